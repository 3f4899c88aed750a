"""Carrying out the planner's actions: start, watch, probe and stop service processes.

Strategy: every decision is ``core.plan.plan``'s; the ``Runner`` keeps one ``Instance`` per
started process and executes actions. Starting is synchronous and fast (fork/exec), so every
service whose dependencies are met starts in the same round; stopping takes up to the grace
period, so each stop runs as its own task and the instance shows ``stopping`` meanwhile. Per
instance, two tasks feed observations back: a watcher that waits for the process to exit, and
a prober that runs the health check. Each observation calls ``wake`` and the engine plans
again.

What it does not guarantee: exit codes of processes adopted from a previous agent (they are
not our children; the kernel gives their status to init).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import anyio
import anyio.abc

from devmesh.agent import launch as launch_mod
from devmesh.agent.instance import Instance
from devmesh.core import health as health_core
from devmesh.core import model, plan
from devmesh.supervisor import ports, probes, process

log = logging.getLogger("devmesh.agent")

RESET_AFTER_S = 10.0
"""A process that stayed up this long before exiting starts a fresh crash count."""
STARTING_PROBE_CAP_S = 0.2
"""Until a service passes, it is probed at least this often, whatever interval_s: readiness
is then noticed within 0.2 s, which is what `up -d` waits on. Failures still count only once
per interval_s (``core.health``)."""


class StartError(Exception):
    """A start that cannot happen (its port is held); the instance records it as FAILED."""


class Runner:
    """The processes of every applied project, and the tasks that watch them."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rand: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.rand = rand
        self.wake = wake
        self.instances: dict[plan.Key, Instance] = {}
        self.tg: anyio.abc.TaskGroup | None = None
        self.carried_restarts: dict[plan.Key, int] = {}
        """Restart counts of instances a user restarted (``restart``), for their successor."""

    def execute(
        self,
        actions: tuple[plan.Action, ...],
        launches: Callable[[plan.Key], launch_mod.Launch],
        wants: Mapping[plan.Key, plan.Want],
    ) -> None:
        """Carry out one round's actions; ``launches`` describes the process of a START."""
        for action in actions:
            if action.verb is plan.Verb.START:
                self.start(action.key, action.reason, launches, wants[action.key])
            elif action.verb is plan.Verb.STOP:
                self.begin_stop(action.key, action.reason)
            elif action.verb is plan.Verb.FORGET:
                self.instances.pop(action.key, None)
        if any(a.verb in (plan.Verb.START, plan.Verb.FORGET) for a in actions):
            self.wake()  # a start can unblock a dependent with condition "started"

    def start(
        self,
        key: plan.Key,
        reason: str,
        launches: Callable[[plan.Key], launch_mod.Launch],
        want: plan.Want,
    ) -> None:
        old = self.instances.get(key)
        launch = launches(key)
        inst = Instance(
            key=key,
            phase=plan.Phase.FAILED,
            service=launch.service,
            port=launch.port,
            urls=launch.urls,
            fingerprint=want.fingerprint,
            deps=tuple(dep for dep, _ in want.deps),
            failures=old.failures if old and old.fingerprint == want.fingerprint else 0,
            restarts=old.restarts + 1 if old else self.carried_restarts.pop(key, 0),
        )
        self.instances[key] = inst
        try:
            if launch.spawn is None:
                raise StartError(launch.error or "cannot describe the process")
            if launch.port is not None:
                owner = ports.check_free(launch.port)
                if owner is not None:
                    raise StartError(self.port_message(launch.port, owner))
            inst.proc = process.spawn(launch.spawn)
        except (StartError, process.SpawnError) as exc:
            inst.reason = str(exc)
            log.warning("%s: cannot start: %s", plan.key_text(key), exc)
            return
        inst.phase = plan.Phase.RUNNING
        if inst.health_kind is not model.HealthKind.NONE:
            inst.tracker = health_core.start(launch.service.effective_health, self.clock())
        log.info("%s: started pid %d (%s)", plan.key_text(key), inst.proc.pid, reason)
        self.watch(inst, launch)

    def port_message(self, port: int, owner: ports.PortOwner) -> str:
        """Who holds ``port``, naming the devmesh service when it is one of ours."""
        for inst in self.instances.values():
            if (
                inst.proc
                and owner.pid is not None
                and owner.pid in process.session_pids(inst.proc.sid)
            ):
                return f"port {port} is already in use by devmesh service {plan.key_text(inst.key)}"
        who = f" by pid {owner.pid} ({owner.name})" if owner.pid else ""
        return f"port {port} is already in use{who}"

    def watch(self, inst: Instance, launch: launch_mod.Launch | None) -> None:
        """Start the exit watcher and, when the service has a check, the prober."""
        assert self.tg is not None and inst.proc is not None
        self.tg.start_soon(self._wait_exit, inst, inst.scope())
        if launch is not None and inst.health_kind is not model.HealthKind.NONE:
            self.tg.start_soon(self._probe_loop, inst, launch, inst.scope())

    async def _wait_exit(self, inst: Instance, scope: anyio.CancelScope) -> None:
        assert inst.proc is not None
        with scope:
            exit_ = await process.wait(inst.proc)
            if inst.phase is not plan.Phase.RUNNING:
                return
            now = self.clock()
            ran_s = now - inst.proc.started_at
            inst.failures = 1 if ran_s >= RESET_AFTER_S else inst.failures + 1
            inst.exit = exit_
            inst.exited_at = now
            inst.phase = plan.Phase.EXITED
            inst.retry_at = plan.retry_deadline(
                exited_at=now,
                failures=inst.failures,
                backoff_s=inst.service.restart.backoff_s,
                jitter=self.rand(),
            )
            log.warning("%s: %s", plan.key_text(inst.key), exit_.describe())
            # Children the service left behind in its session go with it.
            with anyio.CancelScope(shield=True):
                await process.stop(inst.proc, signal="SIGKILL", grace_s=0)
            self.wake()

    async def _probe_loop(
        self, inst: Instance, launch: launch_mod.Launch, scope: anyio.CancelScope
    ) -> None:
        check = launch.check
        spawn = launch.spawn
        assert spawn is not None, "only a spawned process is probed"
        delay = 0.05
        with scope:
            while inst.phase is plan.Phase.RUNNING and inst.tracker is not None:
                result = await probes.probe(
                    check,
                    port=inst.port,
                    cwd=spawn.cwd,
                    env=spawn.env,
                    scheme=inst.service.scheme.value,
                )
                before = inst.tracker
                inst.tracker = health_core.step(
                    inst.tracker, result.ok, self.clock(), result.detail
                )
                if inst.tracker.failures > before.failures:
                    log.info(
                        "%s: health check failed (%d of %d counted): %s",
                        plan.key_text(inst.key),
                        inst.tracker.failures,
                        inst.tracker.retries,
                        result.detail,
                    )
                if inst.tracker.state != before.state:
                    state = inst.tracker.state.value
                    log.info("%s: %s (%s)", plan.key_text(inst.key), state, result.detail)
                    self.wake()
                if inst.tracker.state is health_core.HealthState.HEALTHY and result.ok:
                    delay = check.interval_s
                else:
                    # Probe fast while not passing, so `up -d` returns soon after readiness;
                    # the tracker counts failures only at the pace of interval_s.
                    delay = min(check.interval_s, STARTING_PROBE_CAP_S, delay * 1.5)
                await anyio.sleep(delay)

    def restart(self, key: plan.Key, reason: str) -> None:
        """Stop ``key``'s process (or forget its exited one) so the next round starts it
        afresh: a restart the user asked for, counted in ``restarts``."""
        inst = self.instances[key]
        self.carried_restarts[key] = inst.restarts + 1
        if inst.phase is plan.Phase.RUNNING:
            self.begin_stop(key, reason)
        else:
            del self.instances[key]
            self.wake()

    def begin_stop(self, key: plan.Key, reason: str) -> None:
        inst = self.instances[key]
        inst.phase = plan.Phase.STOPPING
        log.info("%s: stopping (%s)", plan.key_text(key), reason)
        assert self.tg is not None
        self.tg.start_soon(self._stop, inst)

    async def _stop(self, inst: Instance) -> None:
        inst.cancel_tasks()
        if inst.proc is not None:
            # Stop it the way it was started: the service it runs, not a newer spec.
            stop = inst.service.stop
            with anyio.CancelScope(shield=True):
                await process.stop(inst.proc, signal=stop.signal, grace_s=stop.grace_s)
        if self.instances.get(inst.key) is inst:
            del self.instances[inst.key]
        self.wake()

    def longest_grace_s(self) -> float:
        return max((i.service.stop.grace_s for i in self.instances.values()), default=0.0)

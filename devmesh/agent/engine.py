"""The reconciler loop: observe, plan, execute, sleep until something changes.

Strategy: every decision is ``core.plan.plan``'s; this module only keeps the facts the
planner needs (one ``Instance`` per started process) and carries out actions. Starting is
synchronous and fast (fork/exec), so every service whose dependencies are met starts in the
same round; stopping takes up to the grace period, so each stop runs as its own task and the
instance shows ``stopping`` meanwhile. Per instance, two tasks feed observations back:
a watcher that waits for the process to exit, and a prober that runs the health check.
Each observation sets ``_wake`` and the loop plans again.

What it does not guarantee: exit codes of processes adopted from a previous agent (they are
not our children; the kernel gives their status to init), nor log rotation while no agent
runs (rotation is copy-and-truncate from here).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from devmesh.agent import state as state_mod
from devmesh.agent.paths import Home
from devmesh.core import desired, model, plan
from devmesh.core import health as health_core
from devmesh.proxy import routesfile, server, table
from devmesh.supervisor import logs, ports, probes, process

log = logging.getLogger("devmesh.agent")

RESET_AFTER_S = 10.0
"""A process that stayed up this long before exiting starts a fresh crash count."""
ROTATE_EVERY_S = 5.0
LOG_MAX_BYTES = 10 * 2**20
STARTING_PROBE_CAP_S = 0.2
"""Until a service is first healthy it is probed at least this often, whatever interval_s:
readiness is then noticed within 0.2 s, which is what `up -d` waits on."""


@dataclass(slots=True, kw_only=True)
class Instance:
    key: plan.Key
    phase: plan.Phase
    fingerprint: str
    spec: dict[str, Any]
    deps: tuple[plan.Key, ...]
    port: int | None
    proc: process.Proc | None = None
    health_kind: model.HealthKind = model.HealthKind.NONE
    tracker: health_core.HealthTracker | None = None
    exit: process.Exit | None = None
    exited_at: float | None = None
    failures: int = 0
    restarts: int = 0
    retry_at: float | None = None
    reason: str | None = None
    scopes: list[anyio.CancelScope] = field(default_factory=list)
    """One per watcher task (exit waiter, prober); cancelled together on stop."""

    def scope(self) -> anyio.CancelScope:
        s = anyio.CancelScope()
        self.scopes.append(s)
        return s

    def cancel_tasks(self) -> None:
        for s in self.scopes:
            s.cancel()

    def health(self) -> plan.Health:
        if self.health_kind is model.HealthKind.NONE or self.tracker is None:
            return plan.Health.NONE
        return plan.Health(self.tracker.state.value)

    def seen(self) -> plan.Seen:
        exit_failed = bool(self.exit and (self.exit.signal is not None or self.exit.code != 0))
        return plan.Seen(
            key=self.key,
            phase=self.phase,
            fingerprint=self.fingerprint,
            spec=self.spec,
            deps=self.deps,
            health=self.health(),
            health_detail=self.tracker.last_detail if self.tracker else None,
            exit_failed=exit_failed,
            exit_text=self.exit.describe() if self.exit else None,
            failures=self.failures,
            retry_at=self.retry_at,
            reason=self.reason,
        )


class Engine:
    """Owns the applied projects and the processes; the control API calls into it."""

    def __init__(
        self,
        home: Home,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        proxy: server.ProxyServer | None = None,
    ) -> None:
        self.home = home
        self.proxy = proxy
        self.routes = table.RouteTable()
        """What the proxy routes by; replaced (never mutated) after each round."""
        self.route_file: Path | None = None
        """Where the routes and edge ports are published for proxy worker processes after
        each round; None when the agent runs no workers."""
        self.clock = clock
        self.rand = rand
        self.state = state_mod.State()
        self.models: dict[str, model.Project] = {}
        self.instances: dict[plan.Key, Instance] = {}
        self.last_plan = plan.Plan(actions=(), wake_at=None)
        self.started_at = clock()
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self.generation = 0
        """Count of finished reconcile rounds; lets a waiter notice a round it did not await."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._saved: bytes | None = None

    # ---------------------------------------------------------------- lifecycle

    def load_state(self) -> str | None:
        """Read the registry and adopt what still runs; returns a warning to log, if any."""
        warning = None
        try:
            self.state = state_mod.load(self.home.state)
        except state_mod.StateError as exc:
            warning = str(exc)
            self.state = state_mod.State()
        for name, rec in list(self.state.projects.items()):
            try:
                self.models[name] = self._model(rec)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("dropping project %s from the registry: %s", name, exc)
                del self.state.projects[name]
        return warning

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._adopt()
            tg.start_soon(self._rotate_logs)
            task_status.started()
            while True:
                await self._sync_edges()
                self._reconcile()
                self._publish_routes()
                self._save()
                self.generation += 1
                self._changed.set()
                self._changed = anyio.Event()
                wake_at = self.last_plan.wake_at
                timeout = math.inf if wake_at is None else max(0.0, wake_at - self.clock())
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def shutdown(self) -> None:
        """Stop every service (dependents first) and forget them: SIGTERM leaves no orphans."""
        for name in list(self.state.projects):
            del self.state.projects[name]
        self.models.clear()
        self.wake()
        with anyio.move_on_after(max(self._longest_grace() + 5, 10)):
            while self.instances:
                generation = self.generation
                await self.changed(generation)
        self._save()

    def wake(self) -> None:
        self._wake.set()

    async def changed(self, since: int | None = None) -> None:
        """Wait for the end of a reconcile round after generation ``since`` (default: now)."""
        if since is None or since == self.generation:
            await self._changed.wait()

    # ---------------------------------------------------------------- desired state

    def _model(self, rec: state_mod.ProjectRecord) -> model.Project:
        return model.from_document(
            rec.document, directory=rec.directory, default_name=rec.name, source=rec.source
        )

    def urls(
        self, project: model.Project, rec: state_mod.ProjectRecord, svc: model.Service
    ) -> dict[str, str]:
        """The service's NAME_URLs: its proxy edge listeners, else direct ports or fallbacks."""
        prefix = f"{svc.name}->"
        edges = {k[len(prefix) :]: v for k, v in rec.edges.items() if k.startswith(prefix)}
        return desired.dependency_urls(project, svc, rec.ports, edges)

    def urls_for(
        self, project: model.Project, rec: state_mod.ProjectRecord
    ) -> dict[str, dict[str, str]]:
        return {name: self.urls(project, rec, s) for name, s in project.services.items()}

    def wants(
        self, overrides: dict[str, state_mod.ProjectRecord | None] | None = None
    ) -> dict[plan.Key, plan.Want]:
        """What every applied project asks for; ``overrides`` lets a dry run swap one in."""
        records = dict(self.state.projects)
        for name, rec in (overrides or {}).items():
            if rec is None:
                records.pop(name, None)
            else:
                records[name] = rec
        out: dict[plan.Key, plan.Want] = {}
        for name, rec in records.items():
            proj = self.models[name] if rec is self.state.projects.get(name) else self._model(rec)
            out.update(desired.wants_for(proj, rec.enabled, rec.ports, self.urls_for(proj, rec)))
        return out

    def seen(self) -> dict[plan.Key, plan.Seen]:
        return {k: i.seen() for k, i in self.instances.items()}

    def apply(self, rec: state_mod.ProjectRecord, proj: model.Project) -> None:
        self.state.projects[rec.name] = rec
        self.models[rec.name] = proj
        # `up` is the user asking again: services that failed to start or gave up after
        # crashing get a fresh start (and crash count), as `docker compose up` would do.
        for key, inst in list(self.instances.items()):
            if key[0] == rec.name and inst.phase in (plan.Phase.FAILED, plan.Phase.EXITED):
                del self.instances[key]
        self.wake()

    def remove(self, project: str, services: list[str] | None) -> None:
        rec = self.state.projects.get(project)
        if rec is None:
            return
        if services is None:
            del self.state.projects[project]
            self.models.pop(project, None)
        else:
            rec.enabled = [s for s in rec.enabled if s not in services]
        self.wake()

    # ---------------------------------------------------------------- proxy

    async def _sync_edges(self) -> None:
        """One proxy listener per local dependency edge, on the port it had before if free."""
        if self.proxy is None:
            return
        wanted: dict[table.Edge, int | None] = {}
        for name, rec in self.state.projects.items():
            for caller, target in desired.local_edges(self.models[name], rec.enabled):
                edge = table.Edge(caller_project=name, caller_service=caller, target_service=target)
                wanted[edge] = rec.edges.get(f"{caller}->{target}")
        bound = await self.proxy.set_edges(wanted)
        for name, rec in self.state.projects.items():
            rec.edges = {
                f"{e.caller_service}->{e.target_service}": port
                for e, port in bound.items()
                if e.caller_project == name
            }

    def _publish_routes(self) -> None:
        backends: list[table.Backend] = []
        for key, want in self.wants().items():
            inst = self.instances.get(key)
            port = inst.port if inst else want.spec.get("port")
            if not isinstance(port, int):
                continue
            scheme = str(want.spec.get("scheme", "http"))
            backends.append(
                table.Backend(
                    project=key[0],
                    service=key[1],
                    port=port,
                    scheme=scheme,
                    state=_route_state(inst),
                    reason=_route_reason(inst, self.actions_for(key)),
                )
            )
        listed = {(b.project, b.service) for b in backends}
        for name, rec in self.state.projects.items():
            for svc_name, svc in self.models[name].services.items():
                if not svc.runs_here or (name, svc_name) in listed:
                    continue
                backends.append(
                    table.Backend(
                        project=name,
                        service=svc_name,
                        port=svc.port or rec.ports.get(svc_name) or 0,
                        state=table.State.STOPPED.value,
                        reason=f"not started (`devmesh up {svc_name}` starts it)",
                    )
                )
        self.routes = table.RouteTable(tuple(backends))
        self.publish_route_file()

    def publish_route_file(self) -> None:
        """Hand the routes and the bound edge ports to the proxy workers (they poll the file).

        Written only when its content changed, so a round that changed nothing the proxy
        sees costs the workers nothing. A write failure is logged: the workers keep serving
        the previous table and the agent's own proxy is current anyway.
        """
        if self.route_file is None or self.proxy is None:
            return
        try:
            routesfile.write(self.route_file, self.routes, self.proxy.edge_ports())
        except OSError as exc:
            log.warning("cannot publish the routes to the proxy workers: %s", exc)

    # ---------------------------------------------------------------- reconcile

    def _reconcile(self) -> None:
        now = self.clock()
        self.last_plan = plan.plan(self.wants(), self.seen(), now)
        for action in self.last_plan.actions:
            if action.verb is plan.Verb.START:
                self._start(action.key, action.reason)
            elif action.verb is plan.Verb.STOP:
                self._begin_stop(action.key, action.reason)
            elif action.verb is plan.Verb.FORGET:
                self.instances.pop(action.key, None)
        if any(a.verb in (plan.Verb.START, plan.Verb.FORGET) for a in self.last_plan.actions):
            self.wake()  # a start can unblock a dependent with condition "started"

    def _start(self, key: plan.Key, reason: str) -> None:
        project_name, name = key
        rec = self.state.projects[project_name]
        proj = self.models[project_name]
        svc = proj.services[name]
        port = svc.port if svc.port is not None else rec.ports.get(name)
        urls = self.urls(proj, rec, svc)
        spec = desired.instance_spec(svc, port=port, urls=urls)
        old = self.instances.get(key)
        inst = Instance(
            key=key,
            phase=plan.Phase.FAILED,
            fingerprint=desired.fingerprint(spec),
            spec=spec,
            deps=tuple((project_name, d.name) for d in svc.depends_on if d.name in proj.services),
            port=port,
            health_kind=svc.effective_health.kind,
            failures=old.failures if old and old.fingerprint == desired.fingerprint(spec) else 0,
            restarts=old.restarts + 1 if old else 0,
        )
        self.instances[key] = inst
        try:
            if port is not None:
                owner = ports.check_free(port)
                if owner is not None:
                    raise _StartError(self._port_message(port, owner))
            env = desired.launch_env(rec.base_env, proj, svc, port=port, urls=urls)
            argv = desired.launch_argv(proj, svc, port=port, urls=urls)
            launch = process.Launch(
                argv=argv,
                cwd=svc.cwd or proj.directory,
                env=env,
                log_path=self.home.service_log(project_name, name),
            )
            inst.proc = process.spawn(launch)
        except (_StartError, process.SpawnError, ValueError) as exc:
            inst.reason = str(exc)
            log.warning("%s: cannot start: %s", plan.key_text(key), exc)
            return
        inst.phase = plan.Phase.RUNNING
        if inst.health_kind is not model.HealthKind.NONE:
            inst.tracker = health_core.start(svc.effective_health, self.clock())
        log.info("%s: started pid %d (%s)", plan.key_text(key), inst.proc.pid, reason)
        self._watch(inst, svc, launch)

    def _port_message(self, port: int, owner: ports.PortOwner) -> str:
        for inst in self.instances.values():
            if (
                inst.proc
                and owner.pid is not None
                and owner.pid in process.session_pids(inst.proc.sid)
            ):
                return f"port {port} is already in use by devmesh service {plan.key_text(inst.key)}"
        who = f" by pid {owner.pid} ({owner.name})" if owner.pid else ""
        return f"port {port} is already in use{who}"

    def _watch(
        self, inst: Instance, svc: model.Service | None, launch: process.Launch | None
    ) -> None:
        assert self._tg is not None and inst.proc is not None
        self._tg.start_soon(self._wait_exit, inst, inst.scope())
        if svc is not None and launch is not None and inst.health_kind is not model.HealthKind.NONE:
            self._tg.start_soon(self._probe_loop, inst, svc, launch, inst.scope())

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
            rec = self.state.projects.get(inst.key[0])
            svc = self.models[inst.key[0]].services.get(inst.key[1]) if rec else None
            backoff_s = svc.restart.backoff_s if svc else 1.0
            inst.retry_at = plan.retry_deadline(
                exited_at=now, failures=inst.failures, backoff_s=backoff_s, jitter=self.rand()
            )
            log.warning("%s: %s", plan.key_text(inst.key), exit_.describe())
            # Children the service left behind in its session go with it.
            with anyio.CancelScope(shield=True):
                await process.stop(inst.proc, signal="SIGKILL", grace_s=0)
            self.wake()

    async def _probe_loop(
        self, inst: Instance, svc: model.Service, launch: process.Launch, scope: anyio.CancelScope
    ) -> None:
        check = desired.probe_health(svc.effective_health, launch.env)
        delay = 0.05
        with scope:
            while inst.phase is plan.Phase.RUNNING and inst.tracker is not None:
                result = await probes.probe(
                    check, port=inst.port, cwd=launch.cwd, env=launch.env, scheme=svc.scheme.value
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

    def _begin_stop(self, key: plan.Key, reason: str) -> None:
        inst = self.instances[key]
        inst.phase = plan.Phase.STOPPING
        log.info("%s: stopping (%s)", plan.key_text(key), reason)
        assert self._tg is not None
        self._tg.start_soon(self._stop, inst)

    async def _stop(self, inst: Instance) -> None:
        inst.cancel_tasks()
        if inst.proc is not None:
            # Stop it the way it was started: the spec it runs with, not a newer one.
            spec_stop = inst.spec.get("stop") or {}
            sig = str(spec_stop.get("signal", "SIGTERM"))
            grace = float(spec_stop.get("grace_s", 10.0))
            with anyio.CancelScope(shield=True):
                await process.stop(inst.proc, signal=sig, grace_s=grace)
        if self.instances.get(inst.key) is inst:
            del self.instances[inst.key]
        self.wake()

    def service_of(self, key: plan.Key) -> model.Service | None:
        proj = self.models.get(key[0])
        return proj.services.get(key[1]) if proj else None

    def _longest_grace(self) -> float:
        return max(
            (float((i.spec.get("stop") or {}).get("grace_s", 10)) for i in self.instances.values()),
            default=0.0,
        )

    # ---------------------------------------------------------------- persistence / adoption

    def _save(self) -> None:
        procs: dict[str, state_mod.ProcessRecord] = {}
        for key, inst in self.instances.items():
            if inst.proc is None or inst.phase not in (plan.Phase.RUNNING, plan.Phase.STOPPING):
                continue
            procs[plan.key_text(key)] = state_mod.ProcessRecord(
                project=key[0],
                service=key[1],
                pid=inst.proc.pid,
                sid=inst.proc.sid,
                start_ticks=inst.proc.start_ticks,
                started_at=inst.proc.started_at,
                fingerprint=inst.fingerprint,
                spec=inst.spec,
                deps=[plan.key_text(d) for d in inst.deps],
                port=inst.port,
                restarts=inst.restarts,
            )
        self.state.processes = procs
        data = state_mod.encode(self.state)
        if data == self._saved:
            return  # most rounds change only health: no need to fsync the registry again
        self.home.ensure()
        state_mod.save(self.home.state, data)
        self._saved = data

    def _adopt(self) -> None:
        for rec in list(self.state.processes.values()):
            key = (rec.project, rec.service)
            proc = process.adopt(rec.pid, rec.start_ticks)
            if proc is None:
                log.info("%s: pid %d is gone; cleaning up", plan.key_text(key), rec.pid)
                _kill_session_leftovers(rec.sid)
                continue
            svc = self.service_of(key)
            inst = Instance(
                key=key,
                phase=plan.Phase.RUNNING,
                fingerprint=rec.fingerprint,
                spec=rec.spec,
                deps=tuple(tuple(d.split("/", 1)) for d in rec.deps),  # type: ignore[misc]
                port=rec.port,
                proc=proc,
                health_kind=svc.effective_health.kind if svc else model.HealthKind.NONE,
                restarts=rec.restarts,
            )
            if inst.health_kind is not model.HealthKind.NONE:
                inst.tracker = health_core.start(svc.effective_health, proc.started_at)
            self.instances[key] = inst
            log.info("%s: adopted running pid %d", plan.key_text(key), proc.pid)
            launch = None
            if svc is not None:
                rec_p = self.state.projects[key[0]]
                proj = self.models[key[0]]
                urls = self.urls(proj, rec_p, svc)
                launch = process.Launch(
                    argv=tuple(svc.command or ()),
                    cwd=svc.cwd or proj.directory,
                    env=desired.launch_env(rec_p.base_env, proj, svc, port=rec.port, urls=urls),
                    log_path=self.home.service_log(*key),
                )
            self._watch(inst, svc, launch)

    async def _rotate_logs(self) -> None:
        while True:
            await anyio.sleep(ROTATE_EVERY_S)
            for key in list(self.instances):
                with contextlib.suppress(OSError):
                    logs.rotate_if_needed(self.home.service_log(*key), max_bytes=LOG_MAX_BYTES)

    # ---------------------------------------------------------------- views

    def actions_for(self, key: plan.Key) -> Iterator[plan.Action]:
        return (a for a in self.last_plan.actions if a.key == key)


class _StartError(Exception):
    pass


def _route_state(inst: Instance | None) -> str:
    if inst is None or inst.phase in (plan.Phase.FAILED, plan.Phase.STOPPING):
        return table.State.STOPPED.value
    if inst.phase is plan.Phase.EXITED:
        crash = inst.failures > 1
        return (table.State.CRASH_LOOPING if crash else table.State.STOPPED).value
    if inst.health() is plan.Health.STARTING:
        return table.State.STARTING.value
    return table.State.RUNNING.value


def _route_reason(inst: Instance | None, actions: Iterator[plan.Action]) -> str | None:
    if inst is None:
        return next((a.reason for a in actions), "not started")
    if inst.phase is plan.Phase.FAILED:
        return inst.reason
    if inst.phase is plan.Phase.STOPPING:
        return "stopping"
    if inst.phase is plan.Phase.EXITED and inst.exit is not None:
        return inst.exit.describe()
    return None


def _kill_session_leftovers(sid: int) -> None:
    import os
    import signal

    for pid in process.session_pids(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

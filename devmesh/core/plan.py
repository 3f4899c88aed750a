"""The reconciler's decision: what to start, stop, wait for or leave alone, and why.

Strategy: the agent describes the world as two plain maps, ``wants`` (what the applied
projects ask for, one entry per service instance that runs here) and ``seen`` (what the agent
observes of the processes), and calls ``plan(wants, seen, now)``. The result is a list of typed
actions, each with a human reason, plus the next moment worth re-planning at. The function
never performs I/O, never reads a clock and never draws a random number: the agent injects
``now`` and stores the jittered restart deadline in ``Seen.retry_at`` when it observes a crash.
That is what makes ``devmesh plan`` a faithful dry run and the planner testable in microseconds.

Ordering rules live here too:
- a service starts only when each local dependency meets its condition (started or healthy);
  services whose dependencies are met start in the same round, i.e. in parallel;
- a stop waits until running dependents that are being stopped as well have gone
  (dependents first, as in compose);
- a changed service is stopped, then started on a later round; dependents follow only when
  their own fingerprint changes (the agent folds dependency URLs into it).

What it does not guarantee: that an action succeeds. A failed start comes back as
``Phase.FAILED`` in the next ``seen`` and is then held until the configuration changes or
the agent forgets it (the next `up`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devmesh.core import backoff
from devmesh.core.model import Condition, RestartPolicy

Key = tuple[str, str]
"""(project, service): one service instance on this agent."""


def key_text(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class Phase(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    """The process ended on its own (a crash, or a clean exit)."""
    FAILED = "failed"
    """The process could not be started (command not found, port taken...)."""


class Health(enum.Enum):
    NONE = "none"
    """No check: ready as soon as the process runs."""
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Want:
    key: Key
    fingerprint: str
    """Digest of everything that needs a restart when it changes (spec, port, dependency URLs)."""
    spec: Mapping[str, Any]
    """The normalised spec behind the fingerprint; diffed to explain a restart."""
    deps: tuple[tuple[Key, Condition], ...] = ()
    """Dependencies that run on this agent, with the condition to wait for."""
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    max_retries: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    key: Key
    phase: Phase
    fingerprint: str | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)
    deps: tuple[Key, ...] = ()
    """Dependencies of the instance as it was started, for stop ordering."""
    health: Health = Health.NONE
    health_detail: str | None = None
    exit_failed: bool = False
    """True for a non-zero exit or a signal."""
    exit_text: str | None = None
    failures: int = 0
    """Consecutive crashes; reset by the agent once the service stayed up long enough."""
    retry_at: float | None = None
    reason: str | None = None
    """Why a FAILED start failed."""

    @property
    def ready(self) -> bool:
        return self.phase is Phase.RUNNING and self.health in (Health.NONE, Health.HEALTHY)


class Verb(enum.Enum):
    START = "start"
    STOP = "stop"
    WAIT = "wait"
    HOLD = "hold"
    """Not started and not retried until the configuration changes or the next `up`."""
    FORGET = "forget"
    """Drop the record of an exited instance that nobody wants any more."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    verb: Verb
    key: Key
    reason: str
    until: float | None = None

    def describe(self) -> str:
        return f"{key_text(self.key)}: {self.verb.value} - {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    actions: tuple[Action, ...]
    wake_at: float | None
    """Earliest deadline at which planning again may produce new actions."""

    def of(self, verb: Verb) -> list[Action]:
        return [a for a in self.actions if a.verb is verb]


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level (and env.NAME) keys that differ, for a readable restart reason."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping) and k in ("env", "dep_urls"):
            out.extend(f"{k}.{sub}" for sub in changed_keys(a, b))
        else:
            out.append(k)
    return out


def _policy_restarts(want: Want, s: Seen) -> bool:
    """Whether the restart policy restarts this kind of exit at all (ignoring max_retries)."""
    if want.restart is RestartPolicy.NO:
        return False
    return not (want.restart is RestartPolicy.ON_FAILURE and not s.exit_failed)


def _restart_wanted(want: Want, s: Seen) -> bool:
    return _policy_restarts(want, s) and (
        want.max_retries is None or s.failures <= want.max_retries
    )


def will_restart(want: Want, s: Seen) -> bool:
    """An exited instance that the policy starts again (now or after its backoff)."""
    return s.phase is Phase.EXITED and _restart_wanted(want, s)


def gave_up(want: Want, s: Seen) -> bool:
    """A bounded policy (``max_retries``) stopped restarting an instance that kept crashing.

    Only this is "crash-looping": with unlimited retries a crashing service is restarting.
    """
    return (
        s.phase is Phase.EXITED
        and _policy_restarts(want, s)
        and want.max_retries is not None
        and s.failures > want.max_retries
    )


def _dep_block(want: Want, wants: Mapping[Key, Want], seen: Mapping[Key, Seen]) -> str | None:
    """Why ``want`` cannot start yet, or None when every dependency meets its condition."""
    waiting: list[str] = []
    for dep, cond in want.deps:
        s = seen.get(dep)
        name = dep[1]
        if s is None:
            waiting.append(f"{name} to start")
        elif s.phase is Phase.FAILED:
            return f"blocked: dependency {name} failed to start ({s.reason})"
        elif s.phase is Phase.EXITED and dep in wants and not _restart_wanted(wants[dep], s):
            return f"blocked: dependency {name} {s.exit_text} and will not be restarted"
        elif s.phase is not Phase.RUNNING:
            waiting.append(f"{name} to run again ({s.exit_text or s.phase.value})")
        elif cond is Condition.HEALTHY and not s.ready:
            detail = f": {s.health_detail}" if s.health_detail else ""
            waiting.append(f"{name} to be healthy (now {s.health.value}{detail})")
    return "waiting for " + ", ".join(waiting) if waiting else None


def plan(wants: Mapping[Key, Want], seen: Mapping[Key, Seen], now: float) -> Plan:
    """Decide the next actions. Pure: same inputs, same plan."""
    actions: list[Action] = []
    wake: list[float] = []

    # Stops: instances nobody wants, dependents before their dependencies.
    unwanted = {k for k in seen if k not in wants}
    for k in sorted(unwanted):
        gone = seen[k]
        if gone.phase in (Phase.EXITED, Phase.FAILED):
            actions.append(Action(verb=Verb.FORGET, key=k, reason="no longer in the project"))
            continue
        if gone.phase is Phase.STOPPING:
            continue
        blockers = [
            o.key[1]
            for o in seen.values()
            if k in o.deps and o.key in unwanted and o.phase in (Phase.RUNNING, Phase.STOPPING)
        ]
        if blockers:
            reason = "stop after its dependents " + ", ".join(sorted(blockers))
            actions.append(Action(verb=Verb.WAIT, key=k, reason=reason))
        else:
            actions.append(Action(verb=Verb.STOP, key=k, reason="no longer wanted"))

    for k, want in wants.items():
        s = seen.get(k)
        if s is not None and s.phase is Phase.STOPPING:
            continue
        if s is not None and s.fingerprint != want.fingerprint and s.phase is Phase.RUNNING:
            what = ", ".join(changed_keys(s.spec, want.spec)) or "configuration"
            actions.append(Action(verb=Verb.STOP, key=k, reason=f"restart: {what} changed"))
            continue
        if s is not None and s.phase is Phase.RUNNING:
            continue
        if s is not None and s.fingerprint == want.fingerprint:
            if s.phase is Phase.FAILED:
                actions.append(Action(verb=Verb.HOLD, key=k, reason=s.reason or "failed"))
                continue
            if not _restart_wanted(want, s):
                actions.append(Action(verb=Verb.HOLD, key=k, reason=_gave_up(want, s)))
                continue
            if s.retry_at is not None and now < s.retry_at:
                reason = (
                    f"restarting: attempt {s.failures}, next try in {s.retry_at - now:.1f} s "
                    f"(it {s.exit_text})"
                )
                actions.append(Action(verb=Verb.WAIT, key=k, reason=reason, until=s.retry_at))
                wake.append(s.retry_at)
                continue
        block = _dep_block(want, wants, seen)
        if block is not None:
            verb = Verb.HOLD if block.startswith("blocked") else Verb.WAIT
            actions.append(Action(verb=verb, key=k, reason=block))
            continue
        if s is None:
            reason = "not running"
        elif s.fingerprint != want.fingerprint:
            reason = "configuration changed"
        else:
            reason = f"restart after it {s.exit_text} (attempt {s.failures})"
        actions.append(Action(verb=Verb.START, key=k, reason=reason))

    return Plan(actions=tuple(actions), wake_at=min(wake) if wake else None)


def _gave_up(want: Want, s: Seen) -> str:
    if want.restart is RestartPolicy.NO:
        return f"{s.exit_text}; restart policy is no"
    if want.restart is RestartPolicy.ON_FAILURE and not s.exit_failed:
        return f"{s.exit_text}; restart policy on-failure does not restart a clean exit"
    return f"{s.exit_text}; gave up after {want.max_retries} restarts"


def retry_deadline(*, exited_at: float, failures: int, backoff_s: float, jitter: float) -> float:
    """When the next restart may happen; ``jitter`` in [0, 1) comes from the agent's RNG."""
    return exited_at + backoff.delay(failures, base_s=backoff_s, jitter=jitter)


def closure(deps: Mapping[str, Iterable[str]], roots: Iterable[str]) -> set[str]:
    """The roots and everything they depend on, transitively."""
    out: set[str] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo.extend(deps.get(n, ()))
    return out

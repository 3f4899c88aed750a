"""One started (or failed-to-start) service process and what the agent observed of it.

Why it exists: the planner reasons about ``plan.Seen`` facts; the agent keeps the richer,
mutable record behind them (the process, its health tracker, its watcher tasks). The service
an instance runs is the config model's typed ``model.Service`` as it was when the process
started, with the port and dependency URLs it was given: a newer configuration is a reason to
restart it, never a change to how the running process is probed or stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from devmesh.core import desired, model, plan
from devmesh.core import health as health_core
from devmesh.supervisor import process


@dataclass(slots=True, kw_only=True)
class Instance:
    key: plan.Key
    phase: plan.Phase
    service: model.Service
    """The service as started (port and URLs aside); stop and probes follow it."""
    port: int | None
    urls: Mapping[str, str]
    """Dependency name -> URL the process was given."""
    fingerprint: str
    deps: tuple[plan.Key, ...]
    proc: process.Proc | None = None
    tracker: health_core.HealthTracker | None = None
    exit: process.Exit | None = None
    exited_at: float | None = None
    failures: int = 0
    restarts: int = 0
    retry_at: float | None = None
    reason: str | None = None
    scopes: list[anyio.CancelScope] = field(default_factory=list)
    """One per watcher task (exit waiter, prober); cancelled together on stop."""

    @property
    def spec(self) -> dict[str, Any]:
        """The normalised spec behind the fingerprint (diffed to explain a restart)."""
        return desired.instance_spec(self.service, port=self.port, urls=self.urls)

    @property
    def health_kind(self) -> model.HealthKind:
        return self.service.effective_health.kind

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

"""Readiness bookkeeping: what a stream of probe results means for a service.

Why it exists: the supervisor only runs one probe and says pass or fail; whether that makes
the service healthy, still starting or unhealthy depends on history (retries, the start
period) and on time. Keeping that decision here, over plain floats, lets it be tested as a
table without processes or clocks, and keeps the agent's loop a thin driver:
``tracker = health.step(tracker, ok=result.ok, now=clock(), detail=result.detail)``.

Semantics (those of docker's HEALTHCHECK, which users already know):

- a service starts ``starting``; one passing probe makes it ``healthy`` at once;
- during ``start_period_s`` after start, failures do not count, unless the service has
  already been healthy once (then the grace is over);
- ``retries`` consecutive counted failures make it ``unhealthy``; any pass resets the count;
- an unhealthy service that passes again is healthy again.

What it does not decide: when to probe next (``interval_s``) or what to do with an unhealthy
service (restart or not): both belong to the reconciler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from devmesh.core import model


class HealthState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthTracker:
    started_at: float
    """When the process started (same clock as ``now`` in ``step``), in seconds."""
    retries: int = 3
    """Consecutive counted failures that make the service unhealthy (at least 1)."""
    start_period_s: float = 10.0
    """Seconds after ``started_at`` during which failures do not count."""
    state: HealthState = HealthState.STARTING
    failures: int = 0
    """Consecutive failures counted against ``retries``."""
    ever_healthy: bool = False
    """Once true, the start period no longer shields failures."""
    last_detail: str = ""
    """What the last probe said, for status and the dashboard."""
    last_probe_at: float | None = None
    """When the last probe result was recorded, in seconds; None before the first."""


def start(health: model.Health, now: float) -> HealthTracker:
    """A tracker for a process that started at ``now``."""
    return HealthTracker(
        started_at=now, retries=health.retries, start_period_s=health.start_period_s
    )


def in_start_period(tracker: HealthTracker, now: float) -> bool:
    return not tracker.ever_healthy and now - tracker.started_at < tracker.start_period_s


def step(tracker: HealthTracker, ok: bool, now: float, detail: str = "") -> HealthTracker:
    """The tracker after one probe result observed at ``now``."""
    if ok:
        return replace(
            tracker,
            state=HealthState.HEALTHY,
            failures=0,
            ever_healthy=True,
            last_detail=detail,
            last_probe_at=now,
        )
    if in_start_period(tracker, now):
        return replace(tracker, last_detail=detail, last_probe_at=now)
    failures = tracker.failures + 1
    state = HealthState.UNHEALTHY if failures >= max(tracker.retries, 1) else tracker.state
    return replace(tracker, state=state, failures=failures, last_detail=detail, last_probe_at=now)

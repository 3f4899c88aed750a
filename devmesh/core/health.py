"""Readiness bookkeeping: what a stream of probe results means for a service.

Why it exists: the supervisor only runs one probe and says pass or fail; whether that makes
the service healthy, still starting or unhealthy depends on history (retries, the start
period) and on time. Keeping that decision here, over plain floats, lets it be tested as a
table without processes or clocks, and keeps the agent's loop a thin driver:
``tracker = health.step(tracker, ok=result.ok, now=clock(), detail=result.detail)``.

Semantics (those of docker's HEALTHCHECK with its start_period/start_interval, which users
already know):

- a service starts ``starting``; one passing probe makes it ``healthy`` at once, so the agent
  may probe a starting service as often as it likes to notice readiness early;
- a failure *counts* against ``retries`` only at the pace the user set: never inside
  ``start_period_s``, the first one no earlier than ``interval_s`` after the start period,
  each next one no earlier than ``interval_s`` after the previous counted one. Failures in
  between are recorded (``last_detail``, ``probes``) but not counted. So
  ``{interval_s: 4, retries: 3, start_period_s: 0}`` on a service that always fails is
  unhealthy after about 12 s however often it is probed, as under docker;
- once the service has been healthy, the start period is over: the next failure counts at
  once, later ones again no faster than one per ``interval_s``;
- ``retries`` counted failures in a row make it ``unhealthy``; any pass resets the count;
- an unhealthy service that passes again is healthy again.

What it does not decide: when to probe next or what to do with an unhealthy service
(restart or not): both belong to the reconciler.
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
    interval_s: float = 1.0
    """Least time between two failures that count against ``retries``, in seconds."""
    retries: int = 3
    """Counted failures in a row that make the service unhealthy (at least 1)."""
    start_period_s: float = 10.0
    """Seconds after ``started_at`` during which failures do not count."""
    state: HealthState = HealthState.STARTING
    failures: int = 0
    """Failures in a row counted against ``retries``."""
    probes: int = 0
    """Probe results recorded since start, counted or not (for status)."""
    ever_healthy: bool = False
    """Once true, the start period no longer shields failures."""
    last_detail: str = ""
    """What the last probe said, for status and the dashboard."""
    last_probe_at: float | None = None
    """When the last probe result was recorded, in seconds; None before the first."""
    last_counted_at: float | None = None
    """When the last counted failure was recorded; None after a pass or before any."""


def start(health: model.Health, now: float) -> HealthTracker:
    """A tracker for a process that started at ``now``."""
    return HealthTracker(
        started_at=now,
        interval_s=health.interval_s,
        retries=health.retries,
        start_period_s=health.start_period_s,
    )


def counts_from(tracker: HealthTracker) -> float:
    """The earliest moment at which a failing probe counts against ``retries``."""
    if tracker.last_counted_at is not None:
        return tracker.last_counted_at + tracker.interval_s
    if tracker.ever_healthy:
        return float("-inf")
    return tracker.started_at + tracker.start_period_s + tracker.interval_s


def step(tracker: HealthTracker, ok: bool, now: float, detail: str = "") -> HealthTracker:
    """The tracker after one probe result observed at ``now``."""
    probes = tracker.probes + 1
    if ok:
        return replace(
            tracker,
            state=HealthState.HEALTHY,
            failures=0,
            probes=probes,
            ever_healthy=True,
            last_detail=detail,
            last_probe_at=now,
            last_counted_at=None,
        )
    if now < counts_from(tracker):
        return replace(tracker, probes=probes, last_detail=detail, last_probe_at=now)
    failures = tracker.failures + 1
    state = HealthState.UNHEALTHY if failures >= max(tracker.retries, 1) else tracker.state
    return replace(
        tracker,
        state=state,
        failures=failures,
        probes=probes,
        last_detail=detail,
        last_probe_at=now,
        last_counted_at=now,
    )

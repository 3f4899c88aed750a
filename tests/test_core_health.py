"""HealthTracker as a table: probe results at injected times -> states."""

from __future__ import annotations

import pytest

from devmesh.core import health, model

S = health.HealthState


def _run(events: list[tuple[float, bool]], *, retries: int = 3, start_period_s: float = 10.0):
    tracker = health.HealthTracker(started_at=100.0, retries=retries, start_period_s=start_period_s)
    states = []
    for now, ok in events:
        tracker = health.step(tracker, ok, now, detail=f"probe at {now:g}")
        states.append(tracker.state)
    return tracker, states


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # failures inside the start period do not count
        ([(101, False), (102, False), (103, False), (104, False)], [S.STARTING] * 4),
        # one pass is enough, even inside the start period
        ([(101, False), (102, True)], [S.STARTING, S.HEALTHY]),
        # after the start period, `retries` consecutive failures make it unhealthy
        (
            [(109, False), (110, False), (111, False), (112, False)],
            [S.STARTING, S.STARTING, S.STARTING, S.UNHEALTHY],
        ),
        # once healthy, the start period no longer shields failures
        (
            [(101, True), (102, False), (103, False), (104, False)],
            [S.HEALTHY, S.HEALTHY, S.HEALTHY, S.UNHEALTHY],
        ),
        # a pass resets the count
        (
            [(101, True), (102, False), (103, False), (104, True), (105, False), (106, False)],
            [S.HEALTHY] * 6,
        ),
        # an unhealthy service recovers with one pass
        (
            [(120, False), (121, False), (122, False), (123, True)],
            [S.STARTING, S.STARTING, S.UNHEALTHY, S.HEALTHY],
        ),
        # stays unhealthy while failing
        (
            [(120, False), (121, False), (122, False), (123, False)],
            [S.STARTING] * 2 + [S.UNHEALTHY] * 2,
        ),
    ],
)
def test_transitions(events, expected):
    _, states = _run(events)
    assert states == expected


def test_failure_count_and_last_detail():
    tracker, _ = _run([(101, True), (102, False), (103, False)])
    assert tracker.failures == 2
    assert tracker.last_detail == "probe at 103"
    assert tracker.last_probe_at == 103
    assert tracker.ever_healthy


def test_retries_of_one_and_zero_start_period():
    _, states = _run([(100, False)], retries=1, start_period_s=0)
    assert states == [S.UNHEALTHY]
    _, states = _run([(100, False)], retries=0, start_period_s=0)
    assert states == [S.UNHEALTHY]


def test_start_uses_the_health_settings():
    h = model.Health(kind=model.HealthKind.TCP, retries=5, start_period_s=2.5)
    tracker = health.start(h, now=7.0)
    assert tracker == health.HealthTracker(started_at=7.0, retries=5, start_period_s=2.5)
    assert tracker.state is S.STARTING
    assert health.in_start_period(tracker, 9.4)
    assert not health.in_start_period(tracker, 9.5)

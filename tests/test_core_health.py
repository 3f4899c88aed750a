"""HealthTracker as a table: probe results at injected times -> states and counted failures."""

from __future__ import annotations

import pytest

from devmesh.core import health, model

S = health.HealthState
F, P = False, True


def _run(
    events: list[tuple[float, bool]],
    *,
    interval_s: float = 1.0,
    retries: int = 3,
    start_period_s: float = 10.0,
) -> tuple[health.HealthTracker, list[health.HealthState], list[int]]:
    tracker = health.HealthTracker(
        started_at=100.0, interval_s=interval_s, retries=retries, start_period_s=start_period_s
    )
    states, counted = [], []
    for now, ok in events:
        tracker = health.step(tracker, ok, now, detail=f"probe at {now:g}")
        states.append(tracker.state)
        counted.append(tracker.failures)
    return tracker, states, counted


def _fast(start: float, end: float, every: float = 0.2) -> list[tuple[float, bool]]:
    """Failing probes every ``every`` seconds in [start, end), as the agent runs while starting."""
    n = round((end - start) / every)
    return [(round(start + i * every, 3), F) for i in range(n)]


@pytest.mark.parametrize(
    ("name", "events", "settings", "states", "counted"),
    [
        (
            "failures inside the start period do not count",
            [(101, F), (102, F), (103, F), (104, F)],
            {},
            [S.STARTING] * 4,
            [0, 0, 0, 0],
        ),
        (
            "one pass is enough, even inside the start period",
            [(101, F), (102, P)],
            {},
            [S.STARTING, S.HEALTHY],
            [0, 0],
        ),
        (
            "after the start period, one failure counts per interval",
            [(110.5, F), (111, F), (111.5, F), (112, F), (113, F)],
            {},
            [S.STARTING, S.STARTING, S.STARTING, S.STARTING, S.UNHEALTHY],
            [0, 1, 1, 2, 3],
        ),
        (
            "once healthy, the next failure counts at once, later ones per interval",
            [(101, P), (101.5, F), (102, F), (102.5, F), (103.5, F)],
            {},
            [S.HEALTHY, S.HEALTHY, S.HEALTHY, S.HEALTHY, S.UNHEALTHY],
            [0, 1, 1, 2, 3],
        ),
        (
            "a pass resets the count and the pace",
            [(101, P), (102, F), (103, F), (104, P), (104.1, F), (104.2, F)],
            {},
            [S.HEALTHY] * 6,
            [0, 1, 2, 0, 1, 1],
        ),
        (
            "an unhealthy service recovers with one pass",
            [(111, F), (112, F), (113, F), (113.1, P)],
            {},
            [S.STARTING, S.STARTING, S.UNHEALTHY, S.HEALTHY],
            [1, 2, 3, 0],
        ),
        (
            "stays unhealthy while failing",
            [(111, F), (112, F), (113, F), (114, F)],
            {},
            [S.STARTING] * 2 + [S.UNHEALTHY] * 2,
            [1, 2, 3, 4],
        ),
        (
            "retries of one with no start period: unhealthy after one interval",
            [(100, F), (100.9, F), (101, F)],
            {"retries": 1, "start_period_s": 0},
            [S.STARTING, S.STARTING, S.UNHEALTHY],
            [0, 0, 1],
        ),
        (
            "retries of zero behaves as one",
            [(101, F)],
            {"retries": 0, "start_period_s": 0},
            [S.UNHEALTHY],
            [1],
        ),
    ],
)
def test_transitions(name, events, settings, states, counted):
    _, got_states, got_counted = _run(events, **settings)
    assert (got_states, got_counted) == (states, counted), name


def test_fast_probes_of_a_failing_service_count_at_the_users_pace():
    # interval 4, retries 3, no start period, probed every 0.2 s: docker says unhealthy at
    # about 12 s, not after the third fast probe.
    events = [*_fast(100.0, 112.0), (112.0, F)]
    tracker, states, counted = _run(events, interval_s=4, retries=3, start_period_s=0)
    assert S.UNHEALTHY not in states[:-1]
    assert states[-1] is S.UNHEALTHY
    assert counted[-1] == 3
    assert tracker.probes == len(events)
    # failures counted at 104, 108 and 112 only
    firsts = [
        events[i][0] for i in range(len(events)) if counted[i] != (counted[i - 1] if i else 0)
    ]
    assert firsts == [104.0, 108.0, 112.0]


def test_start_period_then_interval():
    # start period 10, interval 4: nothing counts before 114, then 118, 122.
    events = _fast(100.0, 122.2)
    _, states, counted = _run(events, interval_s=4, retries=3, start_period_s=10)
    first_unhealthy = events[states.index(S.UNHEALTHY)][0]
    assert first_unhealthy == 122.0
    assert max(counted) == 3


def test_failure_count_and_last_detail():
    tracker, _, _ = _run([(101, P), (102, F), (103, F)])
    assert tracker.failures == 2
    assert tracker.probes == 3
    assert tracker.last_detail == "probe at 103"
    assert tracker.last_probe_at == 103
    assert tracker.last_counted_at == 103
    assert tracker.ever_healthy


def test_start_uses_the_health_settings():
    h = model.Health(kind=model.HealthKind.TCP, interval_s=3, retries=5, start_period_s=2.5)
    tracker = health.start(h, now=7.0)
    assert tracker == health.HealthTracker(
        started_at=7.0, interval_s=3, retries=5, start_period_s=2.5
    )
    assert tracker.state is S.STARTING
    assert health.counts_from(tracker) == 12.5

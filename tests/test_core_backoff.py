"""Restart delays as a table: failures, base, jitter -> seconds. No clock, no RNG."""

from __future__ import annotations

import pytest

from devmesh.core import backoff


@pytest.mark.parametrize(
    ("failures", "base_s", "jitter", "expected"),
    [
        (0, 1.0, 0.0, 0.0),
        (-3, 1.0, 0.9, 0.0),
        (1, 1.0, 0.0, 1.0),
        (2, 1.0, 0.0, 2.0),
        (3, 1.0, 0.0, 4.0),
        (6, 1.0, 0.0, 32.0),
        (7, 1.0, 0.0, 60.0),
        (1000, 1.0, 0.0, 60.0),
        (1, 0.5, 0.0, 0.5),
        (4, 0.25, 0.0, 2.0),
        (1, 1.0, 0.5, 1.125),
        (1, 2.0, 0.999, 2.0 * (1 + 0.25 * 0.999)),
        (3, 1.0, 1.0, 5.0),
        # jitter outside [0, 1] is clamped, never negative nor beyond +25 %
        (1, 1.0, -5.0, 1.0),
        (1, 1.0, 7.0, 1.25),
        # the jittered value is capped too
        (6, 1.0, 0.99, 32.0 * (1 + 0.25 * 0.99)),
        (7, 1.0, 0.99, 60.0),
        (6, 2.0, 0.0, 60.0),
        (1, 0.0, 0.5, 0.0),
    ],
)
def test_delay(failures, base_s, jitter, expected) -> None:
    assert backoff.delay(failures, base_s=base_s, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("failures", "expected"), [(1, 1.0), (3, 4.0), (4, 5.0), (50, 5.0)])
def test_custom_cap(failures, expected) -> None:
    assert backoff.delay(failures, base_s=1.0, jitter=0.0, cap_s=5.0) == expected


def test_huge_failure_counts_do_not_overflow() -> None:
    assert backoff.delay(10**9, base_s=1.0, jitter=0.3) == backoff.CAP_S


def test_delay_never_decreases_with_more_failures() -> None:
    for jitter in (0.0, 0.5, 0.99):
        delays = [backoff.delay(n, base_s=0.3, jitter=jitter) for n in range(0, 40)]
        assert delays == sorted(delays)
        assert max(delays) == backoff.CAP_S


def test_jitter_stays_within_a_quarter() -> None:
    for n in range(1, 8):
        low = backoff.delay(n, base_s=1.0, jitter=0.0)
        for j in (0.1, 0.5, 0.9999):
            d = backoff.delay(n, base_s=1.0, jitter=j)
            assert low <= d <= min(backoff.CAP_S, low * (1 + backoff.JITTER_FRACTION))

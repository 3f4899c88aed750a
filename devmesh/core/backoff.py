"""Restart delays: exponential backoff with jitter, capped.

Jitter is a parameter rather than a call to ``random`` so the planner stays pure and tests
can pin it; the agent passes ``random.random()``. Full doubling from ``base_s`` with up to
+25 % jitter spreads restarts of services that crashed together (a shared dependency went
away) without making the delay unpredictable for a human watching ``devmesh status``.
"""

from __future__ import annotations

CAP_S = 60.0
"""No restart waits longer than this, however many crashes in a row."""
JITTER_FRACTION = 0.25


def delay(failures: int, *, base_s: float, jitter: float, cap_s: float = CAP_S) -> float:
    """Seconds to wait before restart number ``failures`` (1 for the first crash).

    ``jitter`` is a number in [0, 1); the result grows by up to JITTER_FRACTION of itself.
    """
    if failures < 1:
        return 0.0
    raw = min(cap_s, base_s * 2 ** min(failures - 1, 32))
    return min(cap_s, raw * (1 + JITTER_FRACTION * max(0.0, min(jitter, 1.0))))

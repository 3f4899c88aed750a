"""Two minutes of bench/soak.py's mixed traffic through two agents in namespaces: keep-alive,
fresh connections, HTTPS, WebSocket, server-sent events, a peer hop, and a service SIGKILLed
and restarted every half minute.

Asserted: outcomes. No request failed (the proxy's own 502 while the killed service is down
is not a failure: nothing could answer it, and it is what the proxy is for), but for the one
request of flaky's client thread that a SIGKILL may catch half-answered (the service sent its
head and died before its body: no proxy can complete that answer), at most one per kill and
only as a cut connection; every kind of
traffic was served; and once the traffic stops and no client connection is left, neither
agent holds more open files or asyncio tasks than at the same quiet moment after warm-up.
Memory and speed are the benchmark's to report (bench/soak.py), not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from netkit import NETNS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soak

CUT = ("IncompleteRead", "RemoteDisconnected", "ConnectionResetError")
"""How a request in flight when flaky is SIGKILLed ends: a connection cut, never a wrong answer."""

pytestmark = [
    pytest.mark.slow,
    NETNS,
]


@pytest.mark.timeout(600)
def test_two_minutes_of_mixed_traffic_fail_nothing_and_leak_nothing() -> None:
    with soak.Soak() as s:
        s.run(30.0, kill_every=15.0)  # warm-up: pools, caches, the first restarts
        quiet_alpha, quiet_beta = s.quiet()
        samples = s.run(90.0, kill_every=30.0)
        end_alpha, end_beta = s.quiet()
        restarts = s.alpha.services("shop")["flaky"]["restarts"]
        counts = dict(s.counts)
        kills = s.kills
    failures = {flow: c.errors for flow, c in counts.items() if c.failed and flow != "flaky"}
    assert failures == {}, failures
    flaky = counts["flaky"]
    assert flaky.failed <= kills, (kills, flaky.errors)  # at most the one in flight per kill
    assert all(e.startswith(CUT) for e in flaky.errors), flaky.errors
    assert sum(m.failed for m in samples) <= flaky.failed  # nothing failed in other flows
    assert set(counts) == {"keep-alive", "fresh", "https", "websocket", "sse", "peer hop", "flaky"}
    assert all(c.ok > 0 for c in counts.values()), counts
    assert restarts >= 3  # one kill in the warm-up, two after: the agent restarted each
    assert end_alpha.fds <= quiet_alpha.fds and end_alpha.tasks <= quiet_alpha.tasks, (
        quiet_alpha,
        end_alpha,
    )
    assert end_beta.fds <= quiet_beta.fds and end_beta.tasks <= quiet_beta.tasks, (
        quiet_beta,
        end_beta,
    )

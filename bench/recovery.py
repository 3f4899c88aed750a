"""Benchmark of recovery: how fast calls move when a peer dies, and the restart backoff.

    .venv/bin/python bench/recovery.py [--rounds 3] [--skip-failover]

Why a script and not a test: both figures are times on this machine, under whatever else
runs on it. The tests assert order and outcome (tests/test_mesh_route_failover_netns.py:
no GET fails, each client moves beta -> gamma -> fallback and never back;
tests/test_agent_lifecycle.py: restart N starts no earlier than its backoff); the times are
printed here, as ratios against a baseline measured in the same run.

- **failover** (needs root: network namespaces): the test's three machines and load (four
  keep-alive clients on web's edge in alpha, ``policy.balance: first``, so beta answers
  while it lives). Beta is killed two ways: the machine (every process in its namespace,
  SIGKILL) and only its api process (its agent lives and restarts it). Printed: the time
  from the kill to the first answer from gamma, the slowest GET across the kill, the GETs
  that failed (goal: none), and both times as a ratio to the median GET before the kill.
- **backoff**: a service with ``restart: {policy: always, backoff_s: 0.3}`` that exits at
  once; the gap between run N and run N+1 against the backoff it was due (0.3 s doubling,
  up to +25 % jitter): the ratio should stay in [1, 1.25] plus the agent's overhead, which
  is printed too (gap minus the jitter-free delay).

Everything runs on loopback or inside namespaces the script creates; every load loop is
bounded in count (MAX_PER_CLIENT GETs per client) and time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agentkit import PY, ROUTE_SERVICE, Machines, Mesh
from netkit import have_netns, wait_for
from test_agent_lifecycle import BACKOFF_S, run_times
from test_mesh_route_failover_netns import (
    ALPHA,
    BETA,
    FALLBACK_PORT,
    NAMES,
    PROJECT,
    Load,
    start,
)

RUNS = 5


def failover(kind: str) -> dict[str, Any]:
    """One round: up the three machines, load, kill beta (``machine`` or ``service``)."""
    m = Machines(NAMES)
    try:
        fb = m.agents[ALPHA].root / "fallback.py"
        fb.write_text(ROUTE_SERVICE)
        env = {**os.environ, "PORT": str(FALLBACK_PORT), "NODE": "fallback", "NAME": "fallback"}
        env.pop("DEVMESH_SERVICE", None)
        m.net.run(ALPHA, [PY, str(fb)], env=env, stdout=subprocess.DEVNULL)
        edge = start(m)
        pid = int(m.agents[BETA].services(PROJECT)["api"]["pid"])
        load = Load(m.net.hosts[ALPHA], edge)
        try:
            wait_for("40 answers from beta", lambda: len(load.after(0, "beta")) >= 40)
            killed = time.monotonic()
            if kind == "machine":
                m.kill(BETA)
            else:
                os.kill(pid, signal.SIGKILL)
            wait_for("40 answers from gamma", lambda: len(load.after(killed, "gamma")) >= 40)
        finally:
            load.close()
        answers = load.snapshot()
        before: list[float] = []  # each client's GET times before the kill: the baseline
        slowest = 0.0  # the longest a client waited for a GET answered after the kill
        for client in {a.client for a in answers}:
            mine = [a.done_s for a in answers if a.client == client]
            before += [y - x for x, y in itertools.pairwise(mine) if y <= killed]
            slowest = max([slowest, *(y - x for x, y in itertools.pairwise(mine) if y > killed)])
        per_get = statistics.median(before)
        moved_s = min(a.done_s for a in load.after(killed, "gamma")) - killed
        return {
            "moved_ms": round(moved_s * 1000, 1),
            "slowest_get_ms": round(slowest * 1000, 1),
            "median_get_ms": round(per_get * 1000, 2),
            "failed": sum(1 for a in answers if a.status != 200),
            "gets": len(answers),
        }
    finally:
        m.close()


def backoff() -> list[dict[str, float]]:
    """The gaps between the first RUNS runs of a service that exits at once."""
    mesh = Mesh()
    try:
        times = run_times(mesh, RUNS)
    finally:
        mesh.close()
    out = []
    for n, (a, b) in enumerate(itertools.pairwise(times), start=1):
        due = BACKOFF_S * 2 ** (n - 1)
        out.append(
            {
                "restart": n,
                "due_s": due,
                "gap_s": round(b - a, 3),
                "ratio": round((b - a) / due, 2),
                "overhead_ms": round((b - a - due) * 1000, 1),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="failover rounds per kind")
    ap.add_argument("--skip-failover", action="store_true", help="only the backoff")
    args = ap.parse_args()

    print("restart backoff (policy always, backoff_s 0.3; ratio = gap / backoff due):")
    for row in backoff():
        print("  " + json.dumps(row))

    if args.skip_failover:
        return
    if not have_netns():
        sys.exit("failover needs root and iproute2 (network namespaces); --skip-failover")
    for kind in ("machine", "service"):
        rounds = [failover(kind) for _ in range(args.rounds)]
        for r in rounds:
            print(f"failover, beta's {kind} killed: " + json.dumps(r))
        moved = [r["moved_ms"] for r in rounds]
        base = statistics.median(r["median_get_ms"] for r in rounds)
        print(
            f"  {kind}: calls moved to gamma in median {statistics.median(moved):.0f} ms "
            f"(max {max(moved):.0f} ms) = {statistics.median(moved) / base:.0f}x a median GET "
            f"({base:.1f} ms); failed GETs: {sum(r['failed'] for r in rounds)}"
        )


if __name__ == "__main__":
    main()

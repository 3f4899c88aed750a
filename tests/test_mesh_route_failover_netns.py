"""Failover across machines under steady load: three network-namespace "machines" of one team.

    alpha  web (calls api through its injected API_URL); api declared without a command, with
           a fallback: a plain HTTP server in alpha's namespace
    beta   api 2.3.0, shared
    gamma  api 2.3.0, shared

``policy.balance: first`` sends every call to beta while it lives (node names order equal
candidates), so the moment calls move to gamma is observable. Beta is killed (every process
in its namespace, SIGKILL: the machine dies) while four clients keep GETs in flight; then
gamma. Another test kills only beta's api process, its agent alive. Each test has machines
of its own, since it changes what runs.

What is asserted is order and outcome: no GET fails, and each client's answers come from
beta, then gamma, then the fallback, never back. How fast calls move is a figure, measured
by ``bench/recovery.py`` (the same machines and load), not asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentkit import PY, ROUTE_SERVICE, Machines, Mesh
from netkit import NETNS, NsHTTP, wait_for

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA, GAMMA = 0, 1, 2
NAMES = ["alpha", "beta", "gamma"]
PROJECT = "shop"
FALLBACK_PORT = 18080
"""In alpha's namespace, whose ports are all free."""
CLIENTS = 4
MAX_PER_CLIENT = 400
"""Bound of the load: at most CLIENTS x MAX_PER_CLIENT GETs."""

MESH = (
    "version: 1\nproject: shop\n"
    "mesh:\n  name: team\n  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
)


def owner_yaml(node: str) -> str:
    return MESH + (
        "services:\n"
        f"  api:\n    version: 2.3.0\n    command: {PY} svc.py\n    share: true\n"
        "    health: {http: /healthz, interval_s: 0.5}\n"
        f"    env: {{NODE: {node}}}\n"
    )


def alpha_yaml() -> str:
    return MESH + (
        "policy:\n  balance: first\n"
        "services:\n"
        f"  web:\n    version: 1.0.0\n    command: {PY} svc.py\n    env: {{NODE: alpha}}\n"
        "    depends_on:\n      api: ^2.1\n"
        f"  api:\n    fallback: http://127.0.0.1:{FALLBACK_PORT}\n"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    client: int
    done_s: float
    """time.monotonic() when the answer (or the failure) came."""
    status: int
    node: str | None
    error: str | None = None


class Load:
    """CLIENTS keep-alive clients on web's edge listener, each sending GETs back to back
    until stopped or MAX_PER_CLIENT."""

    def __init__(self, netns: str, port: int) -> None:
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(netns, port, n), daemon=True)
            for n in range(CLIENTS)
        ]
        for t in self.threads:
            t.start()

    def _run(self, netns: str, port: int, client: int) -> None:
        import json

        with NsHTTP(netns, "127.0.0.1", port, timeout_s=15) as c:
            for _ in range(MAX_PER_CLIENT):
                if self.stop.is_set():
                    return
                try:
                    resp = c.request("GET", "/work?ms=10")
                    node = json.loads(resp.body).get("node") if resp.status == 200 else None
                    a = Answer(client=client, done_s=time.monotonic(), status=resp.status, node=node,
                               error=None if resp.status == 200 else resp.body[:300].decode())  # fmt: skip
                except (OSError, ValueError) as exc:
                    a = Answer(client=client, done_s=time.monotonic(), status=0, node=None,
                               error=repr(exc))  # fmt: skip
                with self.lock:
                    self.answers.append(a)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def after(self, t: float, node: str) -> list[Answer]:
        return [a for a in self.snapshot() if a.done_s > t and a.node == node]

    def sequences(self) -> dict[int, list[str | None]]:
        """Each client's answering nodes in the order it got them, repeats collapsed."""
        out: dict[int, list[str | None]] = {}
        for a in self.snapshot():
            seq = out.setdefault(a.client, [])
            if not seq or seq[-1] != a.node:
                seq.append(a.node)
        return out

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    m = Machines(NAMES)
    try:
        fb = tmp_path / "fallback.py"
        fb.write_text(ROUTE_SERVICE)
        env = {**os.environ, "PORT": str(FALLBACK_PORT), "NODE": "fallback", "NAME": "fallback"}
        env.pop("DEVMESH_SERVICE", None)
        m.net.run(ALPHA, [PY, str(fb)], env=env, stdout=subprocess.DEVNULL)
        yield m
    finally:
        m.close()


def start(machines: Machines) -> int:
    """Up the three projects, wait until alpha routes web -> api to beta; web's edge port."""
    files = {"svc.py": ROUTE_SERVICE}
    machines.up(BETA, PROJECT, owner_yaml("beta"), files)
    machines.up(GAMMA, PROJECT, owner_yaml("gamma"), files)
    machines.up(ALPHA, PROJECT, alpha_yaml(), files)
    alpha = machines.agents[0]

    def owners_healthy() -> bool:
        peers = {p["name"]: p for p in alpha.peers()["peers"]}
        return all(
            any(s["name"] == "api" and s["health"] == "healthy" for s in peers[n]["services"])
            for n in ("beta", "gamma")
            if n in peers
        ) and {"beta", "gamma"} <= set(peers)

    alpha.wait_for(owners_healthy, timeout=60, what="api healthy on beta and gamma, seen by alpha")
    alpha.wait_for(lambda: route(alpha).get("node") == "beta", what="web -> api routed to beta")
    return _edge_port(machines)


def route(alpha: Mesh) -> dict[str, Any]:
    rows = alpha.status(PROJECT).get("routes") or []
    return next((r for r in rows if r["caller"] == "web" and r["service"] == "api"), {})


def test_calls_move_to_gamma_then_to_the_fallback_without_a_failed_get(
    machines: Machines,
) -> None:
    alpha = machines.agents[0]
    edge = start(machines)
    load = Load(machines.net.hosts[ALPHA], edge)
    try:
        wait_for("40 answers from beta", lambda: len(load.after(0, "beta")) >= 40)
        killed_beta = time.monotonic()
        machines.kill(BETA)
        wait_for("40 answers from gamma", lambda: len(load.after(killed_beta, "gamma")) >= 40)
        killed_gamma = time.monotonic()
        machines.kill(GAMMA)
        wait_for(
            "the first answer from the fallback after gamma was killed",
            lambda: load.after(killed_gamma, "fallback"),
            timeout_s=10,
        )
        wait_for(
            "20 answers from the fallback", lambda: len(load.after(killed_gamma, "fallback")) >= 20
        )
    finally:
        load.close()
    answers = load.snapshot()
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} GETs failed: {failed[:5]}"
    # Every client moved on in order (beta, gamma, fallback) and never back to a dead node.
    order = ["beta", "gamma", "fallback"]
    for client, seq in load.sequences().items():
        start_at = order.index(str(seq[0]))
        assert seq == order[start_at : start_at + len(seq)], (client, seq)
    alpha.wait_for(
        lambda: route(alpha).get("target") == "fallback", what="web -> api on the fallback"
    )


def _edge_port(machines: Machines) -> int:
    """web's API_URL port (its edge listener), as web itself sees it."""
    alpha = machines.agents[0]
    port = int(alpha.services(PROJECT)["web"]["port"])
    with NsHTTP(machines.net.hosts[ALPHA], "127.0.0.1", port) as c:
        status, env = c.get_json("/env")
    assert status == 200, env
    url = env["API_URL"]
    assert url.startswith("http://127.0.0.1:"), url
    return int(url.rsplit(":", 1)[1].strip("/"))


def test_when_betas_service_dies_but_its_agent_lives_no_get_fails(machines: Machines) -> None:
    # The machine stays; only its api process is killed (its agent will start it again).
    # Calls in flight on beta and those that arrive before beta's agent has noticed must
    # end on gamma, not as beta's own 502.
    edge = start(machines)
    beta = machines.agents[BETA]
    pid = int(beta.services(PROJECT)["api"]["pid"])
    load = Load(machines.net.hosts[ALPHA], edge)
    try:
        wait_for("40 answers from beta", lambda: len(load.after(0, "beta")) >= 40)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for("40 answers from gamma", lambda: len(load.after(killed, "gamma")) >= 40)
    finally:
        load.close()
    answers = load.snapshot()
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} GETs failed: {failed[:5]}"
    # Each client's first answer not from beta came from gamma (beta's api may be back by
    # the end: its agent restarts it, and `balance: first` prefers beta again then).
    for client, seq in load.sequences().items():
        assert [n for n in seq if n != "beta"][:1] in ([], ["gamma"]), (client, seq)
        assert set(seq) <= {"beta", "gamma"}, (client, seq)

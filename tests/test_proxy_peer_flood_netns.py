"""The peer listener under a stranger's flood and a teammate's slow client, across machines.

Three network-namespace "machines" of one team:

    alpha     a teammate: its agent calls ``api`` on beta through its proxy (Host routing)
    beta      shares ``api``; its proxy has short deadlines (header 2 s, keep-alive 1 s), so
              alpha's pooled connections are closed and opened again all the time
    stranger  no agent, no certificate: a script there opens 50 TCP connections a second to
              beta's peer listener for 20 s (bounded in count and time) and never says hello

Asserted: outcomes only. Every call alpha makes while its agent runs is answered 200 (the
agent restarts in the middle of the flood, so it discovers beta again, fetches its catalog
through the flooded listener and opens every connection anew); the stranger's excess was
refused at its address's cap; a teammate's request head sent a byte at a time is cut with
408 while other calls are served.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agentkit import PY, ROUTE_SERVICE, Machines
from netkit import NETNS, NsHTTP, ns_socket

from devmesh.mesh import channel
from devmesh.mesh import identity as ids

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA, STRANGER = 0, 1, 2
MESH_PORT = 7701
FLOOD_RATE = 50
FLOOD_S = 20.0

FLOOD = r"""
import socket, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held, opened, failed = [], 0, 0
start = time.monotonic()
while time.monotonic() - start < seconds and opened + failed < rate * seconds:
    due = start + (opened + failed) / rate
    time.sleep(max(0.0, due - time.monotonic()))
    try:
        s = socket.create_connection((host, port), timeout=2)
        held.append((time.monotonic(), s))
        opened += 1
    except OSError:
        failed += 1
    now = time.monotonic()
    while held and now - held[0][0] > 6.0:  # past the handshake timeout: give the fd back
        held.pop(0)[1].close()
for _, s in held:
    s.close()
print(opened, failed, flush=True)
"""


def yaml(node: str, shared: bool) -> str:
    head = (
        "version: 1\nproject: shop\nmesh:\n  name: team\n"
        f"  port: {MESH_PORT}\n"
        "  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\nservices:\n"
    )
    if not shared:
        return head + "  api: {}\n"
    return head + (
        f"  api:\n    version: 1.0.0\n    command: {PY} svc.py\n    share: true\n"
        "    health: {http: /healthz, interval_s: 0.5}\n"
        f"    env: {{NODE: {node}}}\n"
    )


@pytest.fixture(scope="module")
def machines() -> Iterator[Machines]:
    m = Machines(["alpha", "beta", "stranger"])
    try:
        beta = m.agents[BETA]
        beta.env["DEVMESH_PROXY_HEADER_TIMEOUT_S"] = "2"
        beta.env["DEVMESH_PROXY_KEEPALIVE_TIMEOUT_S"] = "1"
        files = {"svc.py": ROUTE_SERVICE}
        m.up(BETA, "shop", yaml("beta", True), files)
        m.up(ALPHA, "shop", yaml("alpha", False), files)
        wait_api(m)
        yield m
    finally:
        m.close()


def wait_api(m: Machines) -> None:
    """Until alpha holds beta's catalog with a healthy api (discovery, then a fetch)."""

    def seen() -> bool:
        peers = {p["name"]: p for p in m.agents[ALPHA].peers().get("peers", [])}
        beta = peers.get("beta") or {}
        return beta.get("state") == "alive" and any(
            s["name"] == "api" and s["health"] == "healthy" for s in beta.get("services", [])
        )

    m.agents[ALPHA].wait_for(seen, timeout=60, what="beta's api on alpha")


def call(m: Machines, path: str) -> tuple[int, bytes]:
    alpha = m.agents[ALPHA]
    with NsHTTP(m.net.hosts[ALPHA], "127.0.0.1", alpha.proxy_port) as c:
        r = c.request("GET", path, headers={"Host": f"api.localhost:{alpha.proxy_port}"})
        return r.status, r.body


def listener(m: Machines) -> dict[str, Any]:
    proxy = m.agents[BETA].status()["proxy"]
    return proxy["peer_listener"]


class Caller(threading.Thread):
    """Calls api on beta from alpha, ``n`` at a time, until told to stop."""

    def __init__(self, m: Machines, n: int) -> None:
        super().__init__(daemon=True)
        self.m, self.n = m, n
        self.go = threading.Event()
        self.go.set()
        self.stop = threading.Event()
        self.ok = 0
        self.inflight = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        def one(k: int) -> None:
            while not self.stop.is_set():
                if not self.go.wait(0.2):
                    continue
                with self.lock:
                    self.inflight += 1
                try:
                    status, body = call(self.m, f"/flood/{k}")
                    ok = status == 200 and json.loads(body).get("node") == "beta"
                    words = f"{status} {body[:200]!r}"
                except Exception as exc:
                    ok, words = False, repr(exc)
                with self.lock:
                    self.inflight -= 1
                    if ok:
                        self.ok += 1
                    elif self.go.is_set():  # a call cut by the agent's own restart is not one
                        self.failures.append(words)

        workers = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(self.n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def test_a_strangers_flood_keeps_no_teammate_out(machines: Machines) -> None:
    m = machines
    flood = m.net.run(
        STRANGER,
        [PY, "-c", FLOOD, m.net.address(BETA), str(MESH_PORT), str(FLOOD_RATE), str(FLOOD_S)],
        stdout=subprocess.PIPE,
    )
    caller = Caller(m, 4)
    caller.start()
    try:
        # The stranger fills its address's share of the handshake budget, and no more.
        m.agents[BETA].wait_for(
            lambda: listener(m)["refused_over_address_cap"] > 0, what="the stranger capped"
        )
        with caller.lock:
            before = caller.ok
        m.agents[ALPHA].wait_for(lambda: caller.ok > before + 20, what="calls during the flood")
        # Alpha's agent restarts mid-flood: calls stop while it is down (they would fail
        # at alpha, not at beta), then it must find beta again through the flooded listener.
        caller.go.clear()
        m.agents[ALPHA].wait_for(lambda: caller.inflight == 0, what="calls in flight to end")
        alpha = m.agents[ALPHA]
        pid = alpha.agent_pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        assert alpha.agent is not None
        alpha.agent.wait(30)
        alpha.agent = None  # stopped: `devmesh up` starts it again, as a teammate would
        m.up(ALPHA, "shop", yaml("alpha", False), {"svc.py": ROUTE_SERVICE})
        wait_api(m)
        with caller.lock:
            before = caller.ok
        caller.go.set()
        m.agents[ALPHA].wait_for(lambda: caller.ok > before + 20, what="calls after the restart")
        assert flood.poll() is None, "the flood ended before the restart was tested"
        assert flood.wait(FLOOD_S + 30) == 0
    finally:
        caller.stop.set()
        caller.join(30)
        if flood.poll() is None:
            flood.kill()
            flood.wait(10)
    assert flood.stdout is not None
    with flood.stdout:
        opened, failed = map(int, flood.stdout.read().split())
    assert opened + failed > FLOOD_RATE * 5  # it did flood
    assert caller.failures == [], caller.failures[:5]
    stats = listener(m)
    assert stats["refused_over_address_cap"] > 0
    assert stats["refused_over_cap"] == 0 and stats["refused_over_node_cap"] == 0
    assert stats["failed_handshakes"] > 0  # the stranger's silent ones, timed out
    text = m.agents[BETA].cli("peers", check=True).stdout
    assert "refused over the handshakes per address" in text
    # Nothing of it is in beta's log line by line.
    log = m.agents[BETA].agent_log()
    assert "peer listener" not in log and log.count(m.net.address(STRANGER)) < 5


def test_a_teammates_slow_head_is_cut_with_408_while_calls_go_on(machines: Machines) -> None:
    m = machines
    identity = ids.load(m.agents[ALPHA].home)
    ctx = channel.client_context(identity)
    ctx.check_hostname = False
    head = b"GET /mesh/v1/catalog HTTP/1.1\r\nhost: beta\r\nx-slow: " + b"x" * 200 + b"\r\n\r\n"
    slow: list[ssl.SSLSocket] = []
    try:
        for _ in range(5):
            tls = ctx.wrap_socket(ns_socket(m.net.hosts[ALPHA], m.net.address(BETA), MESH_PORT))
            tls.settimeout(0.1)
            slow.append(tls)
        got = {id(s): b"" for s in slow}
        closed: set[int] = set()
        sent = 0
        end = time.monotonic() + 30
        while len(closed) < len(slow) and time.monotonic() < end and sent < len(head):
            for s in slow:
                if id(s) in closed:
                    continue
                try:
                    s.sendall(head[sent : sent + 1])
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    closed.add(id(s))
                    continue
                if not chunk:
                    closed.add(id(s))
                got[id(s)] += chunk
            sent += 1
            status, _ = call(m, "/during-slow-heads")
            assert status == 200
        assert sent < len(head), "the heads were complete before any deadline"
        for s in slow:
            assert got[id(s)].startswith(b"HTTP/1.1 408 "), got[id(s)][:200]
    finally:
        for s in slow:
            s.close()

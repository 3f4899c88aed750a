"""The proxy's deadlines on its clients: a slow request head is cut with 408, an idle
keep-alive connection is closed, and neither costs the other clients anything.

Real proxy processes (workers included) and raw sockets on loopback. The slow clients are
bounded in count and time; what is asserted is what each client saw (408, EOF, 200), never
when it saw it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import proxykit
import pytest

from devmesh.agent import daemon
from devmesh.commands import _common
from devmesh.core import model
from devmesh.proxy import __main__ as proxy_main
from devmesh.proxy import workers

HEAD = b"GET /echo HTTP/1.1\r\nhost: api.localhost\r\nx-slow: " + b"x" * 400 + b"\r\n\r\n"
DRIBBLE_S = 0.1
"""A slow client's pause between bytes: the whole head would take 40 s."""
BOUND_S = 30.0
"""No slow client runs longer than this, whatever happens."""


@pytest.fixture
def upstream():
    with proxykit.upstream() as server:
        yield server


def routes(port: int) -> dict:
    return {"backends": [{"project": "shop", "service": "api", "port": port}]}


def start(port: int, *args: str) -> proxykit.ProxyProcess:
    return proxykit.ProxyProcess(routes(port), args=("--json", *args))


class SlowClient(threading.Thread):
    """Sends HEAD a byte at a time until the proxy answers or closes; keeps what it got."""

    def __init__(self, port: int, *, send: bool = True) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.send = send
        self.got = b""
        self.closed = False
        self.sent = 0

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=BOUND_S) as sock:
            sock.settimeout(DRIBBLE_S)
            end = time.monotonic() + BOUND_S
            while time.monotonic() < end:
                if self.send and self.sent < len(HEAD):
                    try:
                        sock.sendall(HEAD[self.sent : self.sent + 1])
                        self.sent += 1
                    except OSError:
                        self.closed = True
                        return
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    self.closed = True
                    return
                if not chunk:
                    self.closed = True
                    return
                self.got += chunk


def status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def test_slow_heads_are_cut_with_408_while_other_clients_are_served(upstream):
    proxy = start(upstream.port, "--header-timeout", "1")
    try:
        slow = [SlowClient(proxy.port) for _ in range(30)]
        silent = [SlowClient(proxy.port, send=False) for _ in range(5)]
        for c in slow + silent:
            c.start()
        served = 0
        with httpx.Client(trust_env=False) as http:
            while any(c.is_alive() for c in slow + silent):
                r = http.get(
                    f"http://127.0.0.1:{proxy.port}/echo", headers={"host": "api.localhost"}
                )
                assert r.status_code == 200, r.text
                served += 1
        for c in slow:
            assert c.closed and status(c.got) == 408, c.got[:200]
            assert b"header_timeout_s" in c.got
            assert 0 < c.sent < len(HEAD)
        for c in silent:  # nothing was asked: nothing is answered, the connection just closes
            assert c.closed and c.got == b""
        assert served > 0
        lines = proxy.wait_log(
            lambda ls: sum(json.loads(x)["status"] == 408 for x in ls) == len(slow), "408s"
        )
        assert all(json.loads(x)["status"] in (200, 408) for x in lines)
    finally:
        assert proxy.stop() == ""


def raw_exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request; read its whole answer (Content-Length framed)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v
            for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert status(head) == 200, head
    return body


GET = b"GET /echo HTTP/1.1\r\nhost: api.localhost\r\n\r\n"
POST = b"POST /echo HTTP/1.1\r\nhost: api.localhost\r\ncontent-length: 5\r\n\r\nhello"


def closed_by_proxy(sock: socket.socket) -> bool:
    """Whether the proxy closes ``sock`` (EOF, or a reset) within the bound; it never answers
    anything on an idle connection."""
    sock.settimeout(BOUND_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_idle_keepalive_connections_are_closed_after_keepalive_timeout(upstream, workers):
    """Both ways an exchange runs (a task for a body, callbacks for a GET on a pooled
    connection), and in worker processes too, which get the setting on their command line."""
    proxy = start(
        upstream.port,
        "--keepalive-timeout",
        "2",
        "--header-timeout",
        "30",
        "--workers",
        str(workers),
    )
    try:
        socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(16)]
        for i, sock in enumerate(socks):
            raw_exchange(sock, POST if i % 2 else GET)
            raw_exchange(sock, GET)  # the fast path: the service's connection is pooled now
        # A connection in use is not idle: requests keep it open past the timeout.
        busy = socket.create_connection(("127.0.0.1", proxy.port))
        end = time.monotonic() + 4
        while time.monotonic() < end:
            raw_exchange(busy, GET)
            time.sleep(0.05)
        for sock in socks:
            assert closed_by_proxy(sock)
            sock.close()
        assert closed_by_proxy(busy)
        busy.close()
        if workers > 1:
            pids = {json.loads(x)["pid"] for x in proxy.log_lines()}
            assert len(pids) == workers, pids  # every process served, so every one cut
    finally:
        assert proxy.stop() == ""


def test_the_project_deadlines_reach_the_agent_and_its_workers():
    """devmesh.yaml -> the agent's environment -> its proxy settings -> a worker's argv."""
    project = model.from_document(
        {"version": 1, "project": "p", "proxy": {"header_timeout_s": 3, "keepalive_timeout_s": 4}},
        directory="/tmp",
        default_name="p",
    )
    config = daemon.proxy_settings(_common.proxy_env(project.proxy))
    assert (config.header_timeout_s, config.keepalive_timeout_s) == (3.0, 4.0)
    argv = workers.worker_argv(
        parent=1,
        routes=Path("/tmp/r.json"),
        config=config,
        http_port=7700,
        https_port=None,
        home=Path("/tmp"),
        access_log=None,
        json_lines=False,
    )
    worker = proxy_main._settings(proxy_main.parse_args(argv[3:]))
    assert (worker.header_timeout_s, worker.keepalive_timeout_s) == (3.0, 4.0)
    defaults = daemon.proxy_settings({})
    assert (defaults.header_timeout_s, defaults.keepalive_timeout_s) == (10.0, 75.0)

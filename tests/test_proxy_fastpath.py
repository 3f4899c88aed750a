"""The callback path: requests without a body on a pooled upstream connection.

A first request opens the upstream connection (general path); every later one finds it idle in
the pool and is answered in callbacks (server._Fast). These tests warm the pool first, then
check that the callback path keeps every promise of the general one: timeouts, backpressure,
pipelining, truncation, hand-over of streamed answers, client disconnects.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import httpx
import proxykit
import pytest

MIB = 1024 * 1024
HOST = {"host": "api.localhost"}


@pytest.fixture
def upstream():
    with proxykit.upstream() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "p", "service": "api", "port": upstream.port}]},
        args=("--idle-timeout", "0.5", "--json"),
    )
    yield p
    assert p.stop() == ""


def warm(proxy) -> None:
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/warm", headers=HOST)
    assert r.status_code == 200


def test_silent_service_on_a_pooled_connection_gets_504_and_the_connection_lives_on(
    proxy, upstream
):
    with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", headers=HOST) as client:
        assert client.get("/first").status_code == 200
        r = client.get("/sleep?s=2")
        assert r.status_code == 504
        assert r.text == (
            f"504 Gateway Timeout: service 'api' on 127.0.0.1:{upstream.port}"
            " timed out: no response within 0.5 s\n"
        )
        again = client.get("/after")
        assert again.status_code == 200
        assert json.loads(again.text)["path"] == "/after"


def test_pipelined_requests_are_answered_in_order(proxy):
    warm(proxy)
    paths = [f"/p{i}" for i in range(5)]
    raw = b"".join(f"GET {p} HTTP/1.1\r\nHost: api.localhost\r\n\r\n".encode() for p in paths)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(raw)
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < len(paths) or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    bodies = [json.loads(part[part.index(b"{") :]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert [b["path"] for b in bodies] == paths


def test_large_download_on_a_pooled_connection_streams_in_flat_memory(proxy):
    warm(proxy)
    size = 256 * MIB
    rss_before = proxy.rss_kib()
    peak = rss_before
    got = 0
    with httpx.stream(
        "GET", f"http://127.0.0.1:{proxy.port}/download?n={size}", headers=HOST, timeout=60
    ) as r:
        assert int(r.headers["content-length"]) == size
        for i, chunk in enumerate(r.iter_raw(1 << 20)):
            got += len(chunk)
            if i % 32 == 0:
                peak = max(peak, proxy.rss_kib())
                time.sleep(0.002)  # a slow reader: the service must be held back
    assert got == size
    assert peak - rss_before < 40 * 1024, (rss_before, peak)


def test_truncated_answer_on_a_pooled_connection_aborts_the_client(proxy):
    warm(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /truncated HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\nyyyyyyyyyy")
    errors = [json.loads(line).get("error") for line in proxy.log_lines()]
    assert any(e and "broke off its answer" in e for e in errors), errors


def test_streamed_answer_is_handed_over_and_flows_event_by_event(proxy, upstream):
    warm(proxy)
    arrivals = []
    with httpx.stream(
        "GET", f"http://127.0.0.1:{proxy.port}/sse?n=4&interval=0.3", headers=HOST, timeout=10
    ) as r:
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((line, time.monotonic() - start))
    assert [a for a, _ in arrivals] == [f"data: event {i}" for i in range(4)]
    assert arrivals[0][1] < 0.25 < 0.6 < arrivals[-1][1]


def test_client_leaving_while_a_pooled_request_waits_is_logged_and_harmless(proxy):
    warm(proxy)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
    time.sleep(0.1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, as a killed client leaves it
    time.sleep(0.4)
    lines = [json.loads(line) for line in proxy.log_lines()]
    gone = [e for e in lines if e["path"] == "/sleep?s=0.3"]
    assert gone and gone[0]["error"] == "client closed the connection during the response"
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/next", headers=HOST)
    assert (r.status_code, json.loads(r.text)["path"]) == (200, "/next")


def test_http10_client_on_a_pooled_connection_is_closed_after_its_answer(proxy):
    warm(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /ten HTTP/1.0\r\nHost: api.localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # ends: the proxy closes after the answer
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    assert json.loads(data[data.index(b"{") :])["path"] == "/ten"


def test_bytes_a_service_sends_on_an_idle_connection_are_not_taken_for_an_answer():
    """Some servers write a 408 on a kept-alive connection before closing it. The next
    request must go out on a fresh connection, not be answered by that stale 408."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    stop = threading.Event()
    served = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                served.append(data.split(b" ")[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.05)
                conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                time.sleep(0.5)  # keep it open a while: only the stray bytes say it is dead

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "p", "service": "api", "port": listener.getsockname()[1]}]}
    )
    try:
        for path in ("/one", "/two"):
            r = httpx.get(f"http://127.0.0.1:{p.port}{path}", headers=HOST)
            assert (r.status_code, r.text) == (200, "ok"), path
            time.sleep(0.2)  # the 408 arrives while the connection sits in the pool
        assert served == [b"/one", b"/two"]
    finally:
        stop.set()
        listener.close()
        thread.join(5)
        assert p.stop() == ""

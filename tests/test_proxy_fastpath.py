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
    lines = proxy.wait_log(lambda ls: any("/truncated" in ln for ln in ls), "the /truncated line")
    (entry,) = [json.loads(ln) for ln in lines if "/truncated" in ln]
    assert entry["error"] == (
        "service 'api' broke off its answer: peer closed connection without sending complete"
        " message body (received 10 bytes, expected 1000)"
    )


def test_streamed_answer_is_handed_over_and_flows_event_by_event(proxy, upstream):
    """The service sends event i+1 only once the client has read event i through the proxy:
    a proxy that held events back would leave the client waiting until its read timeout."""
    warm(proxy)
    url = f"http://127.0.0.1:{proxy.port}/sse?n=4&gated=1"
    with httpx.stream("GET", url, headers=HOST, timeout=10) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for i in range(4):
            assert next(events) == f"data: event {i}"
            upstream.sse_gate.release()
        assert list(events) == []


def test_client_leaving_while_a_pooled_request_waits_is_logged_and_harmless(proxy, upstream):
    warm(proxy)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"GET /hold HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
    assert upstream.held.wait(10)  # the request reached the service, which holds its answer
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, as a killed client leaves it
    lines = proxy.wait_log(lambda ls: any("/hold" in ln for ln in ls), "the /hold line")
    upstream.release.set()
    (gone,) = [json.loads(ln) for ln in lines if "/hold" in ln]
    assert gone["error"] == "client closed the connection during the response"
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
    """Some servers write a 408 on a kept-alive connection (and close it later). The next
    request must go out on a fresh connection, not be answered by that stale 408."""
    answered, stray_sent, done = threading.Event(), threading.Event(), threading.Event()
    served = []

    def handler(conn: socket.socket, number: int) -> None:
        head = proxykit.read_head(conn)
        served.append(head.split(b" ")[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if number == 0:
            assert answered.wait(10)
            conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            stray_sent.set()
        done.wait(10)  # open until the end: only the stray bytes say this one is dead

    with proxykit.RawService(handler) as service:
        p = proxykit.ProxyProcess(
            {"backends": [{"project": "p", "service": "api", "port": service.port}]}
        )
        try:
            r = httpx.get(f"http://127.0.0.1:{p.port}/one", headers=HOST)
            assert (r.status_code, r.text) == (200, "ok")
            answered.set()
            assert stray_sent.wait(10)
            # A barrier through the proxy's event loop: the 408 was in its socket before this
            # request was sent, so the proxy has read it by the time this answer comes back.
            unknown = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "x.localhost"})
            assert unknown.status_code == 404
            r = httpx.get(f"http://127.0.0.1:{p.port}/two", headers=HOST)
            assert (r.status_code, r.text) == (200, "ok")
            assert served == [b"/one", b"/two"]
            assert service.accepted == 2
        finally:
            done.set()
            assert p.stop() == ""

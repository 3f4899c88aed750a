"""Streaming through the proxy: SSE event by event, disconnects, big bodies in flat memory."""

from __future__ import annotations

import hashlib
import socket
import time

import httpx
import proxykit
import pytest

MIB = 1024 * 1024


@pytest.fixture
def upstream():
    with proxykit.upstream() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "p", "service": "api", "port": upstream.port}]}
    )
    yield p
    assert p.stop() == ""


def test_sse_events_arrive_one_by_one(proxy, upstream):
    """Unbuffered: the service sends event i+1 only after the client read event i through
    the proxy; a proxy that held events back would leave the client waiting."""
    url = f"http://127.0.0.1:{proxy.port}/sse?n=5&gated=1"
    with httpx.stream("GET", url, headers={"host": "api.localhost"}, timeout=10) as r:
        assert r.headers["content-type"] == "text/event-stream"
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for i in range(5):
            assert next(events) == f"data: event {i}"
            upstream.sse_gate.release()
        assert list(events) == []


def test_client_leaving_an_sse_stream_closes_the_upstream_side(upstream, proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"GET /sse?n=100&interval=0.05 HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
    received = b""
    while b"data: event 0" not in received:  # the head may come in a segment of its own
        chunk = s.recv(65536)
        assert chunk, received
        received += chunk
    s.close()
    proxykit.wait_for(lambda: upstream.sse_disconnects, "the service to see the client leave")
    assert upstream.sse_disconnects == 1


def test_upstream_leaving_mid_stream_closes_the_client(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /truncated HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\nyyyyyyyyyy")  # then EOF: the client sees the truncation


def test_large_upload_streams_in_flat_memory(proxy):
    size = 384 * MIB
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    rss_before = proxy.rss_kib()
    peak = [rss_before]

    def body():
        for i in range(size // len(block)):
            digest.update(block)
            if i % 32 == 0:
                peak[0] = max(peak[0], proxy.rss_kib())
            yield block

    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/echo",
        headers={"host": "api.localhost"},
        content=body(),
        timeout=60,
    )
    doc = r.json()
    assert doc["body_length"] == size
    assert doc["body_sha256"] == digest.hexdigest()
    assert peak[0] - rss_before < 40 * 1024, (rss_before, peak[0])


def test_large_download_streams_in_flat_memory(proxy):
    size = 512 * MIB
    rss_before = proxy.rss_kib()
    peak = rss_before
    got = 0
    with httpx.stream(
        "GET",
        f"http://127.0.0.1:{proxy.port}/download?n={size}",
        headers={"host": "api.localhost"},
        timeout=60,
    ) as r:
        assert int(r.headers["content-length"]) == size
        for i, chunk in enumerate(r.iter_raw(1 << 20)):
            got += len(chunk)
            if i % 64 == 0:
                peak = max(peak, proxy.rss_kib())
                time.sleep(0.001)  # a slow reader: backpressure must hold the upstream back
    assert got == size
    assert peak - rss_before < 40 * 1024, (rss_before, peak)

"""Retrying a routed request with a body: the proxy keeps a copy of the body (up to
``exchange.RETRY_BODY_BYTES``) so that an idempotent request whose upstream dies before
answering goes whole to the next target.

Real services on loopback that die before answering (raw sockets), a real HTTP service as the
next target (it reports the length and SHA-256 of what it received), real clients.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import proxykit
import pytest

from devmesh.proxy import exchange, table

EDGE = table.Edge(caller_project="shop", caller_service="web", target_service="api")
BODY = bytes(range(256)) * (300 * 1024 // 256)  # 300 KiB: several reads on every side


def _read_request(conn: socket.socket) -> bytes:
    """The whole request (head and body, Content-Length or chunked), or what came before EOF."""
    data = proxykit.read_head(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        length = 0
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return head + b"\r\n\r\n" + body


def _dies_after_the_head(conn: socket.socket, number: int) -> None:
    proxykit.read_head(conn)  # dies while the body is still on its way


def _dies_after_the_body(conn: socket.socket, number: int) -> None:
    _read_request(conn)  # takes it all, then dies without a byte of answer


DYING = {"after the head": _dies_after_the_head, "after the body": _dies_after_the_body}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[proxykit.InProcessProxy]:
    p = proxykit.InProcessProxy(table.RouteTable(), tmp_path / "proxy")
    try:
        yield p
    finally:
        p.close()


def _route(proxy: proxykit.InProcessProxy, dying_port: int, fallback_port: int) -> int:
    """api runs locally (on the dying service) with a fallback; the edge port of web -> api."""
    proxy.table = table.RouteTable(
        backends=(table.Backend(project="shop", service="api", port=dying_port),),
        mesh=(
            table.MeshRoute(
                project="shop", service="api", fallback=f"http://127.0.0.1:{fallback_port}"
            ),
        ),
    )
    return proxy.call(proxy.server.set_edges({EDGE: None}))[EDGE]


def _chunks(blob: bytes) -> Iterator[bytes]:
    for i in range(0, len(blob), 64 * 1024):
        yield blob[i : i + 64 * 1024]


def _send(url: str, method: str, blob: bytes, framing: str) -> httpx.Response:
    content = blob if framing == "content-length" else _chunks(blob)
    with httpx.Client(trust_env=False, timeout=30) as client:
        return client.request(method, url, content=content)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("dies", list(DYING))
def test_put_with_a_body_is_retried_with_the_identical_bytes(proxy, framing, dies):
    with proxykit.RawService(DYING[dies]) as dying, proxykit.upstream() as fallback:
        port = _route(proxy, dying.port, fallback.port)
        r = _send(f"http://127.0.0.1:{port}/items/7", "PUT", BODY, framing)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["method"] == "PUT" and seen["path"] == "/items/7"
        assert seen["body_length"] == len(BODY)
        assert seen["body_sha256"] == hashlib.sha256(BODY).hexdigest()
        if framing == "chunked":
            assert ["transfer-encoding", "chunked"] in seen["headers"]
        assert dying.accepted == 1 and fallback.connections == 1
        entry = proxy.wait_entries(1)[0]
        assert entry["route"] == "fallback" and entry["bytes_in"] == len(BODY)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_bound_is_not_retried_and_the_502_says_why(proxy, framing):
    blob = b"z" * (exchange.RETRY_BODY_BYTES + 1)
    with proxykit.RawService(_dies_after_the_body) as dying, proxykit.upstream() as fallback:
        port = _route(proxy, dying.port, fallback.port)
        r = _send(f"http://127.0.0.1:{port}/big", "PUT", blob, framing)
        assert r.status_code == 502
        assert "connection closed before a response" in r.text
        assert "not tried elsewhere: its body is larger than the 1024 KiB" in r.text
        assert fallback.connections == 0
        assert dying.accepted == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_post_with_a_body_is_never_retried(proxy, framing):
    with proxykit.RawService(_dies_after_the_body) as dying, proxykit.upstream() as fallback:
        port = _route(proxy, dying.port, fallback.port)
        r = _send(f"http://127.0.0.1:{port}/orders", "POST", BODY, framing)
        assert r.status_code == 502
        assert "connection closed before a response" in r.text
        assert "not tried elsewhere" not in r.text  # not for its size: for its method
        assert fallback.connections == 0
        assert dying.accepted == 1


@pytest.mark.parametrize("dies", list(DYING))
def test_put_across_the_peer_hop_moves_on_with_its_body(tmp_path, dies):
    """B's service dies before answering: B cuts the hop's connection (the body fits the
    caller's copy), and A sends the same bytes to the next target."""
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    try:
        with proxykit.RawService(DYING[dies]) as dying, proxykit.upstream() as fallback:
            b.set_table(
                backends=(
                    table.Backend(project="shop", service="api", port=dying.port, shared=True),
                )
            )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(b.instance("shop", "api"),),
                        fallback=f"http://127.0.0.1:{fallback.port}",
                    ),
                )
            )
            port = a.proxy.call(a.proxy.server.set_edges({EDGE: None}))[EDGE]
            for framing in ("content-length", "chunked"):
                r = _send(f"http://127.0.0.1:{port}/items/7", "PUT", BODY, framing)
                assert r.status_code == 200, r.text
                assert r.json()["body_sha256"] == hashlib.sha256(BODY).hexdigest()
                assert r.json()["body_length"] == len(BODY)
            assert [e["route"] for e in a.proxy.wait_entries(2)] == ["fallback", "fallback"]
            assert dying.accepted == 2  # each PUT went to B first, then to the fallback
    finally:
        a.close()
        b.close()


def test_a_peer_that_says_unavailable_after_the_body_left_moves_on_with_the_copy(tmp_path):
    """B cannot reach its service (a TLS port that never completes a handshake, closed by the
    test once A's body has reached B): its answer, ``x-devmesh-unavailable: 1``, comes after
    A let the body go (A waits a second for ``100 Continue``). Nothing was forwarded, so the
    call moves on, for any method, with the body from A's copy."""
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)

    def body_at_b() -> bool:
        # The body waits, undecrypted-then-buffered, in B's peer connection while B dials.
        return b.proxy.on_loop(
            lambda: sum(d._size for d in b.proxy.server._connections.open) >= len(BODY)
        )

    def stalls_then_closes(conn: socket.socket, number: int) -> None:
        conn.recv(65536)  # B's TLS ClientHello, never answered
        proxykit.wait_for(body_at_b, "A's body to reach B")

    try:
        with (
            proxykit.RawService(stalls_then_closes) as stalling,
            proxykit.upstream() as fallback,
        ):
            b.set_table(
                backends=(
                    table.Backend(
                        project="shop",
                        service="api",
                        port=stalling.port,
                        scheme="https",
                        shared=True,
                    ),
                )
            )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(b.instance("shop", "api"),),
                        fallback=f"http://127.0.0.1:{fallback.port}",
                    ),
                )
            )
            port = a.proxy.call(a.proxy.server.set_edges({EDGE: None}))[EDGE]
            r = _send(f"http://127.0.0.1:{port}/orders", "POST", BODY, "content-length")
            assert r.status_code == 200, r.text
            assert r.json()["body_sha256"] == hashlib.sha256(BODY).hexdigest()
            entry = a.proxy.wait_entries(1)[0]
            assert entry["route"] == "fallback" and entry["bytes_in"] == len(BODY)
            assert b.proxy.wait_entries(1)[0]["status"] == 502
            marks = a.proxy.on_loop(lambda: a.proxy.server.forwarder.router.down)
            assert f"peer:{b.identity.node_id}" in marks[("shop", "api")]
    finally:
        a.close()
        b.close()

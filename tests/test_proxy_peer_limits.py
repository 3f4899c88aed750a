"""The peer listener's limits: teammates' places (a cap, and a cap per node), a handshake
budget of its own (capped per source address) that strangers cannot spill out of, a short TLS
handshake timeout, and failed handshakes counted (``ProxyServer.peer_stats``) rather than
logged one by one.

Real mesh nodes (``proxykit.Node``: a team CA, mutual TLS on loopback), a stranger with a
certificate of another CA, curl without any certificate, and raw TCP connections.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import proxykit
import pytest


def _client_context(node: proxykit.Node, server: proxykit.Node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server.identity.ca_path))
    ctx.load_cert_chain(str(node.identity.node_cert_path), str(node.identity.node_key_path))
    ctx.check_hostname = False  # the server's name is not what these tests are about
    return ctx


def _catalog(ctx: ssl.SSLContext, port: int) -> bytes:
    """One catalog request on a new connection; the answer (b"" when refused)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="peer") as tls,
    ):
        tls.sendall(b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
        return proxykit.read_head(tls)


def _stats(node: proxykit.Node) -> dict[str, object]:
    return node.proxy.on_loop(node.proxy.server.peer_stats)


@pytest.fixture
def team(tmp_path: Path) -> Iterator[tuple[proxykit.Node, proxykit.Node]]:
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle, listener_options={"max_connections": 2})
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_strangers_failed_handshakes_are_counted_not_logged(team, tmp_path, caplog):
    a, b = team
    caplog.set_level(logging.INFO)
    stranger = proxykit.Node(tmp_path, "node-x")  # a team of its own, same mesh name
    try:
        ctx = _client_context(stranger, b)
        with contextlib.suppress(ssl.SSLError, OSError):
            assert _catalog(ctx, b.peer_port) == b""
        proxykit.wait_for(
            lambda: _stats(b)["failed_handshakes"] == 1, "the stranger's handshake counted"
        )
        assert "certificate verify failed" in str(_stats(b)["last_failed_handshake"])
        # curl with no certificate at all: refused in TLS, counted too.
        out = subprocess.run(
            ["curl", "-sk", "--max-time", "10", f"https://127.0.0.1:{b.peer_port}/mesh/v1/catalog"],
            capture_output=True,
            check=False,
            timeout=30,
            env=proxykit.env_without_proxy(),
        )
        assert out.returncode != 0 and b"HTTP" not in out.stdout
        proxykit.wait_for(lambda: _stats(b)["failed_handshakes"] == 2, "curl's handshake counted")
        # The listener keeps serving the team, and the refusals took no place under the cap.
        assert _catalog(_client_context(a, b), b.peer_port).startswith(b"HTTP/1.1 200 ")
        assert _stats(b)["refused_over_cap"] == 0
        assert not [r for r in caplog.records if r.name.startswith(("asyncio", "devmesh"))]
    finally:
        stranger.close()


def _held(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """A team connection, handshaken and answered once, held open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname="peer")
    tls.sendall(b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
    assert proxykit.read_head(tls).startswith(b"HTTP/1.1 200 ")
    return tls


def test_the_cap_refuses_teammates_past_it_with_a_503_and_recovers(team):
    a, b = team
    ctx = _client_context(a, b)
    held = []
    try:
        held += [_held(ctx, b.peer_port) for _ in range(2)]
        assert _stats(b)["open"] == 2
        # The third is a teammate's: it is handshaken, then told it is crowded out (the
        # caller moves on: x-devmesh-unavailable), and closed.
        head = _catalog(ctx, b.peer_port)
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"x-devmesh-unavailable: 1" in head.lower()
        assert _stats(b)["refused_over_cap"] == 1
        assert _stats(b)["failed_handshakes"] == 0
        held.pop().close()
        proxykit.wait_for(lambda: _stats(b)["open"] == 1, "a place under the cap")
        assert _catalog(ctx, b.peer_port).startswith(b"HTTP/1.1 200 ")
        assert _stats(b)["refused_over_cap"] == 1
    finally:
        for tls in held:
            tls.close()


def test_one_node_cannot_take_every_place(tmp_path):
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(
        tmp_path,
        "node-b",
        bundle=a.bundle,
        listener_options={"max_connections": 4, "max_per_node": 2},
    )
    c = proxykit.Node(tmp_path, "node-c", bundle=a.bundle)
    held = []
    try:
        greedy = _client_context(a, b)
        held += [_held(greedy, b.peer_port) for _ in range(2)]
        head = _catalog(greedy, b.peer_port)
        assert head.startswith(b"HTTP/1.1 503 ") and b"node-a holds 2" in head, head
        assert _stats(b)["refused_over_node_cap"] == 1
        # Another teammate still has places.
        other = _client_context(c, b)
        held += [_held(other, b.peer_port) for _ in range(2)]
        assert _stats(b)["open"] == 4
        held[0].close()
        proxykit.wait_for(lambda: _stats(b)["open"] == 3, "node-a's place freed")
        held[0] = _held(greedy, b.peer_port)
    finally:
        for tls in held:
            tls.close()
        for node in (a, b, c):
            node.close()


def test_handshakes_have_a_budget_of_their_own_capped_per_address(tmp_path):
    """Silent TCP connections (a stranger who never says hello) fill their address's share
    of the handshake budget and no more: the excess is refused at once, another address has
    its own share, a teammate's connection keeps its place (handshakes never take one), and
    once the silent ones time out the address has its share again."""
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(
        tmp_path,
        "node-b",
        bundle=a.bundle,
        listener_options={
            "max_connections": 2,
            "max_handshakes": 8,
            "max_handshakes_per_address": 3,
            "handshake_timeout_s": 2.0,
        },
    )
    ctx = _client_context(a, b)
    silent = []
    try:
        member = _held(ctx, b.peer_port)  # a teammate's place, held throughout
        silent = [
            socket.create_connection(("127.0.0.1", b.peer_port), timeout=10) for _ in range(3)
        ]
        proxykit.wait_for(lambda: _stats(b)["handshaking"] == 3, "three handshakes pending")
        extra = [socket.create_connection(("127.0.0.1", b.peer_port), timeout=10) for _ in range(4)]
        for sock in extra:  # closed at once, before any TLS
            assert sock.recv(1) == b""
            sock.close()
        assert _stats(b)["refused_over_address_cap"] == 4
        # Another address has its own share: 127.0.0.2 is loopback too.
        other = socket.create_connection(
            ("127.0.0.1", b.peer_port), source_address=("127.0.0.2", 0)
        )
        silent.append(other)
        proxykit.wait_for(lambda: _stats(b)["handshaking"] == 4, "another address's handshake")
        # The teammate's held connection still works, and the silent ones time out.
        member.sendall(b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
        assert proxykit.read_head(member).startswith(b"HTTP/1.1 200 ")
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
        proxykit.wait_for(lambda: _stats(b)["handshaking"] == 0, "the silent ones gone")
        assert _stats(b)["failed_handshakes"] == 4
        assert _catalog(ctx, b.peer_port).startswith(b"HTTP/1.1 200 ")  # recovered
        assert _stats(b)["refused_over_cap"] == 0
        member.close()
    finally:
        for sock in silent:
            sock.close()
        a.close()
        b.close()


def test_a_handshake_that_never_comes_is_closed_and_counted(tmp_path):
    node = proxykit.Node(
        tmp_path, "node-b", listener_options={"handshake_timeout_s": 0.2, "max_connections": 1}
    )
    try:
        with socket.create_connection(("127.0.0.1", node.peer_port), timeout=10) as silent:
            assert silent.recv(1) == b""  # closed by the listener, not by us
        proxykit.wait_for(lambda: _stats(node)["failed_handshakes"] == 1, "the timeout counted")
        assert "not finished within 0.2 s" in str(_stats(node)["last_failed_handshake"])
        proxykit.wait_for(lambda: _stats(node)["open"] == 0, "its place freed")
        ctx = _client_context(node, node)
        assert _catalog(ctx, node.peer_port).startswith(b"HTTP/1.1 200 ")
    finally:
        node.close()

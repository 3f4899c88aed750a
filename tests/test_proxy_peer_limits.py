"""The peer listener's limits: a cap on open connections, a short TLS handshake timeout, and
failed handshakes counted (``ProxyServer.peer_stats``) rather than logged one by one.

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


def test_the_cap_refuses_connections_past_it_and_recovers(team):
    a, b = team
    ctx = _client_context(a, b)
    held = []
    try:
        for _ in range(2):  # two team connections, handshaken and answered, held open
            sock = socket.create_connection(("127.0.0.1", b.peer_port), timeout=10)
            tls = ctx.wrap_socket(sock, server_hostname="peer")
            held.append(tls)
            tls.sendall(b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
            assert proxykit.read_head(tls).startswith(b"HTTP/1.1 200 ")
        assert _stats(b)["open"] == 2
        # The third is closed at once, before any TLS, and counted as load.
        with pytest.raises((ssl.SSLError, OSError)):
            got = _catalog(ctx, b.peer_port)
            assert got == b"", got  # TLS 1.3: the close may come as the end of the stream
            raise ConnectionResetError("closed without an answer")
        assert _stats(b)["refused_over_cap"] == 1
        assert _stats(b)["failed_handshakes"] == 0
        held.pop().close()
        proxykit.wait_for(lambda: _stats(b)["open"] == 1, "a place under the cap")
        assert _catalog(ctx, b.peer_port).startswith(b"HTTP/1.1 200 ")
        assert _stats(b)["refused_over_cap"] == 1
    finally:
        for tls in held:
            tls.close()


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

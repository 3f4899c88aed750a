"""WebSocket through the proxy: the `websockets` library on both ends, frames untouched."""

from __future__ import annotations

import os
import socket
import threading

import proxykit
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

MIB = 1024 * 1024


def handler(ws: ServerConnection) -> None:
    if ws.request.path == "/close":
        ws.close(4001, "bye from service")
        return
    if ws.request.path == "/headers":
        ws.send(repr(sorted(ws.request.headers.raw_items())))
        return
    for message in ws:
        ws.send(message)


@pytest.fixture
def ws_upstream():
    server = serve(handler, "127.0.0.1", 0, max_size=32 * MIB)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()
    thread.join(5)


@pytest.fixture
def proxy(ws_upstream):
    p = proxykit.ProxyProcess(
        {
            "backends": [{"project": "p", "service": "chat", "port": ws_upstream}],
            "edges": [{"caller_project": "p", "caller_service": "web", "target_service": "chat"}],
        }
    )
    yield p
    assert p.stop() == ""


def ws_connect(proxy, path: str = "/", **kw):
    """Connect by name (Host: chat.localhost) over a socket to the proxy port."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    return connect(
        f"ws://chat.localhost:{proxy.port}{path}", sock=sock, proxy=None, max_size=32 * MIB, **kw
    )


def test_text_and_binary_echo_with_deflate_negotiated_end_to_end(proxy):
    with ws_connect(proxy) as ws:
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv() == b"\x00\x01\xff"
        ext = ws.response.headers["sec-websocket-extensions"]
        assert ext.startswith("permessage-deflate")


def test_forwarded_handshake_keeps_extensions_and_forwarding_headers(proxy):
    with ws_connect(proxy, "/headers") as ws:
        seen = ws.recv()
    assert "('sec-websocket-extensions', 'permessage-deflate" in seen
    assert "('x-forwarded-host', 'chat.localhost:" in seen
    assert "('via', '1.1 devmesh')" in seen


def test_fragmented_and_16mib_messages(proxy):
    with ws_connect(proxy) as ws:
        ws.send(["frag", "mented", " message"])
        assert ws.recv() == "fragmented message"
        big = os.urandom(16 * MIB)  # incompressible, so 16 MiB of frames cross the tunnel
        ws.send(big)
        assert ws.recv(timeout=30) == big


def test_ping_pong_and_close_codes(proxy):
    with ws_connect(proxy) as ws:
        pong = ws.ping(b"are you there")
        assert pong.wait(5)
    with ws_connect(proxy, "/close") as ws, pytest.raises(ConnectionClosedError) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye from service")


def test_client_close_code_reaches_service(proxy):
    with ws_connect(proxy) as ws:
        ws.send("x")
        ws.recv()
        ws.close(4002, "client leaving")
        assert ws.close_code == 4002


def test_edge_listener_carries_websockets(proxy):
    port = proxy.edges[("p", "web", "chat")]
    with connect(f"ws://127.0.0.1:{port}/", proxy=None) as ws:
        ws.send("via edge")
        assert ws.recv() == "via edge"


def test_invalid_handshake_is_rejected_with_400(proxy):
    with pytest.raises(InvalidStatus) as info:
        # A version-12 handshake: wsproto rejects it before any service sees it.
        ws_connect(proxy, additional_headers={"Sec-WebSocket-Version": "12"})
    assert info.value.response.status_code in (400, 426)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"GET / HTTP/1.1\r\nHost: chat.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert data.endswith(
        b"400 Bad Request: invalid WebSocket handshake from the client:"
        b" Missing header, 'Sec-WebSocket-Key'\n"
    )

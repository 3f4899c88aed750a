"""WebSocket upgrades: validate the handshake with wsproto, then splice bytes both ways.

Why validate but not parse frames: the handshake is where a broken client or service can
confuse a proxy (a 101 to a request that never asked for it, a wrong accept token); wsproto
decides those by the RFC. After the 101 the proxy is a byte pipe, so extensions such as
permessage-deflate are negotiated end to end and frames, fragments, pings and close codes
pass untouched at the cost of one read and one write per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
from wsproto import ConnectionType
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from devmesh.proxy import channel, errors, headers


def check_request(request: h11.Request) -> bytes:
    """The client's Sec-WebSocket-Key after wsproto accepted the request.

    Raises BadUpgradeError naming what wsproto rejected.
    """
    raw = h11.Connection(h11.CLIENT).send(
        h11.Request(method=request.method, target=request.target, headers=request.headers)
    )
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(raw)
        list(handshake.events())
    except RemoteProtocolError as exc:
        raise errors.BadUpgradeError("client", str(exc)) from None
    key = headers.get(request.headers, b"sec-websocket-key")
    assert key is not None  # wsproto rejects a request without one
    return key


def check_response(response: h11.InformationalResponse, key: bytes) -> None:
    """Raise BadUpgradeError unless the service's 101 accepts this client's key."""
    if headers.wants_upgrade(response.headers) != b"websocket":
        raise errors.BadUpgradeError("service", "101 without Upgrade: websocket")
    accept = headers.get(response.headers, b"sec-websocket-accept")
    if accept != generate_accept_token(key):
        raise errors.BadUpgradeError("service", "Sec-WebSocket-Accept does not match the key")


async def _pipe(
    reader: channel.Channel,
    writer: channel.Channel,
    other: channel.Channel,
    size: int,
    count: list[int],
) -> None:
    try:
        while data := await reader.read(size):
            count[0] += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()
            return
    except (OSError, RuntimeError):
        pass
    # A reset, or an end we cannot pass on as a half-close: tear both sides down, which also
    # ends the opposite pipe's read.
    for w in (writer, other):
        with contextlib.suppress(Exception):
            w.transport.abort()


async def splice(
    a: tuple[channel.Channel, channel.Channel],
    b: tuple[channel.Channel, channel.Channel],
    *,
    size: int,
) -> tuple[int, int]:
    """Copy a->b and b->a until both directions end; (bytes a->b, bytes b->a).

    A clean EOF is passed on as a half-close (the WebSocket close handshake finishes in
    band); a reset on either side tears both down, so no peer is left on a half-dead tunnel.
    """
    ab, ba = [0], [0]
    tasks = (
        asyncio.ensure_future(_pipe(a[0], b[1], a[1], size, ab)),
        asyncio.ensure_future(_pipe(b[0], a[1], b[1], size, ba)),
    )
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        for _, w in (a, b):
            with contextlib.suppress(Exception):
                w.transport.abort()
    return ab[0], ba[0]

"""One proxied exchange: a client's request forwarded to a service and the answer streamed back.

Strategy: two h11 connections, one per side, and the proxy moves events between them.
Bodies travel as h11 ``Data`` events in chunks of at most ``read_size`` bytes; every write is
followed by ``drain()``, so a slow reader on either side stops the proxy reading the other
side (the stream readers stop reading their sockets past twice their limit). Nothing is held
whole, whatever the body's size.

To keep the small-request path cheap, everything h11 can produce without I/O (a response head,
its body, the end of message) is collected and written to the client in one ``write``.

- A request body is pumped by a second task while the response is awaited, so a service that
  answers early (a 413 of its own) is not deadlocked against a client still sending.
- ``Expect: 100-continue`` is passed on to the service, and the client gets the service's
  own ``100 Continue`` (or its early final answer, say a 413, with no body sent): a client
  told to go on by the proxy would send a body the service already refused and see its
  connection reset. A service that ignores the expectation is waited for ``CONTINUE_WAIT_S``,
  as clients do, then the proxy lets the body go.
- A response without Content-Length (server-sent events, chunked downloads) is watched: if the
  client goes away the service's connection is closed at once rather than at the next event.
- A 101 to a WebSocket request turns the exchange into a byte tunnel (``tunnel.splice``).
- An idle connection from the pool that turns out closed is retried once on a new one, but
  only for a request without a body, when nothing of the answer has arrived
  (``upstream.may_retry``, the one rule for both ways an exchange runs).
- A mesh-routed request that has another target to go to keeps a copy of its body while it
  streams (``BodyCopy``, up to ``RETRY_BODY_BYTES``), so that a target that fails before
  answering does not take the body with it: the next target gets the copy (``replay``).

What the service side needs in both executions (the head sent, the head passed back, the retry
rule, the words of each error) is ``upstream``'s, shared with ``callbacks``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h11

from devmesh.proxy import (
    channel,
    errors,
    headers,
    peering,
    pool,
    settings,
    table,
    tunnel,
    upstream,
)

CONTINUE_WAIT_S = 1.0
"""How long a client's ``Expect: 100-continue`` waits for the service's own answer before the
proxy lets the body go (curl waits as long)."""


RETRY_BODY_BYTES = 1024 * 1024
"""The most of a request body kept while it is forwarded, so that a target that fails
before answering (it died, or a peer says it has no instance) can be replaced by the next
one with the same bytes. A larger body is streamed without a copy and not sent twice."""


class BodyCopy:
    """The request body as read from the client so far, while it fits RETRY_BODY_BYTES."""

    __slots__ = ("chunks", "complete", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] | None = []
        """None once the body outgrew the bound: it can no longer be sent again."""
        self.size = 0
        self.complete = False
        """The client's end of the body was read."""

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.chunks is not None:
            if self.size > RETRY_BODY_BYTES:
                self.chunks = None
            else:
                self.chunks.append(data)  # h11 hands out a fresh bytes object per event

    @property
    def whole(self) -> bool:
        """The entire body is held: it can go to another target."""
        return self.complete and self.chunks is not None


class ClientGoneError(Exception):
    """The client closed or reset its connection mid-exchange (no answer can reach it)."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"client closed the connection during {phase}")


class StaleConnectionError(Exception):
    """The service closed the connection before a byte of the response arrived."""


class Client:
    """The client side of one connection: its h11 server state and where it came from."""

    __slots__ = (
        "caller",
        "conn",
        "edge",
        "ip",
        "max_head",
        "mesh",
        "peer",
        "proto",
        "reader",
        "size",
        "writer",
    )

    def __init__(
        self,
        chan: channel.Channel,
        *,
        proto: str,
        edge: table.Edge | None,
        config: settings.Settings,
        mesh: peering.PeerListener | None = None,
    ) -> None:
        self.reader = chan
        self.writer = chan
        self.proto = proto
        self.edge = edge
        self.mesh = mesh
        """Set on the peer listener's connections."""
        self.caller: peering.PeerCaller | peering.Crowded | str | None = None
        """On the peer listener: the calling node, or why it is refused (or crowded out)."""
        self.size = config.read_size
        self.max_head = config.max_header_bytes
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        peer = chan.get_extra_info("peername") or ("?", 0)
        self.ip = str(peer[0])
        self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in self.ip else f"{peer[0]}:{peer[1]}"
        if mesh is not None:
            self.caller = peering.authorize(mesh, chan.get_extra_info("peercert"), self.ip)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, reading the socket as needed. Raises h11.RemoteProtocolError."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Event) or event is h11.PAUSED:
                return event
            try:
                data = await self.reader.read(self.size)
            except OSError:
                data = b""
            conn.receive_data(data)


class Result:
    """What the access log needs to know about an exchange."""

    __slots__ = ("bytes_in", "bytes_out", "error", "extra", "on_open", "status")

    def __init__(self) -> None:
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.extra: headers.Headers | None = None
        """Headers added to the response head (a version warning); None on the fast path."""
        self.on_open: Callable[[], None] | None = None
        """Called when a WebSocket tunnel opens (the metrics count it open until it ends)."""


async def _next_upstream(
    up: pool.Upstream, backend: table.Backend, config: settings.Settings
) -> h11.Event:
    conn = up.conn
    timeout = config.idle_timeout_s
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise errors.UpstreamProtocolError(
                backend.service, backend.host, backend.port, str(exc)
            ) from None
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:  # h11 pauses only after a whole answer: not awaited here
            raise errors.UpstreamProtocolError(
                backend.service, backend.host, backend.port, "data after the end of an answer"
            )
        try:
            async with asyncio.timeout(timeout):
                data = await up.reader.read(config.read_size)
        except TimeoutError:
            raise upstream.response_timeout(backend, config) from None
        except OSError:
            data = b""
        stale = conn.their_state is h11.SEND_RESPONSE
        if not data and stale and not conn.trailing_data[0]:
            raise StaleConnectionError
        conn.receive_data(data)


async def _pump_body(
    client: Client,
    up: pool.Upstream,
    limit: int | None,
    result: Result,
    copy: BodyCopy | None,
) -> None:
    """Client request body -> service, chunk by chunk, honouring the size limit (and kept in
    ``copy``, when there is one, before it leaves)."""
    try:
        while True:
            event = await client.next_event()
            if type(event) is h11.Data:
                result.bytes_in += len(event.data)
                if limit is not None and result.bytes_in > limit:
                    raise errors.BodyTooLargeError(limit)
                if copy is not None:
                    copy.add(event.data)
                if not await _send_up(up, up.conn.send(event)):
                    return
            elif type(event) is h11.EndOfMessage:
                if copy is not None:
                    copy.complete = True
                await _send_up(up, up.conn.send(h11.EndOfMessage()))
                return
            else:
                raise ClientGoneError("the request body")
    except BaseException:
        up.close()  # wakes the response reader, which then reports our exception
        raise


async def _replay_body(up: pool.Upstream, chunks: list[bytes]) -> None:
    """A copied body -> the next target (the client's own body was read already)."""
    try:
        for chunk in chunks:
            if not await _send_up(up, up.conn.send(h11.Data(data=chunk))):
                return
        await _send_up(up, up.conn.send(h11.EndOfMessage()))
    except BaseException:
        up.close()
        raise


async def _send_up(up: pool.Upstream, data: bytes | None) -> bool:
    """Write to the service; False when it has closed its side. That is not the body's
    fault: the response reader then reports the service closing (before or after its
    answer began), which is what decides a retry."""
    try:
        if data:
            up.writer.write(data)
        await up.writer.drain()
    except OSError:
        return False
    return True


async def finish_copy(client: Client, copy: BodyCopy, limit: int | None, result: Result) -> None:
    """Read the rest of the client's body into ``copy`` (stopping once it outgrows the
    bound), so that the request can go whole to another target."""
    while not copy.complete and copy.chunks is not None:
        event = await client.next_event()
        if type(event) is h11.Data:
            result.bytes_in += len(event.data)
            if limit is not None and result.bytes_in > limit:
                raise errors.BodyTooLargeError(limit)
            copy.add(event.data)
        elif type(event) is h11.EndOfMessage:
            copy.complete = True
        else:
            raise ClientGoneError("the request body")


async def _watch_client(client: Client, up: pool.Upstream) -> None:
    """Close the service side as soon as the client leaves during a streamed answer."""
    while len(client.conn.trailing_data[0]) < client.max_head:
        try:
            data = await client.reader.read(client.size)
        except OSError:
            data = b""
        if not data:
            up.close()
            return
        client.conn.receive_data(data)  # pipelined bytes, kept for the next cycle


async def forward(
    client: Client,
    request: h11.Request,
    *,
    hdrs: headers.Headers,
    host: bytes,
    backend: table.Backend,
    upstreams: pool.Pool,
    config: settings.Settings,
    result: Result,
    attempt: int = 0,
    hop: upstream.Adjust | None = None,
    copy: BodyCopy | None = None,
) -> None:
    """Run one exchange. Raises ProxyError before the response head reached the client;
    afterwards failures abort the client connection and are recorded in ``result.error``.

    ``hdrs`` is ``request.headers`` as a plain list and ``host`` its Host value: the caller
    made them once, because h11's header sequence is slow to iterate again and again.
    ``attempt`` 1 is the retry of a request whose pooled connection was found closed
    (``may_retry``): it goes out on a new connection and is not retried again.
    ``hop`` adjusts the request head for a peer or a fallback (``upstream.request_head``).
    ``copy`` keeps the body while it streams; once it holds the whole body (an earlier
    target failed), the body is sent from it instead of from the client.
    """
    ws_key = None
    if headers.wants_upgrade(hdrs) == b"websocket":
        ws_key = tunnel.check_request(request)
    limit = config.max_body_bytes
    length = headers.get(hdrs, b"content-length")
    if limit is not None and length is not None and int(length) > limit:
        raise errors.BodyTooLargeError(limit)
    has_body = headers.is_chunked(hdrs) or (length is not None and int(length) > 0)
    replay = copy.chunks if copy is not None and copy.complete else None
    up_request = upstream.request_head(
        request, hdrs, client_ip=client.ip, proto=client.proto, host=host, ws_key=ws_key, hop=hop
    )
    ask_peer = (
        has_body
        and backend.scheme == table.MESH_SCHEME
        and not client.conn.they_are_waiting_for_100_continue
        and headers.get(hdrs, b"expect") is None
    )
    if ask_peer:
        # A peer that cannot serve the call says so before the body leaves the client, so
        # the call can still move on (``x-devmesh-unavailable``) with its body intact.
        up_request = h11.Request(
            method=up_request.method,
            target=up_request.target,
            headers=[*up_request.headers.raw_items(), (b"expect", b"100-continue")],
            _parsed=True,
        )

    pump: asyncio.Task[None] | None = None
    up = await (upstreams.connect(backend) if attempt else upstreams.acquire(backend))
    try:
        while True:
            head = up.conn.send(up_request)
            if not has_body:
                if client.conn.their_state is h11.SEND_BODY:
                    await client.next_event()  # the EndOfMessage of an empty body: no I/O
                head += up.conn.send(h11.EndOfMessage())
            up.writer.write(head)
            try:
                event: h11.Event | None = None
                if has_body and client.conn.they_are_waiting_for_100_continue:
                    event = await _expect_continue(client, up, backend, config)
                elif ask_peer:
                    event = await _peer_continue(up, backend, config)
                if has_body and event is None:
                    pump = asyncio.ensure_future(
                        _replay_body(up, replay)
                        if replay is not None
                        else _pump_body(client, up, limit, result, copy)
                    )
                if event is None:
                    event = await _next_upstream(up, backend, config)
                break
            except StaleConnectionError:
                if pump is not None and pump.done() and pump.exception() is not None:
                    raise _pump_error(pump) from None
                up.close()
                if not upstream.may_retry(up, has_body=has_body, attempt=attempt):
                    raise upstream.closed_early(backend) from None
                attempt += 1
                up = await upstreams.connect(backend)
        await _respond(
            client,
            up,
            upstreams=upstreams,
            backend=backend,
            config=config,
            result=result,
            event=event,
            ws_key=ws_key,
            pump=pump,
        )
    except BaseException:
        up.close()
        if pump is not None and pump.done() and not pump.cancelled():
            exc = pump.exception()
            if isinstance(exc, errors.ProxyError | ClientGoneError | h11.RemoteProtocolError):
                raise exc from None
        raise
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.wait((pump,))  # it must stop reading the client before we do


def _pump_error(pump: asyncio.Task[None]) -> BaseException:
    exc = pump.exception()
    assert exc is not None
    return exc


async def _expect_continue(
    client: Client, up: pool.Upstream, backend: table.Backend, config: settings.Settings
) -> h11.Event | None:
    """Wait for the service's word on a client's ``Expect: 100-continue``.

    Returns the service's final answer when it came first (the client then sends no body);
    None once the client was told ``100 Continue``: by the service, or by the proxy when the
    service said nothing within CONTINUE_WAIT_S (it may ignore the expectation).
    """
    try:
        async with asyncio.timeout(CONTINUE_WAIT_S):
            event = await _next_upstream(up, backend, config)
    except TimeoutError:
        event = None
    if type(event) is h11.InformationalResponse and event.status_code == 100:
        event = None
    if event is None:
        client.writer.write(
            client.conn.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            )
        )
    return event


async def _peer_continue(
    up: pool.Upstream, backend: table.Backend, config: settings.Settings
) -> h11.Event | None:
    """Wait for the peer's ``100 Continue`` to the expectation the proxy added: its final
    answer when it came first, None when the body may go (after CONTINUE_WAIT_S at most)."""
    try:
        async with asyncio.timeout(CONTINUE_WAIT_S):
            event = await _next_upstream(up, backend, config)
    except TimeoutError:
        return None
    if type(event) is h11.InformationalResponse and event.status_code == 100:
        return None
    return event


async def resume(
    client: Client,
    up: pool.Upstream,
    event: h11.Event,
    *,
    backend: table.Backend,
    upstreams: pool.Pool,
    config: settings.Settings,
    result: Result,
) -> None:
    """Finish an exchange whose request went out in callbacks, from the service's first
    event on (the fast path hands over answers it does not stream itself)."""
    try:
        await _respond(
            client,
            up,
            upstreams=upstreams,
            backend=backend,
            config=config,
            result=result,
            event=event,
            ws_key=None,
            pump=None,
        )
    except BaseException:
        up.close()
        raise


async def _respond(
    client: Client,
    up: pool.Upstream,
    *,
    upstreams: pool.Pool,
    backend: table.Backend,
    config: settings.Settings,
    result: Result,
    event: h11.Event,
    ws_key: bytes | None,
    pump: asyncio.Task[None] | None,
) -> None:
    while type(event) is h11.InformationalResponse:
        if event.status_code == 101:
            if ws_key is None:
                raise errors.BadUpgradeError("service", "101 to a request that asked no upgrade")
            tunnel.check_response(event, ws_key)
            await _tunnel(client, up, config, result, event)
            return
        if event.status_code != 100:  # 100 was already passed on (_expect_continue)
            client.writer.write(
                client.conn.send(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=headers.response_headers(event.headers),
                    )
                )
            )
        try:
            event = await _next_upstream(up, backend, config)
        except StaleConnectionError:  # an interim answer is no answer: closed before one
            raise upstream.closed_early(backend) from None
    if type(event) is not h11.Response:
        raise errors.UpstreamProtocolError(
            backend.service, backend.host, backend.port, f"unexpected {type(event).__name__}"
        )
    up_hdrs = list(event.headers)  # once: h11's header sequence is slow to iterate
    if upstream.unavailable(backend, event.status_code, up_hdrs):
        up.close()
        raise upstream.peer_unavailable(backend, event.status_code)
    result.status = event.status_code
    out = [client.conn.send(upstream.response_head(event, up_hdrs, result.extra))]
    watcher = None
    if headers.get(up_hdrs, b"content-length") is None and (pump is None or pump.done()):
        watcher = asyncio.ensure_future(_watch_client(client, up))
    writer = client.writer
    try:
        while True:
            try:
                step = up.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if watcher is not None and watcher.done():
                    raise ClientGoneError("the response") from None
                result.error = upstream.broke_off(backend, str(exc))
                client.writer.transport.abort()
                return
            if step is h11.NEED_DATA:
                if out:
                    writer.write(b"".join(out))
                    out.clear()
                    await writer.drain()
                    if writer.transport.is_closing():
                        raise ClientGoneError("the response")
                try:
                    async with asyncio.timeout(config.idle_timeout_s):
                        data = await up.reader.read(config.read_size)
                except TimeoutError:
                    result.error = upstream.idle_mid_answer(backend, config)
                    writer.transport.abort()
                    return
                except OSError:
                    data = b""
                up.conn.receive_data(data)
            elif type(step) is h11.Data:
                result.bytes_out += len(step.data)
                out.append(client.conn.send(step))
            elif type(step) is h11.EndOfMessage:
                out.append(client.conn.send(h11.EndOfMessage()))
                break
            else:
                break
        if pump is not None and not pump.done():
            pump.cancel()  # answered early: the rest of the body is not wanted
        writer.write(b"".join(out))
        await writer.drain()
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.wait((watcher,))  # it must stop reading the client before we do
    upstreams.release(up)


async def _tunnel(
    client: Client,
    up: pool.Upstream,
    config: settings.Settings,
    result: Result,
    switch: h11.InformationalResponse,
) -> None:
    result.status = 101
    hdrs = headers.response_headers(switch.headers)
    hdrs += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    if result.extra:
        hdrs += result.extra
    client.writer.write(client.conn.send(h11.InformationalResponse(status_code=101, headers=hdrs)))
    if result.on_open is not None:
        result.on_open()
    client_rest = client.conn.trailing_data[0]
    up_rest = up.conn.trailing_data[0]
    if client_rest:
        up.writer.write(client_rest)
    if up_rest:
        client.writer.write(up_rest)
    sent, received = await tunnel.splice(
        (client.reader, client.writer), (up.reader, up.writer), size=config.read_size
    )
    result.bytes_in += sent + len(client_rest)
    result.bytes_out += received + len(up_rest)

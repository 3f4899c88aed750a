"""Client connections: read requests, start each one's exchange, go on to the next.

Why a module of its own: a client connection's life (parse a request, choose how its
exchange runs, wait for it, then the next request or the end) is the same whatever the
exchange does, and keeping it apart leaves ``forward`` with only the forwarding decisions.

A ``Downstream`` parses requests in its socket's callbacks. Each request is routed there
(``Forwarder.route``, which also answers the proxy's own pages at once); its exchange then
runs in callbacks (``callbacks.start``) when it can, or as a task (``run_task``) that reads
the client through the channel's stream API. When the exchange ends, parsing goes back to the
callbacks, and requests the client pipelined meanwhile are served in turn: in a loop, never
by recursion, so a burst of pipelined requests costs no stack.

Deadlines on the client (``Connections.expire``, run by the server's one sweep timer like the
callback runs' timeouts, rather than a timer armed per request): a connection waiting for a
request head gets ``header_timeout_s`` from the head's first byte (from the connection's
opening for its first request), then 408 and close; a keep-alive connection idle between
requests is closed after ``keepalive_timeout_s``. A connection busy with an exchange has
neither: the service's silence is ``idle_timeout_s``'s business. The sweep notes when it
first sees a connection in a waiting state, so a deadline is never early, at most a sweep
interval late, and the request path pays one counter increment for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

import h11

from devmesh.proxy import callbacks, channel, exchange, forward, peergate, peering, table

log = logging.getLogger("devmesh.proxy")


class Connections:
    """What every client connection of one proxy shares, and what the proxy closes at the end:
    the open connections and their tasks."""

    def __init__(
        self,
        forwarder: forward.Forwarder,
        inflight: callbacks.Inflight,
        members: peergate.Members,
    ) -> None:
        self.forwarder = forwarder
        self.inflight = inflight
        self.members = members
        """The places of the peer listener's connections (past their TLS handshake)."""
        self.open: set[Downstream] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def factory(
        self, proto: str, edge: table.Edge | None, mesh: peering.PeerListener | None = None
    ) -> Callable[[], Downstream]:
        """The protocol factory of a listener speaking ``proto`` (for ``edge``, if any; the
        peer listener's connections carry ``mesh``)."""
        return lambda: Downstream(self, proto, edge, mesh)

    def close(self) -> None:
        """Cancel every exchange task and drop every client connection."""
        for task in list(self.tasks):
            task.cancel()
        for down in list(self.open):
            down.abort()

    def expire(self, now: float, header_s: float, keepalive_s: float) -> int:
        """Close the connections past their header or keep-alive deadline (loop clock); how
        many heads were cut with a 408."""
        cut = 0
        for down in [d for d in self.open if d.current is None and d.consumer is not None]:
            client = down.client
            if client is None or down.transport.is_closing():
                continue
            partial = bool(client.conn.trailing_data[0])
            if down.mark != down.served:  # first seen waiting after a request (or opening)
                down.mark, down.since, down.partial = down.served, now, partial
            elif partial and not down.partial:  # a head began since the last look
                down.since, down.partial = now, True
            first = down.served == 0
            limit = header_s if down.partial or first else keepalive_s
            if now - down.since < limit:
                continue
            if partial:
                cut += 1
                self.forwarder.reject(
                    client,
                    h11.RemoteProtocolError(
                        f"request head not complete within {header_s:g} s (header_timeout_s)",
                        error_status_hint=408,
                    ),
                )
            down.close()
        return cut


class Downstream(channel.Channel):
    """One client connection. Bytes go into its h11 state as they arrive (``feed``)."""

    __slots__ = (
        "client",
        "connections",
        "current",
        "edge",
        "held",
        "mark",
        "member",
        "mesh",
        "partial",
        "proto",
        "served",
        "since",
    )

    def __init__(
        self,
        connections: Connections,
        proto: str,
        edge: table.Edge | None,
        mesh: peering.PeerListener | None = None,
    ) -> None:
        super().__init__(connections.forwarder.settings.read_size)
        self.connections = connections
        self.proto = proto
        self.edge = edge
        self.mesh = mesh
        self.client: exchange.Client | None = None
        self.current: callbacks.Run | None = None
        """The exchange running in callbacks, if one is."""
        self.held = False
        self.member: peering.PeerCaller | None = None
        """The teammate holding a place under the peer listener's caps with this connection."""
        self.served = 0
        """Requests begun on this connection (the deadline sweep's clock of progress)."""
        self.mark = 0
        """``served`` when the sweep last saw the connection begin waiting."""
        self.since = 0.0
        """When that wait (or the head under way) began, as far as the sweep knows."""
        self.partial = False
        """A request head had begun then."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.since = asyncio.get_running_loop().time()
        self.client = exchange.Client(
            self,
            proto=self.proto,
            edge=self.edge,
            config=self.connections.forwarder.settings,
            mesh=self.mesh,
        )
        self.consumer = self.feed
        self.on_lost = self._lost
        self.on_writable = self._writable
        self.connections.open.add(self)
        caller = self.client.caller
        if self.mesh is not None and isinstance(caller, peering.PeerCaller):
            admitted = self.connections.members.admit(self.mesh, caller)
            self.client.caller = admitted
            if admitted is caller:
                self.member = caller

    def feed(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        try:
            conn = client.conn
            conn.receive_data(data)
            if self.current is None:
                self.next_request()
            elif len(conn.trailing_data[0]) > client.max_head:
                self.hold(True)  # pipelined requests wait in the socket, not in memory
        except Exception:
            # A bug, not a client's doing (those are answered): drop this connection only.
            log.exception("proxy connection from %s failed", client.peer)
            self.abort()

    def next_request(self) -> None:
        """Serve the complete requests in the client's h11 buffer until one must wait."""
        while self._serve_one():
            pass

    def _serve_one(self) -> bool:
        """Start the next request's exchange; True when it was answered at once and the
        connection can go on with the next one."""
        client = self.client
        assert client is not None
        forwarder = self.connections.forwarder
        try:
            event = client.conn.next_event()
        except h11.RemoteProtocolError as exc:
            forwarder.reject(client, exc)
            self.close()
            return False
        if event is h11.NEED_DATA:
            return False
        if type(event) is not h11.Request:
            self.close()  # the client closed its side between requests
            return False
        self.served += 1
        ex = forwarder.open(client, event)
        backend = forwarder.route(ex)
        if backend is None:  # answered by the proxy itself
            return self._cycle(forwarder.finish(ex))
        if callbacks.fits(ex) and callbacks.start(
            self, ex, backend, forwarder, self.connections.inflight
        ):
            return False
        self.run_task(forwarder.run(ex, backend))
        return False

    def _cycle(self, keep: bool) -> bool:
        """After an exchange in callbacks: ready the next cycle, or close; True when ready."""
        if not keep:
            self.close()
            return False
        assert self.client is not None
        self.client.conn.start_next_cycle()
        self.hold(False)
        return True

    def finished(self, ex: forward.Exchange) -> None:
        """An exchange run in callbacks ended: log it, then serve the next request or close."""
        self.current = None
        if self._cycle(self.connections.forwarder.finish(ex)):
            assert self.client is not None
            pending, ended = self.client.conn.trailing_data
            if pending or ended:  # a pipelined request, or the client's EOF, is already here
                self.next_request()

    def run_task(self, work: Coroutine[None, None, bool]) -> None:
        """Run an exchange as a task; ``work`` says whether the connection lives on."""
        self.consumer = None  # the task reads the client through the channel's buffer,
        self.hold(False)  # whose own flow control now bounds what a client can send ahead
        task = asyncio.ensure_future(self._drive(work))
        self.connections.tasks.add(task)
        task.add_done_callback(self.connections.tasks.discard)

    async def _drive(self, work: Coroutine[None, None, bool]) -> None:
        client = self.client
        assert client is not None
        try:
            keep = await work
        except (OSError, asyncio.CancelledError, exchange.ClientGoneError):
            self.abort()
            return
        except Exception:
            log.exception("proxy connection from %s failed", client.peer)
            self.abort()
            return
        finally:
            work.close()  # a task cancelled before its first step never started ``work``
        if not keep:
            self.close()
            return
        client.conn.start_next_cycle()
        for chunk in self.take_buffer():
            client.conn.receive_data(chunk)
        self.consumer = self.feed
        self.next_request()

    def hold(self, on: bool) -> None:
        if on != self.held and not self.transport.is_closing():
            self.held = on
            if on:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.consumer = _ignore
        super().close()

    def abort(self) -> None:
        self.transport.abort()

    def _lost(self, exc: BaseException | None) -> None:
        self.connections.open.discard(self)
        if self.member is not None:
            self.connections.members.leave(self.member)
            self.member = None
        if self.current is not None:
            self.current.client_gone()

    def _writable(self, ok: bool) -> None:
        if self.current is not None:
            self.current.client_writable(ok)


def _ignore(data: bytes) -> None:
    pass

"""The proxy server: listeners, per-edge listeners, the connection loop and error answers.

Why it looks like this: the agent owns one ``ProxyServer`` and runs ``serve()`` in its anyio
task group (asyncio backend). The proxy reads the route table through ``table_provider`` on
every request, so the agent applies a new table by swapping the object it returns; no call
into the proxy is needed. Edge listeners are the exception: they are sockets, so the agent
declares the edges it wants with ``set_edges`` and gets their ports back.

Every failure becomes an HTTP answer here, at one place (``_answer``); a connection's handler
catches everything a client can cause, so one bad client never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus

import anyio
import h11
from anyio.abc import TaskStatus

from devmesh.proxy import (
    accesslog,
    ca,
    channel,
    errors,
    exchange,
    headers,
    listeners,
    pages,
    pool,
    settings,
    table,
)

log = logging.getLogger("devmesh.proxy")
FLUSH_INTERVAL_S = 0.25
_SLOW_REQUEST_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"connection"}
)
"""A request carrying one of these (other than Content-Length: 0) takes the general path.
``Connection`` is here because it may name an upgrade or more hop-by-hop fields."""


class NoRouteError(errors.ProxyError):
    """An edge listener whose target service is not in the caller's project (any more)."""

    status = 502

    def __init__(self, edge: table.Edge) -> None:
        super().__init__(
            f"service {edge.target_service!r} is not running in project {edge.caller_project!r}"
            f" (called by {edge.caller_service!r})"
        )


class ProxyServer:
    """HTTP(S) front door for every local service. See docs/proxy.md."""

    def __init__(
        self,
        config: settings.Settings,
        table_provider: Callable[[], table.RouteTable],
        authority: ca.CertificateAuthority | None = None,
        access_log: accesslog.AccessLog | None = None,
    ) -> None:
        self.settings = config
        self._table = table_provider
        self._ca = authority
        self.access_log = access_log or accesslog.AccessLog(None)
        self.pool = pool.Pool(config)
        self.http_port: int | None = None
        self.https_port: int | None = None
        self._servers: list[asyncio.Server] = []
        self._edges: dict[table.Edge, tuple[int, list[asyncio.Server]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Downstream] = set()
        self._inflight: set[_Fast] = set()
        """Fast exchanges awaiting their service: ``_sweep`` times them out."""
        self._sweeper: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def _listen(
        self, port: int, edge: table.Edge | None, tls: object | None
    ) -> tuple[int, list[asyncio.Server]]:
        """Bind 127.0.0.1:port (and ::1 on the same port when possible); the bound port."""
        proto = "https" if tls is not None else "http"
        loop = asyncio.get_running_loop()

        def factory() -> _Downstream:
            return _Downstream(self, proto, edge)

        shared, join = self.settings.reuse_port, self.settings.join_ports
        sock = listeners.bind(self.settings.host, port, shared=shared, join=join)
        first = await loop.create_server(factory, sock=sock, ssl=tls)
        bound = sock.getsockname()[1]
        servers = [first]
        if self.settings.ipv6:
            try:
                sock6 = listeners.bind("::1", bound, shared=shared, join=join)
                servers.append(await loop.create_server(factory, sock=sock6, ssl=tls))
            except OSError as exc:  # no IPv6 loopback here, or the port is taken on ::1
                log.debug("not listening on [::1]:%s: %s", bound, exc)
        return bound, servers

    async def start(self) -> None:
        """Bind the HTTP (and HTTPS) listeners. Raises OSError when a port is taken."""
        self._sweep()
        port, servers = await self._listen(self.settings.port, None, None)
        self.http_port = port
        self._servers += servers
        if self.settings.https_port is not None and self._ca is not None:
            tls = await asyncio.to_thread(self._ca.ssl_context_for_server)
            port, servers = await self._listen(self.settings.https_port, None, tls)
            self.https_port = port
            self._servers += servers

    async def serve(
        self, *, task_status: TaskStatus[ProxyServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled, then close every listener and connection.

        ``task_status.started(self)`` fires once the listeners are bound, so the agent can
        read ``http_port``/``https_port`` (useful with port 0).
        """
        try:
            await self.start()
            task_status.started(self)
            while True:
                await anyio.sleep(FLUSH_INTERVAL_S)
                self.access_log.flush()
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening, drop every connection and idle upstream, flush the log."""
        for server in self._servers:
            server.close()
        for _, servers in self._edges.values():
            for server in servers:
                server.close()
        self._servers.clear()
        self._edges.clear()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns):
            conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pool.close()
        self.access_log.flush()

    def _sweep(self) -> None:
        """Time out fast exchanges whose service went quiet for idle_timeout_s.

        One timer for all of them rather than one per request: arming and cancelling a timer
        per request cost as much as routing it. The price is lateness of up to a quarter of
        the idle timeout (at most a second).
        """
        idle = self.settings.idle_timeout_s
        loop = asyncio.get_running_loop()
        now = loop.time()
        for fast in [f for f in self._inflight if now - f.last >= idle]:
            fast.timed_out()
        self._sweeper = loop.call_later(min(1.0, idle / 4), self._sweep)

    # -- edges ---------------------------------------------------------------------------

    async def set_edges(self, wanted: Mapping[table.Edge, int | None]) -> dict[table.Edge, int]:
        """Make the edge listeners exactly ``wanted``; edge -> bound port.

        The value is the preferred port (the one used before an agent restart, so NAME_URL
        stays stable); when it is None or taken, an ephemeral port is used. Edges no longer
        wanted stop listening; their open connections finish their current exchange.
        """
        for edge in list(self._edges):
            if edge not in wanted:
                for server in self._edges.pop(edge)[1]:
                    server.close()
        for edge, preferred in wanted.items():
            if edge in self._edges:
                continue
            try:
                bound = await self._listen(preferred or 0, edge, None)
            except OSError:
                bound = await self._listen(0, edge, None)
            self._edges[edge] = bound
        return {edge: port for edge, (port, _) in self._edges.items()}

    def edge_ports(self) -> dict[table.Edge, int]:
        return {edge: port for edge, (port, _) in self._edges.items()}

    # -- connections ---------------------------------------------------------------------
    #
    # A connection's requests are parsed in the socket's callbacks (``_dispatch``). A request
    # with no body, for a running service with an idle pooled connection, is answered there
    # too (``_Fast``): no task, no await, which is what makes the proxy cheap per request.
    # Everything else (bodies, upgrades, first connections, the proxy's own pages, answers
    # without Content-Length) runs as a task through ``exchange.forward`` (``_slow``); when it
    # ends, parsing goes back to the callbacks.

    def _dispatch(self, down: _Downstream) -> None:
        """Act on the next complete request in the client's h11 buffer, if there is one."""
        client = down.client
        try:
            event = client.conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._bad_request(client, exc)
            down.close()
            return
        if event is h11.NEED_DATA:
            return
        if type(event) is not h11.Request:
            down.close()  # the client closed its side between requests
            return
        ctx = _Ctx(client, event)
        if not self._fast(down, ctx):
            self._spawn(down, self._slow(down, ctx))

    def _spawn(self, down: _Downstream, work: Coroutine[None, None, None]) -> None:
        down.consumer = None  # the task reads the client through the channel's buffer,
        down.hold(False)  # whose own flow control now bounds what a client can send ahead
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slow(
        self,
        down: _Downstream,
        ctx: _Ctx,
        resume: tuple[pool.Upstream, h11.Event] | None = None,
    ) -> None:
        try:
            keep = await self._exchange(ctx, resume)
        except (OSError, asyncio.CancelledError, exchange.ClientGoneError):
            down.transport.abort()
            return
        except Exception:
            log.exception("proxy connection from %s failed", down.client.peer)
            down.transport.abort()
            return
        if not keep:
            down.close()
            return
        down.client.conn.start_next_cycle()
        for chunk in down.take_buffer():
            down.client.conn.receive_data(chunk)
        down.consumer = down.feed
        self._dispatch(down)

    def _fast(self, down: _Downstream, ctx: _Ctx) -> bool:
        """Start answering ctx in callbacks; False when it needs the general path."""
        for name, value in ctx.hdrs:
            if name in _SLOW_REQUEST_HEADERS and (name != b"content-length" or value != b"0"):
                return False
        client = down.client
        routes = self._table()
        if client.edge is not None:
            backend: object = routes.for_edge(client.edge)
        else:
            backend = routes.resolve_host(ctx.host.decode("latin-1"))
        if type(backend) is not table.Backend or backend.state not in table.ROUTABLE_STATES:
            return False
        up = self.pool.take_idle(backend)
        if up is None:
            return False
        if type(client.conn.next_event()) is not h11.EndOfMessage:  # no body: never I/O
            raise AssertionError("a request without a body did not end")
        ctx.backend = backend
        assert ctx.request is not None
        request = exchange.upstream_request(client, ctx.request, ctx.hdrs, ctx.host, None)
        up.writer.write(up.conn.send(request) + up.conn.send(h11.EndOfMessage()))
        down.fast = _Fast(self, down, ctx, up, backend)
        return True

    def after(self, down: _Downstream, ctx: _Ctx) -> None:
        """A fast exchange ended: log it, then serve the next request or close."""
        down.fast = None
        if not self._done(ctx):
            down.close()
            return
        conn = down.client.conn
        conn.start_next_cycle()
        down.hold(False)
        pending, ended = conn.trailing_data
        if pending or ended:  # a pipelined request, or the client's EOF, is already here
            self._dispatch(down)

    def _bad_request(self, client: exchange.Client, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
        message = "request head too large" if status == 431 else f"malformed request: {exc}"
        if client.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            # h11 is in its ERROR state now and sends nothing more: write the answer raw.
            ctype, body = pages.render(status, message, accept=None)
            phrase = "Bad Request" if status == 400 else "Request Header Fields Too Large"
            head = (
                f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {ctype.decode()}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\nvia: 1.1 devmesh\r\n\r\n"
            )
            client.writer.write(head.encode() + body)
        ctx = _Ctx(client, None)
        ctx.result.status, ctx.result.error = status, message
        self._log(ctx)

    async def _exchange(
        self, ctx: _Ctx, resume: tuple[pool.Upstream, h11.Event] | None = None
    ) -> bool:
        """Answer one request; True when the connection can serve another.

        ``resume``: a fast exchange handed over with its connection and the service's first
        event (an answer the callbacks do not stream: no Content-Length, or a 1xx).
        """
        client = ctx.client
        try:
            if resume is not None:
                assert ctx.backend is not None
                await exchange.resume(
                    client,
                    resume[0],
                    resume[1],
                    backend=ctx.backend,
                    upstreams=self.pool,
                    config=self.settings,
                    result=ctx.result,
                )
                return self._done(ctx)
            routes = self._table()
            if client.edge is not None:
                ctx.backend = routes.for_edge(client.edge)
                if ctx.backend is None:
                    raise NoRouteError(client.edge)
            else:
                target = routes.resolve_host(ctx.host.decode("latin-1"))
                if type(target) is table.Unknown:
                    self._index(ctx, routes, 404, f"no service is named by host {target.host!r}")
                    return self._done(ctx)
                if type(target) is table.Reserved:
                    if routes.agent is None:
                        self._index(ctx, routes, 200, "devmesh agent")
                        return self._done(ctx)
                    target = routes.agent
                ctx.backend = target  # type: ignore[assignment]
            backend = ctx.backend
            assert backend is not None
            if backend.state not in table.ROUTABLE_STATES:
                raise errors.ServiceNotRunningError(
                    backend.service, backend.project, backend.state, backend.reason
                )
            assert ctx.request is not None
            await exchange.forward(
                client,
                ctx.request,
                hdrs=ctx.hdrs,
                host=ctx.host,
                backend=backend,
                upstreams=self.pool,
                config=self.settings,
                result=ctx.result,
            )
        except errors.ProxyError as exc:
            self._answer(ctx, exc.status, exc.message)
        except h11.RemoteProtocolError as exc:
            self._answer(ctx, 400, f"malformed request: {exc}")
        except exchange.ClientGoneError as exc:
            ctx.result.error = str(exc)
            client.writer.transport.abort()
        return self._done(ctx)

    def _done(self, ctx: _Ctx) -> bool:
        self._log(ctx)
        conn = ctx.client.conn
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _index(self, ctx: _Ctx, routes: table.RouteTable, status: int, message: str) -> None:
        rows = pages.service_lines(
            routes.backends, port=self.http_port or 0, https_port=self.https_port
        )
        self._answer(ctx, status, message, services=rows)

    def _answer(
        self,
        ctx: _Ctx,
        status: int,
        message: str,
        services: list[tuple[str, str, str | None]] | None = None,
    ) -> None:
        """Send the proxy's own answer, or abort when a response already started."""
        result, conn = ctx.result, ctx.client.conn
        if status >= 400:
            result.error = message
        if conn.our_state is not h11.SEND_RESPONSE:
            ctx.client.writer.transport.abort()
            return
        with contextlib.suppress(h11.RemoteProtocolError):  # an empty body ends without I/O
            while conn.their_state is h11.SEND_BODY and conn.next_event() is not h11.NEED_DATA:
                pass
        assert ctx.request is not None
        accept = headers.get(ctx.hdrs, b"accept")
        ctype, body = pages.render(status, message, accept=accept, services=services)
        hdrs = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"via", headers.VIA),
        ]
        if conn.their_state is not h11.DONE:
            hdrs.append((b"connection", b"close"))
        result.status = status
        data = conn.send(
            h11.Response(
                status_code=status, headers=hdrs, reason=HTTPStatus(status).phrase.encode()
            )
        )
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        ctx.client.writer.write(data)
        result.bytes_out += len(body) if ctx.request.method != b"HEAD" else 0

    def _log(self, ctx: _Ctx) -> None:
        if not self.access_log.enabled:
            return  # building the entry costs as much as routing the request
        edge, request, backend, result = ctx.client.edge, ctx.request, ctx.backend, ctx.result
        # The keys are accesslog.Entry's fields, in its order (the JSON lines keep it).
        self.access_log.record_fields(
            {
                "time": ctx.started,
                "client": ctx.client.peer,
                "method": request.method.decode("latin-1") if request else "-",
                "host": ctx.host.decode("latin-1") if request else "-",
                "path": request.target.decode("latin-1") if request else "-",
                "status": result.status,
                "bytes_in": result.bytes_in,
                "bytes_out": result.bytes_out,
                "duration_ms": (time.perf_counter() - ctx.clock) * 1000,
                "upstream": f"{backend.host}:{backend.port}" if backend else None,
                "caller": f"{edge.caller_service}.{edge.caller_project}" if edge else None,
                "error": result.error,
            }
        )


class _Ctx:
    """One request's bookkeeping, from its head to its access log line."""

    __slots__ = ("backend", "client", "clock", "hdrs", "host", "request", "result", "started")

    def __init__(self, client: exchange.Client, request: h11.Request | None) -> None:
        self.client = client
        self.request = request
        # h11's header sequence iterates through __getitem__, one Python call per header:
        # copy it once into a list that routing, forwarding, pages and the log all share.
        self.hdrs: headers.Headers = list(request.headers) if request is not None else []
        self.host: bytes = headers.get(self.hdrs, b"host") or b""
        self.started = time.time()
        self.clock = time.perf_counter()
        self.result = exchange.Result()
        self.backend: table.Backend | None = None


class _Downstream(channel.Channel):
    """One client connection. Bytes go into its h11 state as they arrive (``feed``)."""

    __slots__ = ("client", "edge", "fast", "held", "proto", "server")

    def __init__(self, server: ProxyServer, proto: str, edge: table.Edge | None) -> None:
        super().__init__(server.settings.read_size)
        self.server = server
        self.proto = proto
        self.edge = edge
        self.client: exchange.Client = None  # type: ignore[assignment]
        self.fast: _Fast | None = None
        self.held = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.client = exchange.Client(
            self,  # type: ignore[arg-type]
            self,  # type: ignore[arg-type]
            proto=self.proto,
            edge=self.edge,
            config=self.server.settings,
        )
        self.consumer = self.feed
        self.on_lost = self._lost
        self.on_writable = self._writable
        self.server._conns.add(self)

    def feed(self, data: bytes) -> None:
        try:
            conn = self.client.conn
            conn.receive_data(data)
            if self.fast is None:
                self.server._dispatch(self)
            elif len(conn.trailing_data[0]) > self.server.settings.max_header_bytes:
                self.hold(True)  # pipelined requests wait in the socket, not in memory
        except Exception:
            # A bug, not a client's doing (those are answered): drop this connection only.
            log.exception("proxy connection from %s failed", self.client.peer)
            self.transport.abort()

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

    def _lost(self, exc: BaseException | None) -> None:
        self.server._conns.discard(self)
        if self.fast is not None:
            self.fast.client_gone()

    def _writable(self, ok: bool) -> None:
        if self.fast is not None:
            self.fast.client_writable(ok)


def _ignore(data: bytes) -> None:
    pass


class _Fast:
    """A request without a body, sent on a pooled connection, answered in callbacks.

    The service's answer is parsed as it arrives and written to the client at once, with
    backpressure (the service's socket stops being read while the client's is full). An
    answer with no Content-Length or a 1xx hands the exchange to a task (``_handover``); a
    pooled connection found closed before any answer is retried there on a new one.
    """

    __slots__ = (
        "backend",
        "ctx",
        "down",
        "head_sent",
        "last",
        "loop",
        "paused",
        "server",
        "up",
    )

    def __init__(
        self,
        server: ProxyServer,
        down: _Downstream,
        ctx: _Ctx,
        up: pool.Upstream,
        backend: table.Backend,
    ) -> None:
        self.server = server
        self.down = down
        self.ctx = ctx
        self.up = up
        self.backend = backend
        self.head_sent = False
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        server._inflight.add(self)
        chan = up.reader
        chan.consumer = self.on_data
        chan.on_lost = self._up_lost

    def _detach(self) -> None:
        chan = self.up.reader
        chan.consumer = None
        chan.on_lost = None
        self.server._inflight.discard(self)
        if self.paused:
            self.paused = False
            chan.transport.resume_reading()
        self.down.fast = None

    def on_data(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:
            log.exception("proxy exchange with %s failed", self.backend.service)
            self._abort("internal error (see the agent's log)")

    def _on_data(self, data: bytes) -> None:
        up, ctx = self.up, self.ctx
        uconn = up.conn
        if not data and not self.head_sent and not uconn.trailing_data[0]:
            self._closed_early()
            return
        uconn.receive_data(data)
        self.last = self.loop.time()
        cconn = self.down.client.conn
        out: list[bytes] = []
        result = ctx.result
        while True:
            try:
                event = uconn.next_event()
            except h11.RemoteProtocolError as exc:
                self._broken(out, str(exc))
                return
            kind = type(event)
            if kind is h11.Data:
                result.bytes_out += len(event.data)  # type: ignore[union-attr]
                out.append(cconn.send(event))  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                out.append(cconn.send(h11.EndOfMessage()))
                self.down.write(b"".join(out))
                self._detach()
                self.server.pool.release(up)
                self.server.after(self.down, ctx)
                return
            elif event is h11.NEED_DATA:
                if out:
                    self.down.write(b"".join(out))
                return
            elif kind is h11.Response:
                up_hdrs = list(event.headers)  # type: ignore[union-attr]
                status = event.status_code  # type: ignore[union-attr]
                if (
                    headers.get(up_hdrs, b"content-length") is None
                    and status not in (204, 304)
                    and ctx.request.method != b"HEAD"  # type: ignore[union-attr]
                ):
                    self._handover(event)  # type: ignore[arg-type]
                    return
                result.status = status
                out.append(
                    cconn.send(
                        h11.Response(
                            status_code=status,
                            headers=headers.response_headers(up_hdrs),
                            reason=event.reason,  # type: ignore[union-attr]
                            _parsed=True,  # see exchange.upstream_request()
                        )
                    )
                )
                self.head_sent = True
            elif kind is h11.InformationalResponse:
                self._handover(event)  # type: ignore[arg-type]
                return
            else:  # ConnectionClosed before a response
                self._closed_early()
                return

    def _handover(self, event: h11.Event) -> None:
        self._detach()
        self.server._spawn(self.down, self.server._slow(self.down, self.ctx, (self.up, event)))

    def _closed_early(self) -> None:
        """The service closed the connection before a byte of its answer."""
        self._detach()
        self.up.close()
        if self.up.reused:  # an idle connection it had dropped: once more on a new one
            self.server._spawn(self.down, self.server._slow(self.down, self.ctx))
            return
        b = self.backend
        self._fail(
            errors.UpstreamProtocolError(
                b.service, b.host, b.port, "connection closed before a response"
            )
        )

    def _broken(self, out: list[bytes], reason: str) -> None:
        b = self.backend
        if not self.head_sent:
            self._detach()
            self.up.close()
            self._fail(errors.UpstreamProtocolError(b.service, b.host, b.port, reason))
            return
        if out:
            self.down.write(b"".join(out))
        self._abort(f"service {b.service!r} broke off its answer: {reason}")

    def _fail(self, exc: errors.ProxyError) -> None:
        """Answer with the proxy's own error page (nothing was sent yet)."""
        self.server._answer(self.ctx, exc.status, exc.message)
        self.server.after(self.down, self.ctx)

    def _abort(self, error: str) -> None:
        """Mid-answer failure: the client's connection is cut so it sees a short answer."""
        self._detach()
        self.up.close()
        self.ctx.result.error = error
        self.down.transport.abort()
        self.server._log(self.ctx)

    def _up_lost(self, exc: BaseException | None) -> None:
        if self.up.reader.consumer is not None:
            self.on_data(b"")  # a reset without EOF: h11 reads it as the end

    def client_gone(self) -> None:
        self._detach()
        self.up.close()
        self.ctx.result.error = "client closed the connection during the response"
        self.server._log(self.ctx)

    def client_writable(self, ok: bool) -> None:
        if self.paused == ok:
            self.paused = not ok
            transport = self.up.reader.transport
            if not transport.is_closing():
                if ok:
                    transport.resume_reading()
                else:
                    transport.pause_reading()

    def timed_out(self) -> None:
        idle = self.server.settings.idle_timeout_s
        b = self.backend
        if self.head_sent:
            self._abort(f"service {b.service!r} idle for {idle:g} s mid-answer")
            return
        self._detach()
        self.up.close()
        self._fail(errors.UpstreamTimeoutError(b.service, b.host, b.port, "response", idle))

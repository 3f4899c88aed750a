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
from collections.abc import Callable, Mapping
from http import HTTPStatus

import anyio
import h11
from anyio.abc import TaskStatus

from devmesh.proxy import (
    accesslog,
    ca,
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

    # -- lifecycle -----------------------------------------------------------------------

    async def _listen(
        self, port: int, edge: table.Edge | None, tls: object | None
    ) -> tuple[int, list[asyncio.Server]]:
        """Bind 127.0.0.1:port (and ::1 on the same port when possible); the bound port."""
        proto = "https" if tls is not None else "http"

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.set_write_buffer_limits(high=self.settings.read_size)
            await self._connection(reader, writer, proto=proto, edge=edge)

        limit = self.settings.read_size
        shared, join = self.settings.reuse_port, self.settings.join_ports
        sock = listeners.bind(self.settings.host, port, shared=shared, join=join)
        first = await asyncio.start_server(handler, sock=sock, limit=limit, ssl=tls)
        bound = sock.getsockname()[1]
        servers = [first]
        if self.settings.ipv6:
            try:
                sock6 = listeners.bind("::1", bound, shared=shared, join=join)
                servers.append(
                    await asyncio.start_server(handler, sock=sock6, limit=limit, ssl=tls)
                )
            except OSError as exc:  # no IPv6 loopback here, or the port is taken on ::1
                log.debug("not listening on [::1]:%s: %s", bound, exc)
        return bound, servers

    async def start(self) -> None:
        """Bind the HTTP (and HTTPS) listeners. Raises OSError when a port is taken."""
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
        self.pool.close()
        self.access_log.flush()

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

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        proto: str,
        edge: table.Edge | None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        client = exchange.Client(reader, writer, proto=proto, edge=edge, config=self.settings)
        try:
            while True:
                try:
                    event = await client.next_event()
                except h11.RemoteProtocolError as exc:
                    self._bad_request(client, exc)
                    break
                if type(event) is not h11.Request:
                    break
                if not await self._exchange(client, event):
                    break
                client.conn.start_next_cycle()
        except (OSError, asyncio.CancelledError, exchange.ClientGoneError):
            writer.transport.abort()
        except Exception:
            log.exception("proxy connection from %s failed", client.peer)
            writer.transport.abort()
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

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

    async def _exchange(self, client: exchange.Client, request: h11.Request) -> bool:
        """Answer one request; True when the connection can serve another."""
        ctx = _Ctx(client, request)
        routes = self._table()
        try:
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
            await exchange.forward(
                client,
                request,
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
        self.access_log.record(
            accesslog.Entry(
                time=ctx.started,
                client=ctx.client.peer,
                method=request.method.decode("latin-1") if request else "-",
                host=ctx.host.decode("latin-1") if request else "-",
                path=request.target.decode("latin-1") if request else "-",
                status=result.status,
                bytes_in=result.bytes_in,
                bytes_out=result.bytes_out,
                duration_ms=(time.perf_counter() - ctx.clock) * 1000,
                upstream=f"{backend.host}:{backend.port}" if backend else None,
                caller=f"{edge.caller_service}.{edge.caller_project}" if edge else None,
                error=result.error,
            )
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

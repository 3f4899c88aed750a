"""The one forwarding path: route a request, forward it, answer failures, log the exchange.

Strategy: every request a client connection reads goes through one ``Forwarder``:

1. ``open`` makes the request's bookkeeping (an ``Exchange``), and ``route`` decides where it
   goes (``routing.choose``); a request the proxy answers itself (an unknown host, a stopped
   service) is answered there and then.
2. The exchange with the service then runs one of two ways, an execution strategy and
   nothing more: in the client connection's callbacks (``callbacks``) when the request has no
   body and an idle pooled connection is at hand, which costs no task and no await; or as a
   task (``run``) for everything else: bodies, upgrades, first connections. The callback
   execution hands an exchange to a task (``resume``, or ``run`` with ``attempt=1`` after a
   stale pooled connection) whenever the answer needs awaiting; the decisions (the retry
   rule, the error pages, the words of each error) are ``exchange``'s and this module's.
3. ``fail``/``answer`` turn a ProxyError into the page the client sees, at this one place;
   ``finish`` writes the access log line and says whether the client connection can serve
   another request.

The mesh's peer hop is one more listener of the same proxy: a connection whose Forwarder has
another table provider goes through the very same steps.
"""

from __future__ import annotations

import ast
import contextlib
import re
import time
from collections.abc import Callable
from http import HTTPStatus

import h11

from devmesh.proxy import (
    accesslog,
    errors,
    exchange,
    headers,
    pages,
    pool,
    routing,
    settings,
    table,
)

_H11_BAD_LINE = re.compile(r"^(illegal (?:request|header) line): bytearray\((b['\"].*['\"])\)$")
"""How h11 words a line it cannot parse; ``bad_request`` rewords it."""


class Exchange:
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


class Forwarder:
    """The proxy's decisions about requests, shared by every connection and strategy."""

    def __init__(
        self,
        config: settings.Settings,
        table_provider: Callable[[], table.RouteTable],
        upstreams: pool.Pool,
        access_log: accesslog.AccessLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` gives Unix seconds (a restarting service's page says how long it waits)."""
        self.settings = config
        self.table = table_provider
        self.pool = upstreams
        self.access_log = access_log
        self.clock = clock
        self.http_port: int | None = None
        """The ports the index page links to, set once the listeners are bound."""
        self.https_port: int | None = None

    def open(self, client: exchange.Client, request: h11.Request) -> Exchange:
        return Exchange(client, request)

    def route(self, ex: Exchange) -> table.Backend | None:
        """The backend ``ex`` goes to; None when the proxy answered it itself."""
        try:
            target = routing.choose(
                self.table(), edge=ex.client.edge, host=ex.host, now_s=self.clock
            )
        except errors.ProxyError as exc:
            self.fail(ex, exc)
            return None
        if type(target) is routing.OwnPage:
            rows = pages.service_lines(
                self.table().backends,
                port=self.http_port or 0,
                https_port=self.https_port,
                now_s=self.clock(),
            )
            self.answer(ex, target.status, target.message, services=rows)
            return None
        assert type(target) is table.Backend
        ex.backend = target
        return target

    async def run(self, ex: Exchange, backend: table.Backend, *, attempt: int = 0) -> bool:
        """Forward ``ex`` from its request head on, as a task; True when the client
        connection can serve another request. ``attempt``: see ``exchange.forward``."""
        assert ex.request is not None
        try:
            await exchange.forward(
                ex.client,
                ex.request,
                hdrs=ex.hdrs,
                host=ex.host,
                backend=backend,
                upstreams=self.pool,
                config=self.settings,
                result=ex.result,
                attempt=attempt,
            )
        except errors.ProxyError as exc:
            self.fail(ex, exc)
        except h11.RemoteProtocolError as exc:
            self.fail(ex, bad_request(exc))
        except exchange.ClientGoneError as exc:
            ex.result.error = str(exc)
            ex.client.writer.transport.abort()
        return self.finish(ex)

    async def resume(self, ex: Exchange, up: pool.Upstream, event: h11.Event) -> bool:
        """Finish, as a task, an exchange whose request went out in callbacks, from the
        service's first event on (``run``'s answer)."""
        assert ex.backend is not None
        try:
            await exchange.resume(
                ex.client,
                up,
                event,
                backend=ex.backend,
                upstreams=self.pool,
                config=self.settings,
                result=ex.result,
            )
        except errors.ProxyError as exc:
            self.fail(ex, exc)
        except h11.RemoteProtocolError as exc:
            self.fail(ex, bad_request(exc))
        except exchange.ClientGoneError as exc:
            ex.result.error = str(exc)
            ex.client.writer.transport.abort()
        return self.finish(ex)

    def fail(self, ex: Exchange, exc: errors.ProxyError) -> None:
        """Answer with the proxy's page for ``exc`` (or cut the connection when the answer
        had already begun)."""
        self.answer(ex, exc.status, exc.message)

    def answer(
        self,
        ex: Exchange,
        status: int,
        message: str,
        services: list[tuple[str, str, str | None]] | None = None,
    ) -> None:
        """Send the proxy's own answer, or abort when a response already started."""
        result, conn = ex.result, ex.client.conn
        if status >= 400:
            result.error = message
        if conn.our_state is not h11.SEND_RESPONSE:
            ex.client.writer.transport.abort()
            return
        with contextlib.suppress(h11.RemoteProtocolError):  # an empty body ends without I/O
            while conn.their_state is h11.SEND_BODY and conn.next_event() is not h11.NEED_DATA:
                pass
        accept = headers.get(ex.hdrs, b"accept")
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
        ex.client.writer.write(data)
        head_only = ex.request is not None and ex.request.method == b"HEAD"
        result.bytes_out += 0 if head_only else len(body)

    def reject(self, client: exchange.Client, exc: h11.RemoteProtocolError) -> None:
        """Answer bytes that are not a request (400, or 431 for a head too large) and log
        them. h11 is in its ERROR state by now and sends nothing more: the answer is written
        raw, and the connection must be closed after it."""
        error = bad_request(exc)
        if client.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            ctype, body = pages.render(error.status, error.message, accept=None)
            head = (
                f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
                f"content-type: {ctype.decode()}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\nvia: 1.1 devmesh\r\n\r\n"
            )
            client.writer.write(head.encode() + body)
        ex = Exchange(client, None)
        ex.result.status, ex.result.error = error.status, error.message
        self.finish(ex)

    def finish(self, ex: Exchange) -> bool:
        """Log the exchange; True when both sides ended cleanly (the connection lives on)."""
        self._log(ex)
        conn = ex.client.conn
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _log(self, ex: Exchange) -> None:
        if not self.access_log.enabled:
            return  # building the entry costs as much as routing the request
        edge, request, backend, result = ex.client.edge, ex.request, ex.backend, ex.result
        # The keys are accesslog.Entry's fields, in its order (the JSON lines keep it).
        self.access_log.record_fields(
            {
                "time": ex.started,
                "client": ex.client.peer,
                "method": request.method.decode("latin-1") if request else "-",
                "host": ex.host.decode("latin-1") if request else "-",
                "path": request.target.decode("latin-1") if request else "-",
                "status": result.status,
                "bytes_in": result.bytes_in,
                "bytes_out": result.bytes_out,
                "duration_ms": (time.perf_counter() - ex.clock) * 1000,
                "upstream": f"{backend.host}:{backend.port}" if backend else None,
                "caller": f"{edge.caller_service}.{edge.caller_project}" if edge else None,
                "error": result.error,
            }
        )


def bad_request(exc: h11.RemoteProtocolError) -> errors.BadRequestError:
    """The 400 (or 431) for bytes h11 could not parse, in words a developer can act on.

    h11 quotes the offending line as a Python ``bytearray(b'...')``; the message says instead
    which byte is wrong and where, and that a URL's non-ASCII characters are percent-encoded.
    """
    if exc.error_status_hint == 431:
        return errors.BadRequestError(431, "request head too large")
    text = str(exc)
    found = _H11_BAD_LINE.match(text)
    if found is None:
        return errors.BadRequestError(400, f"malformed request: {text}")
    what = found.group(1)
    try:
        line = ast.literal_eval(found.group(2))
    except (ValueError, SyntaxError):
        return errors.BadRequestError(400, f"malformed request: {what}")
    shown = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in line)
    for i, byte in enumerate(line):
        if byte >= 0x80:
            hint = f"; a URL carries it percent-encoded, as %{byte:02X}" if "req" in what else ""
            return errors.BadRequestError(
                400, f'malformed request: {what} "{shown}": non-ASCII byte at offset {i}{hint}'
            )
        if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
            return errors.BadRequestError(
                400,
                f'malformed request: {what} "{shown}": control byte 0x{byte:02X} at offset {i}',
            )
    return errors.BadRequestError(400, f'malformed request: {what} "{shown}"')

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
    metrics,
    pages,
    peering,
    pool,
    routing,
    selection,
    settings,
    table,
    upstream,
)

_H11_BAD_LINE = re.compile(r"^(illegal (?:request|header) line): bytearray\((b['\"].*['\"])\)$")
"""How h11 words a line it cannot parse; ``bad_request`` rewords it."""


class Exchange:
    """One request's bookkeeping, from its head to its access log line."""

    __slots__ = (
        "adjust",
        "backend",
        "client",
        "clock",
        "copy",
        "counted",
        "hdrs",
        "hop",
        "host",
        "plan",
        "request",
        "result",
        "started",
    )

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
        self.plan: selection.Plan | None = None
        """The targets of a mesh-routed request; None on the fast path."""
        self.hop: selection.Hop | None = None
        """The target being tried (``plan.hop``)."""
        self.adjust: upstream.Adjust | None = None
        """How the request head differs from the client's (a hop, or the peer listener's)."""
        self.counted: tuple[str, str, str] | None = None
        """(project, service, target key) counted as outstanding for this exchange."""
        self.copy: exchange.BodyCopy | None = None
        """The request body kept for another target (``exchange.RETRY_BODY_BYTES``)."""


class Forwarder:
    """The proxy's decisions about requests, shared by every connection and strategy."""

    def __init__(
        self,
        config: settings.Settings,
        table_provider: Callable[[], table.RouteTable],
        upstreams: pool.Pool,
        access_log: accesslog.AccessLog,
        *,
        clock: Callable[[], float] = time.time,
        router: selection.Router | None = None,
        recorder: metrics.Recorder | None = None,
    ) -> None:
        """``clock`` gives Unix seconds (a restarting service's page says how long it waits);
        ``router`` holds the selection state (its own clock, for down marks); ``recorder``
        counts every exchange (None: no metrics, and ``/metrics`` says so)."""
        self.router = router or selection.Router()
        self.settings = config
        self.table = table_provider
        self.pool = upstreams
        self.access_log = access_log
        self.clock = clock
        self.http_port: int | None = None
        """The ports the index page links to, set once the listeners are bound."""
        self.https_port: int | None = None
        self.metrics = recorder

    def open(self, client: exchange.Client, request: h11.Request) -> Exchange:
        return Exchange(client, request)

    def route(self, ex: Exchange) -> table.Backend | None:
        """The backend ``ex`` goes (first) to; None when the proxy answered it itself."""
        routes_table = self.table()
        if routes_table.peer_tls is not self.pool.peer_tls:
            self.pool.peer_tls = routes_table.peer_tls
        if ex.client.mesh is not None:
            return self._route_peer(ex, routes_table)
        request = ex.request
        if (
            request is not None
            and request.target.startswith(metrics.PATH)
            and metrics.is_metrics_request(ex, routes_table)
        ):
            self._answer_metrics(ex)
            return None
        try:
            target = routing.choose(
                routes_table,
                edge=ex.client.edge,
                host=ex.host,
                hdrs=ex.hdrs,
                router=self.router,
                now_s=self.clock,
            )
        except errors.ProxyError as exc:
            self.fail(ex, exc)
            return None
        kind = type(target)
        if kind is table.Backend:
            assert isinstance(target, table.Backend)
            ex.backend = target
            return target
        if kind is selection.Plan:
            assert isinstance(target, selection.Plan)
            ex.plan = target
            ex.hop = ex.adjust = target.hop
            warning = target.decision.warning
            if warning:
                ex.result.extra = [(selection.WARNING_HEADER, _header_text(warning))]
            ex.backend = target.hop.backend
            if len(target.hops) > 1 and _copyable(ex.hdrs):
                ex.copy = exchange.BodyCopy()
            return ex.backend
        if kind is routing.Local:
            assert isinstance(target, routing.Local)
            if target.warning:
                ex.result.extra = [(selection.WARNING_HEADER, _header_text(target.warning))]
            ex.backend = target.backend
            return target.backend
        if kind is routing.Refused:
            assert isinstance(target, routing.Refused)
            decision = target.decision
            self.answer(ex, decision.status or 502, decision.explanation)
            return None
        assert isinstance(target, routing.OwnPage)
        rows = pages.service_lines(
            routes_table.backends,
            port=self.http_port or 0,
            https_port=self.https_port,
            now_s=self.clock(),
        )
        self.answer(ex, target.status, target.message, services=rows)
        return None

    def _route_peer(self, ex: Exchange, routes_table: table.RouteTable) -> table.Backend | None:
        """A request on the peer listener: a local shared backend, or its own answer."""
        client, request = ex.client, ex.request
        assert client.mesh is not None and client.caller is not None and request is not None
        served = peering.serve(
            routes_table,
            client.mesh,
            client.caller,
            method=request.method,
            target=request.target,
            hdrs=ex.hdrs,
            node_name=routes_table.peer_tls.node_name if routes_table.peer_tls else "",
        )
        if isinstance(served, peering.Answer):
            extra = [(selection.UNAVAILABLE_HEADER, b"1")] if served.unavailable else []
            if served.close:
                extra.append((b"connection", b"close"))
            self.send(ex, served.status, b"application/json", served.body, extra)
            if served.status >= 400:
                ex.result.error = served.body.decode("utf-8", "replace")
            return None
        ex.backend = served
        ex.adjust = peering.STRIP
        return served

    def _answer_metrics(self, ex: Exchange) -> None:
        """``/metrics`` of devmesh.localhost: every proxy process's counts, no token needed
        (they hold names and numbers only)."""
        if self.metrics is None:
            self.answer(ex, 404, "metrics are off in this proxy (DEVMESH_METRICS=off)")
            return
        body = self.metrics.exposition()
        self.send(ex, 200, metrics.CONTENT_TYPE, body, [])

    async def run(self, ex: Exchange, backend: table.Backend, *, attempt: int = 0) -> bool:
        """Forward ``ex`` from its request head on, as a task; True when the client
        connection can serve another request. ``attempt``: see ``exchange.forward``.

        A mesh-routed request moves to its plan's next target when a connection fails
        before the request is sent, when a peer says it has no instance, and (once, for an
        idempotent request) when the upstream dies before answering. A request whose body
        had begun to leave moves only when the whole body is in its copy
        (``exchange.RETRY_BODY_BYTES``)."""
        assert ex.request is not None
        if (
            self.metrics is not None
            and ex.result.on_open is None
            and headers.get(ex.hdrs, b"upgrade") is not None
        ):
            # A cycle (ex -> result -> hook -> ex) until ``finish`` breaks it: only for
            # upgrades, so other requests stay free of garbage the collector must find.
            ex.result.on_open = lambda: self._opened(ex)
        while True:
            self.entered(ex)
            try:
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
                        hop=ex.adjust,
                        copy=ex.copy,
                    )
                except errors.ProxyError as exc:
                    copy = ex.copy
                    if copy is not None and copy.size and self._moves(ex, exc) is not None:
                        # The body had begun to leave: it goes on only if it is all held.
                        limit = self.settings.max_body_bytes
                        await exchange.finish_copy(ex.client, copy, limit, ex.result)
                    following = self._next(ex, exc)
                    if isinstance(following, table.Backend):
                        backend, attempt = following, 0
                        continue
                    self.fail(ex, following)
            except errors.ProxyError as exc:  # reading the rest of the body for the copy
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
            return await self.failover(ex, exc)
        except h11.RemoteProtocolError as exc:
            self.fail(ex, bad_request(exc))
        except exchange.ClientGoneError as exc:
            ex.result.error = str(exc)
            ex.client.writer.transport.abort()
        return self.finish(ex)

    async def failover(self, ex: Exchange, exc: errors.ProxyError) -> bool:
        """After ``exc`` ended an attempt: the plan's next target (``run``), or the answer."""
        following = self._next(ex, exc)
        if isinstance(following, table.Backend):
            return await self.run(ex, following)
        self.fail(ex, following)
        return self.finish(ex)

    def _moves(self, ex: Exchange, exc: errors.ProxyError) -> bool | None:
        """Whether ``exc`` lets a mesh-routed request move to its next target: True when
        the target is to be marked down (nothing reached its service), False for the one
        retry of an idempotent request whose upstream died before answering, None when it
        does not move (whatever the body)."""
        plan, request = ex.plan, ex.request
        if plan is None or ex.hop is None or request is None:
            return None
        if isinstance(exc, errors.UpstreamConnectError | errors.PeerUnavailableError) or (
            isinstance(exc, errors.UpstreamTimeoutError) and exc.phase == "connection"
        ):
            return True
        if (
            isinstance(exc, errors.UpstreamClosedEarlyError)
            and not plan.retried
            and request.method in selection.IDEMPOTENT
        ):
            return False
        return None

    def _next(self, ex: Exchange, exc: errors.ProxyError) -> table.Backend | errors.ProxyError:
        """The next target to try after ``exc``, or the error to answer with."""
        down = self._moves(ex, exc)
        plan, hop = ex.plan, ex.hop
        if down is None or plan is None or hop is None:
            return exc
        if down:
            self.router.mark_down(plan.project, plan.service, hop.target.key, exc.message)
        if plan.index + 1 < len(plan.hops) and not _body_resendable(ex):
            return errors.NotRetriedError(exc, _over_bound(ex))
        if not down:
            plan.retried = True
        plan.tried.append(selection.failed_words(plan, exc.message))
        plan.index += 1
        if plan.index >= len(plan.hops):
            return errors.AllTargetsFailedError(plan.service, plan.tried)
        ex.hop = ex.adjust = plan.hop
        ex.backend = plan.hop.backend
        return ex.backend

    def _opened(self, ex: Exchange) -> None:
        if self.metrics is not None:
            self.metrics.opened(ex, self.table())

    def entered(self, ex: Exchange) -> None:
        """Count ``ex`` as outstanding on its current target (and no longer on the last)."""
        hop, plan = ex.hop, ex.plan
        if hop is None or plan is None:
            return
        router = self.router
        if ex.counted is not None:
            router.leave(*ex.counted)
        ex.counted = (plan.project, plan.service, hop.target.key)
        router.enter(*ex.counted)

    def fail(self, ex: Exchange, exc: errors.ProxyError) -> None:
        """Answer with the proxy's page for ``exc`` (or cut the connection when the answer
        had already begun).

        On the peer listener, a failure is passed on in the form that lets the calling node
        move on, as if the caller had met it itself: when nothing reached the service (its
        connection failed) the answer carries ``x-devmesh-unavailable: 1``; when the service
        died before answering a request the caller may retry (idempotent, and a body that
        fits the caller's copy, ``exchange.RETRY_BODY_BYTES``), the connection is cut without
        an answer, which the caller treats exactly as a local service closing early.
        Otherwise the caller would pass this node's 502 on to its client while another
        instance could have answered.
        """
        request = ex.request
        if ex.client.mesh is not None and request is not None:
            if isinstance(exc, errors.UpstreamConnectError) or (
                isinstance(exc, errors.UpstreamTimeoutError) and exc.phase == "connection"
            ):
                if ex.client.conn.our_state is h11.SEND_RESPONSE:
                    ex.result.error = exc.message
                    accept = headers.get(ex.hdrs, b"accept")
                    ctype, body = pages.render(exc.status, exc.message, accept=accept)
                    extra = [(selection.UNAVAILABLE_HEADER, b"1")]
                    self.send(ex, exc.status, ctype, body, extra)
                    return
            elif (
                isinstance(exc, errors.UpstreamClosedEarlyError)
                and request.method in selection.IDEMPOTENT
                and _fits_a_copy(ex)
            ):
                ex.result.error = exc.message
                ex.client.writer.transport.abort()
                return
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
        self.send(ex, status, ctype, body, [])

    def send(
        self, ex: Exchange, status: int, ctype: bytes, body: bytes, extra: headers.Headers
    ) -> None:
        """Write the proxy's own complete answer (the client's request has been read)."""
        result, conn = ex.result, ex.client.conn
        with contextlib.suppress(h11.RemoteProtocolError):  # an empty body ends without I/O
            while conn.their_state is h11.SEND_BODY and conn.next_event() is not h11.NEED_DATA:
                pass
        hdrs = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"via", headers.VIA),
            *extra,
        ]
        if conn.their_state is not h11.DONE and (b"connection", b"close") not in extra:
            hdrs.append((b"connection", b"close"))
        result.status = status
        data = conn.send(
            h11.Response(
                status_code=status, headers=hdrs, reason=HTTPStatus(status).phrase.encode()
            )
        )
        head_only = ex.request is not None and ex.request.method == b"HEAD"
        if not head_only:  # h11 frames a HEAD answer's Content-Length with no body
            data += conn.send(h11.Data(data=body))
            result.bytes_out += len(body)
        data += conn.send(h11.EndOfMessage())
        ex.client.writer.write(data)

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
        if ex.counted is not None:
            self.router.leave(*ex.counted)
            ex.counted = None
            answered = ex.result.status and ex.result.error is None  # by the target itself
            if answered and ex.plan is not None and ex.hop is not None:
                self.router.mark_up(ex.plan.project, ex.plan.service, ex.hop.target.key)
        if self.metrics is not None:
            self.metrics.finished(ex, self.table())
            ex.result.on_open = None
        self._log(ex)
        conn = ex.client.conn
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _log(self, ex: Exchange) -> None:
        if not self.access_log.enabled:
            return  # building the entry costs as much as routing the request
        edge, request, backend, result = ex.client.edge, ex.request, ex.backend, ex.result
        hop, client = ex.hop, ex.client
        target = None
        if edge is not None:
            caller: str | None = f"{edge.caller_service}.{edge.caller_project}"
            owner = ex.plan.target_project if ex.plan is not None else None
            if owner is None and backend is not None and ex.hop is None:
                owner = backend.project
            if owner and owner != edge.caller_project:
                target = f"{owner}/{edge.target_service}"
        elif client.mesh is not None and isinstance(client.caller, peering.PeerCaller):
            who = client.caller
            caller = f"peer {self.table().node_name(who.node_id, who.node_name)}"
        else:
            caller = None
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
                "caller": caller,
                "route": hop.route if hop is not None else ("local" if backend else None),
                "node": hop.node if hop is not None else None,
                "target": target,
                "error": result.error,
            }
        )


def bad_request(exc: h11.RemoteProtocolError) -> errors.BadRequestError:
    """The 400 (or 431) for bytes h11 could not parse, in words a developer can act on.

    h11 quotes the offending line as a Python ``bytearray(b'...')``; the message says instead
    which byte is wrong and where, and that a URL's non-ASCII characters are percent-encoded.
    """
    if exc.error_status_hint in (408, 431):
        words = str(exc) if exc.error_status_hint == 408 else "request head too large"
        return errors.BadRequestError(exc.error_status_hint, words)
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


def _has_body(hdrs: headers.Headers) -> bool:
    length = headers.get(hdrs, b"content-length")
    return headers.is_chunked(hdrs) or (length is not None and length.strip() not in (b"", b"0"))


def _declared_length(hdrs: headers.Headers) -> int | None:
    length = headers.get(hdrs, b"content-length")
    if length is None or headers.is_chunked(hdrs):
        return None
    try:
        return int(length)
    except ValueError:
        return None


def _copyable(hdrs: headers.Headers) -> bool:
    """Whether a body is worth copying: there is one, and it is not declared over the bound."""
    if not _has_body(hdrs):
        return False
    length = _declared_length(hdrs)
    return length is None or length <= exchange.RETRY_BODY_BYTES


def _body_resendable(ex: Exchange) -> bool:
    """Whether the request can go to another target with its body: none of it has left the
    client yet, or all of it is in the copy."""
    copy = ex.copy
    if copy is not None and copy.whole:
        return True
    return ex.result.bytes_in == 0 and (copy is None or not copy.complete)


def _fits_a_copy(ex: Exchange) -> bool:
    """On the peer listener: whether the calling node holds this request's body whole (no
    body, or one within the bound), so that it can send it elsewhere."""
    if not _has_body(ex.hdrs):
        return True
    length = _declared_length(ex.hdrs)
    bound = exchange.RETRY_BODY_BYTES
    return (length is None or length <= bound) and ex.result.bytes_in <= bound


def _over_bound(ex: Exchange) -> str:
    return (
        f"its body is larger than the {exchange.RETRY_BODY_BYTES // 1024} KiB the proxy keeps "
        "to send a request again"
    )


def _header_text(words: str) -> bytes:
    """A sentence as a header value: printable ASCII only (h11 refuses control bytes)."""
    return "".join(c if " " <= c <= "~" else "?" for c in words).encode("ascii")

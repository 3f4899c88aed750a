"""The dashboard's HTTP and WebSocket listener: static files, one action, one live feed.

Why its own listener on a loopback port, behind the proxy: the proxy routes
``devmesh.localhost`` (HTTP and HTTPS) to the agent's backend, so the dashboard gets TLS,
WebSocket tunnelling and the access log from the one forwarding path, and speaks plain
HTTP/1.1 itself (h11 frames, wsproto for the feed's frames, anyio moves bytes).

Routes:
  GET  /?token=T      trades the token for the cookie, 303 to ``/`` (out of the address bar)
  GET  /              the page, with a fresh per-page CSRF token in a <meta>
  GET  /static/NAME   the page's scripts and styles (shipped in the wheel, no build step)
  GET  /feed          the WebSocket: ``state`` documents on every change, and on request
                      the access log (``tap``) and one service's log (``log``)
  POST /api/restart   {project, service}: the one action
Every route needs the token (cookie, or ``Authorization: Bearer`` for scripts) and answers
401 without it; the action also needs the dashboard's ``Origin`` and the page's CSRF token,
the feed an ``Origin`` that is the dashboard's when the client sends one (see ``auth``).

Feed protocol (JSON text messages). Server: ``{"type": "state", "state": {...}}``,
``{"type": "tap", "entries": [...], "dropped": N}``, ``{"type": "log", "service": "P/S",
"lines": [{"line", "time"}]}``, ``{"type": "error", "message"}``. Client:
``{"type": "tap", "on": bool, "service": "", "status": "2xx|3xx|4xx|5xx|error|"}`` and
``{"type": "log", "project": P, "service": S}`` (``service`` null stops following).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
from wsproto import ConnectionType
from wsproto.connection import Connection as WsConnection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from devmesh.dashboard import auth
from devmesh.dashboard.source import ActionError, Source

log = logging.getLogger("devmesh.dashboard")

STATIC = Path(__file__).with_name("static")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = [
    # Nothing from elsewhere: no CDN, no font, no inline script; the favicon is a data: URL.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]
MAX_BODY = 64 * 1024
IDLE_TIMEOUT_S = 60.0
PING_EVERY_S = 15.0
"""Keeps the feed's tunnel through the proxy from idling out while nothing changes."""
TAP_BATCH_S = 0.2
TAP_MAX_PER_S = 200
"""Access-log entries sent per second at most; the rest are counted as ``dropped``."""
TAP_TAIL = 100
LOG_TAIL = 200
STATUS_CLASSES = {"1xx", "2xx", "3xx", "4xx", "5xx", "error"}
UNAUTHORISED = (
    "401 Unauthorized: the dashboard needs the agent's token.\n"
    "Open the URL that `devmesh dashboard` prints (it carries the token once).\n"
)


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    upgrade: bool


@dataclass(slots=True)
class _Answer:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class Dashboard:
    """Serves the dashboard of one agent; ``origins()`` are its own (proxy) origins."""

    def __init__(
        self,
        source: Source,
        token: str,
        origins: Callable[[], Iterable[str]],
        *,
        static: Path = STATIC,
    ) -> None:
        self.source = source
        self.token = token
        self.origins = origins
        self.static = static
        self.port: int | None = None
        self._clients = 0
        self._present = anyio.Event()
        self._updated = anyio.Event()
        self._version = 0
        self._text: str | None = None

    # ------------------------------------------------------------------ listener

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; reports the port."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener, anyio.create_task_group() as tg:
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            self.port = int(sock.getsockname()[1])
            tg.start_soon(self._publish)
            task_status.started(self.port)
            await listener.serve(self._connection)

    async def _publish(self) -> None:
        """Compute the state while a page is connected; wake the pages when it changed."""
        while True:
            if not self._clients:
                self._text = None
                await self._present.wait()
            text: str | None
            try:
                text = json.dumps(self.source.state(), sort_keys=True, default=str)
            except Exception:  # a bug in a view must not end the feed for good
                log.exception("dashboard: cannot build the state")
                text = self._text
            if text is not None and text != self._text:
                self._text = text
                self._version += 1
                self._updated.set()
                self._updated = anyio.Event()
            await self.source.tick()

    def _join(self) -> None:
        self._clients += 1
        self._present.set()

    def _leave(self) -> None:
        self._clients -= 1
        if not self._clients:
            self._present = anyio.Event()

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=32 * 1024)
        async with stream:
            try:
                while True:
                    with anyio.fail_after(IDLE_TIMEOUT_S):
                        req = await _read(conn, stream)
                    if req is None:
                        return
                    if req.upgrade and req.path == "/feed":
                        await self._feed(conn, stream, req)
                        return
                    answer = await self._answer(req)
                    await _send(conn, stream, req, answer)
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with contextlib.suppress(Exception):
                        bad = _Answer(400, f"bad request: {exc}\n".encode())
                        await _send(conn, stream, None, bad)
            except (
                TimeoutError,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ):
                pass
            except Exception:
                log.exception("dashboard connection failed")

    def _authorised(self, req: _Request) -> bool:
        return auth.same(auth.request_token(req.headers), self.token)

    async def _answer(self, req: _Request) -> _Answer:
        if req.path == "/" and "token" in req.query and req.method == "GET":
            if not auth.same(req.query["token"], self.token):
                return _Answer(401, UNAUTHORISED.encode())
            secure = req.headers.get("x-forwarded-proto") == "https"
            cookie = auth.set_cookie(req.headers.get("host"), self.token, secure=secure)
            return _Answer(303, b"", headers=[("Location", "/"), ("Set-Cookie", cookie)])
        if not self._authorised(req):
            return _Answer(401, UNAUTHORISED.encode())
        if req.path == "/feed":
            return _Answer(426, b"the feed is a WebSocket\n", headers=[("Upgrade", "websocket")])
        if req.path == "/api/restart":
            if req.method != "POST":
                return _Answer(405, b"POST only\n", headers=[("Allow", "POST")])
            return await self._restart(req)
        if req.method not in ("GET", "HEAD"):
            return _Answer(405, b"GET only\n", headers=[("Allow", "GET, HEAD")])
        if req.path in ("/", "/index.html"):
            page = (self.static / "index.html").read_text()
            csrf = auth.mint_csrf(self.token)
            return _Answer(200, page.replace("{{CSRF}}", csrf).encode(), CONTENT_TYPES[".html"])
        if req.path.startswith("/static/"):
            return self._file(req.path.removeprefix("/static/"))
        return _Answer(404, b"not found\n")

    def _file(self, name: str) -> _Answer:
        path = (self.static / name).resolve()
        if (
            self.static.resolve() not in path.parents
            or not path.is_file()
            or path.suffix not in CONTENT_TYPES
        ):
            return _Answer(404, b"not found\n")
        return _Answer(200, path.read_bytes(), CONTENT_TYPES[path.suffix])

    async def _restart(self, req: _Request) -> _Answer:
        if not auth.origin_allowed(req.headers.get("origin"), self.origins()):
            return _json(403, {"error": "refused: the request does not come from the dashboard"})
        if not auth.check_csrf(req.headers.get(auth.CSRF_HEADER), self.token):
            return _json(403, {"error": "refused: missing or wrong CSRF token; reload the page"})
        try:
            body = json.loads(req.body)
            project, service = body["project"], body["service"]
            if not isinstance(project, str) or not isinstance(service, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": 'expected {"project": P, "service": S}'})
        try:
            result = await self.source.restart(project, service)
        except ActionError as exc:
            return _json(exc.status, {"error": exc.message})
        return _json(200, result)

    # ------------------------------------------------------------------ feed

    async def _feed(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, req: _Request
    ) -> None:
        if not self._authorised(req):
            await _send(conn, stream, req, _Answer(401, UNAUTHORISED.encode()))
            return
        given = req.headers.get("origin")
        if given is not None and not auth.origin_allowed(given, self.origins()):
            await _send(conn, stream, req, _Answer(403, b"refused: a page of another origin\n"))
            return
        key = req.headers.get("sec-websocket-key")
        if not key or req.headers.get("sec-websocket-version") != "13":
            await _send(conn, stream, req, _Answer(400, b"bad WebSocket handshake\n"))
            return
        accept = generate_accept_token(key.encode()).decode()
        head = h11.InformationalResponse(
            status_code=101,
            headers=[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", accept),
            ],
        )
        await stream.send(conn.send(head) or b"")
        ws = WsConnection(ConnectionType.SERVER, trailing_data=bytes(conn.trailing_data[0]))
        session = _Session(self, ws, stream)
        self._join()
        try:
            await session.run()
        finally:
            self._leave()


class _Session:
    """One page's feed: state pushes, its subscriptions, and its messages."""

    def __init__(self, dash: Dashboard, ws: WsConnection, stream: anyio.abc.ByteStream) -> None:
        self.dash = dash
        self.ws = ws
        self.stream = stream
        self.lock = anyio.Lock()
        self.tap_scope: anyio.CancelScope | None = None
        self.log_scope: anyio.CancelScope | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        """The session's tasks: subscriptions start theirs here."""

    async def send(self, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc, default=str)
        async with self.lock:
            await self.stream.send(self.ws.send(TextMessage(data=text)))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self._push)
            tg.start_soon(self._ping)
            await self._read()
            tg.cancel_scope.cancel()

    async def _push(self) -> None:
        sent = 0
        while True:
            updated = self.dash._updated
            if self.dash._version != sent and self.dash._text is not None:
                sent = self.dash._version
                await self.send('{"type": "state", "state": ' + self.dash._text + "}")
            await updated.wait()

    async def _ping(self) -> None:
        while True:
            await anyio.sleep(PING_EVERY_S)
            async with self.lock:
                await self.stream.send(self.ws.send(Ping()))

    async def _read(self) -> None:
        while True:
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        async with self.lock:
                            await self.stream.send(self.ws.send(event.response()))
                    return
                if isinstance(event, Ping):
                    async with self.lock:
                        await self.stream.send(self.ws.send(event.response()))
                elif isinstance(event, TextMessage | BytesMessage):
                    await self._message(event.data)

    async def _message(self, data: str | bytes | bytearray) -> None:
        try:
            msg = json.loads(data)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            await self.send({"type": "error", "message": "not a JSON message with a type"})
            return
        if kind == "tap":
            if self.tap_scope is not None:
                self.tap_scope.cancel()
                self.tap_scope = None
            if msg.get("on"):
                status = str(msg.get("status") or "")
                if status and status not in STATUS_CLASSES:
                    await self.send({"type": "error", "message": f"unknown status {status!r}"})
                    return
                self.tap_scope = anyio.CancelScope()
                assert self.tg is not None
                self.tg.start_soon(self._tap, self.tap_scope, str(msg.get("service") or ""), status)
        elif kind == "log":
            if self.log_scope is not None:
                self.log_scope.cancel()
                self.log_scope = None
            project, service = msg.get("project"), msg.get("service")
            if isinstance(project, str) and isinstance(service, str) and service:
                self.log_scope = anyio.CancelScope()
                assert self.tg is not None
                self.tg.start_soon(self._log, self.log_scope, project, service)
        else:
            await self.send({"type": "error", "message": f"unknown message type {kind!r}"})

    async def _tap(self, scope: anyio.CancelScope, service: str, status: str) -> None:
        with scope:
            entries = self.dash.source.access_log(TAP_TAIL)
            try:
                await self._batches(
                    entries,
                    lambda e: _tap_match(e, service, status),
                    lambda batch, dropped: {"type": "tap", "entries": batch, "dropped": dropped},
                )
            finally:
                await _aclose(entries)

    async def _log(self, scope: anyio.CancelScope, project: str, service: str) -> None:
        with scope:
            label = f"{project}/{service}"
            try:
                lines = self.dash.source.service_log(project, service, LOG_TAIL)
            except ActionError as exc:
                await self.send({"type": "error", "message": exc.message})
                return
            try:
                await self._batches(
                    lines,
                    lambda _: True,
                    lambda batch, dropped: {
                        "type": "log",
                        "service": label,
                        "lines": batch,
                        "dropped": dropped,
                    },
                    limit=math.inf,
                )
            finally:
                await _aclose(lines)

    async def _batches(
        self,
        items: AsyncIterator[dict[str, Any]],
        keep: Callable[[dict[str, Any]], bool],
        wrap: Callable[[list[dict[str, Any]], int], dict[str, Any]],
        *,
        limit: float = TAP_MAX_PER_S * TAP_BATCH_S,
    ) -> None:
        """Forward ``items`` in batches every TAP_BATCH_S; past ``limit`` per batch, count."""
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](10000)

        async def pump() -> None:
            async with send:
                async for item in items:
                    if "ready" in item or not keep(item):
                        continue
                    try:
                        send.send_nowait(item)
                    except anyio.WouldBlock:
                        pass

        async with anyio.create_task_group() as tg, recv:
            tg.start_soon(pump)
            while True:
                batch: list[dict[str, Any]] = []
                dropped = 0
                with anyio.move_on_after(TAP_BATCH_S):
                    async for item in recv:
                        if len(batch) < limit:
                            batch.append(item)
                        else:
                            dropped += 1
                while True:
                    try:
                        item = recv.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    if len(batch) < limit:
                        batch.append(item)
                    else:
                        dropped += 1
                if batch or dropped:
                    await self.send(wrap(batch, dropped))


def _tap_match(entry: dict[str, Any], service: str, status: str) -> bool:
    if service and entry.get("service") != service:
        return False
    if not status:
        return True
    code = int(entry.get("status") or 0)
    if status == "error":
        return code == 0 or code >= 400
    return code // 100 == int(status[0])


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await aclose()


def _json(status: int, doc: dict[str, Any]) -> _Answer:
    return _Answer(status, json.dumps(doc).encode(), "application/json")


async def _read(conn: h11.Connection, stream: anyio.abc.ByteStream) -> _Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except anyio.EndOfStream:
                data = b""
            if not data and conn.their_state is h11.IDLE:
                return None
            conn.receive_data(data)
        elif event is h11.PAUSED:
            break  # an upgrade request, complete: the caller answers it
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            if conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
                break
        elif isinstance(event, h11.ConnectionClosed):
            return None
    assert head is not None
    target = head.target.decode("latin-1")
    raw_path, _, raw_query = target.partition("?")
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
    return _Request(
        method=head.method.decode("ascii").upper(),
        path=urllib.parse.unquote(raw_path),
        query=dict(urllib.parse.parse_qsl(raw_query)),
        headers=headers,
        body=bytes(body),
        upgrade="upgrade" in headers.get("connection", "").lower()
        and headers.get("upgrade", "").lower() == "websocket",
    )


async def _send(
    conn: h11.Connection, stream: anyio.abc.ByteStream, req: _Request | None, answer: _Answer
) -> None:
    headers = [
        ("Content-Type", answer.content_type),
        ("Content-Length", str(len(answer.body))),
        ("Cache-Control", "no-store"),
        *SECURITY_HEADERS,
        *answer.headers,
    ]
    if conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
    if answer.body and (req is None or req.method != "HEAD"):
        data += conn.send(h11.Data(data=answer.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send(data)

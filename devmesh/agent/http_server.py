"""The agent's side of the control API: a tiny JSON router served over a Unix socket.

The control API is local-only by construction: it listens on a Unix socket of mode 0600 in
DEVMESH_HOME, so only the owning user can reach it and nothing on the network can. This
module knows nothing of devmesh's endpoints; the agent registers them on a ``Router``.

Strategy: h11 parses and frames, anyio moves bytes. One task per connection runs h11's
request/response cycle with keep-alive. Every failure is contained to its connection: a
malformed request gets a 400 and a close, an unexpected handler exception a 500 with its
message, and a client that vanishes mid-stream gets its stream's iterator closed, so a
``logs -f`` producer stops when nobody listens. A stream that fails after its 200 head was
sent ends with an ``x-devmesh-error`` trailer, which the client turns back into an error.

Not guaranteed: fairness between clients, or limits beyond a body-size cap. Callers are the
user's own CLI and dashboard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11

from devmesh.agent import client

log = logging.getLogger(__name__)

ApiError = client.ApiError
ERROR_TRAILER = client.ERROR_TRAILER
MAX_BODY_BYTES = 16 * 1024 * 1024
"""Largest request body accepted; config documents are kilobytes."""
IDLE_TIMEOUT_S = 300.0
"""How long a connection may sit between (or inside) requests before it is dropped."""
_READ_SIZE = 65536
_MAX_UNIX_PATH = 107
_TMP_OVERHEAD = 12


class SocketPathTooLong(client.ControlError):
    """Unix socket paths are limited to about 107 bytes; DEVMESH_HOME is too deep."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"cannot serve the control API on {path}: the path is too long for a Unix socket "
            f"(at most {_MAX_UNIX_PATH - _TMP_OVERHEAD} bytes here); use a shorter DEVMESH_HOME"
        )
        self.path = path


class SocketInUse(client.ControlError):
    """The socket path is taken: a live server answers there, or it is not a socket."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"cannot serve the control API on {path}: {cause}")
        self.path = path
        self.cause = cause


@dataclass(slots=True)
class Request:
    """A request: ``path`` as sent, ``params``/``query`` decoded, header names lower-case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON; raises ApiError(400) when it is empty or not JSON."""
        if not self.body.strip():
            raise ApiError(400, f"{self.method} {self.path} expects a JSON body")
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    """A JSON answer; a ``None`` body sends no content."""

    status: int = 200
    body: Any = None


@dataclass(slots=True)
class StreamResponse:
    """An NDJSON answer sent chunk by chunk as ``items`` produces, until it ends."""

    status: int
    items: AsyncIterator[Any]


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class Router:
    """Maps ``METHOD /path/{param}`` patterns to handlers; 404 and 405 come from here."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = []

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` for ``method`` on ``pattern``.

        Raises ValueError when the same method and pattern are registered twice.
        """
        parts = _split(pattern)
        method = method.upper()

        def register(handler: Handler) -> Handler:
            if any(m == method and p == parts for m, p, _ in self._routes):
                raise ValueError(f"route {method} {pattern} is registered twice")
            self._routes.append((method, parts, handler))
            return handler

        return register

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters for a request; raises ApiError 404 or 405."""
        segments = _split(path)
        allowed: list[str] = []
        for m, parts, handler in self._routes:
            params = _match(parts, segments)
            if params is None:
                continue
            if m == method:
                return handler, params
            allowed.append(m)
        if allowed:
            raise _MethodNotAllowed(method, path, sorted(set(allowed)))
        raise ApiError(404, f"no such endpoint: {method} {path}")


class _MethodNotAllowed(ApiError):
    def __init__(self, method: str, path: str, allowed: list[str]) -> None:
        super().__init__(405, f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})")
        self.allowed = allowed


def _split(path: str) -> tuple[str, ...]:
    return tuple(urllib.parse.unquote(s) for s in path.strip("/").split("/") if s)


def _match(parts: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(parts) != len(segments):
        return None
    params: dict[str, str] = {}
    for part, seg in zip(parts, segments, strict=True):
        if part.startswith("{") and part.endswith("}"):
            params[part[1:-1]] = seg
        elif part != seg:
            return None
    return params


async def serve_unix(
    path: Path,
    router: Router,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on the Unix socket ``path`` until cancelled, then remove the socket.

    The socket appears atomically with mode 0600: it is bound under a temporary name in the
    same folder, restricted, listening, and only then renamed into place. A leftover socket
    file nobody answers on is replaced. Raises SocketInUse when a server already answers on
    ``path`` or the path is something other than a socket.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid() % 10**7}")
    if len(os.fsencode(path)) + _TMP_OVERHEAD > _MAX_UNIX_PATH:
        raise SocketPathTooLong(path)
    _clear_stale(path)
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        tmp.chmod(0o600)
        sock.listen(128)
        tmp.rename(path)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    identity = path.stat().st_ino
    listener = await anyio.abc.SocketListener.from_socket(sock)
    try:
        async with listener:
            task_status.started()
            await listener.serve(lambda stream: _serve_connection(stream, router))
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == identity:  # not if a successor replaced it
                path.unlink()


def _clear_stale(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody answers on; refuse if someone does."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(path, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise SocketInUse(path, f"cannot probe the existing socket: {exc}") from None
    finally:
        probe.close()
    raise SocketInUse(path, "another server is answering on it")


async def _serve_connection(stream: anyio.abc.ByteStream, router: Router) -> None:
    """Run request/response cycles on one connection; never lets an exception escape."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        try:
            while await _one_cycle(conn, stream, router):
                conn.start_next_cycle()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the client left
        except TimeoutError:
            pass  # idle past IDLE_TIMEOUT_S
        except Exception:
            log.exception("control API connection failed")


async def _one_cycle(conn: h11.Connection, stream: anyio.abc.ByteStream, router: Router) -> bool:
    """Serve one request; True when the connection can carry another one."""
    try:
        with anyio.fail_after(IDLE_TIMEOUT_S):
            request = await _read_request(conn, stream)
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            message = f"malformed HTTP request: {exc}" if status == 400 else str(exc)
            await _send_json(conn, stream, status, {"error": message})
        return False
    if request is None:
        return False
    try:
        handler, request.params = router.resolve(request.method, request.path)
        response = await handler(request)
        if isinstance(response, StreamResponse):
            payload = None
        elif isinstance(response, Response):
            payload = _encode(response.status, response.body)
        else:
            raise TypeError(f"handler returned {type(response).__name__}, not a Response")
    except ApiError as exc:
        headers = [("Allow", ", ".join(exc.allowed))] if isinstance(exc, _MethodNotAllowed) else []
        await _send_json(conn, stream, exc.status, {"error": exc.message}, headers)
    except Exception as exc:
        log.exception("control API handler for %s %s failed", request.method, request.path)
        message = f"internal error: {type(exc).__name__}: {exc}"
        await _send_json(conn, stream, 500, {"error": message})
    else:
        if isinstance(response, StreamResponse):
            await _send_stream(conn, stream, response)
        else:
            await _send_bytes(conn, stream, response.status, payload or b"")
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(conn: h11.Connection, stream: anyio.abc.ByteStream) -> Request | None:
    """The next full request, or None when the client closed the connection between requests."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            if not data and conn.their_state is h11.IDLE:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError(
                    f"request body exceeds {MAX_BODY_BYTES} bytes", error_status_hint=413
                )
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            target = head.target.decode("latin-1")
            raw_path, _, raw_query = target.partition("?")
            return Request(
                method=head.method.decode("ascii").upper(),
                path=raw_path,
                query=dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True)),
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers},
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")


def _encode(status: int, body: Any) -> bytes:
    """The JSON payload; 204 and 304 answers carry none. Raises TypeError if not JSON-able."""
    return b"" if body is None or status in (204, 304) else json.dumps(body).encode()


async def _send_json(
    conn: h11.Connection,
    stream: anyio.abc.ByteStream,
    status: int,
    body: Any,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    await _send_bytes(conn, stream, status, _encode(status, body), extra_headers)


async def _send_bytes(
    conn: h11.Connection,
    stream: anyio.abc.ByteStream,
    status: int,
    payload: bytes,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    headers = [("Content-Type", "application/json")]
    if status not in (204, 304):
        headers.append(("Content-Length", str(len(payload))))
    headers += extra_headers or []
    if conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))  # we answer before reading all they sent
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if payload:
        data += conn.send(h11.Data(data=payload)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send(data)


async def _send_stream(
    conn: h11.Connection, stream: anyio.abc.ByteStream, response: StreamResponse
) -> None:
    """Send items as NDJSON chunks, stopping (and closing the iterator) if the client leaves."""
    head = h11.Response(
        status_code=response.status, headers=[("Content-Type", "application/x-ndjson")]
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, conn, stream, tg.cancel_scope)
            try:
                await stream.send(conn.send(head) or b"")
                trailers = await _pump(conn, stream, response.items)
                await stream.send(conn.send(h11.EndOfMessage(headers=trailers)) or b"")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            tg.cancel_scope.cancel()
    finally:
        aclose = getattr(response.items, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


async def _pump(
    conn: h11.Connection, stream: anyio.abc.ByteStream, items: AsyncIterator[Any]
) -> list[tuple[str, str]]:
    """Forward every item; the trailers to end with (an error trailer if ``items`` failed)."""
    try:
        async for item in items:
            line = json.dumps(item).encode() + b"\n"
            await stream.send(conn.send(h11.Data(data=line)) or b"")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        raise
    except Exception as exc:
        log.exception("control API stream failed")
        message = f"internal error: {type(exc).__name__}: {exc}"
        return [(ERROR_TRAILER, " ".join(message.split())[:1000])]
    return []


async def _watch_disconnect(
    conn: h11.Connection, stream: anyio.abc.ByteStream, scope: anyio.CancelScope
) -> None:
    """Cancel the stream when the client hangs up; bytes it sends meanwhile wait in h11.

    Why it reads the raw socket: this task is cancelled whenever a stream ends normally, and
    cancelling ``receive()`` of anyio's Unix socket stream races with the event loop's reader
    callback (the loop may still call ``set_result`` on the cancelled future, logging an
    ``InvalidStateError`` traceback). ``anyio.wait_readable`` tolerates that race, and the
    non-blocking ``recv`` that follows it cannot be interrupted half-way.
    """
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    try:
        while True:
            if sock is None:
                data = await stream.receive(_READ_SIZE)
            else:
                await anyio.wait_readable(sock)
                try:
                    data = sock.recv(_READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise anyio.BrokenResourceError from exc
                if not data:
                    raise anyio.EndOfStream
            conn.receive_data(data)
            if len(conn.trailing_data[0]) > _READ_SIZE:
                await anyio.sleep_forever()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        scope.cancel()

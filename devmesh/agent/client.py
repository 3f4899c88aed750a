"""The CLI's side of the control API: blocking HTTP/1.1 + JSON over the agent's Unix socket.

Why synchronous and stdlib + h11 only: every CLI command imports this module, and
``devmesh status`` must start in well under a quarter of a second. anyio or httpx would
cost more than the whole command. One short-lived connection per call keeps the client
free of retry logic: a Unix-socket connect costs microseconds, and a request is never sent
twice.

Wire conventions shared with ``http_server``: JSON bodies; errors as ``{"error": message}``
with the HTTP status; streams as chunked NDJSON, one document per line, and a stream that
fails after it started ends with an ``x-devmesh-error`` trailer instead of a clean end.

The error classes live here rather than in the server module so that the CLI can catch
them without importing anyio; the server re-uses them.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import h11

ERROR_TRAILER = "x-devmesh-error"
"""Trailer naming why a stream ended early; headers were already sent with a 200."""

_READ_SIZE = 65536


class ControlError(Exception):
    """Base of every control-API transport error, on either side of the socket."""


class ApiError(ControlError):
    """The agent answered with an error status; ``message`` is its ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class AgentUnreachable(ControlError):
    """No usable answer from the socket: missing, refused, timed out or cut off."""

    def __init__(self, socket_path: Path, cause: str) -> None:
        super().__init__(f"cannot reach the devmesh agent at {socket_path}: {cause}")
        self.socket_path = socket_path
        self.cause = cause


class Client:
    """Blocking client of one agent socket; safe to reuse, holds no connection between calls."""

    def __init__(self, socket_path: Path, timeout_s: float = 30) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s

    def request(
        self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None
    ) -> Any:
        """Send one request and return its decoded JSON body (None when the body is empty).

        Raises ApiError on a status >= 400 and AgentUnreachable when the socket cannot be
        used or no complete answer arrives within ``timeout_s``.
        """
        with _Exchange(self, method, path, body, query) as ex:
            status = ex.status
            payload = b"".join(ex.body_chunks())
        return _decode(status, payload)

    def stream(
        self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None
    ) -> Iterator[Any]:
        """Yield NDJSON items as the agent sends them, until it ends the stream.

        ``timeout_s`` applies until the response headers arrive; after that the stream may
        stay quiet for as long as the agent likes (``logs -f``). The request is sent on the
        first ``next()``, so errors surface there. Closing the iterator closes
        the connection, which tells the agent to stop producing. Raises ApiError for an error
        status or a stream that the agent ended with an error, AgentUnreachable as in
        ``request``.
        """
        with _Exchange(self, method, path, body, query) as ex:
            if ex.status >= 400:
                _decode(ex.status, b"".join(ex.body_chunks()))
            ex.sock.settimeout(None)
            pending = b""
            for chunk in ex.body_chunks():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _loads(ex.status, line)
            if pending.strip():
                yield _loads(ex.status, pending)
            if ex.error_trailer is not None:
                raise ApiError(500, ex.error_trailer)


def _loads(status: int, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(status, f"agent sent a body that is not JSON: {raw[:200]!r}") from None


def _decode(status: int, payload: bytes) -> Any:
    value = _loads(status, payload) if payload.strip() else None
    if status >= 400:
        message = value.get("error") if isinstance(value, dict) else None
        raise ApiError(status, message if isinstance(message, str) else repr(value))
    return value


class _Exchange:
    """One request on a fresh connection: connect, send, read the head, then the body."""

    def __init__(
        self,
        client: Client,
        method: str,
        path: str,
        body: Any,
        query: dict[str, str] | None,
    ) -> None:
        self.client = client
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        self.headers = [("Host", "devmesh-agent"), ("Accept", "application/json")]
        self.payload = b""
        if body is not None:
            self.payload = json.dumps(body).encode()
            self.headers.append(("Content-Type", "application/json"))
        self.headers.append(("Content-Length", str(len(self.payload))))
        self.method = method.upper()
        self.target = target
        self.conn = h11.Connection(h11.CLIENT)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.status = 0
        self.error_trailer: str | None = None

    def __enter__(self) -> _Exchange:
        try:
            self.sock.settimeout(self.client.timeout_s)
            self._connect()
            self._send()
            event = self._next_event()
            while isinstance(event, h11.InformationalResponse):
                event = self._next_event()
            if not isinstance(event, h11.Response):
                raise self._unreachable(f"unexpected {type(event).__name__} before a response")
            self.status = event.status_code
        except BaseException:
            self.sock.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _unreachable(self, cause: str) -> AgentUnreachable:
        return AgentUnreachable(self.client.socket_path, cause)

    def _connect(self) -> None:
        path = self.client.socket_path
        try:
            self.sock.connect(str(path))
        except FileNotFoundError:
            raise self._unreachable("no socket file (is the agent running?)") from None
        except ConnectionRefusedError:
            raise self._unreachable(
                "connection refused (stale socket: the agent is not running)"
            ) from None
        except PermissionError:
            raise self._unreachable(
                "permission denied (the socket belongs to another user)"
            ) from None
        except TimeoutError:
            raise self._unreachable(f"connect timed out after {self.client.timeout_s} s") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None

    def _send(self) -> None:
        request = h11.Request(method=self.method, target=self.target, headers=self.headers)
        data = self.conn.send(request) or b""
        data += self.conn.send(h11.Data(data=self.payload)) if self.payload else b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.client.timeout_s} s") from None
        except OSError as exc:
            raise self._unreachable(f"connection lost while sending: {exc}") from None

    def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._unreachable(f"the agent sent malformed HTTP: {exc}") from None
            if event is not h11.NEED_DATA:
                # mypy does not narrow a class object by identity; NEED_DATA is excluded above.
                return cast("h11.Event | type[h11.PAUSED]", event)
            try:
                data = self.sock.recv(_READ_SIZE)
            except TimeoutError:
                raise self._unreachable(f"no answer within {self.client.timeout_s} s") from None
            except OSError as exc:
                raise self._unreachable(f"connection lost: {exc}") from None
            if not data:
                self._check_eof()
            self.conn.receive_data(data)

    def _check_eof(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            raise self._unreachable("the agent closed the connection mid-response")
        if self.conn.their_state is h11.SEND_RESPONSE:
            raise self._unreachable("the agent closed the connection without answering")

    def body_chunks(self) -> Iterator[bytes]:
        """Raw body bytes as they arrive; records an error trailer if the stream has one."""
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                for name, value in event.headers:
                    if name.decode("latin-1").lower() == ERROR_TRAILER:
                        self.error_trailer = value.decode("utf-8", "replace")
                return
            else:
                raise self._unreachable(f"unexpected {type(event).__name__} in a response body")

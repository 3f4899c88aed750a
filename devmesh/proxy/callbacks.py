"""The callback execution of an exchange: no task, no await, for the commonest request.

Why: a request without a body, for a service with an idle pooled connection, needs no
waiting that a coroutine would make easier: its head goes to the service in the client
socket's callback, and the service's answer is parsed and written to the client in the
service socket's callbacks, with backpressure (the service's socket stops being read while
the client's is full). That removes the task switches, futures and per-request timers that
made up a third of such a request's cost (docs/proxy.md, "Performance").

This is an execution strategy of ``forward``'s one path and makes none of its decisions:
routing happened before (``Forwarder.route``); error pages come from ``Forwarder.fail``;
whether a stale connection is retried is ``upstream.may_retry``; the log line is
``Forwarder.finish``'s. What it cannot do without awaiting, it hands to a task: an answer
without Content-Length or with a 1xx (``Forwarder.resume``), and the retry of a pooled
connection found closed (``Forwarder.run`` with ``attempt=1``).

Timeouts: one timer for all runs (``Inflight.expire``, called by the server) rather than one
per request: arming and cancelling a timer per request cost as much as routing it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import h11

from devmesh.proxy import errors, exchange, forward, headers, pool, table, upstream

if TYPE_CHECKING:
    from collections.abc import Coroutine

log = logging.getLogger("devmesh.proxy")

NEEDS_TASK_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"connection"}
)
"""A request carrying one of these (other than Content-Length: 0) runs as a task.
``Connection`` is here because it may name an upgrade or more hop-by-hop fields."""


class ClientConnection(Protocol):
    """What a run needs of the client connection (``dispatch.Downstream``)."""

    current: Run | None

    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    def finished(self, ex: forward.Exchange) -> None: ...
    def run_task(self, work: Coroutine[None, None, bool]) -> None: ...


class Inflight:
    """The runs awaiting their service, so that one timer can time them all out."""

    def __init__(self) -> None:
        self._runs: set[Run] = set()

    def add(self, run: Run) -> None:
        self._runs.add(run)

    def discard(self, run: Run) -> None:
        self._runs.discard(run)

    def expire(self, now: float, idle_s: float) -> None:
        """Time out every run whose service has been silent for idle_s (loop clock)."""
        for run in [r for r in self._runs if now - r.last >= idle_s]:
            run.timed_out()


def fits(ex: forward.Exchange) -> bool:
    """Whether ``ex`` can run in callbacks: no body, no upgrade, no expectation."""
    for name, value in ex.hdrs:
        if name in NEEDS_TASK_HEADERS and (name != b"content-length" or value != b"0"):
            return False
    return True


def start(
    down: ClientConnection,
    ex: forward.Exchange,
    backend: table.Backend,
    forwarder: forward.Forwarder,
    inflight: Inflight,
) -> bool:
    """Send ``ex`` on an idle pooled connection and answer it in callbacks; False (nothing
    done) when no idle connection is at hand. ``ex`` must ``fit``."""
    up = forwarder.pool.take_idle(backend)
    if up is None:
        return False
    client = ex.client
    if type(client.conn.next_event()) is not h11.EndOfMessage:  # no body: never I/O
        raise AssertionError("a request without a body did not end")
    assert ex.request is not None
    request = upstream.request_head(
        ex.request,
        ex.hdrs,
        client_ip=client.ip,
        proto=client.proto,
        host=ex.host,
        ws_key=None,
        hop=ex.adjust,
    )
    if ex.hop is not None:
        forwarder.entered(ex)
    up.writer.write(up.conn.send(request) + up.conn.send(h11.EndOfMessage()))
    down.current = Run(
        down=down, ex=ex, up=up, backend=backend, forwarder=forwarder, inflight=inflight
    )
    return True


class Run:
    """One exchange answered in callbacks; see the module's docstring."""

    __slots__ = (
        "backend",
        "down",
        "ex",
        "forwarder",
        "head_sent",
        "inflight",
        "last",
        "loop",
        "paused",
        "up",
    )

    def __init__(
        self,
        *,
        down: ClientConnection,
        ex: forward.Exchange,
        up: pool.Upstream,
        backend: table.Backend,
        forwarder: forward.Forwarder,
        inflight: Inflight,
    ) -> None:
        self.down = down
        self.ex = ex
        self.up = up
        self.backend = backend
        self.forwarder = forwarder
        self.inflight = inflight
        self.head_sent = False
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        inflight.add(self)
        chan = up.reader
        chan.consumer = self.on_data
        chan.on_lost = self._up_lost

    def _detach(self) -> None:
        chan = self.up.reader
        chan.consumer = None
        chan.on_lost = None
        self.inflight.discard(self)
        if self.paused:
            self.paused = False
            chan.transport.resume_reading()
        self.down.current = None

    def on_data(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:
            log.exception("proxy exchange with %s failed", self.backend.service)
            self._abort("internal error (see the agent's log)")

    def _on_data(self, data: bytes) -> None:
        up, ex = self.up, self.ex
        uconn = up.conn
        if not data and not self.head_sent and not uconn.trailing_data[0]:
            self._closed_early()
            return
        uconn.receive_data(data)
        self.last = self.loop.time()
        cconn = ex.client.conn
        out: list[bytes] = []
        result = ex.result
        while True:
            try:
                event = uconn.next_event()
            except h11.RemoteProtocolError as exc:
                self._broken(out, str(exc))
                return
            if type(event) is h11.Data:
                result.bytes_out += len(event.data)
                out.append(cconn.send(event))
            elif type(event) is h11.EndOfMessage:
                out.append(cconn.send(h11.EndOfMessage()))
                self.down.write(b"".join(out))
                self._detach()
                self.forwarder.pool.release(up)
                self.down.finished(ex)
                return
            elif event is h11.NEED_DATA:
                if out:
                    self.down.write(b"".join(out))
                return
            elif type(event) is h11.Response:
                up_hdrs = list(event.headers)
                status = event.status_code
                if ex.hop is not None and upstream.unavailable(self.backend, status, up_hdrs):
                    self._detach()
                    self.up.close()
                    refused = upstream.peer_unavailable(self.backend, status)
                    self.down.run_task(self.forwarder.failover(ex, refused))
                    return
                if (
                    headers.get(up_hdrs, b"content-length") is None
                    and status not in (204, 304)
                    and ex.request is not None
                    and ex.request.method != b"HEAD"
                ):
                    self._handover(event)  # a streamed answer: watched by a task
                    return
                result.status = status
                out.append(cconn.send(upstream.response_head(event, up_hdrs, result.extra)))
                self.head_sent = True
            elif type(event) is h11.InformationalResponse:
                self._handover(event)
                return
            else:  # ConnectionClosed before a response
                self._closed_early()
                return

    def _handover(self, event: h11.Event) -> None:
        self._detach()
        self.down.run_task(self.forwarder.resume(self.ex, self.up, event))

    def _closed_early(self) -> None:
        """The service closed the connection before a byte of its answer."""
        self._detach()
        self.up.close()
        if upstream.may_retry(self.up, has_body=False, attempt=0):
            self.down.run_task(self.forwarder.run(self.ex, self.backend, attempt=1))
            return
        self._fail(upstream.closed_early(self.backend))

    def _broken(self, out: list[bytes], reason: str) -> None:
        b = self.backend
        if not self.head_sent:
            self._detach()
            self.up.close()
            self._fail(errors.UpstreamProtocolError(b.service, b.host, b.port, reason))
            return
        if out:
            self.down.write(b"".join(out))
        self._abort(upstream.broke_off(b, reason))

    def _fail(self, exc: errors.ProxyError) -> None:
        """Answer with the proxy's own error page (nothing was sent yet)."""
        self.forwarder.fail(self.ex, exc)
        self.down.finished(self.ex)

    def _abort(self, error: str) -> None:
        """Mid-answer failure: the client's connection is cut so it sees a short answer."""
        self._detach()
        self.up.close()
        self.ex.result.error = error
        self.down.abort()
        self.forwarder.finish(self.ex)

    def _up_lost(self, exc: BaseException | None) -> None:
        if self.up.reader.consumer is not None:
            self.on_data(b"")  # a reset without EOF: h11 reads it as the end

    def client_gone(self) -> None:
        self._detach()
        self.up.close()
        self.ex.result.error = str(exchange.ClientGoneError("the response"))
        self.forwarder.finish(self.ex)

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
        if self.head_sent:
            self._abort(upstream.idle_mid_answer(self.backend, self.forwarder.settings))
            return
        self._detach()
        self.up.close()
        self._fail(upstream.response_timeout(self.backend, self.forwarder.settings))

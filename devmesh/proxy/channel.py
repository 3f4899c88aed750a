"""One socket as an asyncio Protocol that serves two masters: callbacks and coroutines.

Why not asyncio streams: a proxied request that is done in callbacks (parse, write upstream;
parse, write back) costs no task switch at all, while every ``await reader.read()`` that has to
wait costs a future, a task step and a loop turn; with four of those per small request the
streams were a third of the proxy's CPU. So a ``Channel`` hands incoming bytes straight to its
``consumer`` when one is set (the fast path in ``server``), and otherwise buffers them for the
coroutine API that the general path uses: ``read``/``at_eof`` of a StreamReader and
``write``/``drain``/``transport``/``write_eof`` of a StreamWriter, so the same object is passed
as both. Switching between the two is a matter of setting or clearing ``consumer``.

Flow control: the buffer stops reading the socket past twice the read size, like StreamReader,
and ``pause_writing``/``resume_writing`` are forwarded to ``on_writable`` so a callback-driven
copy can stop reading its other side while this one's peer is slow.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any


class Channel(asyncio.Protocol):
    __slots__ = (
        "_buffer",
        "_closed",
        "_drainers",
        "_eof",
        "_error",
        "_limit",
        "_read_paused",
        "_size",
        "_tls",
        "_waiter",
        "_write_paused",
        "consumer",
        "on_lost",
        "on_writable",
        "transport",
    )

    def __init__(self, read_size: int) -> None:
        # None only until connection_made, which asyncio calls before any other method: typed
        # as always set, so the hot paths need no check.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.consumer: Callable[[bytes], None] | None = None
        """Takes every chunk as it arrives (b"" at EOF) instead of the buffer."""
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self.on_writable: Callable[[bool], None] | None = None
        self._limit = read_size
        self._buffer: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._tls = False

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Stream sockets (create_server/create_connection) always get a Transport; the
        # protocol interface types it as the base class.
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self._limit)
        self._tls = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        consumer = self.consumer
        if consumer is not None:
            consumer(data)
            return
        self._buffer.append(data)
        self._size += len(data)
        if self._size > 2 * self._limit and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        if self.consumer is not None:
            self.consumer(b"")
        self._wake()
        # Keep the write side open: a half-closed client still gets its answer. (TLS has no
        # half-close; asyncio warns when asked for one.)
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.on_writable is not None:
            self.on_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()
        if self.on_writable is not None:
            self.on_writable(True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the StreamReader half -------------------------------------------------------------

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at EOF. Raises the connection's error once the buffer is empty."""
        if not self._buffer and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._buffer:
            if self._error is not None:
                raise self._error
            return b""
        data = self._buffer.popleft()
        if len(data) > n:
            self._buffer.appendleft(data[n:])
            data = data[:n]
        self._size -= len(data)
        if self._read_paused and self._size <= self._limit:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def reusable(self) -> bool:
        """Open, not ended, and nothing unasked-for waiting: fit for another request.

        A service that wrote while the connection sat idle (a 408 before closing, say) would
        otherwise have those bytes read as the answer to the next request.
        """
        return not self._buffer and not self._eof and not self.transport.is_closing()

    def take_buffer(self) -> list[bytes]:
        """Everything buffered, then b"" if the peer has ended: for a callback taking over."""
        chunks = list(self._buffer)
        self._buffer.clear()
        self._size = 0
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self._eof:
            chunks.append(b"")
        return chunks

    # -- the StreamWriter half -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drainers.append(fut)
            await fut
            if self._closed:
                raise ConnectionResetError("connection lost")

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def write_eof(self) -> None:
        self.transport.write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

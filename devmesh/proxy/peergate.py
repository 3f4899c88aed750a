"""The peer listener's door: accepting, capping and handshaking teammates' connections.

Why an accept loop of its own rather than ``create_server(ssl=...)``: the peer listener faces
the network, and the event loop's TLS server hides what a developer needs to know there. A
failed handshake (a stranger without a team certificate) never reaches the protocol and is
logged by neither asyncio nor uvloop outside debug mode, so nothing can count it; a handshake
that never completes holds its connection for the loop's default 60 s; and nothing bounds how
many connections a stranger may hold open. So each accepted socket is:

1. refused at once (closed, counted) when ``max_connections`` are already open, handshaking
   or established: that is load, not a verdict on the caller;
2. handshaken by the loop's own TLS (``connect_accepted_socket``, the same transport as
   ``create_server`` makes, on asyncio and uvloop alike) within ``handshake_timeout_s``;
3. counted with its reason when the handshake fails, in ``Stats`` (the agent shows it), with
   one DEBUG line rather than a line per stranger in the agent's log.

An established connection is the proxy's like any other (``dispatch.Downstream``); it holds
its place under the cap until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable

from devmesh.proxy import peering

log = logging.getLogger("devmesh.proxy")

ACCEPT_ERROR_PAUSE_S = 0.1
"""After accept() itself fails (out of file descriptors), so the loop does not spin."""


@dataclasses.dataclass(slots=True)
class Stats:
    """What the peer listener refused, since the proxy started (all listeners)."""

    refused_over_cap: int = 0
    """Connections closed at once because ``max_connections`` were open."""
    failed_handshakes: int = 0
    """TLS handshakes that failed, were abandoned or did not finish in time."""
    last_failed_handshake: str | None = None
    """``ADDRESS: why``, for the latest of them."""


class Gate:
    """One listening socket's accept loop (see the module's docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        listener: peering.PeerListener,
        factory: Callable[[], asyncio.Protocol],
        *,
        stats: Stats,
        established: Callable[[], int],
    ) -> None:
        """``established`` counts the peer connections past their handshake (all listeners)."""
        self.sock = sock
        self.listener = listener
        self.factory = factory
        self.stats = stats
        self.established = established
        self.handshaking: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    def open_count(self) -> int:
        return len(self.handshaking) + self.established()

    def close(self) -> None:
        """Stop accepting and drop unfinished handshakes; established connections go on
        until their current exchange ends (the proxy closes them at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self.handshaking):
            task.cancel()
        with contextlib.suppress(OSError):
            self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cap = self.listener.max_connections
        while True:
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError as exc:
                log.warning("peer listener: accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            if self.open_count() >= cap:
                self.stats.refused_over_cap += 1
                log.debug("peer listener: %s refused: over %d connections", address[0], cap)
                conn.close()
                continue
            conn.setblocking(False)
            task = loop.create_task(self._admit(conn, str(address[0])))
            self.handshaking.add(task)
            task.add_done_callback(self.handshaking.discard)

    async def _admit(self, conn: socket.socket, address: str) -> None:
        """Run the TLS handshake; the protocol takes the connection from there."""
        loop = asyncio.get_running_loop()
        timeout_s = self.listener.handshake_timeout_s
        try:
            # The loop enforces the handshake timeout; the outer one is a backstop for a
            # loop that does not (the connection is closed either way).
            async with asyncio.timeout(timeout_s + 1.0):
                await loop.connect_accepted_socket(
                    self.factory,
                    conn,
                    ssl=self.listener.ssl_context,
                    ssl_handshake_timeout=timeout_s,
                )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, TimeoutError, ValueError) as exc:  # SSLError is an OSError
            conn.close()
            why = _handshake_words(exc, timeout_s)
            self.stats.failed_handshakes += 1
            self.stats.last_failed_handshake = f"{address}: {why}"
            log.debug("peer listener: TLS handshake from %s failed: %s", address, why)


def _handshake_words(exc: BaseException, timeout_s: float) -> str:
    """Why a handshake failed, in a few words (the certificate's fault, or the caller's)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return f"not finished within {timeout_s:g} s"
    if isinstance(exc, ConnectionError) or not str(exc):
        return "closed by the caller during the handshake"
    return str(exc)

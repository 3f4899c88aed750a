"""The peer listener's door: accepting, capping and handshaking teammates' connections.

Why an accept loop of its own rather than ``create_server(ssl=...)``: the peer listener faces
the network, and the event loop's TLS server hides what a developer needs to know there. A
failed handshake (a stranger without a team certificate) never reaches the protocol and is
logged by neither asyncio nor uvloop outside debug mode, so nothing can count it; a handshake
that never completes holds its connection for the loop's default 60 s; and nothing bounds how
many connections a stranger may hold open.

Two kinds of place, so that anyone on the LAN (no certificate needed to open a TCP
connection) cannot keep teammates out:

1. A connection still in its TLS handshake holds a place of the handshake budget
   (``max_handshakes``), at most ``max_handshakes_per_address`` of them per source address;
   past either, it is closed at once and counted. It never holds a member's place. The
   handshake runs on the loop's own TLS (``connect_accepted_socket``, the same transport as
   ``create_server`` makes, on asyncio and uvloop alike) within ``handshake_timeout_s``; a
   failure is counted with its reason in ``Stats`` (the agent shows it), with one DEBUG line
   rather than a line per stranger in the agent's log.
2. A connection past its handshake is a teammate's (its certificate chains to the team CA):
   ``Members`` gives it a place under ``max_connections``, at most ``max_per_node`` for one
   node. Past either, its requests are answered 503 with ``x-devmesh-unavailable`` (the
   caller moves on) and it is closed; counted.

An established connection is the proxy's like any other (``dispatch.Downstream``, with its
header and keep-alive deadlines); it holds its place until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable

from devmesh.proxy import peering

log = logging.getLogger("devmesh.proxy")

ACCEPT_ERROR_PAUSE_S = 0.1
"""After accept() itself fails (out of file descriptors), so the loop does not spin."""


@dataclasses.dataclass(slots=True)
class Stats:
    """What the peer listener refused, since the proxy started (all listeners)."""

    refused_over_cap: int = 0
    """Teammates' connections refused because ``max_connections`` members were connected."""
    refused_over_node_cap: int = 0
    """Teammates' connections refused because their node held ``max_per_node``."""
    refused_over_handshake_cap: int = 0
    """Connections closed at once because ``max_handshakes`` were in progress."""
    refused_over_address_cap: int = 0
    """Connections closed at once because their address had ``max_handshakes_per_address``
    handshakes in progress."""
    failed_handshakes: int = 0
    """TLS handshakes that failed, were abandoned or did not finish in time."""
    last_failed_handshake: str | None = None
    """``ADDRESS: why``, for the latest of them."""


class Members:
    """The teammates' places: established peer connections per node (all listeners)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.nodes: Counter[str] = Counter()
        self.count = 0

    def admit(
        self, listener: peering.PeerListener, caller: peering.PeerCaller
    ) -> peering.PeerCaller | peering.Crowded:
        """A place for ``caller``'s new connection (``leave`` gives it back), or why not."""
        if self.count >= listener.max_connections:
            self.stats.refused_over_cap += 1
            why = f"the peer listener holds {listener.max_connections} connections (its cap)"
            return peering.Crowded(node_name=caller.node_name, why=why)
        if self.nodes[caller.node_id] >= listener.max_per_node:
            self.stats.refused_over_node_cap += 1
            why = (
                f"node {caller.node_name} holds {listener.max_per_node} connections to this "
                "peer listener (the cap per node)"
            )
            return peering.Crowded(node_name=caller.node_name, why=why)
        self.nodes[caller.node_id] += 1
        self.count += 1
        return caller

    def leave(self, caller: peering.PeerCaller) -> None:
        self.count -= 1
        left = self.nodes[caller.node_id] - 1
        if left > 0:
            self.nodes[caller.node_id] = left
        else:
            del self.nodes[caller.node_id]


class Gate:
    """One listening socket's accept loop (see the module's docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        listener: peering.PeerListener,
        factory: Callable[[], asyncio.Protocol],
        *,
        stats: Stats,
    ) -> None:
        self.sock = sock
        self.listener = listener
        self.factory = factory
        self.stats = stats
        self.handshaking: set[asyncio.Task[None]] = set()
        self.per_address: Counter[str] = Counter()
        """Handshakes in progress per source address."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

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
        listener, stats, per_address = self.listener, self.stats, self.per_address
        while True:
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError as exc:
                log.warning("peer listener: accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            ip = str(address[0])
            if len(self.handshaking) >= listener.max_handshakes:
                stats.refused_over_handshake_cap += 1
                conn.close()
                continue
            if per_address[ip] >= listener.max_handshakes_per_address:
                stats.refused_over_address_cap += 1
                conn.close()
                continue
            conn.setblocking(False)
            per_address[ip] += 1
            task = loop.create_task(self._admit(conn, ip))
            self.handshaking.add(task)
            task.add_done_callback(functools.partial(self._done, ip))

    def _done(self, ip: str, task: asyncio.Task[None]) -> None:
        self.handshaking.discard(task)
        left = self.per_address[ip] - 1
        if left > 0:
            self.per_address[ip] = left
        else:
            del self.per_address[ip]

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

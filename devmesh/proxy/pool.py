"""Upstream connections: dialing services and keeping idle HTTP/1.1 connections for reuse.

Why a pool: a keep-alive client that makes a thousand requests should cost the service one
TCP connection, not a thousand (and no TIME_WAIT pile-up on loopback). A connection goes back
to the pool only when h11 says both sides finished the exchange cleanly; anything else
(an aborted body, an upgrade, a parse error) is closed.

What it does not guarantee: that an idle connection is still open when taken. A service may
close it at any moment; ``Upstream.reused`` lets the caller retry such a request once on a
fresh connection when nothing of the response has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import defaultdict

import h11

from devmesh.proxy import channel, errors, settings, table


class Upstream:
    """One connection to a service with its h11 client state.

    ``reader`` and ``writer`` are the same ``Channel``: the general path uses its stream API,
    the fast path its ``consumer`` callback.
    """

    __slots__ = ("conn", "key", "reader", "reused", "writer")

    def __init__(self, key: tuple[str, int, str], chan: channel.Channel) -> None:
        self.key = key
        self.reader = chan
        self.writer = chan
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1024 * 1024)
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class Pool:
    def __init__(self, config: settings.Settings) -> None:
        self.settings = config
        self._idle: defaultdict[tuple[str, int, str], list[Upstream]] = defaultdict(list)
        self._tls: ssl.SSLContext | None = None
        self._verified: ssl.SSLContext | None = None
        self._peer: tuple[table.PeerTLS, ssl.SSLContext] | None = None
        self.peer_tls: table.PeerTLS | None = None
        """This node's files for peer hops (from the route table); None: no peer hop."""
        self.opened = 0
        """Connections dialled since start (tests observe reuse through it)."""

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            if self.settings.upstream_verify_tls:
                ctx = ssl.create_default_context(cafile=self.settings.upstream_ca_file)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx
        return self._tls

    def _verified_context(self) -> ssl.SSLContext:
        """For an https fallback: a real server on the network, verified as a browser would."""
        if self._verified is None:
            ctx = ssl.create_default_context(cafile=self.settings.fallback_ca_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._verified = ctx
        return self._verified

    def _peer_context(self, backend: table.Backend) -> ssl.SSLContext:
        """Client side of the peer channel: this node's certificate, the team CA as the one
        trust anchor, the peer's node name checked. Rebuilt when the files change."""
        files = self.peer_tls
        if files is None:
            raise errors.UpstreamConnectError(
                backend.service, backend.host, backend.port, "this node is not in a mesh", ""
            )
        if self._peer is None or self._peer[0] != files:
            try:
                ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca_file)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(files.cert_file, files.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise errors.UpstreamConnectError(
                    backend.service,
                    backend.host,
                    backend.port,
                    f"the node's TLS files are unusable ({exc})",
                    "",
                ) from None
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.set_alpn_protocols(["http/1.1"])
            self._peer = (files, ctx)
        return self._peer[1]

    def take_idle(self, backend: table.Backend) -> Upstream | None:
        """An idle connection to the backend that still looks open, or None (no I/O)."""
        idle = self._idle.get((backend.host, backend.port, backend.scheme))
        while idle:
            up = idle.pop()
            if up.reader.reusable():
                up.reused = True
                return up
            up.close()
        return None

    async def acquire(self, backend: table.Backend) -> Upstream:
        """An idle connection to the backend, or a new one.

        Raises UpstreamConnectError (refused, unreachable, TLS failure) or
        UpstreamTimeoutError (no connection within connect_timeout_s).
        """
        return self.take_idle(backend) or await self.connect(backend)

    async def connect(self, backend: table.Backend) -> Upstream:
        key = (backend.host, backend.port, backend.scheme)
        scheme = backend.scheme
        tls: ssl.SSLContext | None = None
        server_name = backend.host
        if scheme == "https":
            tls = self._tls_context()
        elif scheme == table.MESH_SCHEME:
            tls = self._peer_context(backend)
            server_name = getattr(backend, "server_name", "") or backend.host
        elif scheme == table.VERIFIED_TLS_SCHEME:
            tls = self._verified_context()
        timeout = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                size = self.settings.read_size
                _, chan = await asyncio.get_running_loop().create_connection(
                    lambda: channel.Channel(size),
                    backend.host,
                    backend.port,
                    ssl=tls,
                    server_hostname=server_name if tls else None,
                )
        except TimeoutError:
            raise errors.UpstreamTimeoutError(
                backend.service, backend.host, backend.port, "connection", timeout
            ) from None
        except ConnectionRefusedError:
            raise errors.UpstreamConnectError(
                backend.service, backend.host, backend.port, "connection refused", backend.state
            ) from None
        except ssl.SSLError as exc:
            reason = f"TLS handshake failed ({exc.reason or exc})"
            raise errors.UpstreamConnectError(
                backend.service, backend.host, backend.port, reason, backend.state
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise errors.UpstreamConnectError(
                backend.service, backend.host, backend.port, reason.lower(), backend.state
            ) from None
        self.opened += 1
        return Upstream(key, chan)

    def release(self, up: Upstream) -> None:
        """Return a connection whose exchange completed; anything unclean is closed."""
        conn = up.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            idle = self._idle[up.key]
            if len(idle) < self.settings.pool_idle_per_upstream and up.reader.reusable():
                idle.append(up)
                return
        up.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for up in idle:
                up.close()
        self._idle.clear()

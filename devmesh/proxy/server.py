"""The proxy server's lifecycle: listeners, per-edge listeners, the timeout sweep, shutdown.

Why it looks like this: the agent owns one ``ProxyServer`` and runs ``serve()`` in its anyio
task group (asyncio backend). The proxy reads the route table through ``table_provider`` on
every request, so the agent applies a new table by swapping the object it returns; no call
into the proxy is needed. Edge listeners are the exception: they are sockets, so the agent
declares the edges it wants with ``set_edges`` and gets their ports back.

What happens on a connection is elsewhere: ``dispatch`` reads requests, ``forward`` is the
one forwarding path (routing, error answers, the access log), and ``callbacks`` and
``exchange`` are the two ways an exchange with a service runs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import TaskStatus

from devmesh.core import routes
from devmesh.proxy import (
    accesslog,
    ca,
    callbacks,
    dispatch,
    forward,
    listeners,
    metrics,
    peergate,
    peering,
    pool,
    selection,
    settings,
    table,
)

log = logging.getLogger("devmesh.proxy")
FLUSH_INTERVAL_S = 0.25


class ProxyServer:
    """HTTP(S) front door for every local service. See docs/proxy.md."""

    def __init__(
        self,
        config: settings.Settings,
        table_provider: Callable[[], table.RouteTable],
        authority: ca.CertificateAuthority | None = None,
        access_log: accesslog.AccessLog | None = None,
        router: selection.Router | None = None,
        *,
        recorder: metrics.Recorder | None = None,
    ) -> None:
        """``router`` holds the route selection's state and clock (tests inject one);
        ``recorder`` counts every exchange for ``/metrics`` (None: no metrics)."""
        self.settings = config
        self.metrics = recorder
        self._ca = authority
        self.access_log = access_log or accesslog.AccessLog(None)
        self.pool = pool.Pool(config)
        self.forwarder = forward.Forwarder(
            config, table_provider, self.pool, self.access_log, router=router, recorder=recorder
        )
        self.http_port: int | None = None
        self.https_port: int | None = None
        self._inflight = callbacks.Inflight()
        self._peer_stats = peergate.Stats()
        self._members = peergate.Members(self._peer_stats)
        self._connections = dispatch.Connections(self.forwarder, self._inflight, self._members)
        self._servers: list[asyncio.Server] = []
        self._edges: dict[table.Edge, tuple[int, list[asyncio.Server]]] = {}
        self._peer: tuple[peering.PeerListener, int, peergate.Gate] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def _listen(
        self, port: int, edge: table.Edge | None, tls: ssl.SSLContext | None
    ) -> tuple[int, list[asyncio.Server]]:
        """Bind 127.0.0.1:port (and ::1 on the same port when possible); the bound port."""
        factory = self._connections.factory("https" if tls is not None else "http", edge)
        loop = asyncio.get_running_loop()
        shared, join = self.settings.reuse_port, self.settings.join_ports
        sock = listeners.bind(self.settings.host, port, shared=shared, join=join)
        first = await loop.create_server(factory, sock=sock, ssl=tls)
        bound = sock.getsockname()[1]
        servers = [first]
        if self.settings.ipv6:
            try:
                sock6 = listeners.bind("::1", bound, shared=shared, join=join)
                servers.append(await loop.create_server(factory, sock=sock6, ssl=tls))
            except OSError as exc:  # no IPv6 loopback here, or the port is taken on ::1
                log.debug("not listening on [::1]:%s: %s", bound, exc)
        return bound, servers

    async def start(self) -> None:
        """Bind the HTTP (and HTTPS) listeners. Raises OSError when a port is taken."""
        self._sweep()
        port, servers = await self._listen(self.settings.port, None, None)
        self.http_port = self.forwarder.http_port = port
        self._servers += servers
        if self.settings.https_port is not None and self._ca is not None:
            tls = await asyncio.to_thread(self._ca.ssl_context_for_server)
            port, servers = await self._listen(self.settings.https_port, None, tls)
            self.https_port = self.forwarder.https_port = port
            self._servers += servers

    async def serve(
        self, *, task_status: TaskStatus[ProxyServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled, then close every listener and connection.

        ``task_status.started(self)`` fires once the listeners are bound, so the agent can
        read ``http_port``/``https_port`` (useful with port 0).
        """
        try:
            await self.start()
            task_status.started(self)
            while True:
                await anyio.sleep(FLUSH_INTERVAL_S)
                self.flush()
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening, drop every connection and idle upstream, flush the log."""
        for server in self._servers:
            server.close()
        for _, servers in self._edges.values():
            for server in servers:
                server.close()
        self._servers.clear()
        self._edges.clear()
        if self._peer is not None:
            self._peer[2].close()
            self._peer = None
        self._connections.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pool.close()
        self.flush()

    def flush(self) -> None:
        """Write what is buffered: the access log, and this process's counts to the shared
        metrics files (the proxy does both every ``FLUSH_INTERVAL_S``)."""
        self.access_log.flush()
        if self.metrics is not None:
            self.metrics.flush()

    def _sweep(self) -> None:
        """Time out exchanges running in callbacks whose service went quiet for idle_timeout_s,
        and client connections past their header or keep-alive deadline.

        The price of one timer for all of them is lateness of up to a quarter of the
        shortest timeout (at most a second).
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._inflight.expire(now, s.idle_timeout_s)
        self._connections.expire(now, s.header_timeout_s, s.keepalive_timeout_s)
        shortest = min(s.idle_timeout_s, s.header_timeout_s, s.keepalive_timeout_s)
        self._sweeper = loop.call_later(min(1.0, shortest / 4), self._sweep)

    async def set_edges(self, wanted: Mapping[table.Edge, int | None]) -> dict[table.Edge, int]:
        """Make the edge listeners exactly ``wanted``; edge -> bound port.

        The value is the preferred port (the one used before an agent restart, so NAME_URL
        stays stable); when it is None or taken, an ephemeral port is used. Edges no longer
        wanted stop listening; their open connections finish their current exchange.
        """
        for edge in list(self._edges):
            if edge not in wanted:
                for server in self._edges.pop(edge)[1]:
                    server.close()
        for edge, preferred in wanted.items():
            if edge in self._edges:
                continue
            try:
                bound = await self._listen(preferred or 0, edge, None)
            except OSError:
                bound = await self._listen(0, edge, None)
            self._edges[edge] = bound
        return self.edge_ports()

    def edge_ports(self) -> dict[table.Edge, int]:
        return {edge: port for edge, (port, _) in self._edges.items()}

    async def set_peer_listener(self, listener: peering.PeerListener | None) -> int | None:
        """Open (or replace, or with None close) the peer listener; the bound port.

        Replacing closes the old listener first (its open connections finish their current
        exchange; unfinished handshakes are dropped), so the same port can be bound again.
        Raises OSError when the port is taken. Handshakes are capped apart from teammates'
        connections, timed out and counted (``peergate``, ``peer_stats``).
        """
        if self._peer is not None:
            self._peer[2].close()
            self._peer = None
        if listener is None:
            return None
        factory = self._connections.factory("https", None, listener)
        sock = listeners.bind(listener.host, listener.port)
        gate = peergate.Gate(sock, listener, factory, stats=self._peer_stats)
        gate.start()
        port = int(sock.getsockname()[1])
        self._peer = (listener, port, gate)
        return port

    def peer_stats(self) -> dict[str, int | str | None]:
        """The peer listener's counts, for the agent to show (see docs/mesh.md): teammates'
        connections ``open`` now (of ``max_connections``, ``max_per_node`` each; 0 with no
        listener), connections ``handshaking`` now (of ``max_handshakes``,
        ``max_handshakes_per_address`` each), and since the proxy started the connections
        refused over each cap and the ``failed_handshakes`` (strangers without a team
        certificate, abandoned or slow handshakes), the latest as ``ADDRESS: why``."""
        stats = self._peer_stats
        gate = self._peer[2] if self._peer is not None else None
        listener = gate.listener if gate is not None else None
        return {
            "open": self._members.count,
            "max_connections": listener.max_connections if listener else 0,
            "max_per_node": listener.max_per_node if listener else 0,
            "handshaking": len(gate.handshaking) if gate is not None else 0,
            "max_handshakes": listener.max_handshakes if listener else 0,
            "max_handshakes_per_address": listener.max_handshakes_per_address if listener else 0,
            "refused_over_cap": stats.refused_over_cap,
            "refused_over_node_cap": stats.refused_over_node_cap,
            "refused_over_handshake_cap": stats.refused_over_handshake_cap,
            "refused_over_address_cap": stats.refused_over_address_cap,
            "failed_handshakes": stats.failed_handshakes,
            "last_failed_handshake": stats.last_failed_handshake,
        }

    def load(self) -> dict[str, int]:
        """What this process holds now, cheap to count (for ``status --json`` and the soak):
        client ``connections`` open, exchanges running as ``exchange_tasks``, and every
        asyncio task of the process (the agent's own included) as ``tasks``."""
        return {
            "connections": len(self._connections.open),
            "exchange_tasks": len(self._connections.tasks),
            "tasks": len(asyncio.all_tasks()),
        }

    @property
    def peer_port(self) -> int | None:
        return self._peer[1] if self._peer is not None else None

    def explain(
        self,
        project: str,
        service: str,
        *,
        caller: str | None = None,
        branch: str | None = None,
    ) -> routes.Decision | None:
        """The decision a call to (project, service) from ``caller`` in ``branch`` would get
        now: the same selection as a request, against the same down marks and outstanding
        counts, without advancing any cursor. None when (project, service) has neither a
        MeshRoute nor a Backend. A caller running under a branch is asked for with its
        branch, as its calls are routed."""
        return selection.explain(
            self.forwarder.table(),
            self.forwarder.router,
            project,
            service,
            caller=caller,
            branch=branch,
        )

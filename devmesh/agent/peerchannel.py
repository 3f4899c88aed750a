"""The mesh node's peer channel, served by the agent's proxy (``ProxyServer.set_peer_listener``).

Why the proxy and not the node: a teammate calling a shared service must get this agent's
one forwarding path (streaming, WebSocket, retries, error pages, the access log), so the
peer channel is a listener of the proxy, and the catalog one of its answers. The checks stay
the mesh's: the listener's TLS context requires a client certificate of the team CA
(``mesh.channel.server_context``), and ``authorize`` asks the node, which reads the caller's
node id and name from the certificate, applies ``mesh.allow`` and counts a refusal.
"""

from __future__ import annotations

from collections.abc import Callable

from devmesh.mesh import channel, node
from devmesh.proxy import peering, server


class ProxyPeerChannel:
    """``meshhost.PeerChannel`` over the proxy the agent runs (None before it started)."""

    def __init__(self, proxy: Callable[[], server.ProxyServer | None]) -> None:
        self._proxy = proxy

    def available(self) -> bool:
        return self._proxy() is not None

    async def open(self, n: node.Node, host: str, port: int) -> int:
        proxy = self._proxy()
        if proxy is None:
            raise OSError("the agent's proxy is not running")

        def authorize(cert: dict[str, object] | None, address: str) -> peering.PeerCaller | str:
            seen = n.authorize(cert, address)
            if isinstance(seen, str):
                return seen
            return peering.PeerCaller(
                node_id=seen.node_id, node_name=seen.node_name, address=seen.address
            )

        bound = await proxy.set_peer_listener(
            peering.PeerListener(
                host=host,
                port=port,
                ssl_context=channel.server_context(n.identity),
                authorize=authorize,
                catalog=n.catalog_bytes,
            )
        )
        if bound is None:
            raise OSError(f"the proxy did not open the peer listener on {host}:{port}")
        return bound

    async def close(self) -> None:
        proxy = self._proxy()
        if proxy is not None:
            await proxy.set_peer_listener(None)

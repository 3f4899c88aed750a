"""A node whose peer channel its host serves (the agent's proxy): it opens no listener, but
still decides who may call from the caller's verified certificate, counts refusals and
served catalogs, and tells its host when what peers share changed. In process on ``lo``,
with a real mutual-TLS handshake standing in for the host's listener."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from netkit import free_udp_port

from devmesh.core import catalog
from devmesh.mesh import channel, node
from devmesh.mesh import identity as ids

LONG_INTERVAL_S = 30.0


async def until(what: str, check, timeout_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.01)  # polling an observable state with a deadline
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


def settings(tmp: Path, name: str, port: int, **kw) -> node.NodeSettings:
    return node.NodeSettings(home=tmp / name, interfaces=("lo",), discovery_port=port,
                             channel_host="127.0.0.1", channel_port=0,
                             interval_s=LONG_INTERVAL_S, **kw)  # fmt: skip


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def caller_cert(host_identity: ids.Identity, caller: ids.Identity) -> dict[str, object]:
    """The caller's certificate as a host listener with the node's TLS context reads it."""
    got: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(writer.get_extra_info("peercert"))
        writer.close()

    server = await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=channel.server_context(host_identity)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=channel.client_context(caller),
            server_hostname=ids.node_dns_name(host_identity.node_id, host_identity.team.mesh),
        )
        cert = await asyncio.wait_for(got, 10)
        writer.close()
        return cert
    finally:
        server.close()


def test_a_hosted_node_opens_no_listener_and_authorizes_by_certificate(tmp_path: Path) -> None:
    a_id = ids.init(tmp_path / "alpha", "team", node_name="alpha")
    b_id = ids.join(tmp_path / "beta", ids.encode_bundle(a_id.team), node_name="beta")
    port = free_udp_port()
    channel_port = free_tcp_port()

    async def main() -> None:
        a = node.Node(settings(tmp_path, "alpha", port, serve_channel=False, allow=("gamma",)))
        a.channel_port = channel_port  # what the host bound
        await a.start()
        try:
            assert a.server is None and a.status()["channel"]["port"] == channel_port
            with socket.socket() as s:  # nobody listens there: the host would
                assert s.connect_ex(("127.0.0.1", channel_port)) != 0
            cert = await caller_cert(a.identity, b_id)
            refusal = a.authorize(cert, "127.0.0.1")
            assert isinstance(refusal, str) and "not in mesh.allow" in refusal
            assert a.registry.drops["channel-refused"] == 1
            assert a.status()["channel_refused"] == ["beta: refused by mesh.allow"]
            assert isinstance(a.authorize(None, "127.0.0.9"), str)
            assert a.registry.drops["channel-refused"] == 2
            assert a.catalog_bytes() == catalog.encode(a.catalog)
            assert a.status()["channel"]["served"] == 1
        finally:
            await a.stop()

        a2 = node.Node(settings(tmp_path, "alpha", port, serve_channel=False))
        seen = a2.authorize(await caller_cert(a2.identity, b_id), "127.0.0.1")
        assert isinstance(seen, channel.PeerIdentity)
        assert (seen.node_id, seen.node_name, seen.address) == (b_id.node_id, "beta", "127.0.0.1")

    asyncio.run(main())


def test_the_host_hears_of_a_new_catalog_and_of_a_peer_that_left(tmp_path: Path) -> None:
    a_id = ids.init(tmp_path / "alpha", "team", node_name="alpha")
    ids.join(tmp_path / "beta", ids.encode_bundle(a_id.team), node_name="beta")
    port = free_udp_port()
    changes: list[bool] = []
    """At each call of the host's callback: whether b's services were held by then."""

    async def main() -> None:
        def held() -> bool:
            p = a.registry.get(b.identity.node_id)
            return bool(p and p.catalog and p.catalog.services)

        a = node.Node(
            settings(tmp_path, "alpha", port, serve_channel=False),
            on_change=lambda: changes.append(held()),
        )
        a.channel_port = free_tcp_port()
        b = node.Node(settings(tmp_path, "beta", port))  # serves its own channel
        await a.start()
        await b.start()
        try:
            b.set_services((catalog.SharedService(name="api", project="shop", version="1.0.0"),))
            await until("a to fetch b's catalog", held)
            # Told after the catalog arrived, not only when b was first seen (before it):
            # the host rebuilds its routes then, so b's api becomes routable.
            await until("a to tell its host of the catalog", lambda: any(changes))
        finally:
            await b.stop()
        before = len(changes)
        await until("a to drop b on goodbye", lambda: a.registry.get(b.identity.node_id) is None)
        await until("a to tell its host b left", lambda: len(changes) > before)
        await a.stop()

    asyncio.run(main())

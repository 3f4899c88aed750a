"""The peer channel: mutual TLS from the team CA, the catalog handler, a bounded fetch."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from devmesh.core import catalog
from devmesh.mesh import channel
from devmesh.mesh import identity as ids

SERVICES = (catalog.SharedService(name="api", project="shop", version="2.3.1", health="healthy"),)


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ids.Identity]:
    base = tmp_path_factory.mktemp("channel")
    a = ids.init(base / "a", "team", node_name="alpha")
    b = ids.join(base / "b", ids.encode_bundle(a.team), node_name="beta")
    # Same mesh name, another CA and secret: a stranger.
    x = ids.init(base / "x", "team", node_name="mallory")
    return {"a": a, "b": b, "x": x}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def serve(ident: ids.Identity, **kw) -> tuple[channel.CatalogServer, int]:
    cat = catalog.Catalog(node_id=ident.node_id, services=SERVICES)
    server = channel.CatalogServer(ident, catalog=lambda: catalog.encode(cat), **kw)
    port = await server.start("127.0.0.1", 0)
    return server, port


def test_members_fetch_each_others_catalog(homes) -> None:
    a, b = homes["a"], homes["b"]

    async def main() -> None:
        server, port = await serve(a)
        try:
            got = await channel.fetch_catalog(
                b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port
            )
            assert got.services == SERVICES and got.node_id == a.node_id
            assert server.served == 1 and server.refused_handshakes == 0
        finally:
            await server.close()

    run(main())


def test_a_server_of_another_ca_is_refused(homes) -> None:
    x, b = homes["x"], homes["b"]

    async def main() -> None:
        server, port = await serve(x)
        try:
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    b, node_id=x.node_id, node_name="mallory", address="127.0.0.1", port=port
                )
            assert err.value.refused and "TLS" in err.value.problem
        finally:
            await server.close()

    run(main())


def test_a_client_of_another_ca_is_refused_and_counted(homes) -> None:
    a, x = homes["a"], homes["x"]
    refusals: list[str] = []

    async def main() -> None:
        server, port = await serve(a, on_refused=lambda where, why: refusals.append(why))
        try:
            # The stranger trusts our CA (say it copied our certificate) but its own is not ours.
            ctx = channel.client_context(x)
            ctx.load_verify_locations(cafile=str(a.ca_path))
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    x,
                    node_id=a.node_id,
                    node_name="alpha",
                    address="127.0.0.1",
                    port=port,
                    context=ctx,
                )
            assert err.value.refused or "closed" in err.value.problem
            assert server.served == 0
            for _ in range(200):
                if server.refused_handshakes:
                    break
                await asyncio.sleep(0.01)  # polling an observable counter with a deadline
            assert server.refused_handshakes == 1
            assert refusals and "certificate" in refusals[0]
        finally:
            await server.close()

    run(main())


def test_a_client_without_a_certificate_is_refused(homes) -> None:
    a = homes["a"]

    async def main() -> None:
        server, port = await serve(a)
        try:
            ctx = ssl.create_default_context(cafile=str(a.ca_path))
            ctx.check_hostname = False
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(b"GET /mesh/v1/catalog HTTP/1.1\r\nhost: x\r\n\r\n")
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await writer.drain()
                data = await reader.read(100)
                assert data == b""  # TLS 1.3: the refusal arrives as an alert or a close
                raise ConnectionResetError
            writer.close()
            assert server.served == 0
        finally:
            await server.close()

    run(main())


def test_a_node_claiming_another_id_is_refused(homes) -> None:
    a, b = homes["a"], homes["b"]

    async def main() -> None:
        server, port = await serve(a)
        try:
            # b announced itself as... b, but the address serves a's certificate.
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    a, node_id=b.node_id, node_name="beta", address="127.0.0.1", port=port
                )
            assert err.value.refused
            # Right id, wrong announced name.
            with pytest.raises(
                channel.ChannelError, match="rather than the announced node"
            ) as err2:
                await channel.fetch_catalog(
                    b, node_id=a.node_id, node_name="not-alpha", address="127.0.0.1", port=port
                )
            assert err2.value.refused
        finally:
            await server.close()

    run(main())


def test_mesh_allow_refuses_on_the_server(homes) -> None:
    a, b = homes["a"], homes["b"]

    async def main() -> None:
        server, port = await serve(
            a, allowed=lambda peer: None if peer.node_name == "gamma" else "no"
        )
        try:
            with pytest.raises(channel.ChannelError, match="HTTP 403") as err:
                await channel.fetch_catalog(
                    b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port
                )
            assert not err.value.refused
        finally:
            await server.close()

    run(main())


@pytest.mark.parametrize(
    "mode", ["content-length", "chunked", "slow-loris", "garbage", "bad-catalog"]
)
def test_a_hostile_server_cannot_bloat_or_stall_the_client(homes, mode: str) -> None:
    a, b = homes["a"], homes["b"]
    sent = {"bytes": 0}

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        try:
            if mode == "content-length":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n")
            elif mode == "garbage":
                writer.write(b"\x00\xffnot http at all\r\n\r\n")
            elif mode == "bad-catalog":
                body = b'{"version":1,"node":"%s","services":[{"name":"API"}]}' % a.node_id.encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            elif mode == "slow-loris":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(30)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
                for _ in range(1000):  # bounded: 64 MiB at most, the client stops far earlier
                    writer.write(chunk)
                    sent["bytes"] += 65536
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(hostile, "127.0.0.1", 0, ssl=channel.server_context(a))
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port,
                    max_bytes=256 * 1024, timeout_s=2,
                )  # fmt: skip
            expected = {
                "content-length": "over",
                "chunked": "over",
                "slow-loris": "no answer within 2",
                "garbage": "bad HTTP answer",
                "bad-catalog": "services[0].project",
            }[mode]
            assert expected in err.value.problem
            assert not err.value.refused
            if mode == "chunked":
                assert sent["bytes"] < 64 * 1024 * 1024
        finally:
            srv.close()

    run(main())


@pytest.mark.parametrize(
    ("method", "path", "peer", "allowed", "status"),
    [
        ("GET", "/mesh/v1/catalog", "p", None, 200),
        ("HEAD", "/mesh/v1/catalog?x=1", "p", None, 200),
        ("POST", "/mesh/v1/catalog", "p", None, 405),
        ("GET", "/mesh/v1/other", "p", None, 404),
        ("GET", "/mesh/v1/catalog", None, None, 403),
        ("GET", "/mesh/v1/catalog", "p", "not in mesh.allow", 403),
    ],
)
def test_handle_catalog_is_a_plain_function(method, path, peer, allowed, status) -> None:
    who = channel.PeerIdentity(node_id="ab" * 16, node_name="beta") if peer else None
    got = channel.handle_catalog(
        method, path, who, catalog=lambda: b"{}", allowed=lambda _p: allowed
    )
    assert got.status == status
    assert (got.body == b"{}") is (status == 200)


def test_peer_identity_reads_the_certificate(homes, tmp_path: Path) -> None:
    a = homes["a"]
    cert = {
        "subjectAltName": (
            ("DNS", "alpha.team.devmesh.internal"),
            ("DNS", f"{a.node_id}.team.devmesh.internal"),
        )
    }
    assert channel.peer_identity(cert, "team", "10.0.0.1") == channel.PeerIdentity(
        node_id=a.node_id, node_name="alpha", address="10.0.0.1"
    )
    assert channel.peer_identity(cert, "other") is None
    assert channel.peer_identity({"subjectAltName": (("DNS", "api.localhost"),)}, "team") is None
    assert channel.peer_identity(None, "team") is None


def test_connections_are_bounded_and_a_busy_server_is_not_a_refusal(homes) -> None:
    a, b = homes["a"], homes["b"]

    async def main() -> None:
        server, port = await serve(a)
        idle = []
        try:
            for _ in range(channel.MAX_CONNECTIONS):  # never start TLS: they sit in the handshake
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            for _ in range(500):
                if len(server.connections) >= channel.MAX_CONNECTIONS:
                    break
                await asyncio.sleep(0.01)  # polling an observable state with a deadline
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port
                )
            assert not err.value.refused, err.value.problem
            for _, writer in idle:
                writer.close()
            for _ in range(500):
                if len(server.connections) < channel.MAX_CONNECTIONS:
                    break
                await asyncio.sleep(0.01)
            got = await channel.fetch_catalog(
                b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port
            )
            assert got.services == SERVICES
        finally:
            await server.close()

    run(main())


def test_the_catalog_is_served_on_uvloop_as_the_agent_runs_it(homes) -> None:
    """The agent's loop is uvloop: a server that read the ClientHello before starting TLS
    left the handshake hanging until the client's timeout (every fetch, on uvloop)."""
    uvloop = pytest.importorskip("uvloop")
    a, b = homes["a"], homes["b"]

    async def main() -> None:
        server, port = await serve(a)
        try:
            for _ in range(3):
                got = await channel.fetch_catalog(
                    b,
                    node_id=a.node_id,
                    node_name="alpha",
                    address="127.0.0.1",
                    port=port,
                    timeout_s=5.0,
                )
                assert got.services == SERVICES
            assert server.served == 3 and server.refused_handshakes == 0
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_failed_fetch_always_says_why(homes, loop: str) -> None:
    """A connection closed before the TLS handshake (as the peer listener closes one over its
    caps) fails on uvloop with an error that carries no words (``str(exc)`` is empty): the
    reason logged for the fetch still says what happened."""
    import uvloop

    a, b = homes["a"], homes["b"]

    async def on_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(on_raw, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(channel.ChannelError) as err:
                await channel.fetch_catalog(
                    b, node_id=a.node_id, node_name="alpha", address="127.0.0.1", port=port,
                    timeout_s=5,
                )  # fmt: skip
            problem = err.value.problem
            assert problem.startswith("connection failed: ")
            assert problem.removeprefix("connection failed: ").strip(), problem
        finally:
            srv.close()

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(main(), 30))
    else:
        run(main())

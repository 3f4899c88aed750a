"""The node's timing rules, in process on ``lo``: announce at once (start, change, new peer),
jitter from the injected random source, goodbye on stop, nothing left open on a bad start."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest
from netkit import free_udp_port

from devmesh.core import catalog
from devmesh.mesh import discovery, node
from devmesh.mesh import identity as ids

LONG_INTERVAL_S = 30.0  # nothing here may rely on a periodic heartbeat


class RecordingRandom(random.Random):
    def __init__(self) -> None:
        super().__init__(7)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return 1.0


async def until(what: str, check, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)  # polling an observable state with a deadline


def make(tmp: Path, name: str, port: int, rng: random.Random | None = None, **kw) -> node.Node:
    settings = node.NodeSettings(home=tmp / name, interfaces=("lo",), discovery_port=port,
                                 channel_host="127.0.0.1", channel_port=0,
                                 interval_s=LONG_INTERVAL_S, **kw)  # fmt: skip
    return node.Node(settings, rng=rng)


def test_announces_at_once_and_on_change_then_says_goodbye(tmp_path: Path) -> None:
    a_id = ids.init(tmp_path / "alpha", "team", node_name="alpha")
    ids.join(tmp_path / "beta", ids.encode_bundle(a_id.team), node_name="beta")
    port = free_udp_port()
    rng = RecordingRandom()

    async def main() -> None:
        a = make(tmp_path, "alpha", port, rng)
        b = make(tmp_path, "beta", port)
        await a.start()
        await b.start()
        try:
            # b's hello on start reaches a; a answers at once on a new peer: no interval needed.
            await until(
                "both to meet",
                lambda: a.registry.get(b.identity.node_id) and b.registry.get(a.identity.node_id),
            )
            assert rng.calls and set(rng.calls) == {node.JITTER}
            # A change of shared services is announced at once and the catalog fetched.
            a.set_services(
                (
                    catalog.SharedService(
                        name="api", project="shop", version="1.0.0", health="healthy"
                    ),
                )
            )
            await until(
                "b to fetch the new catalog",
                lambda: (
                    (p := b.registry.get(a.identity.node_id)) and p.catalog and p.catalog.services
                ),
            )
        finally:
            await b.stop()
        await until("a to drop b on goodbye", lambda: a.registry.get(b.identity.node_id) is None)
        await a.stop()
        await a.stop()  # idempotent

    asyncio.run(main())


def test_a_bad_interface_is_named_and_nothing_stays_open(tmp_path: Path) -> None:
    ids.init(tmp_path / "alpha", "team", node_name="alpha")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        channel_port = s.getsockname()[1]
    port = free_udp_port()

    async def main() -> None:
        settings = node.NodeSettings(home=tmp_path / "alpha", interfaces=("nosuch0",), discovery_port=port,
                                     channel_host="127.0.0.1", channel_port=channel_port)  # fmt: skip
        n = node.Node(settings)
        with pytest.raises(discovery.DiscoveryError, match="interface nosuch0: no such interface"):
            await n.start()
        # The channel port was released: it can be bound again at once.
        with socket.socket() as s:
            s.bind(("127.0.0.1", channel_port))

    asyncio.run(main())


def test_resolve_interfaces_on_loopback_and_seeds() -> None:
    [lo] = discovery.resolve_interfaces(["lo"])
    assert (lo.name, lo.address, lo.broadcast, lo.network) == (
        "lo",
        "127.0.0.1",
        "127.255.255.255",
        "127.0.0.0/8",
    )
    assert discovery.parse_seed("[fd00::1]:7702") == ("fd00::1", 7702)
    assert discovery.parse_seed("laptop-b.tail1234.ts.net:7702") == (
        "laptop-b.tail1234.ts.net",
        7702,
    )
    for bad in ("nohost", "host:", "host:0", "host:99999", ":7702"):
        with pytest.raises(discovery.DiscoveryError, match="HOST:PORT"):
            discovery.parse_seed(bad)


@pytest.mark.parametrize("pktinfo", [True, False], ids=["pktinfo", "by-source"])
def test_broadcast_and_unicast_are_told_apart(pktinfo: bool) -> None:
    """With IP_PKTINFO (Linux) by destination; without it (other systems) by source."""
    port = free_udp_port()
    seen: list[discovery.Sighting] = []

    async def main() -> None:
        udp = discovery.UdpSocket(port)
        udp.pktinfo = pktinfo
        bcast = discovery.BroadcastBackend(udp, discovery.resolve_interfaces(["lo"]))
        seeds = discovery.SeedBackend(udp, [])
        await bcast.start(seen.append)
        await seeds.start(seen.append)
        try:
            await bcast.announce(lambda address: b"from " + address.encode())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.2", 0))
                s.sendto(b"unicast", ("127.0.0.1", port))
            await until("two sightings", lambda: len(seen) >= 2)
        finally:
            await bcast.close()
            await seeds.close()
            udp.close()

    asyncio.run(main())
    by_data = {s.data: s.backend for s in seen}
    assert by_data[b"from 127.0.0.1"] == "broadcast"
    # Without PKTINFO a unicast from lo's own network reads as broadcast: the attribution is
    # for display only; both reach the registry.
    assert by_data[b"unicast"] == ("seeds" if pktinfo else "broadcast")

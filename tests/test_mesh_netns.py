"""Mesh nodes on several "machines" (network namespaces on a bridge, made by the test).

Every datagram here stays inside namespaces this test created (see netkit); nothing is sent
on the machine's real interfaces.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from netkit import NETNS, Net, NodeProc, init_team, join_team, wait_for

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

INTERVAL = "0.3"  # TTL 0.9 s
NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture
def net(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Net, Path, list[NodeProc]]]:
    hosts = getattr(request, "param", 3)
    started: list[NodeProc] = []
    with Net(hosts) as n:
        try:
            yield n, tmp_path, started
        finally:
            for node in started:
                node.stop(signal.SIGKILL)


def team(tmp: Path, names: list[str]) -> None:
    init_team(tmp / names[0], names[0])
    for name in names[1:]:
        join_team(tmp / name, tmp / names[0], name)


def start(net: Net, tmp: Path, started: list[NodeProc], i: int, name: str, *extra: str) -> NodeProc:
    node = NodeProc(
        tmp / name,
        ["--interfaces", "eth0", "--interval", INTERVAL, *extra],
        net=net,
        host=i,
        services=[
            {"name": f"svc-{name}", "project": "shop", "version": "1.0.0", "health": "healthy"}
        ],
    )
    started.append(node)
    return node


@pytest.mark.parametrize("net", [4], indirect=True)
def test_broadcast_finds_all_three_and_keeps_another_secret_out(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:3])
    init_team(tmp / "mallory", "mallory")  # same mesh name, its own secret and CA
    nodes = [start(n, tmp, started, i, NAMES[i]) for i in range(3)]
    start(n, tmp, started, 3, "mallory")
    for i, node in enumerate(nodes):
        others = set(NAMES[:3]) - {NAMES[i]}
        wait_for(
            f"{NAMES[i]} to see {others}",
            lambda node=node, others=others: node.alive_peers() == others,
        )
    peer = wait_for(
        "alpha to fetch beta's catalog",
        lambda: (nodes[0].peer("beta") or {}).get("services") and nodes[0].peer("beta"),
    )
    assert peer["address"] == n.address(1) and peer["backends"] == ["broadcast"]
    assert peer["services"][0]["name"] == "svc-beta"
    wait_for("mallory's datagrams counted", lambda: nodes[0].status()["drops"].get("bad-signature"))
    assert nodes[0].peer("mallory") is None


def test_a_seed_finds_a_peer_whose_broadcast_is_dropped(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:3])
    n.drop_broadcast(2)
    a = start(n, tmp, started, 0, "alpha")
    b = start(n, tmp, started, 1, "beta")
    c = start(n, tmp, started, 2, "gamma", "--seed", f"{n.address(0)}:7702")
    wait_for("alpha to see gamma through the seed", lambda: {"beta", "gamma"} <= a.alive_peers())
    assert a.peer("gamma")["backends"] == ["seeds"]  # type: ignore[index]
    # alpha answers by unicast, so one side listing the other is enough.
    wait_for("gamma to see alpha", lambda: c.alive_peers() == {"alpha"})
    wait_for("gamma to fetch alpha's catalog", lambda: (c.peer("alpha") or {}).get("services"))
    # beta has no seed and gamma's broadcasts are dropped: they never meet.
    assert "gamma" not in b.alive_peers()
    assert c.status()["udp_errors"] >= 1  # it tried; the firewall refused the broadcasts


def test_mdns_finds_peers_with_broadcast_off(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:3])
    nodes = [start(n, tmp, started, i, NAMES[i], "--no-broadcast", "--mdns") for i in range(3)]
    for i, node in enumerate(nodes):
        others = set(NAMES[:3]) - {NAMES[i]}
        wait_for(
            f"{NAMES[i]} to see {others} over mDNS",
            lambda node=node, others=others: node.alive_peers() == others,
            timeout_s=30,
        )
    peer = nodes[0].peer("beta")
    assert peer is not None and peer["backends"] == ["mdns"]
    assert "broadcast" not in nodes[0].status()["sent"]
    wait_for("catalog over the channel", lambda: (nodes[0].peer("beta") or {}).get("services"))


def test_a_link_down_expires_the_peer_and_it_returns_with_the_link(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:3])
    nodes = [start(n, tmp, started, i, NAMES[i]) for i in range(3)]
    wait_for("all to meet", lambda: nodes[0].alive_peers() == {"beta", "gamma"})
    n.link(2, up=False)
    wait_for(
        "gamma expired on alpha",
        lambda: (nodes[0].peer("gamma") or {}).get("state") == "expired",
        timeout_s=10,
    )
    assert (nodes[0].peer("beta") or {}).get("state") == "alive"
    n.link(2, up=True)
    wait_for(
        "gamma back on alpha",
        lambda: (nodes[0].peer("gamma") or {}).get("state") == "alive",
        timeout_s=10,
    )
    wait_for("alpha back on gamma", lambda: "alpha" in nodes[2].alive_peers(), timeout_s=10)


def test_a_certificate_of_another_ca_is_refused_in_namespaces(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:2])
    from devmesh.mesh import identity as ids

    init_team(tmp / "mallory", "mallory")
    ids.write_private(
        ids.mesh_dir(tmp / "mallory") / "secret",
        (ids.mesh_dir(tmp / "alpha") / "secret").read_bytes(),
    )
    a = start(n, tmp, started, 0, "alpha")
    start(n, tmp, started, 1, "beta")
    start(n, tmp, started, 2, "mallory")
    wait_for("alpha to fetch beta", lambda: (a.peer("beta") or {}).get("services"))
    refused = wait_for(
        "mallory refused",
        lambda: (a.peer("mallory") or {}).get("state") == "refused" and a.peer("mallory"),
    )
    assert refused["reason"].startswith("tls:")
    assert a.status()["drops"]["refused"] >= 1


def test_namespaces_are_gone_after_close() -> None:
    import subprocess

    with Net(2) as n:
        names = [n.switch, *n.hosts]
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
        assert all(name in listed for name in names)
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert not any(name in listed for name in names)


def test_auto_picks_only_the_broadcast_capable_non_loopback_interfaces() -> None:
    import sys

    probe = (
        "from devmesh.mesh import discovery; "
        "print([(i.name, i.address, i.broadcast) for i in discovery.resolve_interfaces(['auto'])])"
    )
    with Net(1) as n:
        # Up, but without an IPv4 address: not a candidate.
        n.exec(0, ["ip", "link", "add", "xa", "type", "veth", "peer", "name", "xb"])
        n.exec(0, ["ip", "link", "set", "xa", "up"])
        out = n.exec(0, [sys.executable, "-c", probe]).stdout.strip()
    assert out == "[('eth0', '10.250.7.1', '10.250.7.255')]"


@pytest.mark.parametrize("net", [2], indirect=True)
def test_a_new_address_is_announced(net) -> None:
    n, tmp, started = net
    team(tmp, NAMES[:2])
    a = start(n, tmp, started, 0, "alpha")
    start(n, tmp, started, 1, "beta")
    wait_for("alpha to see beta", lambda: (a.peer("beta") or {}).get("address") == n.address(1))
    n.exec(1, ["ip", "addr", "del", f"{n.address(1)}/24", "dev", "eth0"])
    n.exec(1, ["ip", "addr", "add", "10.250.7.9/24", "brd", "+", "dev", "eth0"])
    wait_for(
        "alpha to learn beta's new address",
        lambda: (a.peer("beta") or {}).get("address") == "10.250.7.9",
    )
    assert a.peer("beta")["state"] == "alive"  # type: ignore[index]

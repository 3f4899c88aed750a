"""Real agents on several "machines": each agent (and the services it starts) runs inside a
network namespace of a bridge the test builds (tests/netkit.py); the CLI talks to it over its
Unix socket. Discovery runs on each host's ``eth0``, whose subnet exists only inside these
namespaces: nothing is sent on the machine's real interfaces."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from agentkit import PY, SERVER, Mesh
from netkit import NETNS, Net

from devmesh.mesh import identity as ids

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

INTERVAL_S = 0.3  # TTL 0.9 s
NAMES = ["alpha", "beta", "gamma", "delta"]


def project_yaml(name: str, *, discovery: str, shared: str, allow: str = "") -> str:
    return (
        f"version: 1\nproject: {name}\n"
        f"mesh:\n  name: team\n{allow}"
        f"  discovery:\n    interval_s: {INTERVAL_S}\n{discovery}"
        "services:\n"
        f"  {shared}:\n    version: 1.0.0\n    command: {PY} server.py\n    share: true\n"
    )


class Hosts:
    """A Net of N hosts and one agent per host (started on demand)."""

    def __init__(self, count: int) -> None:
        self.net = Net(count)
        self.agents: list[Mesh] = []
        try:
            for i in range(count):
                self.agents.append(Mesh(netns=self.net.hosts[i]))
        except BaseException:
            self.close()
            raise

    def team(self, first: int, *others: int) -> None:
        self.agents[first].mesh_init(NAMES[first])
        for i in others:
            self.agents[i].mesh_join(self.agents[first], NAMES[i])

    def up(self, i: int, discovery: str = "    interfaces: [eth0]\n", allow: str = "") -> None:
        m = self.agents[i]
        if m.agent is None:
            m.start_agent()
        d = m.project(
            f"p{i}",
            project_yaml(f"p{i}", discovery=discovery, shared=f"svc-{NAMES[i]}", allow=allow),
            {"server.py": SERVER},
        )
        m.cli("up", "-d", cwd=d, timeout=90, check=True)

    def peer(self, i: int, name: str) -> dict[str, Any] | None:
        return next((p for p in self.agents[i].peers()["peers"] if p["name"] == name), None)

    def alive(self, i: int) -> set[str]:
        return self.agents[i].alive_peers()

    def close(self) -> None:
        for m in self.agents:
            m.close()
        self.net.close()


@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    h = Hosts(getattr(request, "param", 3))
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("hosts", [4], indirect=True)
def test_broadcast_finds_all_and_another_team_is_kept_out(hosts: Hosts) -> None:
    hosts.team(0, 1, 2)
    hosts.agents[3].mesh_init("mallory")  # the same mesh name, its own secret and CA
    for i in range(4):
        hosts.up(i)
    for i in range(3):
        others = set(NAMES[:3]) - {NAMES[i]}
        hosts.agents[i].wait_for(lambda i=i, o=others: hosts.alive(i) == o, what=f"{others} alive")
    services = hosts.agents[0].wait_for(
        lambda: [s["name"] for s in (hosts.peer(0, "beta") or {}).get("services", [])],
        what="beta's catalog on alpha",
    )
    assert services == ["svc-beta"]
    beta = hosts.peer(0, "beta")
    assert beta is not None and beta["address"] == hosts.net.address(1)
    assert beta["backends"] == ["broadcast"]
    hosts.agents[0].wait_for(
        lambda: hosts.agents[0].peers()["drops"].get("bad-signature"), what="mallory counted"
    )
    assert hosts.peer(0, "mallory") is None
    row = next(p for p in hosts.agents[0].status()["peers"] if p["name"] == "beta")
    assert row["services"] == [
        {
            "name": "svc-beta",
            "project": "p1",
            "version": "1.0.0",
            "branch": None,
            "health": "healthy",
        }
    ]


def test_a_seed_finds_an_agent_whose_broadcast_is_dropped(hosts: Hosts) -> None:
    hosts.team(0, 1, 2)
    hosts.net.drop_broadcast(2)
    hosts.up(0)
    hosts.up(1)
    seed = f"    interfaces: [eth0]\n    peers: ['{hosts.net.address(0)}:7702']\n"
    hosts.up(2, seed)
    hosts.agents[0].wait_for(lambda: {"beta", "gamma"} <= hosts.alive(0), what="gamma via seed")
    gamma = hosts.peer(0, "gamma")
    assert gamma is not None and gamma["backends"] == ["seeds"]
    hosts.agents[2].wait_for(
        lambda: (hosts.peer(2, "alpha") or {}).get("services"), what="alpha's catalog on gamma"
    )
    assert "gamma" not in hosts.alive(1)  # no seed, broadcast dropped: they never meet


def test_mdns_finds_agents_with_broadcast_off(hosts: Hosts) -> None:
    hosts.team(0, 1, 2)
    for i in range(3):
        hosts.up(i, "    broadcast: false\n    interfaces: [eth0]\n    mdns: true\n")
    for i in range(3):
        others = set(NAMES[:3]) - {NAMES[i]}
        hosts.agents[i].wait_for(
            lambda i=i, o=others: hosts.alive(i) == o, timeout=40, what=f"{others} over mDNS"
        )
    beta = hosts.peer(0, "beta")
    assert beta is not None and beta["backends"] == ["mdns"]
    assert "broadcast" not in hosts.agents[0].peers()["sent"]
    hosts.agents[0].wait_for(
        lambda: (hosts.peer(0, "beta") or {}).get("services"), what="beta's catalog over mDNS"
    )


def test_a_link_down_expires_the_agent_and_it_returns_with_the_link(hosts: Hosts) -> None:
    hosts.team(0, 1, 2)
    for i in range(3):
        hosts.up(i)
    a = hosts.agents[0]
    a.wait_for(lambda: hosts.alive(0) == {"beta", "gamma"}, what="all to meet")
    hosts.net.link(2, up=False)
    # TTL is 3 x 0.3 s; the deadline leaves room for a loaded machine, not for a missed expiry.
    a.wait_for(
        lambda: (hosts.peer(0, "gamma") or {}).get("state") == "expired",
        timeout=10,
        what="gamma expired on alpha",
    )
    assert (hosts.peer(0, "beta") or {}).get("state") == "alive"
    text = a.cli("status", check=True).stdout
    assert "expired" in text  # the peer table says so
    hosts.net.link(2, up=True)
    a.wait_for(
        lambda: (hosts.peer(0, "gamma") or {}).get("state") == "alive",
        timeout=10,
        what="gamma back on alpha",
    )


def test_a_certificate_of_another_ca_is_refused_and_counted(hosts: Hosts) -> None:
    hosts.team(0, 1)
    mallory = hosts.agents[2]
    mallory.mesh_init("mallory")  # its own CA ...
    ids.write_private(  # ... but the team's secret, so its datagrams pass
        ids.mesh_dir(mallory.home) / "secret",
        (ids.mesh_dir(hosts.agents[0].home) / "secret").read_bytes(),
    )
    for i in range(3):
        hosts.up(i)
    a = hosts.agents[0]
    a.wait_for(lambda: (hosts.peer(0, "beta") or {}).get("services"), what="beta's catalog")
    refused = a.wait_for(
        lambda: (
            (hosts.peer(0, "mallory") or {}).get("state") == "refused" and hosts.peer(0, "mallory")
        ),
        what="mallory refused",
    )
    assert refused["reason"].startswith("tls:") and refused["services"] == []
    assert a.peers()["drops"]["refused"] >= 1
    text = a.cli("peers", check=True).stdout
    assert "mallory" in text and "refused (tls:" in text
    # Mallory's own catalog fetches reach alpha's peer listener and fail in TLS: counted there.
    listener = a.wait_for(
        lambda: (
            (a.peers().get("listener") or {}).get("failed_handshakes") and a.peers()["listener"]
        ),
        what="alpha's peer listener counting mallory's handshakes",
    )
    # Under TLS 1.3 mallory rejects alpha's certificate first, so alpha sees it hang up.
    assert listener["last_failed_handshake"].startswith(hosts.net.address(2) + ": ")
    assert "failed TLS handshakes (last: " in a.cli("peers", check=True).stdout


def test_an_agent_outside_mesh_allow_is_refused_and_counted(hosts: Hosts) -> None:
    hosts.team(0, 1, 2)
    hosts.up(0, allow=f"  allow: ['{hosts.net.address(1)}/32']\n")  # beta's address only
    hosts.up(1)
    hosts.up(2)
    a = hosts.agents[0]
    a.wait_for(lambda: "beta" in hosts.alive(0), what="beta alive on alpha")
    gamma = a.wait_for(
        lambda: (hosts.peer(0, "gamma") or {}).get("state") == "refused" and hosts.peer(0, "gamma"),
        what="gamma refused on alpha",
    )
    assert "not in mesh.allow" in gamma["reason"] and gamma["services"] == []
    assert a.peers()["drops"]["refused"] >= 1
    hosts.agents[1].wait_for(
        lambda: (hosts.peer(1, "alpha") or {}).get("services"), what="alpha's catalog on beta"
    )
    a.wait_for(lambda: a.peers()["drops"].get("channel-refused"), what="gamma's fetch refused")
    assert not (hosts.peer(2, "alpha") or {}).get("services")

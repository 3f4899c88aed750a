"""Gossip discovery on the real ``serf`` binary, with real agents on several "machines".

Every agent's file names only machine 0 as ``mesh.discovery.serf.join`` and turns broadcast
off: whatever they learn about each other, they learn through Serf's gossip. Serf binds each
host's ``eth0`` (10.250.7.0/24, which exists only inside the test's namespaces) and its RPC
the host's own loopback: nothing reaches the machine's real interfaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from netkit import NETNS, wait_for
from test_agent_mesh_netns import NAMES, Hosts, hosts  # noqa: F401 (the fixture)

from devmesh.core import serftags, wire
from devmesh.mesh import identity as ids

pytestmark = [
    pytest.mark.slow,
    NETNS,
    pytest.mark.skipif(shutil.which("serf") is None, reason="needs the serf package"),
]


def serf_only(join: str) -> str:
    return f"    broadcast: false\n    interfaces: [eth0]\n    serf:\n      join: ['{join}:7946']\n"


def serf_pids(h: Hosts, i: int, every: bool = False) -> list[int]:
    """The ``serf agent`` processes running in host ``i``; ``every``: any ``serf`` (its
    ``monitor`` and ``members`` too)."""
    out = []
    for pid in h.net.pids(i):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        is_serf = len(argv) > 1 and os.path.basename(argv[0]) == b"serf"
        is_agent = is_serf and (every or argv[1] == b"agent")
        if is_agent and state != "Z":
            out.append(pid)
    return out


def services(h: Hosts, i: int, name: str) -> list[str]:
    return [s["name"] for s in (h.peer(i, name) or {}).get("services", [])]


@pytest.mark.parametrize("hosts", [4], indirect=True)
def test_one_join_address_finds_everyone_and_survives_its_loss(hosts: Hosts) -> None:  # noqa: F811 (the imported fixture)
    hosts.team(0, 1, 2)
    hosts.agents[3].mesh_init("mallory")  # another team: same mesh name, its own secret
    first = hosts.net.address(0)
    for i in range(4):
        hosts.up(i, serf_only(first))
    team = set(NAMES[:3])
    for i in range(3):
        for other in team - {NAMES[i]}:
            hosts.agents[i].wait_for(
                lambda i=i, o=other: services(hosts, i, o) == [f"svc-{o}"],
                timeout=40,
                what=f"{other}'s services on {NAMES[i]} through serf",
            )
    beta = hosts.peer(2, "beta")
    assert beta is not None and beta["backends"] == ["serf"]
    assert beta["address"] == hosts.net.address(1)
    doc = hosts.agents[0].peers()
    # Mallory's Serf cannot join (the gossip key differs): not even an unsigned member.
    assert (doc["serf"]["members"], doc["serf"]["cluster"]) == (3, 3)
    assert doc["drops"] == {}
    assert hosts.agents[3].peers()["serf"]["cluster"] == 1
    assert "broadcast" not in doc["sent"]
    text = hosts.agents[1].cli("peers", check=True).stdout
    assert f"serf on {hosts.net.address(1)}:7946, 3 members, joining {first}:7946" in text
    assert all(hosts.peer(i, "mallory") is None for i in range(3))
    assert hosts.alive(3) == set()

    assert len(serf_pids(hosts, 0)) == 1
    # Machine 0 (the only join address) stops: the others still see each other.
    hosts.agents[0].cli("down", cwd=hosts.agents[0].root / "p0", check=True, timeout=60)
    hosts.agents[1].wait_for(
        lambda: hosts.peer(1, "alpha") is None, timeout=30, what="alpha gone from beta"
    )
    assert services(hosts, 1, "gamma") == ["svc-gamma"]
    assert services(hosts, 2, "beta") == ["svc-beta"]
    # `down` stops the mesh with the project that owned it, and its serf child with it.
    wait_for(
        "no serf process on machine 0", lambda: serf_pids(hosts, 0, every=True) == [], timeout_s=15
    )
    assert hosts.agents[0].agent_pid() is not None  # the agent itself still runs


def test_a_killed_serf_is_restarted_and_a_forged_member_is_counted(hosts: Hosts) -> None:  # noqa: F811 (the imported fixture)
    hosts.team(0, 1)
    first = hosts.net.address(0)
    hosts.up(0, serf_only(first))
    hosts.up(1, serf_only(first))
    a, b = hosts.agents[0], hosts.agents[1]
    b.wait_for(lambda: services(hosts, 1, "alpha") == ["svc-alpha"], timeout=40, what="meet")

    # SIGKILL beta's serf: the agent restarts it and membership comes back.
    [pid] = serf_pids(hosts, 1)
    os.kill(pid, signal.SIGKILL)
    b.wait_for(lambda: b.peers()["serf"]["restarts"] >= 1, timeout=20, what="serf restarted")
    b.wait_for(lambda: serf_pids(hosts, 1) not in ([], [pid]), timeout=20, what="a new serf")
    b.wait_for(
        lambda: b.peers()["serf"]["members"] == 2 and "alpha" in hosts.alive(1),
        timeout=40,
        what="alpha alive on beta again",
    )
    a.wait_for(lambda: "beta" in hosts.alive(0), timeout=40, what="beta alive on alpha again")

    # Beta's agent SIGKILLed: its serf (and monitor) die with it, and leave the cluster.
    agent = b.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    wait_for("no serf left on beta", lambda: serf_pids(hosts, 1, every=True) == [], timeout_s=15)
    a.wait_for(lambda: hosts.peer(0, "beta") is None, timeout=30, what="beta gone from alpha")

    # A plain serf agent with the team's gossip key (it can join) but tags signed with
    # another secret: refused and counted, never a peer.
    secret = ids.load(a.home).team.secret.reveal()
    keys = wire.derive_keys("team", secret)
    forger = wire.derive_keys("team", b"not the team secret at all")
    msg = wire.Announcement(
        kind=wire.Kind.HEARTBEAT,
        node_id="ee" * 16,
        node_name="mallory",
        address=hosts.net.address(2),
        port=7701,
        revision="0",
        sent_ms=1,
        boot_ms=1,
        seq=0,
    )
    tags = serftags.encode(msg, forger)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serf.json"
        doc: dict[str, Any] = {
            "node_name": msg.node_id,
            "bind": f"{hosts.net.address(2)}:7946",
            "rpc_addr": "127.0.0.1:7373",
            "encrypt_key": serftags.gossip_key(keys),
            "tags": tags,
            "retry_join": [f"{first}:7946"],
        }
        config.write_text(json.dumps(doc))
        proc = hosts.net.run(
            2,
            ["serf", "agent", f"-config-file={config}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            a.wait_for(
                lambda: a.peers()["drops"].get("bad-signature", 0) >= 1,
                timeout=40,
                what="the forged member counted on alpha",
            )
            assert hosts.peer(0, "mallory") is None
            assert a.peers()["serf"]["members"] == 1  # only signed members count (beta is gone)
            assert a.peers()["serf"]["cluster"] == 2  # ... but Serf let it in: it has the key
            drops, polls = a.peers()["drops"]["bad-signature"], a.peers()["serf"]["polls"]
            a.wait_for(lambda: a.peers()["serf"]["polls"] >= polls + 3, what="three more polls")
            assert a.peers()["drops"]["bad-signature"] == drops  # counted once, not per poll
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

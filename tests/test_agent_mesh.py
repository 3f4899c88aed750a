"""Real agents on one machine join one mesh over loopback: each has its own DEVMESH_HOME,
its own proxy and peer-channel ports, and discovery pinned to ``lo``, so nothing leaves the
machine. Driven through the real CLI (`up`, `status --json`, `peers --json`)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import PY, SERVER, Mesh, free_port
from netkit import free_udp_port

INTERVAL_S = 0.3  # TTL 0.9 s: peers come and go quickly in tests


def project_yaml(
    name: str,
    *,
    udp_port: int,
    channel_port: int,
    shared: dict[str, str],
    private: tuple[str, ...] = (),
    mesh_name: str = "team",
    allow: list[str] | None = None,
) -> str:
    """A project whose ``shared`` services (name -> version) are share: true."""
    allow_line = f"  allow: {allow}\n" if allow is not None else ""
    text = (
        f"version: 1\nproject: {name}\n"
        f"mesh:\n  name: {mesh_name}\n  port: {channel_port}\n{allow_line}"
        f"  discovery:\n    interfaces: [lo]\n    port: {udp_port}\n"
        f"    interval_s: {INTERVAL_S}\n"
        "services:\n"
    )
    for svc, version in shared.items():
        text += (
            f"  {svc}:\n    version: {version}\n    command: {PY} server.py\n"
            "    health: {http: /healthz, interval_s: 0.5}\n    share: true\n"
        )
    for svc in private:
        text += f"  {svc}:\n    version: 0.1.0\n    command: {PY} server.py\n"
    if not shared and not private:
        text = text.replace("services:\n", "services: {}\n")
    return text


class Team:
    """Agents of one team on loopback, each with its identity, sharing one discovery port."""

    def __init__(self) -> None:
        self.udp_port = free_udp_port()
        self.agents: dict[str, Mesh] = {}

    def add(self, node_name: str, *, team_of: Mesh | None = None, start: bool = True) -> Mesh:
        m = Mesh()
        self.agents[node_name] = m
        if team_of is None:
            m.mesh_init(node_name)
        else:
            m.mesh_join(team_of, node_name)
        if start:
            m.start_agent()
        return m

    def up(self, m: Mesh, project: str, **kw: Any) -> Any:
        d = m.project(
            project,
            project_yaml(project, udp_port=self.udp_port, channel_port=free_port(), **kw),
            {"server.py": SERVER},
        )
        return m.cli("up", "-d", cwd=d, timeout=90)

    def close(self) -> None:
        for m in self.agents.values():
            m.close()


@pytest.fixture
def team() -> Iterator[Team]:
    t = Team()
    try:
        yield t
    finally:
        t.close()


def peer(m: Mesh, name: str) -> dict[str, Any] | None:
    return next((p for p in m.status()["peers"] if p["name"] == name), None)


def services_of(m: Mesh, name: str) -> list[dict[str, Any]]:
    p = peer(m, name)
    return p["services"] if p and p["state"] == "alive" else []


@pytest.mark.slow
def test_agents_on_loopback_see_each_others_shared_services(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    cy = team.add("cy", team_of=ana)
    assert team.up(ana, "shop", shared={"api": "2.3.1"}, private=("worker",)).returncode == 0
    assert team.up(ben, "front", shared={"web": "0.4.0"}).returncode == 0
    assert team.up(cy, "tools", shared={}).returncode == 0

    for m, others in ((ana, {"ben", "cy"}), (ben, {"ana", "cy"}), (cy, {"ana", "ben"})):
        m.wait_for(lambda m=m, o=others: m.alive_peers() == o, what=f"peers {others}")
    api = {"name": "api", "project": "shop", "version": "2.3.1", "branch": None}
    got = ben.wait_for(
        lambda: [s for s in services_of(ben, "ana") if s["health"] == "healthy"],
        what="ana's api, healthy, in ben's status",
    )
    assert got == [{**api, "health": "healthy"}]  # worker is not shared
    status = cy.status()
    seen = {p["name"]: p for p in status["peers"]}
    assert set(seen["ana"]) == {
        "node", "name", "display_name", "address", "state", "last_seen_s", "services",
    }  # fmt: skip
    assert seen["ana"]["display_name"] == "ana"  # no other live node is named ana
    assert seen["ana"]["address"] == "127.0.0.1"
    cy.wait_for(lambda: services_of(cy, "ben"), what="ben's web in cy's status")
    assert [s["name"] for s in services_of(cy, "ben")] == ["web"]
    assert {s["name"] for s in status["services"]} == set()  # cy runs nothing itself

    # Side by side in the table: local rows, then the peers' shared services.
    text = ben.cli("status", check=True).stdout
    local, _, shared = text.partition("SHARED BY PEERS")
    assert "front" in local and "web" in local
    assert "ana" in shared and "shop" in shared and "api" in shared and "2.3.1" in shared

    peers = ana.peers()
    assert peers["running"] is True and peers["project"] == "shop"
    ben_row = next(p for p in peers["peers"] if p["name"] == "ben")
    assert ben_row["state"] == "alive" and "broadcast" in ben_row["backends"]
    assert isinstance(peers["drops"], dict)
    text = ana.cli("peers", check=True).stdout
    assert "ben" in text and "alive" in text and "broadcast" in text


@pytest.mark.slow
def test_the_catalog_follows_the_shared_services_and_a_down_says_goodbye(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    assert team.up(ana, "shop", shared={"api": "2.3.1"}).returncode == 0
    assert team.up(ben, "front", shared={}).returncode == 0
    ben.wait_for(lambda: services_of(ben, "ana"), what="ana's api in ben's status")

    # A second shared project on ana: a new revision, announced and fetched.
    d = ana.project(
        "more",
        project_yaml(
            "more",
            udp_port=team.udp_port,
            channel_port=ana.peers()["channel"]["port"],
            shared={"auth": "1.0.0"},
        ),
        {"server.py": SERVER},
    )
    # The same mesh: settings as shop's (same channel port): accepted.
    assert ana.cli("up", "-d", cwd=d, timeout=90).returncode == 0
    ben.wait_for(
        lambda: {s["name"] for s in services_of(ben, "ana")} == {"api", "auth"},
        what="ana's auth in ben's status",
    )

    # Stopping a shared service shows as stopped health, then it leaves with its project.
    assert ana.cli("down", cwd=d, timeout=60).returncode == 0
    ben.wait_for(
        lambda: {s["name"] for s in services_of(ben, "ana")} == {"api"},
        what="auth gone from ana's catalog",
    )
    # The last project with a mesh goes down: ana says goodbye and ben drops it at once.
    assert ana.cli("down", cwd=ana.root / "shop", timeout=60).returncode == 0
    ben.wait_for(lambda: "ana" not in ben.alive_peers(), what="ben to drop ana")
    assert ana.peers() == {"running": False}


@pytest.mark.slow
def test_a_second_project_asking_for_another_mesh_is_refused_naming_both(team: Team) -> None:
    ana = team.add("ana")
    assert team.up(ana, "shop", shared={"api": "1.0.0"}).returncode == 0
    port = ana.peers()["channel"]["port"]
    result = team.up(ana, "other", shared={"auth": "1.0.0"})  # another channel port
    assert result.returncode == 1
    err = result.stderr
    assert "nothing was applied" in err
    assert "mesh.port is" in err and "in project other" in err and "in project shop" in err
    assert str(port) in err
    assert {s["project"] for s in ana.status()["services"]} == {"shop"}
    assert ana.peers()["channel"]["port"] == port  # the running mesh is untouched

    # Another mesh name than the team's is refused at the first project already.
    cy = team.add("cy", team_of=ana)
    result = team.up(cy, "third", shared={}, mesh_name="other-team")
    assert result.returncode == 1
    assert "mesh.name is other-team" in result.stderr and "mesh team" in result.stderr


@pytest.mark.slow
def test_a_peer_outside_mesh_allow_is_refused_and_counted(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    eve = team.add("eve", team_of=ana)
    assert team.up(ana, "shop", shared={"api": "1.0.0"}, allow=["ben"]).returncode == 0
    assert team.up(ben, "front", shared={}).returncode == 0
    assert team.up(eve, "snoop", shared={}).returncode == 0
    ben.wait_for(lambda: services_of(ben, "ana"), what="ben (allowed) to get ana's catalog")

    def refused() -> dict[str, Any] | None:
        p = next((p for p in ana.peers()["peers"] if p["name"] == "eve"), None)
        return p if p and p["state"] == "refused" else None

    row = ana.wait_for(refused, what="ana to refuse eve")
    assert "not in mesh.allow" in row["reason"]
    drops = ana.peers()["drops"]
    assert drops.get("refused", 0) > 0, drops
    assert "ben" in ana.alive_peers()
    # eve never gets ana's catalog: the channel refuses it and counts it.
    ana.wait_for(
        lambda: any("eve" in line for line in ana.peers()["channel_refused"]),
        what="ana's channel to refuse eve's fetch",
    )
    assert ana.peers()["drops"].get("channel-refused", 0) > 0
    assert services_of(eve, "ana") == []


@pytest.mark.slow
def test_an_agent_of_another_team_is_kept_out_and_counted(team: Team) -> None:
    ana = team.add("ana")
    mallory = team.add("mallory")  # a team of its own, with the same mesh name
    assert team.up(ana, "shop", shared={"api": "1.0.0"}).returncode == 0
    assert team.up(mallory, "evil", shared={"api": "9.9.9"}).returncode == 0
    ana.wait_for(
        lambda: ana.peers()["drops"].get("bad-signature", 0) > 0,
        what="ana to drop mallory's datagrams as wrongly signed",
    )
    assert ana.peers()["peers"] == [] and mallory.peers()["peers"] == []


@pytest.mark.slow
def test_the_secret_is_never_printed_or_logged(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    outputs = [team.up(ana, "shop", shared={"api": "1.0.0"}), team.up(ben, "front", shared={})]
    ben.wait_for(lambda: services_of(ben, "ana"), what="ana's api in ben's status")
    for m in (ana, ben):
        for args in (("status",), ("status", "--json"), ("peers",), ("peers", "--json")):
            outputs.append(m.cli(*args, check=True))
    outputs.append(ana.cli("down", cwd=ana.root / "shop", timeout=60))  # logs leaving the mesh
    ben.wait_for(lambda: "ana" not in ben.alive_peers(), what="ben to drop ana")
    secret = ben.secret()
    assert secret == ana.secret() and len(secret) >= 40
    raw = __import__("base64").b64decode(secret)
    texts = [o.stdout + o.stderr for o in outputs] + [ana.agent_log(), ben.agent_log()]
    for m in (ana, ben):
        texts += [p.read_text(errors="replace") for p in Path(m.home).rglob("*.log")]
    for text in texts:
        assert secret not in text
        assert raw.hex() not in text


@pytest.mark.slow
def test_a_restarted_agent_rejoins_the_mesh_of_its_restored_projects(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    assert team.up(ana, "shop", shared={"api": "1.0.0"}).returncode == 0
    assert team.up(ben, "front", shared={}).returncode == 0
    ben.wait_for(lambda: services_of(ben, "ana"), what="ana's api in ben's status")
    pid = ana.agent_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert ana.agent is not None
    ana.agent.wait(10)
    ben.wait_for(
        lambda: (peer(ben, "ana") or {}).get("state") == "expired", what="ana expired on ben"
    )
    ana.start_agent()  # adopts shop's services and starts shop's mesh again
    ben.wait_for(
        lambda: [s["name"] for s in services_of(ben, "ana")] == ["api"],
        what="ana back, with its api, on ben",
    )
    assert ana.peers()["project"] == "shop"


@pytest.mark.slow
def test_a_new_team_identity_restarts_the_running_mesh_node_with_it(team: Team) -> None:
    ana = team.add("ana")  # team X
    xena = team.add("xena", team_of=ana)
    yuri = team.add("yuri")  # team Y: its own CA and secret, the same mesh name
    ben = team.add("ben", team_of=yuri)
    assert team.up(ana, "shop", shared={"api": "1.0.0"}).returncode == 0
    assert team.up(xena, "front", shared={}).returncode == 0
    assert team.up(ben, "back", shared={}).returncode == 0
    xena.wait_for(lambda: services_of(xena, "ana"), what="ana's api in xena's status (team X)")
    assert services_of(ben, "ana") == []  # another team's node is kept out
    pid = ana.agent_pid()

    bundle = ana.root / "team-y.bundle"
    yuri.cli("mesh", "export", str(bundle), check=True)
    joined = ana.cli("mesh", "join", "--force", str(bundle), "--node-name", "ana", check=True)
    assert "Joined the team" in joined.stdout and "rejoined with this one" in joined.stdout

    # The old identity says goodbye to team X; the new one is seen by team Y, with its
    # catalog, from the same agent process.
    xena.wait_for(lambda: "ana" not in xena.alive_peers(), what="xena to drop ana")
    got = ben.wait_for(
        lambda: [s for s in services_of(ben, "ana") if s["health"] == "healthy"],
        what="ana's api, healthy, in ben's status (team Y)",
    )
    assert [s["name"] for s in got] == ["api"]
    assert ana.agent_pid() == pid
    assert ana.peers()["running"] is True and ana.peers()["project"] == "shop"
    assert "the team identity changed" in ana.agent_log()
    ana.wait_for(lambda: ana.alive_peers() == {"ben"}, what="ana to see team Y's ben only")


@pytest.mark.slow
def test_a_rejoin_keeps_the_node_and_an_unfit_identity_stops_the_mesh_saying_why(
    team: Team,
) -> None:
    ana = team.add("ana")
    assert team.up(ana, "shop", shared={"api": "1.0.0"}).returncode == 0
    assert ana.peers()["running"] is True

    # Joining the team it is in, under the same name, changes no file: the node stays.
    bundle = ana.root / "own.bundle"
    ana.cli("mesh", "export", str(bundle), check=True)
    again = ana.cli("mesh", "join", str(bundle), "--node-name", "ana", check=True)
    assert "rejoined" not in again.stdout
    assert "the team identity changed" not in ana.agent_log()

    # A new team whose name is not shop's mesh.name: written, but the node cannot run it.
    r = ana.cli("mesh", "init", "--force", "other", "--node-name", "ana", check=True)
    assert "Created the team other" in r.stdout
    assert "warning: the mesh is stopped" in r.stderr
    assert "mesh.name is team" in r.stderr and "project shop" in r.stderr
    assert ana.peers() == {"running": False}
    assert ana.services("shop")["api"]["state"] == "running"  # the services keep running

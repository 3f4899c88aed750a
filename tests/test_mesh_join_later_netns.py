"""Joining a team after `up`, and two machines of one name, in network namespaces.

    alpha  project shop: api 2.0.0, shared; node name: the host name (the default)
    beta   project shop: cache, shared; node name: the host name too
    gamma  no team identity at first; project shop: web, which depends on api (its fallback:
           a small HTTP server inside gamma)

Namespaces share the machine's host name, so alpha and beta are exactly the teammates whose
laptops are both ``ubuntu``: everything that shows a node name must tell them apart
(``NAME#ID6``). gamma is the new hire: `up` works before joining (services run, calls get
the fallback), and `mesh join` turns the mesh on in the running agent, web's pid unchanged.
Requests are made inside gamma's namespace with real clients (``netkit.NsHTTP``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from agentkit import PY, ROUTE_SERVICE, Mesh, free_port
from netkit import NETNS, Net, NsHTTP, wait_for

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA, GAMMA = 0, 1, 2
MESH_PORT = 7701
HOST = socket.gethostname().lower()


def head() -> str:
    return (
        "version: 1\nproject: shop\n"
        f"mesh:\n  name: team\n  port: {MESH_PORT}\n"
        "  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
        "services:\n"
    )


def shared(name: str, version: str, node: str) -> str:
    return (
        f"  {name}:\n    version: {version}\n    command: {PY} svc.py\n    share: true\n"
        "    health: {http: /healthz, interval_s: 0.5}\n"
        f"    env: {{NODE: {node}, BIND: 0.0.0.0}}\n"
    )


class World:
    def __init__(self) -> None:
        self.net = Net(3)
        self.agents: list[Mesh] = []
        try:
            for i in range(3):
                self.agents.append(Mesh(netns=self.net.hosts[i]))
            self.alpha, self.beta, self.gamma = self.agents
        except BaseException:
            self.close()
            raise

    def up(self, i: int, yaml_text: str) -> Any:
        m = self.agents[i]
        if m.agent is None:
            m.start_agent()
        d = m.project("shop", yaml_text, {"svc.py": ROUTE_SERVICE})
        return m.cli("up", "-d", cwd=d, timeout=90)

    def web_calls_api(self) -> dict[str, Any]:
        """What gamma's web got when it called its API_URL (inside gamma)."""
        port = int(self.gamma.services("shop")["web"]["port"])
        with NsHTTP(self.net.hosts[GAMMA], "127.0.0.1", port) as c:
            status, doc = c.get_json("/call?dep=API&path=/x")
        assert status == 200, doc
        return dict(doc)

    def close(self) -> None:
        for m in self.agents:
            m.close()
        for i in range(len(self.agents)):
            self.net.kill_all(i)
        self.net.close()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


def test_up_before_joining_then_join_and_two_machines_of_one_name(world: World) -> None:
    alpha, beta, gamma = world.alpha, world.beta, world.gamma
    # alpha creates the team and beta joins it, both under the default node name (the host
    # name they share), with the real CLI and no agent running yet.
    alpha.cli("mesh", "init", "team", check=True)
    bundle = alpha.root / "team.bundle"
    alpha.cli("mesh", "export", str(bundle), check=True)
    beta.cli("mesh", "join", str(bundle), check=True)
    assert not (alpha.home / "agent.sock").exists() and not (beta.home / "agent.sock").exists()
    r = world.up(ALPHA, head() + shared("api", "2.0.0", "alpha"))
    assert r.returncode == 0, r.stderr
    beta_yaml = (
        head()
        + shared("cache", "1.0.0", "beta")
        + f"  caller:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        + "    env: {NODE: beta}\n    depends_on:\n      api: ^2\n"
        + "  api: {}\n"
    )
    r = world.up(BETA, beta_yaml)
    assert r.returncode == 0, r.stderr

    # gamma, before joining: a fallback server of its own, then `up`.
    fport = free_port()
    env = {**os.environ, "PORT": str(fport), "NODE": "fallback", "DEVMESH_SERVICE": "staging"}
    world.net.run(GAMMA, [PY, "-c", ROUTE_SERVICE], env=env)
    gamma_yaml = (
        head()
        + f"  web:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        + "    env: {NODE: gamma}\n    depends_on:\n      api: ^2\n"
        + f"  api:\n    fallback: http://127.0.0.1:{fport}\n"
    )

    def listening() -> str:
        return world.net.exec(GAMMA, ["ss", "-Hltn", f"sport = :{fport}"]).stdout.strip()

    wait_for("gamma's fallback server", listening)
    r = world.up(GAMMA, gamma_yaml)
    assert r.returncode == 0, r.stderr
    assert "this machine has not joined a team" in r.stderr
    assert "devmesh mesh join FILE" in r.stderr and "devmesh mesh init" in r.stderr
    web_pid = gamma.services("shop")["web"]["pid"]
    assert web_pid
    got = world.web_calls_api()
    assert got["status"] == 200 and got["body"]["node"] == "fallback", got
    assert gamma.status()["mesh_off"] == "this machine has not joined a team"
    assert "mesh off: this machine has not joined a team" in gamma.cli("peers").stdout

    # gamma joins: the mesh starts in its running agent; web's calls reach alpha's api.
    r = gamma.cli("mesh", "join", str(bundle), "--node-name", "gamma", check=True)
    assert "The agent's mesh is on now" in r.stdout
    got = wait_for(
        "web's calls to reach alpha's api",
        lambda: (g := world.web_calls_api())["body"].get("node") == "alpha" and g,
        timeout_s=30,
    )
    assert got["status"] == 200
    assert gamma.services("shop")["web"]["pid"] == web_pid  # no service restarted

    # alpha and beta share a name: gamma shows each as NAME#ID6, in JSON and in every table.
    peers = wait_for(
        "alpha and beta alive on gamma",
        lambda: (
            (d := gamma.peers())
            and len([p for p in d["peers"] if p["state"] == "alive"]) == 2
            and d
        ),
    )
    ids = {p["node"] for p in peers["peers"]}
    assert ids == {json.loads(m.cli("mesh", "show", "--json").stdout)["identity"]["node_id"]
                   for m in (alpha, beta)}  # fmt: skip
    for p in peers["peers"]:
        assert p["name"] == HOST
        assert p["display_name"] == f"{HOST}#{p['node'][:6]}"
    assert peers["shared_names"] == [HOST]
    assert peers["display_name"] == "gamma"
    labels = {p["display_name"] for p in peers["peers"]}
    assert len(labels) == 2
    text = gamma.cli("peers", check=True).stdout
    for label in labels:
        assert label in text
    assert text.count(f"warning: more than one live node is named {HOST}") == 1
    status_text = gamma.cli("status", check=True).stdout
    shared_rows = status_text.split("SHARED BY PEERS", 1)[1]
    by_service = {}
    for line in shared_rows.splitlines():
        cells = line.split()
        if len(cells) > 2 and cells[1] == "shop":
            by_service[cells[2]] = cells[0]
    alpha_id = json.loads(alpha.cli("mesh", "show", "--json").stdout)["identity"]["node_id"]
    assert by_service["api"] == f"{HOST}#{alpha_id[:6]}"
    assert by_service["cache"] != by_service["api"] and by_service["cache"] in labels
    # Route reasons, `route` and the access log name alpha the same way.
    route = next(r for r in gamma.status("shop")["routes"] if r["service"] == "api")
    assert route["node"] == f"{HOST}#{alpha_id[:6]}"
    assert f"chose {HOST}#{alpha_id[:6]} api 2.0.0" in route["reason"]
    r = gamma.cli("route", "api", "--caller", "web", "-p", "shop")
    assert f"{HOST}#{alpha_id[:6]}" in r.stdout, r.stdout + r.stderr
    entries = wait_for(
        "web's call in gamma's access log",
        lambda: [e for e in gamma.access_entries() if e.get("route") == "peer"],
    )
    assert entries[-1]["node"] == f"{HOST}#{alpha_id[:6]}"
    # On alpha, its own name is shared with beta: it says NAME#ID6 for itself too, and its
    # access log names beta, calling its api, the same way.
    mine = alpha.peers()
    assert mine["display_name"] == f"{HOST}#{alpha_id[:6]}"
    beta_id = json.loads(beta.cli("mesh", "show", "--json").stdout)["identity"]["node_id"]
    port = int(beta.services("shop")["caller"]["port"])
    with NsHTTP(world.net.hosts[BETA], "127.0.0.1", port) as c:
        got = wait_for(
            "beta's caller to reach alpha's api",
            lambda: (
                (d := c.get_json("/call?dep=API&path=/from-beta")[1])["body"].get("node") == "alpha"
                and d
            ),
        )
    served = wait_for(
        "beta's call in alpha's access log",
        lambda: [e for e in alpha.access_entries() if e.get("path") == "/from-beta"],
    )
    assert served[-1]["caller"] == f"peer {HOST}#{beta_id[:6]}"

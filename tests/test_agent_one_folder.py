"""A project belongs to one folder, `up` before joining a team, and the team and CA commands
without an agent: real agents and the real CLI on loopback (tests/agentkit.py).

- Two folders whose files say the same `project:`: the second `up` is refused as a whole,
  naming both folders and the ways out, and the first folder's services are untouched (same
  pids). The same folder through a symlink, or its file given with `-f`, is the same project.
- A project with a `mesh:` section on a machine with no team identity runs: its services start,
  calls to a dependency that runs nowhere here get its fallback, `up` warns once with the two
  commands, `status` and `peers` say the mesh is off. `mesh init` then starts the node in the
  running agent with no service restarted.
- `ca path` and `mesh init|show|export` on a fresh DEVMESH_HOME start no agent; the first `up`
  then starts it with the project's `proxy:` ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

import httpx
import pytest
from agentkit import PY, ROUTE_SERVICE, SERVER, Mesh, alive, free_port
from netkit import free_udp_port


def pids(m: Mesh, project: str) -> dict[str, int]:
    return {n: s["pid"] for n, s in m.services(project).items() if s["pid"]}


def shop_yaml(*services: str) -> str:
    text = "version: 1\nproject: shop\nservices:\n"
    for name in services:
        text += f"  {name}:\n    version: 1.0.0\n    command: {PY} server.py\n"
    return text


def no_agent(m: Mesh) -> None:
    assert not (m.home / "agent.pid").exists()
    assert not (m.home / "agent.sock").exists()
    assert m.leftovers() == []


def test_a_project_belongs_to_one_folder(mesh: Mesh) -> None:
    first = mesh.project("web-repo", shop_yaml("web"), {"server.py": SERVER})
    second = mesh.project("api-repo", shop_yaml("api"), {"server.py": SERVER})
    mesh.cli("up", "-d", cwd=first, check=True)
    before = pids(mesh, "shop")
    assert set(before) == {"web"}

    r = mesh.cli("up", "-d", cwd=second)
    assert r.returncode == 1, r.stderr
    message = r.stderr
    assert f"project shop is already applied from {first}" in message
    assert f"is in {second}" in message
    assert "devmesh -p NAME up" in message and "project: NAME" in message
    assert "devmesh down -p shop" in message
    assert "nothing was applied" in message
    assert pids(mesh, "shop") == before  # the first folder's services: untouched
    assert set(mesh.services("shop")) == {"web"}
    assert mesh.status()["agent"]["projects"] == ["shop"]
    # A dry run says the same and changes nothing either.
    r = mesh.cli("plan", cwd=second)
    assert r.returncode == 1 and f"already applied from {first}" in r.stderr

    # The same folder through a symlink, or its file given with -f from elsewhere: the same
    # project, as before (up to date, nothing restarted).
    link = mesh.root / "link-to-web"
    link.symlink_to(first)
    for args, cwd in (
        (("up", "-d"), link),
        (("up", "-d", "-f", str(first / "devmesh.yaml")), mesh.root),
        (("-f", str(link / "devmesh.yaml"), "up", "-d"), second),
    ):
        r = mesh.cli(*args, cwd=cwd)
        assert r.returncode == 0, (args, r.stderr)
        assert "everything is up to date" in r.stderr
    assert pids(mesh, "shop") == before

    # An agent that died knows the folder when the next one starts (the state file keeps it).
    agent = mesh.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent), what="the agent gone")
    r = mesh.cli("up", "-d", cwd=second)
    # (named as it was last applied: through the link, the same folder)
    assert r.returncode == 1 and f"already applied from {link}," in r.stderr, r.stderr
    assert mesh.agent_pid() not in (None, agent)
    assert pids(mesh, "shop") == before  # adopted, untouched

    # The ways out named work: -p gives the second folder a project of its own ...
    r = mesh.cli("-p", "shop-api", "up", "-d", cwd=second)
    assert r.returncode == 0, r.stderr
    assert set(mesh.services("shop-api")) == {"api"}
    assert pids(mesh, "shop") == before
    r = mesh.cli("up", "-d", "-p", "Bad_Name", cwd=second)
    assert r.returncode == 2 and "-p 'Bad_Name'" in r.stderr
    # An ad hoc `run NAME -- CMD` has no file, so no folder: run again from elsewhere, it
    # replaces its earlier self as before.
    for cwd in (first, second):
        mesh.cli("run", "-d", "adhoc", "--", PY, "server.py", cwd=cwd, check=True)
    assert set(mesh.services("adhoc")) == {"adhoc"}
    # ... and once the first is down, the project may move to the second folder.
    mesh.cli("down", "-p", "shop", check=True)
    mesh.cli("up", "-d", cwd=second, check=True)
    assert set(mesh.services("shop")) == {"api"}


def mesh_yaml(fallback: str, *, proxy: str = "") -> str:
    return (
        "version: 1\nproject: shop\n"
        f"{proxy}"
        f"mesh:\n  name: team\n  port: {free_port()}\n"
        f"  discovery:\n    interfaces: [lo]\n    port: {free_udp_port()}\n    interval_s: 0.3\n"
        "services:\n"
        f"  web:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        "    depends_on:\n      api: ^2\n"
        f"  api:\n    version: 2.0.0\n    fallback: {fallback}\n"
    )


def call(m: Mesh, caller: str, dep: str) -> dict[str, Any]:
    """What ``caller`` got when it called its ``DEP_URL``."""
    port = m.services("shop")[caller]["port"]
    r = httpx.get(f"http://127.0.0.1:{port}/call?dep={dep}&path=/x", timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


@pytest.mark.slow
def test_up_before_joining_a_team_runs_and_mesh_init_turns_the_mesh_on(
    mesh: Mesh, fallback: str
) -> None:
    d = mesh.project("shop", mesh_yaml(fallback), {"svc.py": ROUTE_SERVICE})
    r = mesh.cli("up", "-d", cwd=d, timeout=90)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "joined a team" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), r.stderr
    assert "this machine has not joined a team" in warnings[0]
    assert "devmesh mesh join FILE" in warnings[0] and "devmesh mesh init" in warnings[0]
    web = mesh.services("shop")["web"]
    assert web["state"] == "running"
    got = call(mesh, "web", "API")
    assert got["status"] == 200 and got["body"]["from"] == "fallback", got

    status = mesh.status()
    assert status["mesh_off"] == "this machine has not joined a team"
    text = mesh.cli("status", check=True).stdout
    assert "mesh off: this machine has not joined a team" in text
    peers = mesh.peers()
    assert peers["running"] is False
    assert peers["mesh_off"] == "this machine has not joined a team"
    assert peers["project"] == "shop"
    text = mesh.cli("peers", check=True).stdout
    assert "mesh off: this machine has not joined a team" in text
    assert "devmesh mesh join FILE" in text

    # A team whose name is not the project's mesh.name: installed, but the mesh stays off,
    # saying why instead.
    agent = mesh.agent_pid()
    r = mesh.cli("mesh", "init", "other", "--node-name", "solo", check=True)
    assert "warning: the mesh is stopped" in r.stderr and "mesh.name is team" in r.stderr
    assert "mesh.name is team" in mesh.status()["mesh_off"]
    assert "mesh.name is team" in mesh.cli("status", check=True).stdout
    # Joining (here: creating) the project's team turns the mesh on in the running agent: no
    # service restarts, no new agent.
    r = mesh.cli("mesh", "init", "team", "--node-name", "solo", "--force", check=True)
    assert "The agent's mesh is on now" in r.stdout
    peers = mesh.peers()
    assert peers["running"] is True and peers["name"] == "solo" and peers["project"] == "shop"
    assert "mesh_off" not in peers
    assert mesh.status()["mesh_off"] is None
    assert mesh.services("shop")["web"]["pid"] == web["pid"]
    assert mesh.agent_pid() == agent
    got = call(mesh, "web", "API")  # no teammate shares api: still its fallback
    assert got["body"]["from"] == "fallback"
    # Another `up` has nothing to do and warns no more.
    r = mesh.cli("up", "-d", cwd=d, check=True)
    assert "joined a team" not in r.stderr and "everything is up to date" in r.stderr


@pytest.mark.slow
def test_ca_and_mesh_commands_start_no_agent_and_up_then_uses_the_projects_ports(
    mesh: Mesh, fallback: str
) -> None:
    for key in ("DEVMESH_PROXY_PORT", "DEVMESH_HTTPS_PORT"):
        del mesh.env[key]  # the ports come from the project's proxy: only
    # The default proxy port is taken by a socket of this test, where that is possible
    # (another program may hold it already: then it is taken all the same).
    held = socket.socket()
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 7700))
            held.listen()
        except OSError:
            pass
        assert mesh.cli("ca", "path", check=True).stdout.strip() == str(mesh.home / "ca" / "ca.pem")
        no_agent(mesh)
        r = mesh.cli("mesh", "init", "team", "--node-name", "solo", check=True)
        assert "Created the team team" in r.stdout and "agent" not in r.stdout + r.stderr
        mesh.cli("mesh", "show", check=True)
        mesh.cli("mesh", "export", str(mesh.root / "team.bundle"), check=True)
        assert mesh.cli("ca", "path", check=True).stdout.strip() == str(
            mesh.home / "mesh" / "team-ca.pem"
        )
        no_agent(mesh)
    finally:
        held.close()

    http_port, https_port = free_port(), free_port()
    proxy = f"proxy:\n  port: {http_port}\n  https_port: {https_port}\n"
    d = mesh.project("shop", mesh_yaml(fallback, proxy=proxy), {"svc.py": ROUTE_SERVICE})
    r = mesh.cli("up", "-d", cwd=d, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "Started the devmesh agent" in r.stderr
    assert "warning:" not in r.stderr, r.stderr  # neither the proxy ports nor the mesh
    assert mesh.status()["proxy"]["http_port"] == http_port
    assert mesh.status()["proxy"]["https_port"] == https_port
    assert mesh.peers()["running"] is True
    r = httpx.get(
        f"http://127.0.0.1:{http_port}/", headers={"Host": "web.localhost"}, trust_env=False
    )
    assert r.status_code == 200
    assert os.path.exists(mesh.home / "agent.pid")


def test_mesh_export_join_and_show_start_no_agent(mesh: Mesh) -> None:
    ana = Mesh()
    try:
        ana.cli("mesh", "init", "team", "--node-name", "ana", check=True)
        bundle = ana.root / "team.bundle"
        ana.cli("mesh", "export", str(bundle), check=True)
        no_agent(ana)
        r = mesh.cli("mesh", "join", str(bundle), "--node-name", "ben", check=True)
        assert "Joined the team team; this node is ben" in r.stdout
        no_agent(mesh)
        shown = json.loads(mesh.cli("mesh", "show", "--json", check=True).stdout)["identity"]
        assert shown["node_name"] == "ben" and shown["mesh"] == "team"
    finally:
        ana.close()

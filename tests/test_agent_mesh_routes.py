"""Calls that cross agents: real agents on one machine, each with its own DEVMESH_HOME, proxy
and peer listener, discovery pinned to ``lo``. A caller's ``NAME_URL`` is its agent's edge
listener; the agent's route table holds the peers' shared instances from their catalogs, and
the call crosses to the owner's peer listener (mutual TLS) which serves its shared service.

The calls are made by the test through the caller's ``NAME_URL`` (the edge listener: it is
the listener, not the process, that names the caller), with curl."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import PY, Mesh, free_port
from netkit import free_udp_port

from devmesh.agent import client

INTERVAL_S = 0.3

# Answers with who it is (service, project, branch, port), the headers it got, and its
# caller-visible URLs; /healthz answers 200.
ECHO = """
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok"
        else:
            env = {k: v for k, v in os.environ.items()
                   if k.endswith("_URL") or k == "PORT" or k in ("DEVMESH_SERVICE", "DEVMESH_PROJECT", "DEVMESH_BRANCH")}
            body = json.dumps({"env": env, "headers": {k.lower(): v for k, v in self.headers.items()}, "path": self.path, "label": os.environ.get("LABEL", "")}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def mesh_block(udp_port: int, allow: list[str] | None = None) -> str:
    allow_line = f"  allow: {allow}\n" if allow is not None else ""
    return (
        f"mesh:\n  name: team\n  port: {free_port()}\n{allow_line}"
        f"  discovery:\n    interfaces: [lo]\n    port: {udp_port}\n    interval_s: {INTERVAL_S}\n"
    )


def service(name: str, version: str, *, extra: str = "") -> str:
    return (
        f"  {name}:\n    version: {version}\n    command: {PY} echo.py\n"
        "    health: {http: /healthz, interval_s: 0.3}\n" + extra
    )


class Team:
    def __init__(self) -> None:
        self.udp_port = free_udp_port()
        self.agents: list[Mesh] = []

    def add(self, node_name: str, team_of: Mesh | None = None) -> Mesh:
        m = Mesh()
        self.agents.append(m)
        if team_of is None:
            m.mesh_init(node_name)
        else:
            m.mesh_join(team_of, node_name)
        m.start_agent()
        return m

    def up(self, m: Mesh, folder: str, body: str, *, allow: list[str] | None = None) -> Path:
        text = f"version: 1\nproject: shop\n{mesh_block(self.udp_port, allow)}services:\n{body}"
        d = m.project(folder, text, {"echo.py": ECHO})
        r = m.cli("up", "-d", cwd=d, timeout=90)
        assert r.returncode == 0, r.stderr
        return d

    def close(self) -> None:
        for m in self.agents:
            m.close()


@pytest.fixture
def team() -> Iterator[Team]:
    t = Team()
    try:
        yield t
    finally:
        t.close()


def get(url: str, *headers: str) -> tuple[int, dict[str, str], str]:
    args = ["curl", "-sS", "--max-time", "10", "-D", "-", url]
    for h in headers:
        args += ["-H", h]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    head, _, body = r.stdout.partition("\n\n")  # text mode turned CRLF into LF
    lines = head.split("\n")
    if not lines[0]:
        return 0, {}, r.stderr
    code = int(lines[0].split()[1])
    got = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        got[k.strip().lower()] = v.strip()
    return code, got, body


def api(m: Mesh, path: str, **query: str) -> Any:
    return client.Client(m.home / "agent.sock").request("GET", path, query=query)


def api_url(m: Mesh, caller: str) -> str:
    """The caller's API_URL as its process got it."""
    web = json.loads(get(f"http://127.0.0.1:{m.proxy_port}/", f"Host: {caller}.localhost")[2])
    return str(web["env"]["API_URL"])


def route_of(m: Mesh, caller: str, dep: str) -> dict[str, Any]:
    return next(r for r in m.status()["routes"] if (r["caller"], r["service"]) == (caller, dep))


def answered_by(url: str, *headers: str) -> dict[str, Any] | None:
    code, _, body = get(url, *headers)
    return json.loads(body) if code == 200 else None


@pytest.mark.slow
def test_a_call_through_name_url_reaches_the_api_a_peer_shares_and_says_why(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    team.up(ana, "owner", service("api", "2.3.0", extra="    share: true\n"))
    team.up(
        ben,
        "caller",
        service("web", "1.0.0", extra="    depends_on:\n      api: ^2.1\n") + "  api: {}\n",
    )
    url = api_url(ben, "web")
    assert url.startswith("http://127.0.0.1:")  # the edge listener, never the peer
    got = ben.wait_for(
        lambda: answered_by(url + "/hello?x=1"), timeout=30, what="web -> api on ana"
    )
    ana_api = ana.services("shop")["api"]
    assert got["env"]["PORT"] == str(ana_api["port"])  # ana's process answered
    assert got["path"] == "/hello?x=1"
    assert "x-devmesh-service" not in got["headers"]  # removed before the service sees it

    # status says where web's calls go and why; /v1/route explains the same decision.
    route = route_of(ben, "web", "api")
    assert (route["target"], route["node"], route["version"]) == ("peer", "ana", "2.3.0")
    assert "chose ana api 2.3.0 (^2.1 ok)" in route["reason"] and route["warning"] is None
    doc = api(ben, "/v1/route", project="shop", service="api", caller="web")
    assert (doc["outcome"], doc["status"], doc["target"], doc["node"]) == (
        "route",
        None,
        "peer",
        "ana",
    )
    assert doc["reason"] == route["reason"]
    assert [t["node"] for t in doc["targets"]] == ["ana"]
    assert doc["url"] == f"https://127.0.0.1:{ana.peers()['channel']['port']}"
    # The owner served its catalog and the call through its one peer listener.
    assert ana.peers()["channel"]["served"] >= 1

    # An unknown service is a 404 naming what exists; a bad branch a 400.
    with pytest.raises(client.ApiError) as err:
        api(ben, "/v1/route", project="shop", service="nope")
    assert err.value.status == 404 and "nope" in err.value.message and "web" in err.value.message
    with pytest.raises(client.ApiError) as err:
        api(ben, "/v1/route", project="shop", service="api", branch="a..b")
    assert err.value.status == 400 and "a..b" in err.value.message


@pytest.mark.slow
def test_the_fallback_answers_until_a_peer_shares_it_and_again_once_the_peer_leaves(
    team: Team,
) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    # The fallback: a service ben runs in another project, reached by its own port.
    fb = ben.project("fb", "version: 1\nproject: fb\nservices:\n" + service("stage", "9.0.0"))
    (fb / "echo.py").write_text(ECHO)
    assert ben.cli("up", "-d", cwd=fb, timeout=90).returncode == 0
    stage_port = ben.services("fb")["stage"]["port"]
    team.up(
        ben,
        "caller",
        service("web", "1.0.0", extra="    depends_on: [api]\n")
        + f"  api:\n    fallback: http://127.0.0.1:{stage_port}\n",
    )
    url = api_url(ben, "web")
    got = answered_by(url)
    assert got is not None and got["env"]["DEVMESH_SERVICE"] == "stage"
    route = route_of(ben, "web", "api")
    assert (
        route["target"] == "fallback"
        and f"fallback http://127.0.0.1:{stage_port}" in (route["reason"])
    )

    # A peer shares api: calls go there (peers before the fallback) ...
    owner = team.up(ana, "owner", service("api", "2.0.0", extra="    share: true\n"))
    ben.wait_for(
        lambda: (answered_by(url) or {}).get("env", {}).get("DEVMESH_SERVICE") == "api",
        timeout=30,
        what="ben's calls to go to ana's api",
    )
    assert route_of(ben, "web", "api")["node"] == "ana"
    # ... and when it leaves the mesh, back to the fallback, with nothing failing between.
    assert ana.cli("down", cwd=owner, timeout=60).returncode == 0
    ben.wait_for(
        lambda: route_of(ben, "web", "api")["target"] == "fallback",
        what="the route back to the fallback",
    )
    got = answered_by(url)
    assert got is not None and got["env"]["DEVMESH_SERVICE"] == "stage"


def git(folder: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(folder), *args],
        check=True,
        capture_output=True,
        env={"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(folder), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.slow
def test_a_branch_auto_service_runs_in_its_git_branch_across_the_mesh(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    folder = ana.root / "owner"
    folder.mkdir()
    git(folder, "init", "-q", "-b", "feat-login")
    git(
        folder,
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "x",
    )
    team.up(ana, "owner", service("api", "2.3.0", extra="    share: true\n    branch: auto\n"))
    team.up(
        ben,
        "caller",
        service("web", "1.0.0", extra="    depends_on: [api]\n") + "  api: {}\n",
    )

    # The owner's process knows its branch (a browser names it in the host); the catalog
    # announces it.
    home = f"http://127.0.0.1:{ana.proxy_port}/"
    assert get(home, "Host: api.localhost")[0] == 502  # not in the default namespace
    env = json.loads(get(home, "Host: api.feat-login.localhost")[2])["env"]
    assert env["DEVMESH_BRANCH"] == "feat-login"

    def announced() -> list[dict[str, Any]]:
        p = next((p for p in ben.status()["peers"] if p["name"] == "ana"), None)
        return p["services"] if p else []

    [entry] = ben.wait_for(announced, what="ana's catalog on ben")
    assert entry["branch"] == "feat-login"

    # A call in the default namespace finds no api; one for the branch reaches ana's.
    url = api_url(ben, "web")
    doc = api(ben, "/v1/route", project="shop", service="api", caller="web")
    assert doc["outcome"] == "no-route" and doc["status"] == 502
    assert "in branch feat-login, not the default namespace" in doc["reason"]
    doc = api(ben, "/v1/route", project="shop", service="api", branch="feat-login")
    assert (doc["target"], doc["node"], doc["branch"]) == ("peer", "ana", "feat-login")
    got = answered_by(url, "X-Devmesh-Branch: feat-login")
    assert got is not None and got["env"]["DEVMESH_BRANCH"] == "feat-login"
    assert got["headers"].get("x-devmesh-branch") == "feat-login"


@pytest.mark.slow
def test_a_branch_auto_outside_git_runs_in_the_default_namespace_and_says_so(
    team: Team,
) -> None:
    ana = team.add("ana")
    d = ana.project(
        "plain",
        "version: 1\nproject: shop\nservices:\n"
        + service("api", "1.0.0", extra="    branch: auto\n"),
        {"echo.py": ECHO},
    )
    r = ana.cli("up", "-d", cwd=d, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "branch: auto runs in the default namespace" in r.stderr
    assert "not in a git repository" in ana.agent_log()
    env = json.loads(get(f"http://127.0.0.1:{ana.proxy_port}/", "Host: api.localhost")[2])["env"]
    assert "DEVMESH_BRANCH" not in env


@pytest.mark.slow
def test_a_peer_outside_mesh_allow_cannot_call_a_shared_service_and_is_counted(
    team: Team,
) -> None:
    ana = team.add("ana")
    eve = team.add("eve", team_of=ana)
    team.up(ana, "owner", service("api", "1.0.0", extra="    share: true\n"), allow=["ben"])
    team.up(
        eve,
        "caller",
        service("web", "1.0.0", extra="    depends_on: [api]\n") + "  api: {}\n",
    )
    ana.wait_for(
        lambda: ana.peers()["drops"].get("channel-refused", 0) > 0,
        what="ana's peer listener to refuse eve's catalog fetch",
    )
    assert any("eve" in line for line in ana.peers()["channel_refused"])
    # eve never learns ana's api, so its calls have nowhere to go.
    assert route_of(eve, "web", "api")["target"] is None
    code, _, _ = get(api_url(eve, "web"))
    assert code == 502


@pytest.mark.slow
def test_a_version_mismatch_under_warn_routes_to_the_peer_and_is_logged_once(
    team: Team,
) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    team.up(ana, "owner", service("api", "2.3.0", extra="    share: true\n"))
    team.up(
        ben,
        "caller",
        service("web", "1.0.0", extra="    depends_on:\n      api: ^3.0\n") + "  api: {}\n",
    )
    route = ben.wait_for(
        lambda: (r := route_of(ben, "web", "api"))["target"] == "peer" and r,
        what="web -> api routed to ana",
    )
    assert route["warning"] == (
        "web needs api ^3.0; no compatible instance, so routed to ana api 2.3.0"
    )
    code, headers, _ = get(api_url(ben, "web"))
    assert code == 200 and headers["x-devmesh-version-warning"] == route["warning"]
    line = f"shop: web -> api: {route['warning']}"
    ben.wait_for(lambda: line in ben.agent_log(), what="the warning in ben's log")
    # Rounds and catalog refreshes go on; the same warning is not logged again.
    ben.cli("up", "-d", cwd=ben.root / "caller", timeout=90, check=True)
    assert ben.agent_log().count(line) == 1


def test_without_a_mesh_a_dependency_that_runs_elsewhere_gets_an_edge_that_says_why(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "solo",
        "version: 1\nproject: solo\nservices:\n"
        + service("web", "1.0.0", extra="    depends_on: [api]\n")
        + "  api: {}\n",
        {"echo.py": ECHO},
    )
    r = mesh.cli("up", "-d", cwd=d, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "dependency api does not run here, has no fallback" in r.stderr
    assert "API_URL will answer 502" in r.stderr
    url = api_url(mesh, "web")
    assert url.startswith("http://127.0.0.1:")  # an edge listener all the same
    code, _, body = get(url)
    assert code == 502 and "no route to api" in body
    route = route_of(mesh, "web", "api")
    assert route["target"] is None and route["node"] is None
    assert "no instance runs here or on any peer" in route["reason"]

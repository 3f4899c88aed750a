"""A dependency that names the project running it (``project: NAME``), and ``up --no-deps``:
real agents on loopback, real processes, calls made with curl through the caller's
``NAME_URL`` (its edge listener, which names the caller).

- Two repositories on one agent: web of ``shop-web`` calls api of ``shop-api`` locally, and
  never the ``api`` of a third project; its route follows ``shop-api`` being applied later
  and going down; ``route``, ``status`` (text and ``--json``) and the access log name the
  target project.
- ``up --no-deps web``: api is not started; web's calls get the 502 that says why, or the
  fallback; ``plan --no-deps`` says so in words; a later plain ``up`` starts api, and an
  ``up --no-deps web`` after that leaves it running and says so.
- The peer hop carries the project: the owner runs two projects that both share an ``api``;
  the caller's call is served by the one its dependency names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import Mesh
from test_agent_mesh_routes import ECHO, Team, answered_by, get, mesh_block, route_of, service


@pytest.fixture
def team() -> Iterator[Team]:
    t = Team()
    try:
        yield t
    finally:
        t.close()


def repo(m: Mesh, folder: str, project: str, body: str, *, mesh_yaml: str = "") -> Path:
    text = f"version: 1\nproject: {project}\n{mesh_yaml}services:\n{body}"
    return m.project(folder, text, {"echo.py": ECHO})


def up(m: Mesh, folder: Path, *args: str) -> str:
    """``devmesh up -d ARGS`` in ``folder`` (the agent started when none runs); its stderr."""
    r = m.cli("up", "-d", *args, cwd=folder, timeout=90)
    assert r.returncode == 0, r.stderr
    return r.stderr


WEB = service("web", "1.0.0", extra="    depends_on:\n      api: ^2\n")
API_OF_SHOP_API = "  api:\n    project: shop-api\n"


def served_project(url: str) -> str | None:
    got = answered_by(url)
    return None if got is None else str(got["env"]["DEVMESH_PROJECT"])


@pytest.mark.slow
def test_web_of_one_project_calls_api_of_another_on_this_machine_and_says_so(mesh: Mesh) -> None:
    mesh.start_agent()
    # A third project with an api of its own, applied first: it keeps api.localhost, and its
    # api must never answer web's calls.
    up(mesh, repo(mesh, "other", "other", service("api", "2.9.0")))
    web_dir = repo(mesh, "shop-web", "shop-web", WEB + API_OF_SHOP_API)
    up(mesh, web_dir)
    url = route_of(mesh, "web", "api")["url"]

    # shop-api is not applied yet: no instance of shop-api/api anywhere, no fallback.
    code, _, body = get(url)
    assert code == 502 and "no route to api" in body, body
    assert route_of(mesh, "web", "api")["target"] is None

    # Applied later, from its own folder: web's calls follow at once (the table is rebuilt).
    api_dir = repo(mesh, "shop-api", "shop-api", service("api", "2.3.0"))
    up(mesh, api_dir)
    mesh.wait_for(lambda: served_project(url) == "shop-api", what="web -> shop-api/api")
    for _ in range(3):
        assert served_project(url) == "shop-api"
    # Both projects still run (one folder each, neither evicts the other).
    assert mesh.services("shop-web")["web"]["state"] == "running"
    assert mesh.services("other")["api"]["state"] == "running"

    # status --json: the route entry names the target project; the caller's stays `project`.
    r = route_of(mesh, "web", "api")
    assert (r["project"], r["target_project"], r["target"], r["version"]) == (
        "shop-web",
        "shop-api",
        "local",
        "2.3.0",
    )
    assert "chose local api 2.3.0 (^2 ok)" in r["reason"]
    text = mesh.cli("status", cwd=web_dir, check=True).stdout
    assert "web → shop-api/api  local api 2.3.0  (^2 ok)" in text, text
    # devmesh route, from the caller's folder.
    routed = mesh.cli("route", "api", "--caller", "web", cwd=web_dir)
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout.startswith("web → shop-api/api: local api 2.3.0 (^2 ok)\n"), routed.stdout
    doc = json.loads(mesh.cli("route", "api", "--caller", "web", "--json", cwd=web_dir).stdout)
    assert (doc["project"], doc["target_project"], doc["target"]) == (
        "shop-web",
        "shop-api",
        "local",
    )
    assert doc["url"] == f"http://127.0.0.1:{mesh.services('shop-api')['api']['port']}"

    # The access log names the target project of web's calls (and only of those).
    entries = mesh.wait_for(
        lambda: [e for e in mesh.access_entries() if e.get("target") == "shop-api/api"],
        what="an access log entry naming shop-api/api",
    )
    assert entries[-1]["caller"] == "web.shop-web" and entries[-1]["status"] == 200
    own = mesh.cli("logs", "--proxy", "--tail", "50", cwd=web_dir, check=True).stdout
    assert "caller=web.shop-web target=shop-api/api" in own, own

    # The caller's range is checked against shop-api's version, not the other project's.
    other = mesh.services("other")["api"]
    assert other["version"] == "2.9.0" and r["version"] == "2.3.0"

    # shop-api goes down: web's calls get the 502 again (not the other project's api).
    assert mesh.cli("down", cwd=api_dir, timeout=60).returncode == 0
    mesh.wait_for(lambda: get(url)[0] == 502, what="web's calls to fail once shop-api is down")
    assert route_of(mesh, "web", "api")["target"] is None


@pytest.mark.slow
def test_up_no_deps_starts_only_the_named_services_and_routes_their_dependencies(
    mesh: Mesh,
) -> None:
    mesh.start_agent()
    d = repo(mesh, "shop", "shop", WEB + service("api", "2.3.0"))
    planned = mesh.cli("plan", "--no-deps", "web", cwd=d, check=True).stdout
    assert "web: start" in planned and "api: start" not in planned, planned
    assert (
        "api: route - not started (--no-deps): calls from web go to a teammate's shared "
        "instance, else 502 (no fallback)"
    ) in planned, planned
    # Without services the flag would mean nothing: a usage error, nothing applied.
    bad = mesh.cli("up", "-d", "--no-deps", cwd=d)
    assert bad.returncode == 2 and "name them" in bad.stderr, bad.stderr

    err = up(mesh, d, "--no-deps", "web")
    assert "api: not started (--no-deps)" in err, err
    svcs = mesh.services("shop")
    assert svcs["web"]["state"] == "running" and svcs.get("api", {}).get("pid") is None, svcs
    url = route_of(mesh, "web", "api")["url"]
    code, _, body = get(url)
    assert code == 502 and "no route to api" in body, body

    # A plain `up` starts everything again; web's calls then go to the local api.
    up(mesh, d)
    mesh.wait_for(lambda: served_project(url) == "shop", what="web -> the local api")
    api_pid = mesh.services("shop")["api"]["pid"]

    # `up --no-deps web` now leaves api running (as compose does) and says so.
    err = up(mesh, d, "--no-deps", "web")
    assert "api: left running (started by an earlier `up`" in err, err
    assert mesh.services("shop")["api"]["pid"] == api_pid
    assert served_project(url) == "shop"


@pytest.mark.slow
def test_up_no_deps_sends_a_dependency_that_is_not_started_to_its_fallback(
    mesh: Mesh, fallback: str
) -> None:
    mesh.start_agent()
    api = service("api", "2.3.0", extra=f"    fallback: {fallback}\n")
    d = repo(mesh, "shop", "shop", WEB + api)
    planned = mesh.cli("plan", "--no-deps", "web", cwd=d, check=True).stdout
    assert f"else its fallback {fallback}" in planned, planned
    up(mesh, d, "--no-deps", "web")
    assert mesh.services("shop").get("api", {}).get("pid") is None
    url = route_of(mesh, "web", "api")["url"]
    assert served_project(url) == "fallback"
    assert route_of(mesh, "web", "api")["target"] == "fallback"


@pytest.mark.slow
def test_the_peer_hop_is_served_by_the_project_the_dependency_names(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    shared = "    share: true\n"
    # Ana runs two projects that both share an `api`; the other one is applied first (it is
    # the first backend named api on her agent).
    block = mesh_block(team.udp_port)  # one agent, one mesh section in both its projects
    for project, version in (("other", "2.9.0"), ("shop-api", "2.3.0")):
        up(ana, repo(ana, project, project, service("api", version, extra=shared), mesh_yaml=block))
    web_body = WEB + API_OF_SHOP_API
    web_dir = repo(ben, "shop-web", "shop-web", web_body, mesh_yaml=mesh_block(team.udp_port))
    up(ben, web_dir)
    url = route_of(ben, "web", "api")["url"]
    ben.wait_for(lambda: served_project(url) is not None, timeout=30, what="web -> ana's api")
    for _ in range(5):
        assert served_project(url) == "shop-api"
    r = route_of(ben, "web", "api")
    assert (r["target"], r["node"], r["target_project"], r["version"]) == (
        "peer",
        "ana",
        "shop-api",
        "2.3.0",
    )
    routed = ben.cli("route", "api", "--caller", "web", cwd=web_dir, check=True).stdout
    assert routed.startswith("web → shop-api/api: ana api 2.3.0 (^2 ok)\n"), routed
    hop = ben.wait_for(
        lambda: [e for e in ben.access_entries() if e.get("target") == "shop-api/api"],
        what="ben's access log naming shop-api/api",
    )
    assert (hop[-1]["route"], hop[-1]["node"]) == ("peer", "ana")

    # Ana stops shop-api: the other project's shared api never takes web's calls.
    assert ana.cli("down", "-p", "shop-api", timeout=60).returncode == 0
    ben.wait_for(lambda: get(url)[0] == 502, timeout=30, what="web's calls to find no route")
    assert route_of(ben, "web", "api")["target"] is None

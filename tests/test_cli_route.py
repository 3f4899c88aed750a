"""`devmesh route` and the routes of `devmesh status`, through the real CLI against a real
agent on loopback: a local service, a service that only has a fallback, an unknown service,
and a call `policy.versions: reject` refuses. Single-machine cases; calls across machines
are the network-namespace tests' job.

The agent replays route selection for `route`; nothing is sent to any service (the fallback
URL below is never connected to), so these tests only read.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import PY, SERVER, Mesh

PROJECT = """
version: 1
project: shop
services:
  api:
    version: 2.3.0
    command: {py} server.py
    health: {{http: /}}
  old:
    version: 2.0.0
    command: {py} server.py
  legacy:
    version: 1.0.0
    command: {py} server.py
  auth:
    version: 1.4.0
    fallback: http://127.0.0.1:9
  web:
    version: 1.0.0
    command: {py} server.py
    depends_on:
      api: {{version: "^2.1", condition: healthy}}
      auth: ^1.2
      old: {{version: "^3.0", versions: reject}}
      legacy: ^2.0
"""


class Shop:
    """One agent running project shop, for the whole module: the tests only ask it."""

    def __init__(self, mesh: Mesh, folder: Path) -> None:
        self.mesh = mesh
        self.folder = folder

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.mesh.cli(*args, cwd=self.folder)

    def route_json(self, *args: str) -> tuple[int, dict[str, object]]:
        r = self.cli("route", *args, "--json")
        return r.returncode, json.loads(r.stdout)


@pytest.fixture(scope="module")
def shop() -> Iterator[Shop]:
    mesh = Mesh()
    try:
        folder = mesh.project("shop", PROJECT.format(py=PY), {"server.py": SERVER})
        mesh.cli("up", "-d", cwd=folder, timeout=90, check=True)
        yield Shop(mesh, folder)
    finally:
        mesh.close()


def test_a_local_service_routes_to_this_machine(shop: Shop) -> None:
    r = shop.cli("route", "api", "--caller", "web")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "web → api: local api 2.3.0 (^2.1 ok)"
    assert "  chose local api 2.3.0 (^2.1 ok)" in lines[1:]
    code, data = shop.route_json("api", "--caller", "web")
    assert code == 0
    assert {k: data[k] for k in ("project", "service", "caller", "outcome", "target")} == {
        "project": "shop",
        "service": "api",
        "caller": "web",
        "outcome": "route",
        "target": "local",
    }
    assert data["version"] == "2.3.0" and data["status"] is None


def test_with_no_caller_the_project_s_ranges_apply(shop: Shop) -> None:
    r = shop.cli("route", "api")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "(no caller) → api: local api 2.3.0 (^2.1 ok)"


def test_a_service_with_only_a_fallback_routes_there(shop: Shop) -> None:
    r = shop.cli("route", "auth", "--caller", "web")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "web → auth: fallback http://127.0.0.1:9"
    code, data = shop.route_json("auth", "--caller", "web")
    assert (code, data["target"], data["url"], data["node"]) == (
        0,
        "fallback",
        "http://127.0.0.1:9",
        None,
    )


def test_an_unknown_service_is_a_usage_error_naming_it_and_what_exists(shop: Shop) -> None:
    r = shop.cli("route", "nosuch")
    assert r.returncode == 2
    assert r.stdout == ""
    error = r.stderr.splitlines()[-1]  # after the file's own warning about `old`
    assert error.startswith("devmesh route: ")
    assert "'nosuch'" in error
    assert all(name in error for name in ("api", "auth", "legacy", "old", "web")), error


def test_an_unknown_project_is_a_usage_error_naming_it(shop: Shop) -> None:
    r = shop.cli("-p", "nosuchproject", "route", "api")
    assert r.returncode == 2
    assert "nosuchproject" in r.stderr and "shop" in r.stderr, r.stderr


def test_a_call_versions_reject_refuses_exits_1_and_says_why(shop: Shop) -> None:
    r = shop.cli("route", "old", "--caller", "web")
    assert r.returncode == 1, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("web → old: rejected with 409: ")
    assert "^3.0" in first and "2.0.0" in first
    code, data = shop.route_json("old", "--caller", "web")
    assert (code, data["outcome"], data["status"], data["target"]) == (1, "reject", 409, None)


def test_a_call_outside_the_range_under_warn_is_routed_with_a_warning(shop: Shop) -> None:
    r = shop.cli("route", "legacy", "--caller", "web")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "web → legacy: local legacy 1.0.0 (outside ^2.0, no compatible instance)"
    assert lines[-1].startswith("warning: web needs legacy ^2.0; no compatible instance")
    code, data = shop.route_json("legacy", "--caller", "web")
    assert (code, data["outcome"], data["target"]) == (0, "route", "local")
    assert str(data["warning"]).startswith("web needs legacy ^2.0")


def test_an_invalid_branch_is_a_usage_error(shop: Shop) -> None:
    r = shop.cli("route", "api", "--branch", "a..b")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "devmesh route: --branch: branch name 'a..b' cannot contain '..'\n"


def test_a_branch_with_no_instance_is_no_route(shop: Shop) -> None:
    r = shop.cli("route", "api", "--caller", "web", "--branch", "feat/x")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("web → api [branch feat/x]: no route, 502: ")


def test_status_shows_where_each_dependency_goes(shop: Shop) -> None:
    text = shop.cli("status").stdout
    section = text.split("\nROUTES\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert section[0] == "shop"
    rows = {line[2:].split("  ", 1)[0].strip(): line for line in section[1:] if line[:1] in " !"}
    assert rows["web → api"].split(None, 3)[3] == "local api 2.3.0  (^2.1 ok)"
    assert "fallback http://127.0.0.1:9" in rows["web → auth"]
    assert "409" in rows["web → old"] or "reject" in rows["web → old"], rows["web → old"]
    warned = rows["web → legacy"]
    assert warned.startswith("! web → legacy"), warned
    after = section[section.index(warned) + 1]
    assert after.startswith("    warning: web needs legacy ^2.0"), after
    assert not rows["web → api"].startswith("!")


def test_status_json_passes_the_routes_through(shop: Shop) -> None:
    routes = json.loads(shop.cli("status", "--json").stdout)["routes"]
    edges = {(r["caller"], r["service"]): r for r in routes}
    assert set(edges) == {("web", "api"), ("web", "auth"), ("web", "old"), ("web", "legacy")}
    for r in routes:
        assert {"project", "caller", "service", "target", "node", "version", "branch"} <= set(r)
        assert {"reason", "warning"} <= set(r)
    assert (edges["web", "api"]["target"], edges["web", "api"]["version"]) == ("local", "2.3.0")
    assert edges["web", "auth"]["target"] == "fallback"
    assert edges["web", "api"]["warning"] is None
    assert str(edges["web", "legacy"]["warning"]).startswith("web needs legacy ^2.0")


def test_with_no_agent_route_says_so_as_other_commands_do(mesh: Mesh) -> None:
    folder = mesh.project("shop", PROJECT.format(py=PY))
    route = mesh.cli("route", "api", cwd=folder)
    logs = mesh.cli("logs", cwd=folder)
    assert (route.returncode, logs.returncode) == (3, 3)
    said = route.stderr.splitlines()[-1]
    assert said.removeprefix("devmesh route: ") == logs.stderr.splitlines()[-1].removeprefix(
        "devmesh logs: "
    )
    assert "cannot reach the devmesh agent" in said
    assert not (mesh.home / "agent.sock").exists()

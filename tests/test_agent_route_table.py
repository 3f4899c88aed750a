"""The agent's route table over plain data: mesh routes from peers' catalogs, callers' rules
and branches, and the decision replayed over the table (what ``/v1/route`` answers when no
proxy runs). Also ``branch: auto`` against a real git repository made in a temp folder."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from devmesh.agent import gitbranch, routing
from devmesh.agent import state as state_mod
from devmesh.core import catalog, desired, model, peers, routes
from devmesh.proxy import table

NODE_B = "b" * 32
NODE_C = "c" * 32


def project(services: dict[str, Any], **extra: Any) -> model.Project:
    doc = {"version": 1, "project": "shop", "services": services, **extra}
    return model.from_document(doc, directory="/tmp/shop", default_name="shop")


def peer(
    node_id: str, name: str, services: list[catalog.SharedService], *, state: str = "alive"
) -> peers.Peer:
    return peers.Peer(
        node_id=node_id,
        name=name,
        address="10.0.0.2",
        port=7701,
        source="10.0.0.2",
        backends=frozenset({"broadcast"}),
        state=peers.PeerState(state),
        last_seen_s=0.0,
        revision="r",
        catalog=catalog.Catalog(node_id=node_id, services=tuple(services)),
    )


def shared(name: str, version: str, *, project: str = "shop", **kw: Any) -> catalog.SharedService:
    return catalog.SharedService(
        name=name, project=project, version=version, health=kw.pop("health", "healthy"), **kw
    )


SHOP = project(
    {
        "web": {
            "version": "1.0.0",
            "command": "web",
            "branch": "feat",
            "depends_on": {"api": {"version": "^2.1", "versions": "reject"}},
        },
        "admin": {"version": "1.0.0", "command": "admin", "depends_on": {"api": ">=1"}},
        "api": {"fallback": "https://api.staging.example"},
    },
    policy={"balance": "least_outstanding"},
)


def test_a_mesh_route_holds_the_peers_instances_of_the_same_project_and_service() -> None:
    alive = peer(
        NODE_B,
        "node-b",
        [
            shared("api", "2.3.0"),
            shared("api", "2.3.0", project="other"),  # another project's api
            shared("web", "1.0.0"),
        ],
    )
    gone = peer(NODE_C, "node-c", [shared("api", "2.4.0")], state="expired")
    route = routing.mesh_route(SHOP, "api", [alive, gone], "team")
    [inst] = route.peers
    assert (inst.node_id, inst.node_name, inst.host, inst.port) == (
        NODE_B,
        "node-b",
        "10.0.0.2",
        7701,
    )
    assert (inst.project, inst.service, inst.version, inst.health) == (
        "shop",
        "api",
        "2.3.0",
        "healthy",
    )
    assert inst.server_name == f"{NODE_B}.team.devmesh.internal"
    assert route.fallback == "https://api.staging.example"


def test_each_caller_gets_its_ranges_and_policy_and_a_rule_for_no_caller() -> None:
    route = routing.mesh_route(SHOP, "api", [], "team")
    by_caller = {r.caller: r for r in route.rules}
    assert set(by_caller) == {"web", "admin", None}
    web = by_caller["web"]
    assert web.requirements == (routes.Requirement(range_text="^2.1", declared_by="web"),)
    assert web.settings.versions is model.VersionPolicy.REJECT  # the edge's override
    assert web.settings.balance is routes.Balance.LEAST_OUTSTANDING
    assert by_caller["admin"].settings.versions is model.VersionPolicy.WARN
    assert {r.declared_by for r in by_caller[None].requirements} == {"web", "admin"}
    assert route.caller_branches == (("web", "feat"),)


def test_the_table_has_a_route_per_declared_service_and_peer_tls_only_as_a_node() -> None:
    proj = project(
        {
            "web": {"version": "1.2.0", "command": "web", "port": 8000, "share": True,
                    "branch": "feat", "depends_on": ["api", "worker"]},
            "worker": {"version": "1.0.0", "command": "w", "health": {"tcp": False}},
            "api": {},
        }
    )  # fmt: skip
    rec = state_mod.ProjectRecord(
        name="shop", document={}, directory="/tmp/shop", source="x", enabled=[], base_env={}
    )
    rt = routing.build_table([(rec, proj)], {}, {}, {})
    # The worker listens on nothing: no backend, and no route here or anywhere.
    assert [(m.project, m.service) for m in rt.mesh] == [("shop", "web"), ("shop", "api")]
    [web] = rt.backends
    assert (web.version, web.branch, web.shared, web.health) == ("1.2.0", "feat", True, "stopped")
    assert rt.peer_tls is None  # not a mesh node


def test_decide_over_the_table_goes_to_a_compatible_peer_and_says_why() -> None:
    plain = project(
        {
            "web": {"version": "1.0.0", "command": "web", "depends_on": {"api": "^2.1"}},
            "api": {"fallback": "https://api.staging.example"},
        }
    )
    old = peer(NODE_C, "node-c", [shared("api", "1.9.0")])
    good = peer(NODE_B, "node-b", [shared("api", "2.3.0")])
    rt = table.RouteTable(mesh=(routing.mesh_route(plain, "api", [old, good], "team"),))
    d = routing.decide(rt, "shop", "api", caller="web", branch=None, now_s=0.0)
    assert d is not None and d.outcome is routes.Outcome.ROUTE
    assert d.chosen is not None and d.chosen.node_name == "node-b"
    assert [t.kind for t in d.targets] == [routes.Kind.PEER, routes.Kind.FALLBACK]
    assert "chose node-b api 2.3.0 (^2.1 ok)" in d.explanation
    assert "skipped node-c api 1.9.0: outside ^2.1" in d.explanation
    assert routing.decide(rt, "shop", "nope", caller=None, branch=None, now_s=0.0) is None


def test_a_caller_under_a_branch_is_routed_in_its_branch_unless_told_otherwise() -> None:
    default = peer(NODE_B, "node-b", [shared("api", "2.3.0")])
    feat = peer(NODE_C, "node-c", [shared("api", "2.3.0", branch="feat")])
    rt = table.RouteTable(mesh=(routing.mesh_route(SHOP, "api", [default, feat], "team"),))
    d = routing.decide(rt, "shop", "api", caller="web", branch=None, now_s=0.0)
    assert d is not None and d.request.branch == "feat"
    assert d.chosen is not None and d.chosen.node_name == "node-c"
    d = routing.decide(rt, "shop", "api", caller="admin", branch=None, now_s=0.0)
    assert d is not None and d.chosen is not None and d.chosen.node_name == "node-b"


def test_dependencies_that_run_elsewhere_get_an_edge_listener_too() -> None:
    proj = project(
        {
            "web": {"version": "1.0.0", "command": "web", "depends_on": ["api", "worker"]},
            "api": {},
            "worker": {"version": "1.0.0", "command": "w", "health": {"tcp": False}},
        }
    )
    # api runs elsewhere: an edge (routing picks peers or fallback per call); worker runs
    # here on no port: no edge, nothing could answer there.
    assert desired.local_edges(proj, ["web", "worker"]) == [("web", "api")]


# ---------------------------------------------------------------- branch: auto


def git(folder: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(folder), *args],
        check=True,
        capture_output=True,
        env={"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(folder), "PATH": "/usr/bin:/bin"},
    )


def repo(tmp_path: Path, branch: str) -> Path:
    git(tmp_path, "init", "-q", "-b", branch)
    git(
        tmp_path,
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
    return tmp_path


def auto_project(folder: Path, **api: Any) -> model.Project:
    doc = {
        "version": 1,
        "project": "shop",
        "services": {"api": {"version": "1.0.0", "command": "api", "branch": "auto", **api}},
    }
    return model.from_document(doc, directory=str(folder), default_name="shop")


def test_branch_auto_is_the_git_branch_of_the_project_folder(tmp_path: Path) -> None:
    got = gitbranch.resolve(auto_project(repo(tmp_path, "feat/login")))
    assert got.branches == {"api": "feat/login"} and got.warnings == [] and got.problems == []


def test_branch_auto_outside_git_or_detached_is_the_default_namespace_with_a_warning(
    tmp_path: Path,
) -> None:
    got = gitbranch.resolve(auto_project(tmp_path))
    assert got.branches == {}
    [warning] = got.warnings
    assert "service api" in warning and "not in a git repository" in warning

    (tmp_path / "r").mkdir()
    folder = repo(tmp_path / "r", "main")
    git(folder, "checkout", "-q", "--detach")
    got = gitbranch.resolve(auto_project(folder))
    assert got.branches == {} and "detached HEAD" in got.warnings[0]


@pytest.mark.parametrize("name", ["-bad", "a..b", "x.lock", "sp ace"])
def test_an_invalid_branch_name_is_a_problem_naming_the_service(name: str, tmp_path: Path) -> None:
    got = gitbranch.resolve(auto_project(tmp_path, branch=name))
    [problem] = got.problems
    assert problem.startswith("services.api.branch: ") and got.branches == {}


def test_resolved_branches_reach_the_environment_and_the_fingerprint(tmp_path: Path) -> None:
    proj = desired.resolve_branches(auto_project(tmp_path), {"api": "feat"})
    svc = proj.services["api"]
    assert svc.branch == "feat"
    env = desired.runtime_vars(proj, svc, port=1, urls={})
    assert env["DEVMESH_BRANCH"] == "feat"
    other = desired.resolve_branches(auto_project(tmp_path), {})
    assert other.services["api"].branch is None
    assert "DEVMESH_BRANCH" not in desired.runtime_vars(
        other, other.services["api"], port=1, urls={}
    )
    spec = desired.instance_spec(svc, port=1, urls={})
    assert spec["branch"] == "feat"
    assert desired.fingerprint(spec) != desired.fingerprint(
        desired.instance_spec(other.services["api"], port=1, urls={})
    )

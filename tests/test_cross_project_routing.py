"""A dependency that names the project running it, and ``up --no-deps``, as plain decisions:
the route table's candidates for an edge of one project to another's service, the worker
file that carries them, and which services ``--no-deps`` leaves to routing (no sockets, no
processes; the agent tests run the same with real agents)."""

from __future__ import annotations

import dataclasses
from typing import Any

from devmesh.agent import routing as agent_routing
from devmesh.core import branches, catalog, desired, model, peers, routes
from devmesh.proxy import routesfile, routing, selection, table


def project(name: str, services: dict[str, Any]) -> model.Project:
    return model.from_document(
        {"version": 1, "project": name, "services": services},
        directory=f"/srv/{name}",
        default_name=name,
    )


WEB = project(
    "shop-web",
    {
        "web": {"command": "w", "port": "auto", "depends_on": {"api": "^2"}},
        "api": {"project": "shop-api", "fallback": "https://api.staging.example"},
    },
)
API_BACKEND = table.Backend(project="shop-api", service="api", port=8081, version="2.3.0")
OTHER_BACKEND = table.Backend(project="other", service="api", port=8082, version="2.9.0")
DEFAULT = branches.Branch(name=None, source=branches.Source.NONE)
EDGE = table.Edge(caller_project="shop-web", caller_service="web", target_service="api")


def web_route(*peers: table.PeerInstance) -> table.MeshRoute:
    """shop-web's route to api as the agent builds it, with ``peers``."""
    return dataclasses.replace(agent_routing.mesh_route(WEB, "api", (), "team"), peers=peers)


def peer_instance(project_name: str, node: str = "ana") -> table.PeerInstance:
    return table.PeerInstance(
        node_id=node * 8,
        node_name=node,
        server_name=f"{node}.team.devmesh.internal",
        host="10.0.0.2",
        port=7701,
        project=project_name,
        service="api",
        version="2.3.0",
    )


def test_the_route_of_a_dependency_names_the_project_that_runs_it() -> None:
    route = agent_routing.mesh_route(WEB, "api", (), "team")
    assert (route.project, route.owner, route.target_project) == (
        "shop-web",
        "shop-api",
        "shop-api",
    )
    assert route.fallback == "https://api.staging.example"
    assert agent_routing.target_project(WEB, "web") == "shop-web"  # runs here: its own


def test_the_local_candidate_is_the_named_projects_instance_never_another_api() -> None:
    route = web_route()
    for backends in ((OTHER_BACKEND, API_BACKEND), (API_BACKEND, OTHER_BACKEND)):
        rt = table.RouteTable(backends=backends, mesh=(route,))
        assert rt.for_edge(EDGE) is API_BACKEND
        plan = selection.Router().plan(rt, route, caller="web", branch=DEFAULT, edge=True)
        assert isinstance(plan, selection.Plan)
        assert plan.hops[0].backend is API_BACKEND and plan.target_project == "shop-api"
        assert plan.decision.verdicts[0].reason == "chose local api 2.3.0 (^2 ok)"
    # Without shop-api here, another project's api is no candidate: the fallback answers.
    rt = table.RouteTable(backends=(OTHER_BACKEND,), mesh=(route,))
    assert rt.for_edge(EDGE) is None
    found = routing.choose(
        rt, edge=EDGE, host=b"", hdrs=[], router=selection.Router(), now_s=lambda: 0.0
    )
    assert isinstance(found, selection.Plan)
    assert [h.route for h in found.hops] == ["fallback"]


def test_peers_instances_of_the_named_project_only_and_the_hop_asks_for_it() -> None:
    catalog_peers = [
        _peer_record("ana", [("shop-api", "api"), ("other", "api")]),
        _peer_record("cara", [("shop-web", "api")]),
    ]
    route = agent_routing.mesh_route(WEB, "api", catalog_peers, "team")
    assert [(p.node_name, p.project) for p in route.peers] == [("ana", "shop-api")]
    rt = table.RouteTable(backends=(), mesh=(route,))
    plan = selection.Router().plan(rt, route, caller="web", branch=DEFAULT, edge=True)
    assert isinstance(plan, selection.Plan)
    assert (selection.SERVICE_HEADER, b"api.shop-api") in plan.hops[0].add


def _peer_record(name: str, services: list[tuple[str, str]]) -> peers.Peer:
    return peers.Peer(
        node_id=name * 8,
        name=name,
        address="10.0.0.2",
        port=7701,
        source="10.0.0.2",
        backends=frozenset({"broadcast"}),
        state=peers.PeerState.ALIVE,
        last_seen_s=0.0,
        revision="r1",
        catalog=catalog.Catalog(
            node_id=name * 8,
            services=tuple(
                catalog.SharedService(
                    project=p, name=s, version="2.3.0", branch=None, health="healthy"
                )
                for p, s in services
            ),
        ),
    )


def test_the_worker_file_keeps_the_owner(tmp_path) -> None:
    route = web_route(peer_instance("shop-api"))
    rt = table.RouteTable(backends=(API_BACKEND,), mesh=(route,))
    path = tmp_path / "routes.json"
    routesfile.write(path, rt, {})
    got, _ = routesfile.read(path)
    assert got.mesh[0].owner == "shop-api" and got.mesh[0].target_project == "shop-api"


def test_a_stopped_local_instance_says_why_it_is_skipped() -> None:
    local = routes.LocalInstance(
        state=routes.LocalState.STOPPED,
        health=routes.Health.STOPPED,
        version="2.3.0",
        reason="not started (`devmesh up api` starts it)",
    )
    d = routes.select(
        routes.Request(service="api"), routes.Candidates(local=local), routes.Settings(), now_s=0
    )
    assert d.outcome is routes.Outcome.NO_ROUTE
    assert d.explanation == (
        "no route to api: local api 2.3.0 is stopped: not started (`devmesh up api` starts it)"
    )


SHOP = project(
    "shop",
    {
        "web": {"command": "w", "port": "auto", "depends_on": ["api", "search"]},
        "api": {"command": "a", "port": "auto", "depends_on": ["db"]},
        "db": {"command": "d", "port": 5432},
        "search": {"fallback": "https://search.example"},
    },
)


def test_no_deps_enables_the_named_services_alone_and_waits_for_nothing_else() -> None:
    assert desired.enabled_closure(SHOP, ["web"]) == {"web", "api", "db"}
    assert desired.enabled_closure(SHOP, ["web"], no_deps=True) == {"web"}
    assert desired.enabled_closure(SHOP, None, no_deps=True) == {"web", "api", "db"}
    wants = desired.wants_for(SHOP, ["web"], {"web": 5000}, {})
    assert wants[("shop", "web")].deps == ()  # api is routed, not waited for
    wants = desired.wants_for(SHOP, ["web", "api", "db"], {"web": 5000, "api": 5001}, {})
    assert [k for k, _ in wants[("shop", "web")].deps] == [("shop", "api")]


def test_no_deps_says_what_is_routed_instead_and_what_is_left_running() -> None:
    routed = desired.routed_instead(SHOP, ["web"], ["web"])
    assert [(r.service, r.callers, r.running) for r in routed] == [("api", ("web",), False)]
    assert routed[0].words(SHOP) == (
        "not started (--no-deps): calls from web go to a teammate's shared instance, "
        "else 502 (no fallback)"
    )
    left = desired.routed_instead(SHOP, ["web"], ["web", "api", "db"])
    assert left[0].running and left[0].words(SHOP).startswith(
        "left running (started by an earlier `up`; web call it here"
    )
    # Naming the dependency too starts it; what it depends on is then the one routed.
    both = desired.routed_instead(SHOP, ["web", "api"], ["web", "api"])
    assert [(r.service, r.callers) for r in both] == [("db", ("api",))]

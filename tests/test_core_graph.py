"""The mesh graph over plain data (core.graph) and its renderings (core.graphrender).

Decisions come from route selection itself (``routes.select``), as the agent's do, so each
edge here is one the proxy could really make. The renderings are checked the way a user
meets them: DOT through Graphviz, Mermaid by its structure, text by its width, JSON against
the field list of docs/cli.md.
"""

from __future__ import annotations

import re

from graphcheck import check_document, check_mermaid, render_dot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from devmesh.core import catalog, graph, graphrender, graphtraffic, metrics, model, routes

ANA = "a" * 32
BEN = "b" * 32


def decide(
    service: str,
    *,
    caller: str = "web",
    ranges: tuple[str, ...] = (),
    local: routes.LocalInstance | None = None,
    peers: tuple[routes.PeerInstance, ...] = (),
    fallback: str | None = None,
    versions: model.VersionPolicy = model.VersionPolicy.WARN,
) -> routes.Decision:
    request = routes.Request(
        service=service,
        caller=caller,
        requirements=tuple(routes.Requirement(range_text=r, declared_by=caller) for r in ranges),
    )
    return routes.select(
        request,
        routes.Candidates(local=local, peers=peers, fallback=fallback),
        routes.Settings(versions=versions),
        now_s=0.0,
    )


def running(version: str) -> routes.LocalInstance:
    return routes.LocalInstance(
        state=routes.LocalState.RUNNING, health=routes.Health.HEALTHY, version=version
    )


def on_peer(node_id: str, name: str, version: str) -> routes.PeerInstance:
    return routes.PeerInstance(
        node_id=node_id, node_name=name, version=version, health=routes.Health.HEALTHY
    )


def svc(name: str, version: str | None = "1.0.0", **kw: object) -> graph.LocalService:
    defaults: dict[str, object] = {
        "project": "shop",
        "branch": None,
        "state": "running",
        "health": "healthy",
        "shared": False,
        "url": f"http://{name}.localhost:7700",
        "reason": None,
    }
    defaults.update(kw)
    return graph.LocalService(name=name, version=version, **defaults)  # type: ignore[arg-type]


def call(
    service: str, decision: routes.Decision | None, range_: str | None = None, **kw: object
) -> graph.Call:
    return graph.Call(
        project=str(kw.pop("project", "shop")),
        caller=str(kw.pop("caller", "web")),
        dependency=model.Dependency(name=service, version_range=range_),
        decision=decision,
        **kw,  # type: ignore[arg-type]
    )


def team_graph(**kw: object) -> graph.Graph:
    """web -> api (local), -> auth (ben), -> pay (fallback), -> mail (nowhere),
    -> search (ben, outside web's range)."""
    return graph.build(
        machine_name="ana",
        node_id=ANA,
        services=[svc("web"), svc("api", "1.2.0")],
        peers=[
            graph.Peer(
                node_id=BEN,
                name="ben",
                address="192.168.1.23",
                state="alive",
                services=(
                    catalog.SharedService(
                        name="auth", project="shop", version="2.3.0", health="healthy"
                    ),
                    catalog.SharedService(
                        name="search", project="shop", version="0.9.0", health="healthy"
                    ),
                    catalog.SharedService(name="books", project="library", version="3.0.0"),
                ),
            )
        ],
        calls=[
            call("api", decide("api", ranges=("^1.2",), local=running("1.2.0")), "^1.2"),
            call(
                "auth",
                decide(
                    "auth",
                    ranges=("^2.1",),
                    peers=(on_peer(BEN, "ben", "2.3.0"),),
                    fallback="https://auth.example",
                ),
                "^2.1",
            ),
            call("pay", decide("pay", fallback="https://pay.example/v1")),
            call("mail", decide("mail", ranges=("^1",)), "^1"),
            call(
                "search",
                decide("search", ranges=("^1.0",), peers=(on_peer(BEN, "ben", "0.9.0"),)),
                "^1.0",
            ),
        ],
        **kw,  # type: ignore[arg-type]
    )


def edges_of(g: graph.Graph) -> dict[str, graph.Edge]:
    return {e.service: e for e in g.edges}


def test_each_edge_goes_to_the_instance_that_serves_it_now() -> None:
    g = team_graph()
    e = edges_of(g)
    assert (e["api"].target, e["api"].dest, e["api"].node) == ("local", "local:shop/api", "ana")
    assert (e["auth"].target, e["auth"].dest, e["auth"].node, e["auth"].version) == (
        "peer",
        f"peer:{BEN}:shop/auth",
        "ben",
        "2.3.0",
    )
    # The fallback is auth's failover after ben; pay's only instance.
    assert e["auth"].failover == ("fallback:shop/auth",)
    assert (e["pay"].target, e["pay"].dest) == ("fallback", "fallback:shop/pay")
    nodes = {n.id: n for n in g.nodes}
    assert nodes["fallback:shop/pay"].url == "https://pay.example/v1"
    assert nodes["fallback:shop/pay"].kind is graph.NodeKind.FALLBACK
    # Nowhere: a missing node that says why, the edge says 502.
    assert (e["mail"].target, e["mail"].dest, e["mail"].status, e["mail"].outcome) == (
        None,
        "missing:shop/mail",
        502,
        "no-route",
    )
    assert "no instance runs here or on any peer" in (nodes["missing:shop/mail"].reason or "")
    assert e["mail"].reason.startswith("no route to mail")
    # Ranges ride on the edges; every edge starts at the local caller.
    assert e["api"].range == "^1.2" and e["pay"].range is None
    assert {x.source for x in g.edges} == {"local:shop/web"}


def test_a_version_mismatch_is_marked_and_only_then() -> None:
    e = edges_of(team_graph())
    assert [s for s, x in sorted(e.items()) if x.mismatch] == ["search"]
    assert e["search"].warning and "web needs search ^1.0" in e["search"].warning
    assert e["search"].target == "peer"  # warn: it still routes, outside the range
    # Under reject with nothing compatible, calls get 409: marked, and they go nowhere.
    rejected = decide(
        "search",
        ranges=("^1.0",),
        peers=(on_peer(BEN, "ben", "0.9.0"),),
        versions=model.VersionPolicy.REJECT,
    )
    g = graph.build(
        machine_name="ana",
        node_id=None,
        services=[svc("web")],
        peers=[],
        calls=[call("search", rejected, "^1.0")],
    )
    (edge,) = g.edges
    assert (edge.mismatch, edge.status, edge.target, edge.dest) == (
        True,
        409,
        None,
        "missing:shop/search",
    )
    # Without a mesh this machine has no node name: a local target names none.
    local = graph.build(
        machine_name="laptop",
        node_id=None,
        services=[svc("web"), svc("api")],
        peers=[],
        calls=[call("api", decide("api", local=running("1.0.0")))],
    )
    assert local.edges[0].node is None and local.machines[0].name == "laptop"


def test_machines_group_the_services_and_the_scope_keeps_peers_as_machines() -> None:
    g = team_graph()
    assert [(m.id, m.name, m.local) for m in g.machines] == [
        ("local", "ana", True),
        (f"peer:{BEN}", "ben", False),
    ]
    by_machine = {
        m.id: sorted(f"{n.project}/{n.name}" for n in g.nodes if n.machine == m.id)
        for m in g.machines
    }
    assert by_machine == {
        "local": ["shop/api", "shop/web"],
        f"peer:{BEN}": ["library/books", "shop/auth", "shop/search"],
    }
    scoped = team_graph(project="library")
    assert [m.name for m in scoped.machines] == ["ana", "ben"]
    assert [n.name for n in scoped.nodes] == ["books"] and scoped.edges == ()


def test_a_target_read_a_moment_apart_is_added_and_an_unrouted_edge_ends_at_its_service() -> None:
    # The decision names a peer whose catalog the snapshot did not hold yet.
    late = decide("api", peers=(on_peer(BEN, "ben", "2.0.0"),))
    worker = svc("queue", None, url=None)
    g = graph.build(
        machine_name="ana",
        node_id=ANA,
        services=[svc("web"), worker],
        peers=[],
        calls=[
            call("api", late),
            call("queue", None, unrouted_reason="queue runs here but listens on no port"),
        ],
    )
    e = edges_of(g)
    assert e["api"].dest == f"peer:{BEN}:shop/api"
    assert f"peer:{BEN}" in {m.id for m in g.machines}
    assert (e["queue"].dest, e["queue"].target, e["queue"].outcome) == (
        "local:shop/queue",
        None,
        None,
    )
    assert e["queue"].reason == "queue runs here but listens on no port"
    check_document(graph.document(g, generated_at=1.0))


def test_traffic_is_on_its_edge_and_null_elsewhere() -> None:
    t = graph.Traffic(requests=300, rps=1.0, error_rate=0.25, p50_ms=2.0, p99_ms=9.5)
    doc = graph.document(team_graph(traffic={("shop", "web", "api"): t}), generated_at=5.0)
    check_document(doc)
    by = {e["service"]: e for e in doc["edges"]}
    assert (by["api"]["requests"], by["api"]["rps"], by["api"]["error_rate"]) == (300, 1.0, 0.25)
    assert (by["api"]["p50_ms"], by["api"]["p99_ms"]) == (2.0, 9.5)
    assert all(by[s]["rps"] is None for s in ("auth", "pay", "mail", "search"))
    assert doc["window_s"] == 300.0 and doc["generated_at"] == 5.0


def test_the_document_has_exactly_the_documented_fields() -> None:
    doc = graph.document(team_graph(), generated_at=1.0)
    check_document(doc)
    kinds = {n["kind"] for n in doc["nodes"]}
    assert kinds == {"service", "fallback", "missing"}


# -------------------------------------------------------------------------------- renderings


def test_text_says_where_each_call_goes_and_marks_the_mismatch() -> None:
    t = graph.Traffic(requests=1260, rps=4.2, error_rate=0.005, p50_ms=3.1, p99_ms=40.0)
    out = graphrender.text(
        graph.document(team_graph(traffic={("shop", "web", "api"): t}), generated_at=1.0)
    )
    assert "ana (this machine)" in out and "ben (peer at 192.168.1.23, alive)" in out
    assert "  web → api ^1.2: served by local api 1.2.0" in out
    assert "4.20 req/s, 0.5% errors, p50 3.1 ms, p99 40 ms" in out
    assert "  web → auth ^2.1: served by ben auth 2.3.0" in out
    assert "failover: fallback https://auth.example" in out
    assert "  web → mail ^1: nowhere, calls get 502" in out
    assert re.search(r"^! web → search \^1\.0: served by ben search 0\.9\.0$", out, re.M)
    assert "Attention: 1 version mismatch (!), 1 dependency served nowhere" in out
    assert out.count("no traffic") == 3  # auth, pay, search; mail goes nowhere


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs", "Cc")),
    min_size=1,
    max_size=120,
)


def weird_doc(name: str, url: str, reason: str) -> dict[str, object]:
    """The team graph with ``name`` as a service, machine and project name everywhere."""
    g = team_graph(
        traffic={
            ("shop", "web", "api"): graph.Traffic(
                requests=10**9, rps=123456.7, error_rate=1.0, p50_ms=12345.6, p99_ms=99999.9
            )
        }
    )
    doc = graph.document(g, generated_at=1.0)
    for m in doc["machines"]:  # type: ignore[union-attr]
        m["name"] = name
        m["address"] = url
    for n in doc["nodes"]:  # type: ignore[union-attr]
        n["name"], n["project"], n["url"], n["branch"] = name, name, url, name
        n["reason"] = reason
        if n["state"]:
            n["state"] = "crash-looping"
    for e in doc["edges"]:  # type: ignore[union-attr]
        e["caller"], e["service"], e["range"], e["project"] = name, name, name, name
        e["reason"], e["warning"] = reason, reason
    return doc


LONG = "a-very-long-service-name-" * 5
LONG_URL = "https://" + "x" * 150 + ".example/v1"
LONG_REASON = "exited with code 3: " + "boom " * 40


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=NAMES, url=NAMES, reason=NAMES)
@example(name=LONG, url=LONG_URL, reason=LONG_REASON)
@example(name="web", url=LONG_URL, reason=LONG_URL)
def test_text_never_exceeds_80_columns(name: str, url: str, reason: str) -> None:
    out = graphrender.text(weird_doc(name, url, reason))
    too_wide = [line for line in out.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=NAMES)
@example(name='a "quoted" <b>name</b> | with # & ; end --> x')
def test_mermaid_stays_well_formed_whatever_the_names(name: str) -> None:
    doc = weird_doc(name, name, name)
    parts = check_mermaid(graphrender.mermaid(doc))
    assert len(parts["subgraphs"]) == len(doc["machines"])  # type: ignore[arg-type]
    assert len(parts["nodes"]) == len(doc["nodes"])  # type: ignore[arg-type]
    failovers = sum(len(e["failover"]) for e in doc["edges"])  # type: ignore[union-attr,index]
    assert len(parts["edges"]) == len(doc["edges"]) + failovers  # type: ignore[arg-type]


def test_mermaid_draws_mismatch_and_nowhere_apart() -> None:
    doc = graph.document(team_graph(), generated_at=1.0)
    text = graphrender.mermaid(doc)
    parts = check_mermaid(text)
    arrows = [arrow for _, arrow, _ in parts["edges"]]
    # edges are sorted: api, auth and its failover to the fallback, mail (nowhere), pay,
    # search (mismatch)
    assert arrows == ["-->", "-->", "-.->", "-.->", "-->", "==>"]
    ids = [n["id"] for n in doc["nodes"]]
    fallback = f"n{ids.index('fallback:shop/auth')}"
    assert parts["edges"][2] == (parts["edges"][1][0], "-.->", fallback)
    assert "linkStyle 5 stroke:red" in text and "linkStyle 3 stroke:grey" in text
    assert "linkStyle 2 stroke:lightgrey" in text


def test_dot_renders_with_graphviz_whatever_the_names() -> None:
    doc = graph.document(team_graph(), generated_at=1.0)
    svg = render_dot(graphrender.dot(doc))
    for label in ("shop/web 1.0.0", "shop/auth 2.3.0", "ana (this machine)", "shop/mail"):
        assert label in svg
    assert svg.count('class="cluster"') == 2
    nasty = 'we"ird\\ {name} <b>&amp; \\"x\\" ; }'
    svg = render_dot(graphrender.dot(weird_doc(nasty, nasty, nasty)))
    assert "we&quot;ird" in svg


def stats(codes: dict[str, int], fast: int = 0, slow: int = 0) -> metrics.Stats:
    """Counts with ``fast`` calls in the 1-2.5 ms bucket and ``slow`` ones in 25-50 ms."""
    s = metrics.Stats(codes=dict(codes))
    s.buckets[metrics.bucket_index(0.002)] += fast
    s.buckets[metrics.bucket_index(0.04)] += slow
    return s


def test_edge_traffic_adds_every_target_of_a_caller_and_leaves_browsers_out() -> None:
    key = metrics.RouteKey
    counts = {
        # web's calls to api went local, then to ben (the target moved within the window)
        key(metrics.ROUTE, "shop", "web.shop", "api", "local", ""): stats({"2xx": 90}, fast=90),
        key(metrics.ROUTE, "shop", "web.shop", "api", "peer", "ben"): stats(
            {"2xx": 20, "5xx": 10}, slow=30
        ),
        # devmesh answered 502 itself: no target, still web's calls to mail
        key(metrics.ROUTE, "shop", "web.shop", "mail", "none", ""): stats({"5xx": 6}),
        # a browser's calls (no caller) and a teammate's calls into here are no edge's
        key(metrics.ROUTE, "shop", "", "api", "local", ""): stats({"2xx": 1000}),
        key(metrics.SERVED, "shop", "", "api", "local", "cara"): stats({"2xx": 1000}),
    }
    got = graphtraffic.edge_traffic(counts, seconds=300.0)
    assert set(got) == {("shop", "web", "api"), ("shop", "web", "mail")}
    api = got[("shop", "web", "api")]
    assert (api.requests, api.rps, api.error_rate) == (120, 0.4, round(10 / 120, 4))
    assert api.p50_ms is not None and 1.0 <= api.p50_ms <= 2.5
    assert api.p99_ms is not None and 25.0 <= api.p99_ms <= 50.0
    mail = got[("shop", "web", "mail")]
    assert (mail.requests, mail.error_rate) == (6, 1.0)
    doc = graph.document(team_graph(traffic=got), generated_at=1.0)
    by = {e["service"]: e for e in doc["edges"]}
    assert by["mail"]["target"] is None and by["mail"]["rps"] == 0.02
    assert "nowhere, calls get 502" in graphrender.text(doc)
    assert "0.02 req/s, 100% errors" in graphrender.text(doc)


def test_with_metrics_off_the_text_says_so_instead_of_no_traffic() -> None:
    doc = graph.document(team_graph(metrics_on=False), generated_at=1.0)
    check_document(doc)
    out = graphrender.text(doc)
    assert "the proxy's metrics are off" in out and "no traffic" not in out


def test_calls_from_teammates_are_counted_per_node_and_drawn_from_their_machine() -> None:
    key = metrics.RouteKey
    counts = {
        key(metrics.SERVED, "shop", "", "api", "local", "ben"): stats({"2xx": 8, "5xx": 2}),
        key(metrics.SERVED, "shop", "", "api", "local", "cara"): stats({"2xx": 3}),
        key(metrics.SERVED, "library", "", "books", "local", "ben"): stats({"2xx": 1}),
        key(metrics.ROUTE, "shop", "web.shop", "api", "local", ""): stats({"2xx": 50}),
    }
    inbound = graphtraffic.inbound_traffic(counts, seconds=100.0)
    assert set(inbound) == {
        ("ben", "shop", "api"),
        ("cara", "shop", "api"),
        ("ben", "library", "books"),
    }
    assert (
        inbound[("ben", "shop", "api")].requests,
        inbound[("ben", "shop", "api")].rps,
        inbound[("ben", "shop", "api")].error_rate,
    ) == (10, 0.1, 0.2)
    g = team_graph(inbound=inbound)
    doc = graph.document(g, generated_at=1.0)
    check_document(doc)
    got = {(i["node"], i["to"]): i for i in doc["inbound"]}
    # ben is a known peer: its machine; cara is not (yet): no machine. books is not a
    # service of this machine's view, so its node is added.
    assert got[("ben", "local:shop/api")]["machine"] == f"peer:{BEN}"
    assert got[("cara", "local:shop/api")]["machine"] is None
    assert ("ben", "local:library/books") in got
    assert [
        i["node"]
        for i in graph.document(team_graph(inbound=inbound, project="library"), generated_at=1.0)[
            "inbound"
        ]
    ] == ["ben"]
    out = graphrender.text(doc)
    assert "CALLS FROM TEAMMATES (last 5 min)" in out
    assert "  ben → shop/api\n      0.10 req/s, 20% errors" in out
    parts = check_mermaid(graphrender.mermaid(doc))
    callers = [n for n in parts["nodes"] if n.startswith("c")]
    assert len(callers) == 2  # one drawn node per calling teammate
    svg = render_dot(graphrender.dot(doc))
    assert "calls from ben" in svg and "calls from cara" in svg


def test_machines_are_this_one_first_then_peers_by_name_even_when_added_late() -> None:
    late = decide("api", peers=(on_peer("0" * 32, "aaron", "2.0.0"),))
    g = graph.build(
        machine_name="zed",
        node_id=None,
        services=[svc("web")],
        peers=[
            graph.Peer(
                node_id=BEN,
                name="ben",
                address="10.0.0.2",
                state="alive",
                services=(catalog.SharedService(name="auth", project="shop", version="1.0.0"),),
            )
        ],
        calls=[call("api", late)],
    )
    assert [m.name for m in g.machines] == ["zed", "aaron", "ben"]
    # nodes follow the machines' order
    assert [n.machine for n in g.nodes] == ["local", "peer:" + "0" * 32, f"peer:{BEN}"]

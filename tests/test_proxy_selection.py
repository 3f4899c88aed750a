"""The proxy's route selection state over plain tables (no sockets): remembered plans must be
exactly what a fresh selection gives, call after call, and runtime state must be counted."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from devmesh.core import branches, model, routes
from devmesh.proxy import selection, table

HEALTH = st.sampled_from([h.value for h in routes.Health])
VERSION = st.sampled_from([None, "1.9.0", "2.1.0", "2.3.0", "3.0.0"])
BRANCH = st.sampled_from([None, "feat"])


@st.composite
def tables(draw: st.DrawFn) -> tuple[table.RouteTable, table.MeshRoute]:
    peers = tuple(
        table.PeerInstance(
            node_id=f"{i:032x}",
            node_name=f"node-{i}",
            server_name=f"node-{i}.team.devmesh.internal",
            host="127.0.0.1",
            port=7000 + i,
            project="shop",
            service="api",
            version=draw(VERSION),
            branch=draw(BRANCH),
            health=draw(HEALTH),
        )
        for i in range(draw(st.integers(0, 4)))
    )
    backends = ()
    if draw(st.booleans()):
        backends = (
            table.Backend(
                project="shop",
                service="api",
                port=8080,
                version=draw(VERSION),
                branch=draw(BRANCH),
                health=draw(HEALTH),
            ),
        )
    rule = table.CallerRule(
        caller="web",
        requirements=(routes.Requirement(range_text="^2.1", declared_by="web"),),
        settings=routes.Settings(
            versions=draw(st.sampled_from(list(model.VersionPolicy))),
            prefer=draw(st.sampled_from(list(model.Prefer))),
            balance=draw(st.sampled_from([routes.Balance.ROUND_ROBIN, routes.Balance.FIRST])),
        ),
    )
    route = table.MeshRoute(
        project="shop",
        service="api",
        peers=peers,
        fallback=draw(st.sampled_from([None, "https://api.example/v2"])),
        rules=(rule,),
        caller_branches=(("web", "feat"),) if draw(st.booleans()) else (),
    )
    return table.RouteTable(backends=backends, mesh=(route,)), route


def _targets(result: selection.Plan | routes.Decision) -> object:
    if isinstance(result, selection.Plan):
        return [(h.target, h.route, h.node, h.add, h.host, h.prefix) for h in result.hops]
    return (result.outcome, result.message, result.explanation)


@settings(max_examples=200, deadline=None)
@given(tables(), st.sampled_from([None, "feat"]), st.integers(1, 15))
def test_remembered_plans_equal_fresh_selection(pair, branch, calls):
    routes_table, route = pair
    remembered, fresh = selection.Router(clock=lambda: 0.0), selection.Router(clock=lambda: 0.0)
    # A mark on a key no candidate has, never expiring: it changes no decision, but turns
    # remembering off (an expired mark is dropped at the next call, and remembering with it).
    fresh.down[("shop", "api")] = {"peer:none": (math.inf, "")}
    asked = branches.Branch(name=branch, source=branches.Source.HEADER)
    for _ in range(calls):
        a = remembered.plan(routes_table, route, caller="web", branch=asked, edge=True)
        b = fresh.plan(routes_table, route, caller="web", branch=asked, edge=True)
        assert _targets(a) == _targets(b)
    assert remembered.cursors == fresh.cursors


def test_outstanding_counts_and_down_marks():
    clock = [10.0]
    router = selection.Router(clock=lambda: clock[0])
    router.enter("shop", "api", "local")
    router.enter("shop", "api", "local")
    router.leave("shop", "api", "local")
    assert router.outstanding == {("shop", "api"): {"local": 1}}
    router.leave("shop", "api", "local")
    assert router.outstanding == {("shop", "api"): {}}
    router.mark_down("shop", "api", "local", "connection refused")
    assert router.down[("shop", "api")]["local"] == (
        10.0 + selection.DOWN_MARK_S,
        "connection refused",
    )
    router.mark_up("shop", "api", "local")
    assert router.down[("shop", "api")] == {}


@settings(max_examples=200, deadline=None)
@given(tables(), tables(), st.sampled_from([None, "feat"]), st.integers(1, 6))
def test_remembered_decisions_follow_a_new_table(first, second, branch, calls):
    """The route table is replaced (never mutated) when anything changes: what was
    remembered for the old one must not answer for the new one, on either path."""
    remembered, fresh = selection.Router(clock=lambda: 0.0), selection.Router(clock=lambda: 0.0)
    fresh.down[("shop", "api")] = {"peer:none": (math.inf, "")}
    asked = branches.Branch(name=branch, source=branches.Source.HEADER)
    swaps = (first, second, first)
    remembered_static = selection.Router(clock=lambda: 0.0)
    for routes_table, route in swaps:
        for backend in routes_table.backends:  # the fast path of a lone local backend
            a = remembered_static.static(routes_table, route, backend, "web")
            b = selection.Router().static(routes_table, route, backend, "web")
            assert (a.outcome, a.message, a.warning) == (b.outcome, b.message, b.warning)
    for routes_table, route in swaps:
        for _ in range(calls):
            a = remembered.plan(routes_table, route, caller="web", branch=asked, edge=True)
            b = fresh.plan(routes_table, route, caller="web", branch=asked, edge=True)
            assert _targets(a) == _targets(b)

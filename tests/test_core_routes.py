"""Route selection over plain data: a table per rule, and hypothesis properties."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmesh.core import model, routes
from devmesh.core.routes import (
    Balance,
    Candidates,
    Health,
    Kind,
    LocalInstance,
    LocalState,
    Outcome,
    PeerInstance,
    Request,
    Requirement,
    Settings,
)

FALLBACK = "https://api.staging.example"


def peer(name: str, version: str | None = "2.3.0", **kw) -> PeerInstance:
    node_id = (name.encode().hex() * 32)[:32]
    return PeerInstance(
        node_id=node_id,
        node_name=name,
        version=version,
        health=kw.pop("health", Health.HEALTHY),
        **kw,
    )


def local(version: str | None = "2.3.1", **kw) -> LocalInstance:
    return LocalInstance(
        state=kw.pop("state", LocalState.RUNNING),
        health=kw.pop("health", Health.HEALTHY),
        version=version,
        **kw,
    )


def web_needs(range_text: str, **kw) -> Request:
    return Request(
        service="api",
        caller="web",
        requirements=(Requirement(range_text=range_text, declared_by="web"),),
        **kw,
    )


def where(target: routes.Target | None) -> str | None:
    if target is None:
        return None
    return target.node_name or target.kind.value


def order(decision: routes.Decision) -> list[str | None]:
    return [where(t) for t in decision.targets]


def test_the_explanation_reads_as_a_sentence() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(
            local=local("2.3.1", state=LocalState.CRASH_LOOPING, health=Health.UNHEALTHY),
            peers=(peer("node-c", "1.9.0"), peer("node-b", "2.3.0")),
        ),
        Settings(),
        now_s=0.0,
    )
    assert d.outcome is Outcome.ROUTE
    assert d.status is None
    assert where(d.chosen) == "node-b"
    assert d.explanation == (
        "local api 2.3.1 is crash-looping; chose node-b api 2.3.0 (^2.1 ok); "
        "skipped node-c api 1.9.0: outside ^2.1"
    )


@pytest.mark.parametrize(
    ("state", "health", "words"),
    [
        (LocalState.STARTING, Health.STARTING, "is starting"),
        (LocalState.RESTARTING, Health.UNHEALTHY, "is restarting"),
        (LocalState.CRASH_LOOPING, Health.UNHEALTHY, "is crash-looping"),
        (LocalState.STOPPED, Health.STOPPED, "is stopped"),
        (LocalState.RUNNING, Health.STARTING, "is starting"),
        (LocalState.RUNNING, Health.UNHEALTHY, "is unhealthy"),
    ],
)
def test_an_unready_local_instance_is_skipped_for_a_peer(state, health, words) -> None:
    d = routes.select(
        Request(service="api"),
        Candidates(local=local(state=state, health=health), peers=(peer("node-b"),)),
        Settings(),
        now_s=0.0,
    )
    assert order(d) == ["node-b"]
    assert f"local api 2.3.1 {words}" in d.explanation


@pytest.mark.parametrize("health", [Health.STARTING, Health.UNHEALTHY, Health.STOPPED])
def test_an_unhealthy_peer_is_skipped(health) -> None:
    d = routes.select(
        Request(service="api"),
        Candidates(peers=(peer("node-b", health=health), peer("node-c"))),
        Settings(),
        now_s=0.0,
    )
    assert order(d) == ["node-c"]
    assert f"node-b api 2.3.0 is {health.value}" in d.explanation


def test_a_peer_marked_down_is_skipped_until_the_mark_expires() -> None:
    candidates = Candidates(
        peers=(
            peer("node-b", down_until_s=110.0, down_reason="connection refused"),
            peer("node-c"),
        )
    )
    before = routes.select(Request(service="api"), candidates, Settings(), now_s=100.0)
    assert order(before) == ["node-c"]
    assert "node-b api 2.3.0 is marked down (connection refused) for another 10.0 s" in (
        before.explanation
    )
    after = routes.select(Request(service="api"), candidates, Settings(), now_s=110.0)
    assert set(order(after)) == {"node-b", "node-c"}


def test_a_local_instance_marked_down_is_skipped() -> None:
    d = routes.select(
        Request(service="api"),
        Candidates(local=local(down_until_s=5.0), peers=(peer("node-b"),)),
        Settings(),
        now_s=1.0,
    )
    assert order(d) == ["node-b"]


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        (model.Prefer.LOCAL, ["local", "node-b", "fallback"]),
        (model.Prefer.PEER, ["node-b", "local", "fallback"]),
        (model.Prefer.FALLBACK, ["fallback", "local", "node-b"]),
    ],
)
def test_prefer_orders_the_failover_list(prefer, expected) -> None:
    d = routes.select(
        Request(service="api"),
        Candidates(local=local(), peers=(peer("node-b"),), fallback=FALLBACK),
        Settings(prefer=prefer, balance=Balance.FIRST),
        now_s=0.0,
    )
    assert order(d) == expected
    assert d.verdicts[-1].reason.endswith(f"fallback {FALLBACK}")


def test_a_compatible_instance_wins_over_an_incompatible_preferred_one() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(local=local("3.0.0"), peers=(peer("node-b", "2.2.0"),)),
        Settings(prefer=model.Prefer.LOCAL),
        now_s=0.0,
    )
    assert order(d) == ["node-b"]
    assert d.warning is None
    assert "skipped local api 3.0.0: outside ^2.1" in d.explanation


def test_warn_routes_to_the_best_incompatible_and_says_so() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(local=local("3.0.0"), peers=(peer("node-c", "1.9.0"),)),
        Settings(versions=model.VersionPolicy.WARN),
        now_s=0.0,
    )
    assert d.outcome is Outcome.ROUTE
    assert order(d) == ["local", "node-c"]
    assert d.warning == ("web needs api ^2.1; no compatible instance, so routed to local api 3.0.0")
    assert "chose local api 3.0.0 (outside ^2.1, no compatible instance)" in d.explanation


def test_reject_answers_409_naming_caller_range_versions_and_where() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(local=local("3.0.0"), peers=(peer("node-c", "1.9.0"),)),
        Settings(versions=model.VersionPolicy.REJECT),
        now_s=0.0,
    )
    assert d.outcome is Outcome.REJECT
    assert d.status == 409
    assert d.targets == ()
    assert d.chosen is None
    assert d.message == (
        "web needs api ^2.1 and policy.versions is reject; "
        "found only local api 3.0.0, node-c api 1.9.0, none compatible"
    )


def test_reject_still_routes_to_a_compatible_instance() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(local=local("3.0.0"), peers=(peer("node-b", "2.9.9"),)),
        Settings(versions=model.VersionPolicy.REJECT),
        now_s=0.0,
    )
    assert order(d) == ["node-b"]


def test_reject_with_only_incompatible_instances_uses_the_fallback() -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(peers=(peer("node-c", "1.9.0"),), fallback=FALLBACK),
        Settings(versions=model.VersionPolicy.REJECT),
        now_s=0.0,
    )
    assert d.outcome is Outcome.ROUTE
    assert order(d) == ["fallback"]
    assert "skipped node-c api 1.9.0: outside ^2.1" in d.explanation


def test_per_dependency_override_of_the_versions_policy() -> None:
    project_policy = model.Policy(versions=model.VersionPolicy.WARN)
    strict = Settings.from_policy(project_policy, versions_override=model.VersionPolicy.REJECT)
    lax = Settings.from_policy(project_policy)
    candidates = Candidates(peers=(peer("node-c", "1.9.0"),))
    assert routes.select(web_needs("^2.1"), candidates, strict, now_s=0).status == 409
    assert routes.select(web_needs("^2.1"), candidates, lax, now_s=0).warning is not None


def test_settings_from_policy_maps_every_model_balance() -> None:
    for balance in model.Balance:
        assert Settings.from_policy(model.Policy(balance=balance)).balance.value == balance.value


@pytest.mark.parametrize(
    ("version", "words"),
    [
        (None, "declares no version, ^2.1 needs one"),
        ("2.5.0-beta.1", "outside ^2.1"),
        ("not-semver", "version 'not-semver' is not semver"),
    ],
)
def test_versions_that_cannot_satisfy_a_range(version, words) -> None:
    d = routes.select(
        web_needs("^2.1"),
        Candidates(peers=(peer("node-b", version), peer("node-c", "2.1.0"))),
        Settings(),
        now_s=0.0,
    )
    assert order(d) == ["node-c"]
    assert words in d.explanation


def test_no_range_accepts_any_version_even_none() -> None:
    d = routes.select(
        Request(service="api", caller="web"),
        Candidates(local=local(None)),
        Settings(),
        now_s=0.0,
    )
    assert order(d) == ["local"]
    assert d.explanation == "chose local api"


def test_every_requirement_must_hold_when_there_is_no_caller() -> None:
    request = Request(
        service="api",
        requirements=(
            Requirement(range_text="^2.1", declared_by="web"),
            Requirement(range_text=">=2.3", declared_by="worker"),
        ),
    )
    d = routes.select(
        request,
        Candidates(peers=(peer("node-b", "2.2.0"), peer("node-c", "2.4.0"))),
        Settings(),
        now_s=0.0,
    )
    assert order(d) == ["node-c"]
    assert "skipped node-b api 2.2.0: outside >=2.3" in d.explanation
    assert "chose node-c api 2.4.0 (^2.1 ok >=2.3 ok)" in d.explanation


def test_requirements_come_from_the_callers_depends_on_or_every_declaration() -> None:
    project = model.Project(
        name="shop",
        directory="/x",
        services={
            "web": model.Service(
                name="web", depends_on=(model.Dependency(name="api", version_range="^2.1"),)
            ),
            "worker": model.Service(
                name="worker",
                depends_on=(
                    model.Dependency(name="api", version_range=">=2.3"),
                    model.Dependency(name="db"),
                ),
            ),
            "cron": model.Service(name="cron", depends_on=(model.Dependency(name="api"),)),
            "api": model.Service(name="api", version="2.3.1"),
        },
    )
    assert routes.requirements_for(project, "web", "api") == (
        Requirement(range_text="^2.1", declared_by="web"),
    )
    assert routes.requirements_for(project, "cron", "api") == ()
    assert routes.requirements_for(project, "api", "api") == ()
    assert routes.requirements_for(project, "ghost", "api") == ()
    assert routes.requirements_for(project, None, "api") == (
        Requirement(range_text="^2.1", declared_by="web"),
        Requirement(range_text=">=2.3", declared_by="worker"),
    )
    assert routes.requirements_for(project, None, "db") == ()


def test_a_requested_branch_sees_only_its_instances_anywhere() -> None:
    candidates = Candidates(
        local=local(),
        peers=(peer("node-b", branch="feat"), peer("node-c", branch="other")),
        fallback=FALLBACK,
    )
    d = routes.select(Request(service="api", branch="feat"), candidates, Settings(), now_s=0.0)
    assert order(d) == ["node-b", "fallback"]
    assert "skipped local api 2.3.1: in the default namespace, not branch feat" in d.explanation
    assert "skipped node-c api 2.3.0 (branch other): in branch other, not branch feat" in (
        d.explanation
    )


def test_the_default_namespace_excludes_branch_instances() -> None:
    candidates = Candidates(
        local=local(branch="feat"), peers=(peer("node-b"), peer("node-c", branch="feat"))
    )
    d = routes.select(Request(service="api"), candidates, Settings(), now_s=0.0)
    assert order(d) == ["node-b"]


def test_no_route_names_what_was_tried_and_why() -> None:
    d = routes.select(
        Request(service="api", branch="feat"),
        Candidates(
            local=local(state=LocalState.STOPPED, health=Health.STOPPED, branch="feat"),
            peers=(peer("node-b"),),
        ),
        Settings(),
        now_s=0.0,
    )
    assert d.outcome is Outcome.NO_ROUTE
    assert d.status == 502
    assert d.explanation == (
        "no route to api in branch feat: local api 2.3.1 (branch feat) is stopped; "
        "skipped node-b api 2.3.0: in the default namespace, not branch feat"
    )


def test_no_candidates_at_all() -> None:
    d = routes.select(Request(service="api"), Candidates(), Settings(), now_s=0.0)
    assert d.status == 502
    assert d.explanation == (
        "no route to api: no instance runs here or on any peer, and it has no fallback"
    )


def test_only_a_fallback() -> None:
    d = routes.select(Request(service="api"), Candidates(fallback=FALLBACK), Settings(), now_s=0)
    assert [t.url for t in d.targets] == [FALLBACK]
    assert d.explanation == f"chose fallback {FALLBACK}"


def three() -> Candidates:
    return Candidates(peers=(peer("node-c"), peer("node-a"), peer("node-b")))


def test_round_robin_rotates_with_the_cursor_and_keeps_the_rest_for_failover() -> None:
    seen = []
    cursor = 0
    for _ in range(4):
        d = routes.select(Request(service="api"), three(), Settings(), now_s=0, cursor=cursor)
        seen.append(order(d))
        assert d.next_cursor == cursor + 1
        cursor = d.next_cursor
    assert seen == [
        ["node-a", "node-b", "node-c"],
        ["node-b", "node-c", "node-a"],
        ["node-c", "node-a", "node-b"],
        ["node-a", "node-b", "node-c"],
    ]


def test_round_robin_does_not_spread_past_a_preferred_local_instance() -> None:
    candidates = Candidates(local=local(), peers=(peer("node-a"), peer("node-b")))
    for cursor in range(4):
        d = routes.select(Request(service="api"), candidates, Settings(), now_s=0, cursor=cursor)
        assert where(d.chosen) == "local"


def test_least_outstanding_picks_the_idlest_and_breaks_ties_by_cursor() -> None:
    keys = {p.node_name: f"peer:{p.node_id}" for p in three().peers}
    settings = Settings(balance=Balance.LEAST_OUTSTANDING)
    counts = {keys["node-a"]: 5, keys["node-b"]: 1, keys["node-c"]: 3}
    d = routes.select(Request(service="api"), three(), settings, now_s=0, outstanding=counts)
    assert order(d) == ["node-b", "node-c", "node-a"]
    tied = {keys["node-a"]: 2}
    firsts = {
        where(
            routes.select(
                Request(service="api"), three(), settings, now_s=0, cursor=c, outstanding=tied
            ).chosen
        )
        for c in range(4)
    }
    assert firsts == {"node-b", "node-c"}


def test_random_uses_the_source_given_and_needs_one() -> None:
    settings = Settings(balance=Balance.RANDOM)
    chosen = Counter(
        where(routes.select(Request(service="api"), three(), settings, now_s=0, rng=rng).chosen)
        for rng in (random.Random(seed) for seed in range(60))
    )
    assert set(chosen) == {"node-a", "node-b", "node-c"}
    again = routes.select(Request(service="api"), three(), settings, now_s=0, rng=random.Random(7))
    same = routes.select(Request(service="api"), three(), settings, now_s=0, rng=random.Random(7))
    assert order(again) == order(same)
    assert sorted(order(again)) == ["node-a", "node-b", "node-c"]
    with pytest.raises(ValueError, match="random source"):
        routes.select(Request(service="api"), three(), settings, now_s=0)


def test_first_keeps_a_stable_order() -> None:
    settings = Settings(balance=Balance.FIRST)
    for cursor in range(3):
        d = routes.select(Request(service="api"), three(), settings, now_s=0, cursor=cursor)
        assert order(d) == ["node-a", "node-b", "node-c"]


# --- properties ---------------------------------------------------------------------------

versions_st = st.one_of(
    st.none(),
    st.builds(
        lambda a, b, c: f"{a}.{b}.{c}",
        st.integers(0, 4),
        st.integers(0, 4),
        st.integers(0, 3),
    ),
)
branch_st = st.sampled_from([None, None, "feat"])
health_st = st.sampled_from(list(Health))
peers_st = st.lists(
    st.builds(
        lambda i, v, h, b, down: PeerInstance(
            node_id=f"{i:032x}",
            node_name=f"node-{i}",
            version=v,
            health=h,
            branch=b,
            down_until_s=down,
        ),
        st.integers(0, 30),
        versions_st,
        health_st,
        branch_st,
        st.sampled_from([None, 5.0, 20.0]),
    ),
    max_size=6,
    unique_by=lambda p: p.node_id,
)
local_st = st.one_of(
    st.none(),
    st.builds(
        lambda s, h, v, b: LocalInstance(state=s, health=h, version=v, branch=b),
        st.sampled_from(list(LocalState)),
        health_st,
        versions_st,
        branch_st,
    ),
)
candidates_st = st.builds(
    Candidates,
    local=local_st,
    peers=peers_st.map(tuple),
    fallback=st.sampled_from([None, FALLBACK]),
)
settings_st = st.builds(
    Settings,
    versions=st.sampled_from(list(model.VersionPolicy)),
    prefer=st.sampled_from(list(model.Prefer)),
    balance=st.sampled_from(list(Balance)),
)
request_st = st.builds(
    Request,
    service=st.just("api"),
    caller=st.sampled_from([None, "web"]),
    requirements=st.sampled_from([(), (Requirement(range_text="^2.1", declared_by="web"),)]),
    branch=branch_st,
)


def passes(request: Request, c: Candidates, target: routes.Target, now_s: float) -> bool:
    """The filters, restated from the rules rather than from the code."""
    if target.kind is Kind.LOCAL:
        inst = c.local
        assert inst is not None
        ready = inst.state is LocalState.RUNNING and inst.health is Health.HEALTHY
    else:
        inst = next(p for p in c.peers if p.node_id == target.node_id)
        ready = inst.health is Health.HEALTHY
    down = inst.down_until_s is not None and now_s < inst.down_until_s
    return ready and not down and inst.branch == request.branch


def fits(request: Request, version: str | None) -> bool:
    if not request.requirements:
        return True
    return version is not None and all(
        routes.versions.satisfies(version, r.range_text) for r in request.requirements
    )


def mesh_targets(c: Candidates) -> list[routes.Target]:
    out = []
    if c.local is not None:
        out.append(routes.Target(kind=Kind.LOCAL, version=c.local.version, branch=c.local.branch))
    out.extend(
        routes.Target(
            kind=Kind.PEER,
            node_id=p.node_id,
            node_name=p.node_name,
            version=p.version,
            branch=p.branch,
        )
        for p in c.peers
    )
    return out


@given(request_st, candidates_st, settings_st, st.integers(0, 10), st.integers(0, 2**32))
def test_property_compatible_healthy_always_wins(request, c, settings, cursor, seed) -> None:
    now_s = 10.0
    d = routes.select(request, c, settings, now_s=now_s, cursor=cursor, rng=random.Random(seed))
    good = [t for t in mesh_targets(c) if passes(request, c, t, now_s) and fits(request, t.version)]
    mesh = [t for t in d.targets if t.kind is not Kind.FALLBACK]
    if good:
        assert mesh, d.explanation
        assert all(fits(request, t.version) for t in mesh)
        assert set(mesh) == set(good)
        assert d.warning is None


@given(request_st, candidates_st, settings_st, st.integers(0, 10), st.integers(0, 2**32))
def test_property_targets_are_candidates_that_pass_the_filters(
    request, c, settings, cursor, seed
) -> None:
    now_s = 10.0
    d = routes.select(request, c, settings, now_s=now_s, cursor=cursor, rng=random.Random(seed))
    known = mesh_targets(c)
    assert len(set(d.targets)) == len(d.targets)
    for t in d.targets:
        if t.kind is Kind.FALLBACK:
            assert t.url == c.fallback
            continue
        assert t in known
        assert passes(request, c, t, now_s)
    assert len(d.verdicts) == len(known) + (1 if c.fallback else 0)
    if d.outcome is Outcome.ROUTE:
        assert d.chosen is not None
        assert d.chosen == d.targets[0]
        assert f"chose {routes.describe('api', d.chosen)}" in d.explanation
    else:
        assert d.targets == ()
        assert d.status in (409, 502)


@given(request_st, candidates_st, settings_st)
def test_property_no_route_names_every_candidate_skipped(request, c, settings) -> None:
    d = routes.select(request, c, settings, now_s=10.0, rng=random.Random(0))
    if d.outcome is Outcome.ROUTE:
        return
    assert c.fallback is None
    for t in mesh_targets(c):
        assert routes.describe("api", t) in d.explanation
    assert d.explanation.startswith(d.message)


@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 1000))
def test_property_round_robin_is_exactly_even(n, k, start) -> None:
    candidates = Candidates(peers=tuple(peer(f"node-{i}") for i in range(n)))
    counts: Counter[str | None] = Counter()
    cursor = start
    for _ in range(k * n):
        d = routes.select(Request(service="api"), candidates, Settings(), now_s=0, cursor=cursor)
        counts[where(d.chosen)] += 1
        cursor = d.next_cursor
    assert sorted(counts.values()) == [k] * n


@given(
    st.lists(
        st.builds(
            lambda i, name, v, b: PeerInstance(
                node_id=f"{i:032x}", node_name=name, version=v, health=Health.HEALTHY, branch=b
            ),
            st.integers(0, 50),
            st.text(max_size=20),
            st.one_of(st.none(), st.text(max_size=20)),
            st.one_of(st.none(), st.text(max_size=10)),
        ),
        max_size=5,
    ),
    request_st,
    settings_st,
)
def test_property_never_raises_on_odd_announced_data(peers, request, settings) -> None:
    d = routes.select(
        request, Candidates(peers=tuple(peers)), settings, now_s=0.0, rng=random.Random(1)
    )
    assert len(d.verdicts) == len(peers)
    assert d.explanation

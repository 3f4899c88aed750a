"""The reconciler's plan over plain data: no processes, no clock, ``now`` injected.

Each test builds ``wants`` and ``seen`` by hand and checks the exact actions and reasons,
because `devmesh plan` prints those reasons verbatim to the user.
"""

from __future__ import annotations

import pytest

from devmesh.core import plan
from devmesh.core.model import Condition, RestartPolicy

P = "proj"
V = plan.Verb
NOW = 1000.0


def k(name: str, project: str = P) -> plan.Key:
    return (project, name)


def want(
    name: str,
    *,
    fp: str = "fp",
    spec: dict | None = None,
    deps: tuple[tuple[str, Condition], ...] = (),
    restart: RestartPolicy = RestartPolicy.ON_FAILURE,
    max_retries: int | None = None,
    project: str = P,
) -> plan.Want:
    return plan.Want(
        key=k(name, project),
        fingerprint=fp,
        spec=spec if spec is not None else {},
        deps=tuple((k(d, project), c) for d, c in deps),
        restart=restart,
        max_retries=max_retries,
    )


def seen(name: str, phase: plan.Phase = plan.Phase.RUNNING, *, project: str = P, **kw) -> plan.Seen:
    kw.setdefault("fingerprint", "fp")
    deps = tuple(k(d, project) for d in kw.pop("deps", ()))
    return plan.Seen(key=k(name, project), phase=phase, deps=deps, **kw)


def wmap(*ws: plan.Want) -> dict[plan.Key, plan.Want]:
    return {w.key: w for w in ws}


def smap(*ss: plan.Seen) -> dict[plan.Key, plan.Seen]:
    return {s.key: s for s in ss}


def table(p: plan.Plan) -> list[tuple[str, str, str]]:
    return [(a.key[1], a.verb.value, a.reason) for a in p.actions]


def verbs(p: plan.Plan) -> dict[str, plan.Verb]:
    return {a.key[1]: a.verb for a in p.actions}


STARTED = Condition.STARTED
HEALTHY = Condition.HEALTHY
H = plan.Health


# ------------------------------------------------------------------ start order


def test_empty_world_plans_nothing() -> None:
    p = plan.plan({}, {}, NOW)
    assert p.actions == ()
    assert p.wake_at is None


def test_independent_services_start_in_the_same_round() -> None:
    p = plan.plan(wmap(want("a"), want("b"), want("c")), {}, NOW)
    assert table(p) == [
        ("a", "start", "not running"),
        ("b", "start", "not running"),
        ("c", "start", "not running"),
    ]
    assert p.wake_at is None


def test_dependent_waits_for_its_dependency_to_start() -> None:
    wants = wmap(want("db"), want("api", deps=(("db", STARTED),)))
    p = plan.plan(wants, {}, NOW)
    assert table(p) == [
        ("db", "start", "not running"),
        ("api", "wait", "waiting for db to start"),
    ]


@pytest.mark.parametrize(
    ("cond", "health", "detail", "expected"),
    [
        (STARTED, H.NONE, None, ("start", "not running")),
        (STARTED, H.STARTING, None, ("start", "not running")),
        (STARTED, H.UNHEALTHY, None, ("start", "not running")),
        (HEALTHY, H.NONE, None, ("start", "not running")),
        (HEALTHY, H.HEALTHY, None, ("start", "not running")),
        (HEALTHY, H.STARTING, None, ("wait", "waiting for db to be healthy (now starting)")),
        (
            HEALTHY,
            H.UNHEALTHY,
            "GET /healthz: 503",
            ("wait", "waiting for db to be healthy (now unhealthy: GET /healthz: 503)"),
        ),
    ],
)
def test_condition_started_vs_healthy(cond, health, detail, expected) -> None:
    wants = wmap(want("db"), want("api", deps=(("db", cond),)))
    p = plan.plan(wants, smap(seen("db", health=health, health_detail=detail)), NOW)
    assert table(p) == [("api", *expected)]


def test_chain_starts_one_layer_per_round() -> None:
    wants = wmap(
        want("db"),
        want("api", deps=(("db", HEALTHY),)),
        want("web", deps=(("api", HEALTHY),)),
        want("worker", deps=(("db", STARTED),)),
    )
    rounds: list[dict[str, plan.Verb]] = []
    world: dict[plan.Key, plan.Seen] = {}
    for _ in range(5):
        p = plan.plan(wants, world, NOW)
        rounds.append(verbs(p))
        for a in p.of(V.START):
            world[a.key] = seen(a.key[1], health=H.HEALTHY)
        if not p.actions:
            break
    assert rounds == [
        {"db": V.START, "api": V.WAIT, "web": V.WAIT, "worker": V.WAIT},
        {"api": V.START, "web": V.WAIT, "worker": V.START},
        {"web": V.START},
        {},
    ]


def test_waiting_names_every_unmet_dependency() -> None:
    wants = wmap(want("a"), want("b"), want("c", deps=(("a", STARTED), ("b", HEALTHY))))
    world = smap(seen("b", health=H.STARTING))
    assert table(plan.plan(wants, world, NOW)) == [
        ("a", "start", "not running"),
        ("c", "wait", "waiting for a to start, b to be healthy (now starting)"),
    ]


def test_dependency_that_will_not_restart_blocks_its_dependent() -> None:
    wants = wmap(want("db", restart=RestartPolicy.NO), want("api", deps=(("db", STARTED),)))
    world = smap(seen("db", plan.Phase.EXITED, exit_text="exited with code 1", exit_failed=True))
    assert table(plan.plan(wants, world, NOW)) == [
        ("db", "hold", "exited with code 1; restart policy is no"),
        ("api", "hold", "blocked: dependency db exited with code 1 and will not be restarted"),
    ]


def test_dependency_restarting_makes_dependent_wait_for_it_to_run_again() -> None:
    wants = wmap(want("db"), want("api", deps=(("db", STARTED),)))
    world = smap(
        seen(
            "db",
            plan.Phase.EXITED,
            exit_text="exited with code 1",
            exit_failed=True,
            failures=1,
            retry_at=NOW + 1,
        )
    )
    assert table(plan.plan(wants, world, NOW))[1] == (
        "api",
        "wait",
        "waiting for db to run again (exited with code 1)",
    )


def test_dependency_failed_to_start_blocks_dependent_with_hold() -> None:
    wants = wmap(want("db"), want("api", deps=(("db", STARTED),)))
    world = smap(seen("db", plan.Phase.FAILED, reason="command not found: pgx"))
    assert table(plan.plan(wants, world, NOW)) == [
        ("db", "hold", "command not found: pgx"),
        ("api", "hold", "blocked: dependency db failed to start (command not found: pgx)"),
    ]


# ------------------------------------------------------------------ idempotence


def test_same_wants_and_seen_plan_no_start_or_stop() -> None:
    wants = wmap(want("db"), want("api", deps=(("db", HEALTHY),)), want("web"))
    world = smap(
        seen("db", health=H.HEALTHY),
        seen("api", deps=("db",), health=H.STARTING),
        seen("web", health=H.UNHEALTHY),
    )
    p = plan.plan(wants, world, NOW)
    assert p.actions == ()
    assert p.wake_at is None


def test_plan_is_pure_same_inputs_same_plan() -> None:
    wants = wmap(want("a"), want("b", deps=(("a", HEALTHY),)))
    world = smap(seen("a", health=H.STARTING))
    assert plan.plan(wants, world, NOW) == plan.plan(wants, world, NOW)


def test_stopping_instance_is_left_alone() -> None:
    wants = wmap(want("a", fp="new"))
    world = smap(seen("a", plan.Phase.STOPPING, fingerprint="old"))
    assert plan.plan(wants, world, NOW).actions == ()


# ------------------------------------------------------------------ changes


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        ({"command": ["a"]}, {"command": ["b"]}, "command"),
        ({"port": 8000}, {"port": 8001}, "port"),
        ({"env": {"X": "1", "Y": "2"}}, {"env": {"X": "9", "Y": "2"}}, "env.X"),
        ({"env": {"X": "1"}}, {"env": {"X": "1", "Z": "2"}}, "env.Z"),
        ({"env": {"X": "1"}}, {}, "env"),
        ({"dep_urls": {"api": "http://a"}}, {"dep_urls": {"api": "http://b"}}, "dep_urls.api"),
        (
            {"command": ["a"], "port": 1, "env": {"B": "1", "A": "1"}},
            {"command": ["b"], "port": 2, "env": {"B": "2", "A": "2"}},
            "command, env.A, env.B, port",
        ),
        ({}, {}, "configuration"),
    ],
)
def test_fingerprint_change_stops_with_reason_naming_key(old, new, what) -> None:
    wants = wmap(want("api", fp="new", spec=new))
    world = smap(seen("api", fingerprint="old", spec=old))
    assert table(plan.plan(wants, world, NOW)) == [("api", "stop", f"restart: {what} changed")]


def test_changed_service_restarts_alone_and_its_dependents_keep_running() -> None:
    wants = wmap(
        want("db"), want("api", fp="new", spec={"port": 2}), want("web", deps=(("api", STARTED),))
    )
    world = smap(seen("db"), seen("api", spec={"port": 1}), seen("web", deps=("api",)))
    assert table(plan.plan(wants, world, NOW)) == [("api", "stop", "restart: port changed")]


def test_stopped_changed_service_starts_on_next_round() -> None:
    wants = wmap(want("api", fp="new"))
    world = smap(seen("api", plan.Phase.EXITED, fingerprint="old", exit_text="was stopped"))
    assert table(plan.plan(wants, world, NOW)) == [("api", "start", "configuration changed")]


def test_changed_configuration_starts_even_during_backoff() -> None:
    wants = wmap(want("api", fp="new"))
    world = smap(
        seen(
            "api",
            plan.Phase.EXITED,
            fingerprint="old",
            exit_failed=True,
            exit_text="exited with code 1",
            failures=3,
            retry_at=NOW + 30,
        )
    )
    p = plan.plan(wants, world, NOW)
    assert table(p) == [("api", "start", "configuration changed")]
    assert p.wake_at is None


# ------------------------------------------------------------------ removal


def test_removed_project_stops_dependents_first() -> None:
    world = smap(
        seen("db"),
        seen("api", deps=("db",)),
        seen("web", deps=("api",)),
        seen("worker", deps=("db",)),
    )
    assert table(plan.plan({}, world, NOW)) == [
        ("api", "wait", "stop after its dependents web"),
        ("db", "wait", "stop after its dependents api, worker"),
        ("web", "stop", "no longer wanted"),
        ("worker", "stop", "no longer wanted"),
    ]


def test_removal_proceeds_as_dependents_go() -> None:
    world = {
        k("db"): seen("db"),
        k("api"): seen("api", deps=("db",)),
        k("web"): seen("web", plan.Phase.STOPPING, deps=("api",)),
    }
    assert verbs(plan.plan({}, world, NOW)) == {"api": V.WAIT, "db": V.WAIT}
    world[k("web")] = seen("web", plan.Phase.EXITED, deps=("api",))
    assert table(plan.plan({}, world, NOW)) == [
        ("api", "stop", "no longer wanted"),
        ("db", "wait", "stop after its dependents api"),
        ("web", "forget", "no longer in the project"),
    ]
    del world[k("web")]
    world[k("api")] = seen("api", plan.Phase.STOPPING, deps=("db",))
    assert table(plan.plan({}, world, NOW)) == [("db", "wait", "stop after its dependents api")]
    world[k("api")] = seen("api", plan.Phase.EXITED, deps=("db",))
    assert verbs(plan.plan({}, world, NOW)) == {"api": V.FORGET, "db": V.STOP}


def test_wanted_dependent_does_not_block_stop_of_removed_service() -> None:
    """Only dependents that are being stopped too are waited for."""
    wants = wmap(want("web"))
    world = smap(seen("api"), seen("web", deps=("api",)))
    assert table(plan.plan(wants, world, NOW)) == [("api", "stop", "no longer wanted")]


def test_removing_one_project_leaves_the_other_alone() -> None:
    wants = wmap(want("api", project="b"))
    world = smap(seen("api", project="a"), seen("api", project="b"))
    p = plan.plan(wants, world, NOW)
    assert [(a.key, a.verb, a.reason) for a in p.actions] == [
        (("a", "api"), V.STOP, "no longer wanted")
    ]


@pytest.mark.parametrize("phase", [plan.Phase.EXITED, plan.Phase.FAILED])
def test_unwanted_finished_instances_are_forgotten(phase) -> None:
    world = smap(seen("old", phase, reason="x", exit_text="exited with code 0"))
    assert table(plan.plan({}, world, NOW)) == [("old", "forget", "no longer in the project")]


# ------------------------------------------------------------------ crashes and restart policy


def crashed(name: str = "api", *, failures: int = 1, retry_at: float | None = None, **kw):
    kw.setdefault("exit_failed", True)
    kw.setdefault("exit_text", "exited with code 1")
    return seen(name, plan.Phase.EXITED, failures=failures, retry_at=retry_at, **kw)


def test_crash_waits_until_retry_at_then_starts() -> None:
    wants = wmap(want("api"))
    world = smap(crashed(failures=2, retry_at=NOW + 2.5))
    p = plan.plan(wants, world, NOW)
    assert table(p) == [
        ("api", "wait", "restarting: attempt 2, next try in 2.5 s (it exited with code 1)")
    ]
    assert p.actions[0].until == NOW + 2.5
    assert p.wake_at == NOW + 2.5
    p = plan.plan(wants, world, NOW + 2.5)
    assert table(p) == [("api", "start", "restart after it exited with code 1 (attempt 2)")]
    assert p.wake_at is None


def test_wake_at_is_the_earliest_retry_deadline() -> None:
    wants = wmap(want("a"), want("b"), want("c"))
    world = smap(
        crashed("a", retry_at=NOW + 7), crashed("b", retry_at=NOW + 3), crashed("c", retry_at=NOW)
    )
    p = plan.plan(wants, world, NOW)
    assert verbs(p) == {"a": V.WAIT, "b": V.WAIT, "c": V.START}
    assert p.wake_at == NOW + 3


def test_restart_after_backoff_still_waits_for_dependencies() -> None:
    wants = wmap(want("db"), want("api", deps=(("db", HEALTHY),)))
    world = smap(seen("db", health=H.STARTING), crashed("api", retry_at=NOW - 1))
    assert table(plan.plan(wants, world, NOW)) == [
        ("api", "wait", "waiting for db to be healthy (now starting)")
    ]


@pytest.mark.parametrize(
    ("policy", "exit_failed", "exit_text", "expected"),
    [
        (
            RestartPolicy.NO,
            True,
            "exited with code 1",
            ("hold", "exited with code 1; restart policy is no"),
        ),
        (
            RestartPolicy.NO,
            False,
            "exited with code 0",
            ("hold", "exited with code 0; restart policy is no"),
        ),
        (
            RestartPolicy.ON_FAILURE,
            False,
            "exited with code 0",
            (
                "hold",
                "exited with code 0; restart policy on-failure does not restart a clean exit",
            ),
        ),
        (
            RestartPolicy.ON_FAILURE,
            True,
            "was killed by SIGKILL",
            ("start", "restart after it was killed by SIGKILL (attempt 1)"),
        ),
        (
            RestartPolicy.ALWAYS,
            False,
            "exited with code 0",
            ("start", "restart after it exited with code 0 (attempt 1)"),
        ),
        (
            RestartPolicy.ALWAYS,
            True,
            "exited with code 1",
            ("start", "restart after it exited with code 1 (attempt 1)"),
        ),
    ],
)
def test_restart_policies(policy, exit_failed, exit_text, expected) -> None:
    wants = wmap(want("api", restart=policy))
    world = smap(crashed(exit_failed=exit_failed, exit_text=exit_text))
    assert table(plan.plan(wants, world, NOW)) == [("api", *expected)]


@pytest.mark.parametrize(
    ("max_retries", "failures", "verb"),
    [(None, 50, "start"), (0, 1, "hold"), (2, 1, "start"), (2, 2, "start"), (2, 3, "hold")],
)
def test_max_retries_then_crash_looping(max_retries, failures, verb) -> None:
    wants = wmap(want("api", max_retries=max_retries))
    world = smap(crashed(failures=failures))
    [action] = plan.plan(wants, world, NOW).actions
    assert action.verb.value == verb
    if verb == "hold":
        # The "crash-looping: " prefix is being dropped (status shows that state in its own
        # column); accept the reason with or without it.
        assert action.reason.removeprefix("crash-looping: ") == (
            f"exited with code 1; gave up after {max_retries} restarts"
        )


def test_crash_looping_hold_ignores_retry_at() -> None:
    wants = wmap(want("api", max_retries=1))
    p = plan.plan(wants, smap(crashed(failures=2, retry_at=NOW + 5)), NOW)
    assert verbs(p) == {"api": V.HOLD}
    assert p.wake_at is None


def test_failed_start_is_held_until_the_fingerprint_changes() -> None:
    failed = seen("api", plan.Phase.FAILED, reason="port 8000 is taken by pid 42 (nginx)")
    p = plan.plan(wmap(want("api")), smap(failed), NOW)
    assert table(p) == [("api", "hold", "port 8000 is taken by pid 42 (nginx)")]
    p = plan.plan(wmap(want("api", fp="fixed")), smap(failed), NOW)
    assert table(p) == [("api", "start", "configuration changed")]


def test_failed_without_reason_says_failed() -> None:
    p = plan.plan(wmap(want("api")), smap(seen("api", plan.Phase.FAILED)), NOW)
    assert table(p) == [("api", "hold", "failed")]


# ------------------------------------------------------------------ helpers


def test_action_describe() -> None:
    a = plan.Action(verb=V.STOP, key=("shop", "api"), reason="restart: port changed")
    assert a.describe() == "shop/api: stop - restart: port changed"
    assert plan.key_text(("shop", "api")) == "shop/api"


def test_plan_of_filters_by_verb() -> None:
    p = plan.plan(wmap(want("a"), want("b", deps=(("a", STARTED),))), {}, NOW)
    assert [a.key[1] for a in p.of(V.START)] == ["a"]
    assert [a.key[1] for a in p.of(V.WAIT)] == ["b"]
    assert p.of(V.STOP) == []


@pytest.mark.parametrize(
    ("deps", "roots", "expected"),
    [
        ({"web": ["api"], "api": ["db"], "db": []}, ["web"], {"web", "api", "db"}),
        ({"web": ["api"], "api": ["db"], "db": []}, ["api"], {"api", "db"}),
        ({"a": ["b"], "b": ["a"]}, ["a"], {"a", "b"}),
        ({"a": []}, [], set()),
        ({}, ["ghost"], {"ghost"}),
    ],
)
def test_closure(deps, roots, expected) -> None:
    assert plan.closure(deps, roots) == expected


def test_retry_deadline_uses_backoff() -> None:
    assert plan.retry_deadline(exited_at=100.0, failures=1, backoff_s=1.0, jitter=0.0) == 101.0
    assert plan.retry_deadline(exited_at=100.0, failures=3, backoff_s=0.5, jitter=0.0) == 102.0
    assert plan.retry_deadline(exited_at=100.0, failures=1, backoff_s=2.0, jitter=0.5) == 102.25


@pytest.mark.parametrize(
    ("policy", "max_retries", "failures", "exit_failed", "restarting", "gave_up"),
    [
        (RestartPolicy.ON_FAILURE, None, 50, True, True, False),  # unlimited: never gives up
        (RestartPolicy.ALWAYS, None, 9, False, True, False),
        (RestartPolicy.ON_FAILURE, 2, 2, True, True, False),
        (RestartPolicy.ON_FAILURE, 2, 3, True, False, True),  # bounded and exhausted
        (RestartPolicy.NO, 2, 3, True, False, False),  # never restarted: just exited
        (RestartPolicy.ON_FAILURE, 0, 1, False, False, False),  # a clean exit is not a crash
    ],
)
def test_restarting_versus_gave_up(
    policy, max_retries, failures, exit_failed, restarting, gave_up
) -> None:
    w = want("api", restart=policy, max_retries=max_retries)
    s = crashed(failures=failures, exit_failed=exit_failed)
    assert (plan.will_restart(w, s), plan.gave_up(w, s)) == (restarting, gave_up)

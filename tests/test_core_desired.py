"""From a project model to wants, URLs, argv and environment: pure functions, plain data.

Projects are built with ``model.from_document`` from literal documents, as the loader would
after validation, so no file or process is involved.
"""

from __future__ import annotations

from typing import Any

import pytest

from devmesh.core import desired, interpolate, model, plan


def project(services: dict[str, Any], name: str = "shop") -> model.Project:
    return model.from_document(
        {"version": 1, "project": name, "services": services},
        directory="/srv/shop",
        default_name="shop",
    )


SHOP = {
    "db": {"command": "python3 db.py", "port": 5500},
    "api": {
        "command": "python3 api.py --port ${PORT}",
        "port": "auto",
        "env": {"DB": "${DB_URL}/main", "LOG_LEVEL": "debug"},
        "depends_on": {"db": {"condition": "healthy"}, "billing": {"version": "^2"}},
    },
    "web": {"command": ["node", "web.js"], "depends_on": ["api"]},
    "billing": {"fallback": "https://billing.staging.example/"},
    "search": {},
    "tool": {"command": "python3 tool.py", "depends_on": ["search"]},
}


# ------------------------------------------------------------------ url_var


@pytest.mark.parametrize(
    ("dep", "var"),
    [("api", "API_URL"), ("payments-v2", "PAYMENTS_V2_URL"), ("a_b", "A_B_URL")],
)
def test_url_var(dep, var) -> None:
    assert desired.url_var(dep) == var
    assert interpolate.url_variable(dep) == var


# ------------------------------------------------------------------ enabled_closure


@pytest.mark.parametrize(
    ("roots", "expected"),
    [
        (None, {"db", "api", "web", "tool"}),
        (["web"], {"web", "api", "db"}),
        (["api"], {"api", "db"}),
        (["db"], {"db"}),
        (["tool"], {"tool"}),
        (["db", "tool"], {"db", "tool"}),
        ([], set()),
    ],
)
def test_enabled_closure_takes_roots_and_their_local_dependencies(roots, expected) -> None:
    """Services without a command (a teammate's, or a fallback) are never enabled."""
    assert desired.enabled_closure(project(SHOP), roots) == expected


# ------------------------------------------------------------------ dependency_urls


def test_dependency_urls_local_fallback_and_none() -> None:
    p = project(SHOP)
    ports = {"db": 5500, "api": 41000}
    assert desired.dependency_urls(p, p.service("api"), ports) == {
        "db": "http://127.0.0.1:5500",
        "billing": "https://billing.staging.example",
    }
    assert desired.dependency_urls(p, p.service("web"), ports) == {"api": "http://127.0.0.1:41000"}
    tool_urls = desired.dependency_urls(p, p.service("tool"), ports)
    assert tool_urls == {}
    assert desired.unreachable(p.service("tool"), tool_urls) == ["search"]
    assert desired.unreachable(p.service("api"), {"db": "x", "billing": "y"}) == []


def test_dependency_url_uses_the_dependency_scheme() -> None:
    p = project(
        {
            "tls": {"command": "srv", "port": 8443, "scheme": "https"},
            "app": {"command": "app", "depends_on": ["tls"]},
        }
    )
    assert desired.dependency_urls(p, p.service("app"), {"tls": 8443}) == {
        "tls": "https://127.0.0.1:8443"
    }


def test_local_dependency_without_a_port_yet_falls_back_or_has_no_url() -> None:
    p = project(
        {
            "api": {"command": "api", "fallback": "http://api.staging:80/"},
            "db": {"command": "db"},
            "web": {"command": "web", "depends_on": ["api", "db"]},
        }
    )
    urls = desired.dependency_urls(p, p.service("web"), {})
    assert urls == {"api": "http://api.staging:80"}
    assert desired.unreachable(p.service("web"), urls) == ["db"]


# ------------------------------------------------------------------ launch_env / launch_argv

BASE = {"PATH": "/usr/bin", "HOME": "/home/dev", "LOG_LEVEL": "info", "PORT": "1"}


def test_launch_env_layers_base_then_service_then_devmesh() -> None:
    p = project(SHOP)
    env = desired.launch_env(
        BASE, p, p.service("api"), port=41000, urls={"db": "http://127.0.0.1:5500"}
    )
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/dev",
        "LOG_LEVEL": "debug",
        "PORT": "41000",
        "DB": "http://127.0.0.1:5500/main",
        "DB_URL": "http://127.0.0.1:5500",
        "DEVMESH_SERVICE": "api",
        "DEVMESH_PROJECT": "shop",
    }


def test_launch_env_runtime_names_win_over_the_service_env() -> None:
    p = project({"a": {"command": "a", "env": {"PORT": "80", "X": "${PORT}"}}})
    env = desired.launch_env({}, p, p.service("a"), port=9000, urls={})
    assert env["PORT"] == "9000"
    assert env["X"] == "9000"


@pytest.mark.parametrize(
    ("value", "port", "urls", "expected"),
    [
        ("${PORT}", 8080, {}, "8080"),
        ("${API_URL}/v1", None, {"api": "http://127.0.0.1:5"}, "http://127.0.0.1:5/v1"),
        ("cost: $$5", None, {}, "cost: $5"),
        ("$$PORT", 8080, {}, "$PORT"),
        ("$HOME stays", None, {}, "$HOME stays"),
        ("${API_URL:-http://none}", None, {}, "http://none"),
        ("${PORT}", None, {}, ""),
        ("${DEVMESH_SERVICE}@${DEVMESH_PROJECT}", None, {}, "a@shop"),
    ],
)
def test_launch_env_expansion(value, port, urls, expected) -> None:
    p = project({"a": {"command": "a", "env": {"V": value}}})
    assert desired.launch_env({}, p, p.service("a"), port=port, urls=urls)["V"] == expected


def test_launch_env_does_not_read_the_base_environment_for_templates() -> None:
    """The loader already expanded the user's variables; what is left is devmesh's alone."""
    p = project({"a": {"command": "a", "env": {"V": "${HOME:-unset}"}}})
    assert desired.launch_env(BASE, p, p.service("a"), port=None, urls={})["V"] == "unset"


def test_launch_env_required_runtime_variable_missing_raises() -> None:
    p = project({"a": {"command": "a", "env": {"V": "${API_URL:?api is not reachable}"}}})
    with pytest.raises(interpolate.InterpolationError) as err:
        desired.launch_env({}, p, p.service("a"), port=None, urls={})
    assert "api is not reachable" in str(err.value)


def test_launch_argv_expands_runtime_names() -> None:
    p = project(
        {
            "a": {
                "command": ["srv", "--port=${PORT}", "--api", "${API_URL}", "$$HOME", "${X:-d}"],
            }
        }
    )
    argv = desired.launch_argv(p, p.service("a"), port=7001, urls={"api": "http://127.0.0.1:9"})
    assert argv == ("srv", "--port=7001", "--api", "http://127.0.0.1:9", "$HOME", "d")
    assert desired.launch_argv(p, p.service("a"), port=7001, urls={})[3] == ""


def test_launch_argv_of_a_service_without_command_is_empty() -> None:
    p = project({"remote": {"fallback": "http://x"}})
    assert desired.launch_argv(p, p.service("remote"), port=None, urls={}) == ()


def test_runtime_vars() -> None:
    p = project(SHOP)
    assert desired.runtime_vars(
        p, p.service("web"), port=3000, urls={"api": "http://127.0.0.1:1"}
    ) == {
        "DEVMESH_SERVICE": "web",
        "DEVMESH_PROJECT": "shop",
        "PORT": "3000",
        "API_URL": "http://127.0.0.1:1",
    }
    assert "PORT" not in desired.runtime_vars(p, p.service("web"), port=None, urls={})


# ------------------------------------------------------------------ wants and fingerprints


def _wants(services: dict[str, Any], ports: dict[str, int], urls=None, enabled=None):
    p = project(services)
    return desired.wants_for(p, enabled or list(p.services), ports, urls or {})


def test_wants_for_builds_one_want_per_local_service() -> None:
    urls = {"api": {"db": "http://127.0.0.1:5500"}, "web": {"api": "http://127.0.0.1:41000"}}
    wants = _wants(SHOP, {"db": 5500, "api": 41000, "web": 41001}, urls)
    assert set(wants) == {("shop", "db"), ("shop", "api"), ("shop", "web"), ("shop", "tool")}
    api = wants[("shop", "api")]
    assert api.deps == ((("shop", "db"), model.Condition.HEALTHY),)
    assert wants[("shop", "web")].deps == ((("shop", "api"), model.Condition.STARTED),)
    assert wants[("shop", "tool")].deps == ()
    assert api.restart is model.RestartPolicy.ON_FAILURE
    assert api.max_retries is None
    assert api.spec["port"] == 41000
    assert api.spec["dep_urls"] == {"db": "http://127.0.0.1:5500"}
    assert api.spec["command"] == ["python3", "api.py", "--port", "${PORT}"]
    assert api.fingerprint == desired.fingerprint(api.spec)
    assert len(api.fingerprint) == 16


def test_wants_for_skips_unknown_and_remote_names() -> None:
    wants = _wants(SHOP, {}, enabled=["billing", "ghost", "db"])
    assert list(wants) == [("shop", "db")]


def test_wants_carry_restart_settings() -> None:
    svc = {"a": {"command": "a", "restart": {"policy": "always", "max_retries": 4}}}
    w = _wants(svc, {})[("shop", "a")]
    assert (w.restart, w.max_retries) == (model.RestartPolicy.ALWAYS, 4)


def _fp(services: dict[str, Any], ports=None, urls=None) -> str:
    return _wants(services, ports or {"a": 8000}, urls)[("shop", "a")].fingerprint


BASE_SVC: dict[str, Any] = {"command": "srv --x", "env": {"K": "1"}, "port": "auto"}


def _with(**changes: Any) -> dict[str, Any]:
    return {"a": {**BASE_SVC, **changes}}


@pytest.mark.parametrize(
    "same",
    [
        _with(command=["srv", "--x"]),
        _with(env={"K": 1}),
        _with(share=True),
        _with(fallback="http://elsewhere"),
        _with(restart={"policy": "on-failure"}),
        {"a": {"env": {"K": "1"}, "port": "auto", "command": "srv --x"}},
    ],
)
def test_fingerprint_stable_across_spelling_and_routing_only_fields(same) -> None:
    assert _fp(same) == _fp({"a": BASE_SVC})


@pytest.mark.parametrize(
    "changed",
    [
        _with(command="srv --y"),
        _with(env={"K": "2"}),
        _with(env={"K": "1", "L": "1"}),
        _with(health={"http": "/healthz"}),
        _with(restart={"policy": "always"}),
        _with(cwd="sub"),
        _with(branch="feature"),  # the process sees it as DEVMESH_BRANCH
    ],
)
def test_fingerprint_changes_with_what_needs_a_restart(changed) -> None:
    assert _fp(changed) != _fp({"a": BASE_SVC})


def test_fingerprint_changes_with_picked_port_and_dependency_url() -> None:
    svc = {"a": {**BASE_SVC, "depends_on": ["b"]}, "b": {"command": "b"}}
    base = _fp(svc, {"a": 8000}, {"a": {"b": "http://127.0.0.1:1"}})
    assert _fp(svc, {"a": 8000}, {"a": {"b": "http://127.0.0.1:1"}}) == base
    assert _fp(svc, {"a": 8001}, {"a": {"b": "http://127.0.0.1:1"}}) != base
    assert _fp(svc, {"a": 8000}, {"a": {"b": "http://127.0.0.1:2"}}) != base


def test_fixed_port_equal_to_the_picked_one_is_no_change() -> None:
    """The spec holds the port the process gets, not how it was chosen."""
    assert _fp(_with(port=8000), {"a": 8000}) == _fp({"a": BASE_SVC}, {"a": 8000})
    assert _fp(_with(port=8001), {"a": 8001}) != _fp({"a": BASE_SVC}, {"a": 8000})


def test_base_environment_is_not_part_of_the_fingerprint() -> None:
    """`up` from another shell must not restart anything: base env never reaches wants."""
    p = project({"a": BASE_SVC})
    w1 = desired.wants_for(p, ["a"], {"a": 8000}, {})
    env1 = desired.launch_env({"OLDPWD": "/x"}, p, p.service("a"), port=8000, urls={})
    env2 = desired.launch_env({"OLDPWD": "/y"}, p, p.service("a"), port=8000, urls={})
    assert env1 != env2
    assert desired.wants_for(p, ["a"], {"a": 8000}, {}) == w1


def test_spec_diff_names_the_changed_key_for_the_planner() -> None:
    old = _wants({"a": BASE_SVC}, {"a": 8000})[("shop", "a")]
    new = _wants(_with(env={"K": "2"}, command="srv --y"), {"a": 8001})[("shop", "a")]
    assert plan.changed_keys(old.spec, new.spec) == ["command", "env.K", "port"]
    seen = plan.Seen(
        key=old.key, phase=plan.Phase.RUNNING, fingerprint=old.fingerprint, spec=old.spec
    )
    p = plan.plan({new.key: new}, {seen.key: seen}, 0.0)
    assert [a.describe() for a in p.actions] == [
        "shop/a: stop - restart: command, env.K, port changed"
    ]


def test_fingerprint_is_order_independent() -> None:
    assert desired.fingerprint({"a": 1, "b": {"x": 1, "y": 2}}) == desired.fingerprint(
        {"b": {"y": 2, "x": 1}, "a": 1}
    )
    assert desired.fingerprint({"a": 1}) != desired.fingerprint({"a": 2})


def test_fixed_port_is_in_the_want_even_when_the_agent_picked_none() -> None:
    """The agent's port map holds only `port: auto` picks; a fixed port must still reach the
    want, or the running instance (started on it) looks changed on every round."""
    wants = _wants(SHOP, {"api": 41000}, enabled=["db", "api"])
    assert wants[("shop", "db")].spec["port"] == 5500
    assert wants[("shop", "api")].spec["port"] == 41000


# ------------------------------------------------------------------ who gets a port


@pytest.mark.parametrize(
    ("doc", "wants_port", "health"),
    [
        ({"command": "w"}, True, model.HealthKind.TCP),  # no health: checked on its port
        ({"command": "w", "port": 9000}, True, model.HealthKind.TCP),
        ({"command": "w", "port": "auto", "health": {"tcp": False}}, True, model.HealthKind.NONE),
        ({"command": "w", "health": {"http": "/h"}}, True, model.HealthKind.HTTP),
        ({"command": "w", "health": {"tcp": True}}, True, model.HealthKind.TCP),
        ({"command": "w", "health": {"tcp": False}}, False, model.HealthKind.NONE),
        ({"command": "w", "health": {"command": "true"}}, False, model.HealthKind.COMMAND),
        ({"fallback": "https://x.example"}, False, model.HealthKind.NONE),  # not run here
    ],
)
def test_which_services_get_a_port(doc, wants_port, health) -> None:
    svc = project({"w": doc}).services["w"]
    assert (svc.wants_port, svc.effective_health.kind) == (wants_port, health)
    # the normalised document keeps the meaning
    again = model.from_document(
        model.to_document(project({"w": doc})), directory="/srv/shop", default_name="shop"
    )
    assert again.services["w"].wants_port == wants_port


def test_a_service_without_a_port_gives_no_url_edge_or_port() -> None:
    proj = project(
        {
            "worker": {"command": "w", "health": {"tcp": False}},
            "api": {"command": "a", "depends_on": ["worker"]},
        }
    )
    ports = {"worker": 7001, "api": 7002}  # a port kept from before the rule changed
    assert desired.local_edges(proj, ["api", "worker"]) == []
    assert desired.dependency_urls(proj, proj.services["api"], ports) == {}
    wants = desired.wants_for(proj, ["api", "worker"], ports, {})
    assert wants[("shop", "worker")].spec["port"] is None
    env = desired.launch_env({}, proj, proj.services["worker"], port=None, urls={})
    assert "PORT" not in env

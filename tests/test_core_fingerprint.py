"""The restart fingerprint: the same for every spelling of one spec, different when a restart
is needed (the agent restarts a running service exactly when it changes)."""

from __future__ import annotations

from typing import Any

import pytest

from devmesh.core import desired, model


def svc(**doc: Any) -> model.Service:
    base: dict[str, Any] = {"version": "1.0.0", "command": "./api --port ${PORT}"}
    base.update(doc)
    project = model.from_document(
        {"version": 1, "services": {"api": base}}, directory="/p", default_name="p"
    )
    return project.service("api")


def digest(**doc: Any) -> str:
    s = svc(**doc)
    return desired.fingerprint(desired.instance_spec(s, port=s.port, urls={}))


def test_stable_across_spellings():
    assert digest() == digest(command=["./api", "--port", "${PORT}"])
    assert digest(command="a 'b c'") == digest(command=["a", "b c"])
    assert digest(env={"A": "1", "B": "2"}) == digest(env={"B": "2", "A": 1})
    assert digest(depends_on=["db"]) == digest(depends_on={"db": None})
    assert digest(depends_on=["db"]) == digest(depends_on={"db": {"condition": "started"}})
    assert digest(port="auto") == digest()
    assert digest(restart={"policy": "on-failure"}) == digest()
    assert digest(cwd="sub/../sub") == digest(cwd="./sub")


def test_key_order_does_not_matter():
    a = {"version": "1.0.0", "command": "x", "env": {"K": "v"}, "port": 9000}
    b = dict(reversed(list(a.items())))
    assert digest(**a) == digest(**b)


@pytest.mark.parametrize(
    "change",
    [
        {"command": "./api --port ${PORT} --verbose"},
        {"env": {"A": "1"}},
        {"port": 9000},
        {"version": "1.0.1"},
        {"cwd": "other"},
        {"health": {"http": "/healthz"}},
        {"depends_on": {"db": "^2"}},
        {"stop": {"grace_s": 3}},
        {"branch": "main"},  # the process sees it as DEVMESH_BRANCH
    ],
)
def test_changes_that_need_a_restart_change_the_hash(change: dict[str, Any]):
    assert digest(**change) != digest()


@pytest.mark.parametrize(
    "change",
    [{"share": True}, {"fallback": "https://staging.example.com"}],
)
def test_routing_only_changes_keep_the_hash(change: dict[str, Any]):
    assert digest(**change) == digest()


def test_env_value_change_changes_the_hash():
    assert digest(env={"A": "1"}) != digest(env={"A": "2"})


def test_port_and_dependency_urls_are_part_of_the_fingerprint():
    s = svc()
    base = desired.fingerprint(desired.instance_spec(s, port=9000, urls={}))
    assert base != desired.fingerprint(desired.instance_spec(s, port=9001, urls={}))
    with_dep = desired.instance_spec(s, port=9000, urls={"db": "http://127.0.0.1:1"})
    assert base != desired.fingerprint(with_dep)

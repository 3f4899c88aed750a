"""The catalog document (core.catalog): bounded, validated, and never crashes on hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmesh.core import catalog

NODE = "ab" * 16


def doc(*services: dict[str, object], **top: object) -> bytes:
    body: dict[str, object] = {"version": 1, "node": NODE, "services": list(services)}
    body.update(top)
    return json.dumps(body).encode()


def svc(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "api",
        "project": "shop",
        "version": "2.3.1",
        "branch": None,
        "health": "healthy",
    }
    base.update(changes)
    return base


def test_round_trip_and_revision_is_stable_under_order() -> None:
    a = catalog.SharedService(name="api", project="shop", version="2.3.1", health="healthy")
    b = catalog.SharedService(name="web", project="shop", version="1.0.0-rc.1", branch="feat/x")
    one = catalog.Catalog(node_id=NODE, services=(a, b))
    two = catalog.Catalog(node_id=NODE, services=(b, a))
    assert one.revision == two.revision
    assert catalog.encode(one) == catalog.encode(two)
    back = catalog.decode(catalog.encode(one), node_id=NODE)
    assert set(back.services) == {a, b}
    assert back.revision == one.revision
    changed = catalog.Catalog(node_id=NODE, services=(a,))
    assert changed.revision != one.revision


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[1]", "expected an object"),
        (b"[" * 100_000, "not JSON"),
        (doc(version=2), "version: expected 1"),
        (doc(version=True), "version: expected 1"),
        (doc(node="cd" * 16), "is not the peer that served it"),
        (doc(node=5), "node: expected a node id"),
        (doc(extra=1), "unknown keys extra"),
        (doc(services={}), "services: expected a list"),
        (doc(svc(version="2.x")), "services[0].version: expected semver, got '2.x'"),
        (doc(svc(version=3)), "services[0].version: expected a semver version"),
        (doc(svc(name="API")), "services[0].name: expected a service name"),
        (doc(svc(name="a" * 5000)), "services[0].name: expected a service name"),
        (doc(svc(project=None)), "services[0].project: expected a project name, got NoneType"),
        (doc(svc(branch="bad branch!")), "services[0].branch"),
        (doc(svc(health="great")), "services[0].health: expected one of"),
        (doc(svc(), svc(cmd="rm -rf /")), "services[1]: unknown keys cmd"),
        (doc(*[svc()] * (catalog.MAX_SERVICES + 1)), "entries, at most"),
        (doc(svc(), pad="x" * catalog.MAX_CATALOG_BYTES), "over"),
        (doc(5), "services[0]: expected an object"),
    ],
)
def test_bad_catalogs_are_refused_path_first(data: bytes, problem: str) -> None:
    with pytest.raises(catalog.CatalogError) as err:
        catalog.decode(data, node_id=NODE)
    assert problem in str(err.value)


def test_every_problem_is_listed_but_the_list_is_bounded() -> None:
    with pytest.raises(catalog.CatalogError) as err:
        catalog.decode(doc(*[svc(version="x", health="?")] * 200), node_id=NODE)
    assert 20 <= len(err.value.problems) <= 25


def test_encode_refuses_what_peers_would_refuse() -> None:
    bad = catalog.Catalog(
        node_id=NODE,
        services=(catalog.SharedService(name="api", project="shop", version="latest"),),
    )
    with pytest.raises(catalog.CatalogError, match="semver"):
        catalog.encode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        catalog.decode(data, node_id=NODE)
    except catalog.CatalogError:
        pass


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 2, "1"]), "node": st.sampled_from([NODE, "x"])},
        optional={
            "services": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": st.one_of(st.sampled_from(["api", "web"]), JSONISH),
                        "project": st.one_of(st.just("shop"), JSONISH),
                        "version": st.one_of(
                            st.sampled_from(["1.2.3", "2.0.0-rc.1", "1.2"]), JSONISH
                        ),
                        "branch": st.one_of(st.none(), st.just("main"), JSONISH),
                        "health": st.one_of(st.sampled_from(catalog.HEALTH_VALUES), JSONISH),
                    },
                ),
                max_size=5,
            )
        },
    )
)
def test_hostile_documents_are_refused_or_valid(document: dict[str, object]) -> None:
    data = json.dumps(document).encode()
    try:
        got = catalog.decode(data, node_id=NODE)
    except catalog.CatalogError as exc:
        assert exc.problems
        return
    # Accepted: then it is within every bound and re-encodes to an accepted document.
    assert len(got.services) <= catalog.MAX_SERVICES
    assert catalog.decode(catalog.encode(got), node_id=NODE) == got

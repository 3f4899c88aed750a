"""Branch extraction from headers, baggage and host: tables for every rule, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmesh.core import branches
from devmesh.core.branches import Source

PROJECTS = ("shop", "billing")


@pytest.mark.parametrize(
    "name",
    ["main", "feat/login", "release-2.3", "fix_1", "a", "Feature/X.y", "a" * 128, "user/a/b-c"],
)
def test_valid_branch_names(name) -> None:
    assert branches.problem(name) is None


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "empty"),
        ("a" * 129, "longer than 128"),
        ("feat login", "may only hold"),
        ("feat~1", "may only hold"),
        ("a:b", "may only hold"),
        ("a@{b", "may only hold"),
        ("ünï", "may only hold"),
        ("-x", "start with '-'"),
        ("feat/", "end with"),
        ("feat.", "end with"),
        ("a..b", "'..'"),
        ("a//b", "empty path component"),
        ("/a", "empty path component"),
        ("a/.hidden", "starting with '.'"),
        (".a", "starting with '.'"),
        ("x.lock", ".lock"),
        ("x.lock/y", ".lock"),
    ],
)
def test_invalid_branch_names_say_why(name, words) -> None:
    message = branches.problem(name)
    assert message is not None
    assert words in message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-Devmesh-Branch", "feat/login")], ("feat/login", Source.HEADER)),
        ([(b"x-devmesh-branch", b"  feat  ")], ("feat", Source.HEADER)),
        ([("X-DEVMESH-BRANCH", "a"), ("x-devmesh-branch", "a")], ("a", Source.HEADER)),
        ([("baggage", "devmesh-branch=feat")], ("feat", Source.BAGGAGE)),
        (
            [("baggage", "k1=v1, devmesh-branch = feat%2Flogin ;prop=1;flag")],
            ("feat/login", Source.BAGGAGE),
        ),
        ([("baggage", "k1=v1"), ("Baggage", "devmesh-branch=b2")], ("b2", Source.BAGGAGE)),
        ([("baggage", "devmesh-branch=one,devmesh-branch=two")], ("one", Source.BAGGAGE)),
        # a malformed member is skipped, the valid one still counts
        ([("baggage", "bad key=1,=x,noequals,devmesh-branch=ok")], ("ok", Source.BAGGAGE)),
        ([("baggage", 'devmesh-branch="quoted",devmesh-branch=ok')], ("ok", Source.BAGGAGE)),
        ([("baggage", "devmesh-branch=%zz,devmesh-branch=ok")], ("ok", Source.BAGGAGE)),
        ([("baggage", "devmesh-branch=%ff%fe,devmesh-branch=ok")], ("ok", Source.BAGGAGE)),
        # a property named like the key is not the key
        ([("baggage", "other=1;devmesh-branch=no")], (None, Source.NONE)),
        ([("baggage", "devmesh-branch-x=no")], (None, Source.NONE)),
        # header beats baggage beats host
        (
            [
                ("host", "api.feat.localhost"),
                ("baggage", "devmesh-branch=bag"),
                ("x-devmesh-branch", "hdr"),
            ],
            ("hdr", Source.HEADER),
        ),
        (
            [("host", "api.feat.localhost"), ("baggage", "devmesh-branch=bag")],
            ("bag", Source.BAGGAGE),
        ),
        ([("host", "api.feat.localhost")], ("feat", Source.HOST)),
        ([("host", "API.Feat-2.LOCALHOST:7780")], ("feat-2", Source.HOST)),
        ([("host", "api.feat.shop.localhost")], ("feat", Source.HOST)),
        # the project form wins over a branch of the same name
        ([("host", "api.shop.localhost")], (None, Source.NONE)),
        ([("host", "api.shop.shop.localhost")], ("shop", Source.HOST)),
        ([("host", "api.localhost")], (None, Source.NONE)),
        ([("host", "a.b.c.d.localhost")], (None, Source.NONE)),
        ([("host", "api.feat.example.com")], (None, Source.NONE)),
        ([("host", "127.0.0.1:7780")], (None, Source.NONE)),
        ([], (None, Source.NONE)),
    ],
)
def test_extract(headers, expected) -> None:
    got = branches.extract(headers, projects=PROJECTS)
    assert (got.name, got.source) == expected
    assert got.error is None


def test_explicit_host_argument_overrides_header_host() -> None:
    got = branches.extract([("host", "api.localhost")], "api.feat.localhost", projects=PROJECTS)
    assert (got.name, got.source) == ("feat", Source.HOST)


@pytest.mark.parametrize(
    ("headers", "source", "words"),
    [
        ([("x-devmesh-branch", "a..b")], Source.HEADER, "'..'"),
        ([("x-devmesh-branch", "")], Source.HEADER, "empty"),
        ([("x-devmesh-branch", "a"), ("x-devmesh-branch", "b")], Source.HEADER, "conflicting"),
        ([("baggage", "devmesh-branch=feat%20x")], Source.BAGGAGE, "may only hold"),
        ([("host", "api.-x.localhost")], Source.HOST, "not a branch name"),
        ([("host", "api.feat-.localhost")], Source.HOST, "not a branch name"),
    ],
)
def test_an_invalid_name_is_an_error_not_the_default(headers, source, words) -> None:
    got = branches.extract(headers, projects=PROJECTS)
    assert got.name is None
    assert got.source is source
    assert got.error is not None
    assert words in got.error


def test_an_invalid_header_does_not_fall_through_to_baggage() -> None:
    got = branches.extract(
        [("x-devmesh-branch", "bad name"), ("baggage", "devmesh-branch=ok")], projects=PROJECTS
    )
    assert got.error is not None
    assert got.name is None


def test_baggage_entries_parse_whitespace_properties_and_encoding() -> None:
    assert branches.baggage_entries([" a = 1 ;p ; q=2 , b=%E2%82%AC\t", b"c=x%3Dy,d", "e="]) == [
        ("a", "1"),
        ("b", "€"),
        ("c", "x=y"),
        ("e", ""),
    ]


header_text = st.one_of(st.text(max_size=200), st.binary(max_size=200))


@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(["X-Devmesh-Branch", "baggage", "host", "Host", "x"]),
                header_text,
            ),
            header_text,
        ),
        max_size=8,
    ),
    st.one_of(st.none(), header_text),
)
def test_never_raises_on_arbitrary_headers(headers, host) -> None:
    got = branches.extract(headers, host, projects=PROJECTS)
    if got.name is not None:
        assert branches.is_valid(got.name)
        assert got.error is None
    else:
        assert got.source is Source.NONE or got.error is not None


@given(st.from_regex(r"[a-z0-9]([a-z0-9/._-]{0,30}[a-z0-9])?", fullmatch=True))
def test_a_valid_name_round_trips_through_header_and_baggage(name) -> None:
    if not branches.is_valid(name):
        return
    assert branches.extract([("x-devmesh-branch", name)]).name == name
    encoded = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in name)
    assert branches.extract([("baggage", f"k=v,devmesh-branch={encoded};p")]).name == name

"""Semver ranges: npm's documented desugarings and its range-include/exclude fixtures."""

from __future__ import annotations

import pytest
import semver
from hypothesis import given
from hypothesis import strategies as st

from devmesh.core import versions


def npm_form(text: str) -> str:
    """The range as node-semver prints ``new Range(text).range``."""
    r = versions.parse_range(text)
    return " || ".join(" ".join(str(c) for c in s) or "*" for s in r.alternatives)


# From node-semver's README ("Advanced Range Syntax"), with includePrerelease off.
DESUGAR = [
    ("1.2.3 - 2.3.4", ">=1.2.3 <=2.3.4"),
    ("1.2 - 2.3.4", ">=1.2.0 <=2.3.4"),
    ("1.2.3 - 2.3", ">=1.2.3 <2.4.0-0"),
    ("1.2.3 - 2", ">=1.2.3 <3.0.0-0"),
    ("*", "*"),
    ("", "*"),
    ("1.x", ">=1.0.0 <2.0.0-0"),
    ("1.2.x", ">=1.2.0 <1.3.0-0"),
    ("1.2.*", ">=1.2.0 <1.3.0-0"),
    ("1", ">=1.0.0 <2.0.0-0"),
    ("1.x.x", ">=1.0.0 <2.0.0-0"),
    ("1.2", ">=1.2.0 <1.3.0-0"),
    ("~1.2.3", ">=1.2.3 <1.3.0-0"),
    ("~1.2", ">=1.2.0 <1.3.0-0"),
    ("~1", ">=1.0.0 <2.0.0-0"),
    ("~0.2.3", ">=0.2.3 <0.3.0-0"),
    ("~0.2", ">=0.2.0 <0.3.0-0"),
    ("~0", ">=0.0.0 <1.0.0-0"),
    ("~1.2.3-beta.2", ">=1.2.3-beta.2 <1.3.0-0"),
    ("^1.2.3", ">=1.2.3 <2.0.0-0"),
    ("^0.2.3", ">=0.2.3 <0.3.0-0"),
    ("^0.0.3", ">=0.0.3 <0.0.4-0"),
    ("^1.2.3-beta.2", ">=1.2.3-beta.2 <2.0.0-0"),
    ("^0.0.3-beta", ">=0.0.3-beta <0.0.4-0"),
    ("^1.2.x", ">=1.2.0 <2.0.0-0"),
    ("^0.0.x", ">=0.0.0 <0.1.0-0"),
    ("^0.0", ">=0.0.0 <0.1.0-0"),
    ("^1.x", ">=1.0.0 <2.0.0-0"),
    ("^0.x", ">=0.0.0 <1.0.0-0"),
    ("^1.4", ">=1.4.0 <2.0.0-0"),
    (">=1.2.3 <2", ">=1.2.3 <2.0.0-0"),
    (">= 1.2.3   <  2", ">=1.2.3 <2.0.0-0"),
    ("=1.2.3", "=1.2.3"),
    ("v1.2.3", "=1.2.3"),
    (">1", ">=2.0.0"),
    (">1.2", ">=1.3.0"),
    ("<=1.2", "<1.3.0-0"),
    ("<1.2", "<1.2.0-0"),
    ("<*", "<0.0.0-0"),
    ("~>1.2", ">=1.2.0 <1.3.0-0"),
    ("1.2.3 || >=3 <4", "=1.2.3 || >=3.0.0 <4.0.0-0"),
    ("1.x || ", "*"),
]


@pytest.mark.parametrize(("text", "expected"), DESUGAR)
def test_desugars_like_node_semver(text: str, expected: str) -> None:
    assert npm_form(text) == expected


# From node-semver's test/fixtures/range-include.js (non-loose, no includePrerelease).
INCLUDE = [
    ("1.0.0 - 2.0.0", "1.2.3"),
    ("^1.2.3+build", "1.2.3"),
    ("^1.2.3+build", "1.3.0"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3-pre.2"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "2.4.3-alpha"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3"),
    ("1.0.0", "1.0.0"),
    (">=*", "0.2.4"),
    ("", "1.0.0"),
    ("*", "1.2.3"),
    (">=1.0.0", "1.0.0"),
    (">1.0.0", "1.0.1"),
    ("<=2.0.0", "2.0.0"),
    ("<=2.0.0", "1.9999.9999"),
    ("<2.0.0", "0.2.9"),
    (">= 1.0.0", "1.0.0"),
    ("<\t2.0.0", "0.2.9"),
    (">=0.1.97", "v0.1.97"),
    ("0.1.20 || 1.2.4", "1.2.4"),
    (">=0.2.3 || <0.0.1", "0.0.0"),
    (">=0.2.3 || <0.0.1", "0.2.4"),
    ("||", "1.3.4"),
    ("2.x.x", "2.1.3"),
    ("1.2.x || 2.x", "2.1.3"),
    ("x", "1.2.3"),
    ("2.*.*", "2.1.3"),
    ("2", "2.1.2"),
    ("2.3", "2.3.1"),
    ("~0.0.1", "0.0.2"),
    ("~x", "0.0.9"),
    ("~2.4", "2.4.5"),
    ("~>3.2.1", "3.2.2"),
    ("~> 1", "1.2.3"),
    ("~ 1.0", "1.0.2"),
    ("~ 1.0.3", "1.0.12"),
    ("< 1.2", "1.1.1"),
    ("~v0.5.4-pre", "0.5.5"),
    ("~v0.5.4-pre", "0.5.4"),
    ("=0.7.x", "0.7.2"),
    ("<=0.7.x", "0.7.2"),
    (">=0.7.x", "0.7.2"),
    ("~1.2.1 >=1.2.3", "1.2.3"),
    ("~1.2.1 1.2.3 >=1.2.3", "1.2.3"),
    ("^1.2.3", "1.8.1"),
    ("^0.1", "0.1.2"),
    ("^0.0.1", "0.0.1"),
    ("^1.2 ^1", "1.4.2"),
    ("^1.2.3-alpha", "1.2.3-pre"),
    ("^0.0.1-alpha", "0.0.1-beta"),
    ("^0.0.1-alpha", "0.0.1"),
    ("^x", "1.2.3"),
    ("x - 1.0.0", "0.9.7"),
    ("x - 1.x", "0.9.7"),
    ("1.0.0 - x", "1.9.7"),
    ("1.x - x", "1.9.7"),
    ("<=7.x", "7.9.9"),
]

# From node-semver's test/fixtures/range-exclude.js (non-loose, no includePrerelease).
EXCLUDE = [
    ("1.0.0 - 2.0.0", "2.2.3"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3-pre.2"),
    ("1.2.3+asdf - 2.4.3+asdf", "2.4.3-alpha"),
    ("^1.2.3+build", "2.0.0"),
    ("^1.2.3", "1.2.3-pre"),
    ("^1.2", "1.2.0-pre"),
    (">1.2", "1.3.0-beta"),
    ("<=1.2.3", "1.2.3-beta"),
    ("=0.7.x", "0.7.0-asdf"),
    (">=0.7.x", "0.7.0-asdf"),
    ("1.0.0", "1.0.1"),
    (">=1.0.0", "0.1.0"),
    ("<=2.0.0", "2.2.9"),
    ("<2.0.0", "2.9999.9999"),
    (">=0.1.97", "v0.1.93"),
    ("0.1.20 || 1.2.4", "1.2.3"),
    (">=0.2.3 || <0.0.1", "0.0.3"),
    ("2.x.x", "3.1.3"),
    ("1.2.x || 2.x", "1.1.3"),
    ("2", "1.1.2"),
    ("2.3", "2.4.1"),
    ("~0.0.1", "0.1.0-alpha"),
    ("~2.4", "2.5.0"),
    ("~>3.2.1", "3.2.0"),
    ("~1.0", "1.1.0"),
    ("<1", "1.0.0"),
    ("~v0.5.4-beta", "0.5.4-alpha"),
    ("<0.7.x", "0.7.2"),
    ("<1.2.3", "1.2.3-beta"),
    ("=1.2.3", "1.2.3-beta"),
    (">1.2", "1.2.8"),
    ("^0.0.1", "0.0.2"),
    ("^1.2.3", "2.0.0-alpha"),
    ("^1.2", "1.1.9"),
    ("*", "v1.2.3-foo"),
    ("^1.0.0", "2.0.0-rc1"),
    ("1 - 2", "2.0.0-pre"),
    ("1.0 - 2", "1.0.0-pre"),
    ("1.1.x", "1.1.0-a"),
    ("1.x", "1.2.0-a"),
    (">=1.0.0 <1.1.0", "1.1.0-pre"),
    (">*", "1.0.0"),
    # The `-0` upper bound keeps 2.0.0 prereleases out even when the set names one.
    ("^1.2.3 <=2.0.0-rc.1", "2.0.0-rc.0"),
]


@pytest.mark.parametrize(("text", "version"), INCLUDE)
def test_range_includes(text: str, version: str) -> None:
    assert versions.satisfies(version, text)
    assert versions.parse_range(text).contains(versions.parse_version(version))


@pytest.mark.parametrize(("text", "version"), EXCLUDE)
def test_range_excludes(text: str, version: str) -> None:
    assert not versions.satisfies(version, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2.x.1", "'2.x.1' is not a semver version (expected MAJOR.MINOR.PATCH, e.g. 2.3.1)"),
        ("2.3", "'2.3' is not a semver version (expected MAJOR.MINOR.PATCH, e.g. 2.3.1)"),
        ("01.2.3", "'01.2.3' is not a semver version (expected MAJOR.MINOR.PATCH, e.g. 2.3.1)"),
        ("", "'' is not a semver version (expected MAJOR.MINOR.PATCH, e.g. 2.3.1)"),
    ],
)
def test_parse_version_errors(text: str, message: str) -> None:
    with pytest.raises(versions.VersionError) as info:
        versions.parse_version(text)
    assert str(info.value) == message


def test_parse_version_accepts_leading_v() -> None:
    assert versions.parse_version("v2.3.1-rc.1+b7") == semver.Version(2, 3, 1, "rc.1", "b7")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (">=2 <<3", "invalid range '>=2 <<3': unexpected '<<3'"),
        ("1.2.3.4", "invalid range '1.2.3.4': unexpected '1.2.3.4'"),
        ("^banana", "invalid range '^banana': unexpected '^banana'"),
        (">==1", "invalid range '>==1': unexpected '>==1'"),
        ("1.2-2.3", "invalid range '1.2-2.3': unexpected '1.2-2.3'"),
        ("^1.2.3 -", "invalid range '^1.2.3 -': unexpected '-'"),
        ("1 || 2 && 3", "invalid range '1 || 2 && 3': unexpected '&&'"),
    ],
)
def test_parse_range_errors(text: str, message: str) -> None:
    with pytest.raises(versions.VersionError) as info:
        versions.parse_range(text)
    assert str(info.value) == message


def test_contains_rejects_malformed_version_string() -> None:
    with pytest.raises(versions.VersionError, match=r"^'1\.2' is not a semver version"):
        versions.parse_range("^1").contains("1.2")


def test_range_keeps_text() -> None:
    r = versions.parse_range("^2.1")
    assert r.text == "^2.1"
    assert str(r) == "^2.1"
    assert r.desugared() == ">=2.1.0 <3.0.0"
    assert r.contains("2.9.9")
    assert not r.contains(semver.Version(3, 0, 0))


@pytest.mark.parametrize(
    ("version", "text", "explanation"),
    [
        ("2.3.1", "^2.1", "2.3.1 satisfies ^2.1"),
        ("3.0.0", "^2.1", "3.0.0 is outside ^2.1 (needs >=2.1.0 <3.0.0)"),
        (
            "0.9.0",
            "1.x || >=3 <4",
            "0.9.0 is outside 1.x || >=3 <4 (needs >=1.0.0 <2.0.0 || >=3.0.0 <4.0.0)",
        ),
        ("1.0.0", "", "1.0.0 satisfies *"),
        (
            "2.5.0-beta.1",
            "^2.1",
            "2.5.0-beta.1 is outside ^2.1 (needs >=2.1.0 <3.0.0; "
            "a prerelease only matches a range that names a 2.5.0 prerelease)",
        ),
        ("2.5.0-beta.1", ">=2.5.0-beta.0 <3", "2.5.0-beta.1 satisfies >=2.5.0-beta.0 <3"),
    ],
)
def test_compatible_explanation(version: str, text: str, explanation: str) -> None:
    assert versions.compatible_explanation(version, text) == explanation


releases = st.builds(
    semver.Version,
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
)
prereleases = st.one_of(
    st.none(), st.sampled_from(["0", "1", "alpha", "alpha.1", "beta.2", "rc.0", "rc.10"])
)
any_versions = st.builds(
    semver.Version,
    st.integers(0, 6),
    st.integers(0, 6),
    st.integers(0, 6),
    prereleases,
)


@given(releases)
def test_caret_and_tilde_contain_their_base(v: semver.Version) -> None:
    assert versions.parse_range(f"^{v}").contains(v)
    assert versions.parse_range(f"~{v}").contains(v)
    assert versions.parse_range(f"{v.major}.{v.minor}").contains(v)
    assert versions.parse_range(str(v)).contains(v)


@given(st.integers(1, 5), st.integers(0, 5), st.integers(0, 5), any_versions)
def test_caret_equals_explicit_bounds_above_zero(
    major: int, minor: int, patch: int, w: semver.Version
) -> None:
    caret = versions.parse_range(f"^{major}.{minor}.{patch}")
    explicit = versions.parse_range(f">={major}.{minor}.{patch} <{major + 1}.0.0")
    assert caret.contains(w) == explicit.contains(w)


@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), any_versions)
def test_desugared_text_means_the_same_range(
    major: int, minor: int, patch: int, w: semver.Version
) -> None:
    for text in (f"^{major}.{minor}", f"~{major}.{minor}.{patch}", f"{major}.x || >{patch}"):
        r = versions.parse_range(text)
        assert versions.parse_range(r.desugared()).contains(w) == r.contains(w)


@given(any_versions)
def test_parse_version_round_trips(v: semver.Version) -> None:
    assert versions.parse_version(str(v)) == v
    assert versions.parse_version(f"v{v}") == v

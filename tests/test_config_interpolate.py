"""${VAR} expansion: every compose form, the deferred runtime names, the two-pass contract."""

from __future__ import annotations

import pytest

from devmesh.core import interpolate

ENV = {"A": "alpha", "EMPTY": "", "DOLLAR": "a$b"}


def expand(text: str, **kw) -> str:
    return interpolate.expand(text, ENV.get, **kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "alpha"),
        ("x-${A}-y", "x-alpha-y"),
        ("${UNSET}", ""),
        ("${UNSET:-dflt}", "dflt"),
        ("${EMPTY:-dflt}", "dflt"),
        ("${EMPTY-dflt}", ""),
        ("${UNSET-dflt}", "dflt"),
        ("${A:-dflt}", "alpha"),
        ("${A:?needed}", "alpha"),
        ("${EMPTY?needed}", ""),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${UNSET:-${A}/x}", "alpha/x"),
        ("$$", "$"),
        ("$${A}", "${A}"),
        ("cost $5 and $HOME", "cost $5 and $HOME"),
        ("${DOLLAR}", "a$b"),
        ("trailing $", "trailing $"),
    ],
)
def test_forms(text: str, expected: str):
    assert expand(text) == expected


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        (
            "${UNSET:?set UNSET first}",
            "required variable UNSET is missing a value: set UNSET first",
            0,
        ),
        ("ab${EMPTY:?}", "required variable EMPTY is missing a value (it is empty)", 2),
        ("${UNSET?}", "required variable UNSET is missing a value (it is not set)", 0),
        ("x ${A", "missing '}' to close '${A'", 2),
        ("${}", "empty variable name in '${}'", 0),
        ("${1A}", "invalid variable name in '${1A}'", 0),
    ],
)
def test_errors_carry_message_and_offset(text: str, message: str, offset: int):
    with pytest.raises(interpolate.InterpolationError) as info:
        expand(text)
    assert info.value.message == message
    assert info.value.offset == offset
    assert str(info.value) == f"{message} (at offset {offset})"


def test_unknown_operator_names_the_accepted_forms():
    with pytest.raises(interpolate.InterpolationError) as info:
        expand("${A b}")
    assert info.value.message.startswith("invalid variable name or operator in '${A b}'")


def test_kept_names_stay_verbatim_defaults_included():
    keep = {"PORT", "API_URL"}.__contains__
    assert (
        expand("--port ${PORT} ${API_URL:-x} ${A}", keep=keep)
        == "--port ${PORT} ${API_URL:-x} alpha"
    )


def test_two_passes_never_reread_a_value_as_a_template():
    env = {"TRICK": "${PORT}", "A": "alpha"}
    first = interpolate.expand(
        "$$ ${TRICK} ${PORT} ${A}", env.get, keep={"PORT"}.__contains__, keep_escapes=True
    )
    assert first == "$$ $${PORT} ${PORT} alpha"
    second = interpolate.expand(first, {"PORT": "8080"}.get)
    assert second == "$ ${PORT} 8080 alpha"


def test_on_unset_is_told_about_plain_unset_names_only():
    seen: list[str] = []
    expand("${UNSET} ${OTHER:-d} ${A}", on_unset=seen.append)
    assert seen == ["UNSET"]


def test_runtime_names_include_each_dependency_url():
    assert interpolate.url_variable("auth-api") == "AUTH_API_URL"
    assert interpolate.runtime_names(["db", "auth-api"]) == {
        "PORT",
        "DEVMESH_SERVICE",
        "DEVMESH_PROJECT",
        "DATABASE_URL",
        "DB_URL",
        "AUTH_API_URL",
    }

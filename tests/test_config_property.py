"""Property: any valid document -> model -> to_document validates again and round-trips.

The strategy builds documents from the schema's shape (every key, both spellings of
command and depends_on, every health kind), respecting the rules the schema cannot say
(unique fixed ports, dependencies on known services without cycles, semver). It also
round-trips through YAML text and the real loader, which exercises the marks builder.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmesh.config import checks, loader, marks, schema
from devmesh.core import branches, model

# Hypothesis writes a patch of the failing example with libcst, whose import warns; that
# warning must not hide the real failure under filterwarnings=error.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict:DeprecationWarning")

NAMES = ["api", "web", "db", "auth-svc", "w2", "x"]
VERSIONS = st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}{pre}",
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(0, 20),
    st.sampled_from(["", "-rc.1", "-beta"]),
)
RANGES = st.sampled_from(["^1.4", "~2.3.0", ">=2 <3", "1.x", "1.2 - 1.5", "*", "^0.2.1 || 3.x"])
WORD = st.text(string.ascii_letters + string.digits + "-_./:", min_size=1, max_size=8)
ENV_NAME = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,6}\Z")
ENV_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), WORD, st.just("no"))
SECONDS = st.sampled_from([0.05, 0.5, 1, 2.5, 10])


def optional(
    d: dict[str, Any], **values: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """d plus any subset of the given keys."""
    return st.fixed_dictionaries(d, optional=values)


def health() -> st.SearchStrategy[dict[str, Any]]:
    timings = {
        "interval_s": SECONDS,
        "timeout_s": SECONDS,
        "retries": st.integers(1, 5),
        "start_period_s": st.sampled_from([0, 1.5, 30]),
    }
    return st.one_of(
        optional({"http": st.sampled_from(["/", "/healthz", "/a/b?c=1"])}, **timings),
        optional({"tcp": st.booleans()}, **timings),
        optional(
            {
                "command": st.one_of(
                    st.lists(WORD, min_size=1, max_size=3), st.just("check --fast 'a b'")
                )
            },
            **timings,
        ),
    )


@st.composite
def depends_on(draw: st.DrawFn, earlier: list[str]) -> Any:
    names = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
    if draw(st.booleans()):
        return names
    spec = st.one_of(
        st.none(),
        RANGES,
        optional({}, version=RANGES, condition=st.sampled_from(["started", "healthy"])),
    )
    return {n: draw(spec) for n in names}


@st.composite
def service(draw: st.DrawFn, earlier: list[str], port: int | None) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    runs = draw(st.booleans())
    if runs or draw(st.booleans()):
        doc["version"] = draw(VERSIONS)
    if runs:
        doc["command"] = draw(
            st.one_of(
                st.lists(WORD, min_size=1, max_size=4), st.just("python -m http.server ${PORT}")
            )
        )
        doc["port"] = port if port is not None else draw(st.sampled_from(["auto", None]))
        if doc["port"] is None:
            del doc["port"]
    extra = draw(
        optional(
            {},
            cwd=st.sampled_from(["sub", "./a/b", "../up"]),
            scheme=st.sampled_from(["http", "https"]),
            env=st.dictionaries(ENV_NAME, ENV_VALUE, max_size=3),
            health=health(),
            depends_on=depends_on(earlier),
            restart=optional(
                {},
                policy=st.sampled_from(["no", "on-failure", "always"]),
                max_retries=st.integers(0, 9),
                backoff_s=SECONDS,
            ),
            stop=optional({}, signal=st.sampled_from(["SIGTERM", "SIGINT"]), grace_s=SECONDS),
            share=st.booleans(),
            branch=st.sampled_from(["auto", "main", "feature/x"]),
            fallback=st.sampled_from(["https://staging.example.com", "http://127.0.0.1:9"]),
            db=optional(
                {"engine": st.sampled_from(["postgres", "sqlite"])},
                version=st.sampled_from(["15", 16]),
                provider=st.sampled_from(["auto", "native", "docker"]),
                name=st.sampled_from(["app", "shop_db"]),
            ),
        )
    )
    doc.update(extra)
    return doc


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    ports = draw(
        st.lists(
            st.one_of(st.none(), st.integers(1024, 65535)),
            min_size=len(names),
            max_size=len(names),
            unique_by=lambda p: p or object(),
        )
    )
    services = {}
    for i, name in enumerate(names):
        services[name] = draw(service(names[:i], ports[i]))
    doc = draw(
        optional(
            {"version": st.just(1)},
            project=st.sampled_from(["shop", "a", "team-42"]),
            proxy=optional({}, port=st.integers(1, 65535), https_port=st.integers(1, 65535)),
            mesh=optional(
                {},
                name=st.just("team"),
                node_name=st.sampled_from(["ana", "ben-xps"]),
                port=st.integers(1, 65535),
                discovery=optional(
                    {},
                    broadcast=st.booleans(),
                    interfaces=st.sampled_from([["auto"], ["lo"]]),
                    port=st.integers(1, 65535),
                    interval_s=st.sampled_from([0.1, 2, 30]),
                    peers=st.sampled_from([[], ["127.0.0.1:7702", "[::1]:7702"]]),
                    mdns=st.booleans(),
                ),
                allow=st.sampled_from([["*"], ["alice", "10.0.0.0/8"]]),
            ),
            policy=optional(
                {},
                versions=st.sampled_from(["warn", "reject"]),
                prefer=st.sampled_from(["local", "peer", "fallback"]),
                balance=st.sampled_from(["round_robin", "random", "first"]),
            ),
        )
    )
    if services or draw(st.booleans()):
        doc["services"] = services
    return doc


def assert_valid(doc: dict[str, Any]) -> None:
    problems = schema.problems(doc, marks.Marks(), "doc") + checks.check(doc, marks.Marks(), "doc")
    assert [p for p in problems if p.is_error] == []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_document_model_document_round_trip(doc: dict[str, Any]):
    assert_valid(doc)
    first = model.from_document(doc, directory="/proj/here", default_name="here")
    normal = model.to_document(first)
    assert_valid(normal)
    second = model.from_document(normal, directory="/proj/here", default_name="here")
    assert second == first
    assert model.to_document(second) == normal
    for name, svc in first.services.items():
        assert model.restart_spec(svc) == model.restart_spec(second.services[name])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_yaml_text_through_the_loader_gives_the_same_model(doc: dict[str, Any]):
    text = yaml.safe_dump(doc, sort_keys=False)
    path = Path("/nonexistent-devmesh-test/here/devmesh.yaml")
    loaded = loader.load(path, environ={"PORT": "must-not-be-used"}, text=text)
    expected = model.from_document(
        doc, directory=str(path.parent), default_name="here", source=str(path)
    )
    assert loaded.project == expected


# -- interpolation as compose does it --------------------------------------------------------

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
TYPED_FILE = """\
version: 1
services:
  api:
    version: 1.0.0
    command: ./api
    port: ${P}
    branch: "${B}"
    env:
      S: ${S}
"""
PORT_AT = (6, 11)
SERVICE_TEXT = "services:\n  api:\n    version: 1.0.0\n    command: ./api\n"


def _load(environ: dict[str, str]) -> loader.Loaded:
    path = Path("/nonexistent-devmesh-test/typed/devmesh.yaml")
    return loader.load(path, environ=environ, text=TYPED_FILE)


BRANCH_LIKE = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,30}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT, st.one_of(ANY_TEXT, BRANCH_LIKE))
def test_a_variable_in_a_string_field_is_that_text_and_never_changes_the_structure(
    secret: str, branch: str
):
    environ = {"S": secret, "P": "8080", "B": branch}
    if branch != "auto" and branches.problem(branch) is not None:
        # Text that is no branch name is an error at the branch, and only there.
        with pytest.raises(loader.ConfigError) as info:
            _load(environ)
        errors = [(p.line, p.column, p.path) for p in info.value.problems if p.is_error]
        assert errors == [(7, 13, "services.api.branch")]
        return
    loaded = _load(environ)
    api = loaded.project.service("api")
    assert api.env["S"] == secret.replace("$", "$$")  # kept literal through start time
    assert api.branch == branch
    assert set(loaded.document) == {"version", "services"}
    assert set(loaded.document["services"]["api"]) == {
        "version",
        "command",
        "port",
        "branch",
        "env",
    }


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.integers(-10, 70_000).map(str), ANY_TEXT, st.just("")))
def test_a_variable_in_a_port_is_the_integer_or_an_error_at_the_port(text: str):
    environ = {"S": "s", "P": text, "B": "main"}
    if re.fullmatch(r"\+?[0-9]+", text) and 1 <= int(text) <= 65535:
        assert _load(environ).project.service("api").port == int(text)
        return
    with pytest.raises(loader.ConfigError) as info:
        _load(environ)
    errors = [p for p in info.value.problems if p.is_error]
    assert [(p.line, p.column, p.path) for p in errors] == [(*PORT_AT, "services.api.port")]
    assert errors[0].message.endswith("(from '${P}')")


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"\A[a-z][a-z0-9 ._/=-]{0,20}\Z"), st.sampled_from(["", '"', "'"]))
def test_a_malformed_expression_is_reported_at_the_column_of_its_dollar(prefix: str, quote: str):
    line = f"    command: {quote}{prefix} ${{BAD{quote}"
    text = f"version: 1\nservices:\n  api:\n    version: 1.0.0\n{line}\n"
    with pytest.raises(loader.ConfigError) as info:
        loader.load(Path("/nonexistent-devmesh-test/p/devmesh.yaml"), environ={}, text=text)
    [problem] = info.value.problems
    assert (problem.line, problem.column) == (5, line.index("${") + 1)


@settings(max_examples=60, deadline=None)
@given(st.from_regex(r"\A[A-Z][A-Z0-9_]{0,8}\Z"))
def test_an_unset_variable_is_an_empty_string_with_one_warning_naming_it(name: str):
    text = f"version: 1\n{SERVICE_TEXT}    env:\n      V: ${{{name}}}\n"
    loaded = loader.load(Path("/nonexistent-devmesh-test/u/devmesh.yaml"), environ={}, text=text)
    assert loaded.project.service("api").env["V"] == ""
    unset = [w for w in loaded.warnings if "is not set" in w.message]
    assert [(w.line, w.column, w.path) for w in unset] == [(7, 10, "services.api.env.V")]
    assert unset[0].message.startswith(f"variable {name} is not set")

"""Every invalid fixture prints exactly its .expected text; the valid one loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.config import loader

FIXTURES = Path(__file__).parent / "fixtures" / "config"
INVALID = sorted(p.stem for p in (FIXTURES / "invalid").glob("*.yaml"))


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIXTURES)
    return FIXTURES


@pytest.mark.parametrize("name", INVALID)
def test_invalid_fixture_reports_exactly_the_expected_problems(in_fixtures: Path, name: str):
    expected = (in_fixtures / "invalid" / f"{name}.expected").read_text().rstrip("\n")
    with pytest.raises(loader.ConfigError) as info:
        loader.load(f"invalid/{name}.yaml", environ={})
    assert str(info.value) == expected
    lines = [(p.line, p.column) for p in info.value.problems]
    assert lines == sorted(lines)


def test_every_error_kind_has_a_fixture():
    kinds = {
        "unknown_key",
        "wrong_types",
        "unknown_dependency",
        "cycle",
        "bad_semver",
        "port_clash",
        "duplicate_key",
        "not_yaml",
        "not_mapping",
        "unsupported_version",
        "missing_version",
        "env_file_missing",
        "interpolation",
        "health_kinds",
        "empty",
        "many",
    }
    assert kinds <= set(INVALID)


def test_problem_fields_locate_the_unknown_key_itself(in_fixtures: Path):
    with pytest.raises(loader.ConfigError) as info:
        loader.load("invalid/unknown_key.yaml", environ={})
    first = info.value.problems[0]
    assert first == loader.Problem(
        file="invalid/unknown_key.yaml",
        line=6,
        column=5,
        path="services.api.healthcheck",
        message="unknown key 'healthcheck'; did you mean 'health'?",
        severity="error",
    )


def test_semantic_checks_run_alongside_schema_errors(in_fixtures: Path):
    with pytest.raises(loader.ConfigError) as info:
        loader.load("invalid/many.yaml", environ={})
    messages = [p.message for p in info.value.problems]
    assert any(m.startswith("expected a name of lower-case") for m in messages)  # schema
    assert any(m.startswith("port 3000 is already used") for m in messages)  # semantic
    assert any(m.startswith("unknown service 'cart'") for m in messages)  # semantic
    assert info.value.project == "Shop_App"
    assert info.value.services == ("web", "api")


def test_unsupported_version_stops_before_other_checks(in_fixtures: Path):
    with pytest.raises(loader.ConfigError) as info:
        loader.load("invalid/unsupported_version.yaml", environ={})
    assert [p.path for p in info.value.problems] == ["version"]


def test_missing_file_is_one_problem_about_the_whole_file(in_fixtures: Path):
    with pytest.raises(loader.ConfigError) as info:
        loader.load("invalid/nope.yaml", environ={})
    assert str(info.value) == "invalid/nope.yaml: file not found"
    assert info.value.problems[0].line == 0


def test_valid_fixture_builds_the_model(in_fixtures: Path):
    loaded = loader.load("valid/devmesh.yaml", environ={"NODE_NAME": "ben"})
    assert [(p.path, p.message.split(":")[0]) for p in loaded.warnings] == []
    assert loaded.file == "valid/devmesh.yaml"
    project = loaded.project
    assert project.name == "shop"
    assert project.directory == str(in_fixtures / "valid")
    assert project.mesh is not None and project.mesh.node_name == "ben"
    api = project.service("api")
    assert api.port == 8081  # ${API_PORT} from .env, typed as an integer
    assert api.command == (
        "python",
        "-m",
        "http.server",
        "${PORT}",
        "--bind",
        "127.0.0.1",
    )
    assert api.restart.policy.value == "no"  # unquoted `no` is the policy, not false
    assert api.env_file == ("app.env",)
    assert dict(api.env) == {
        "LOG_LEVEL": "debug",
        "GREETING": "hello\tworld",
        "RAW": "$$NOT_EXPANDED $${X}",  # env_file text is escaped for the start-time pass
        "OVERRIDDEN": "from-env",
        "MODE": "0755",  # as written, not octal 493
        "DOTENV": "dotenv-value",
        "SHADOW": "dotenv",
        "PRICE": "$$5",
        "DB": "${DATABASE_URL}",
        "AUTH": "${AUTH_URL}",
    }
    assert loaded.document["services"]["api"]["env"] == dict(api.env)
    auth = project.service("auth")
    assert auth.runs_here is False and auth.fallback == "https://auth.staging.example.com"

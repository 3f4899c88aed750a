"""The loader end to end on files in a temp folder: interpolation, .env, stdin, finding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from devmesh.config import loader

BASE = """\
version: 1
services:
  api:
    version: 1.0.0
    command: ./api --port ${PORT} --auth ${AUTH_URL} --db ${DB_URL} --home ${HOME_DIR}
    port: ${API_PORT:-8080}
    share: ${SHARE:-false}
    env:
      SELF: ${DEVMESH_SERVICE}/${DEVMESH_PROJECT}
      DATA: ${DATABASE_URL}
      OTHER_URL: ${OTHER_URL:-none}
      GREETING: ${GREETING-hi}
    health:
      command: [check, "${PORT}", "${HOME_DIR}"]
    depends_on:
      auth: ^1
      db: ~2.0
  auth:
    version: 1.2.0
  db:
    version: 2.0.1
"""


def write(folder: Path, text: str, name: str = "devmesh.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write(tmp_path / "My Shop_2", BASE)


def test_runtime_names_are_deferred_others_interpolated(project: Path):
    loaded = loader.load(project, environ={"HOME_DIR": "/h", "API_PORT": "9000"})
    api = loaded.project.service("api")
    assert api.command == (
        "./api",
        "--port",
        "${PORT}",
        "--auth",
        "${AUTH_URL}",
        "--db",
        "${DB_URL}",
        "--home",
        "/h",
    )
    assert api.port == 9000
    assert api.share is False
    assert dict(api.env) == {
        "SELF": "${DEVMESH_SERVICE}/${DEVMESH_PROJECT}",
        "DATA": "${DATABASE_URL}",
        "OTHER_URL": "none",  # not a dependency of api: interpolated at load
        "GREETING": "hi",
    }
    assert api.health is not None and api.health.command == ("check", "${PORT}", "/h")


def test_project_name_from_the_folder_is_normalised(project: Path):
    loaded = loader.load(project, environ={"HOME_DIR": "/h"})
    assert loaded.project.name == "my-shop-2"
    assert loaded.file == "My Shop_2/devmesh.yaml"
    assert loaded.project.source == str(project)


def test_environment_wins_over_dotenv(project: Path):
    (project.parent / ".env").write_text("API_PORT=7001\nHOME_DIR=/from-dotenv\nSHARE=true\n")
    loaded = loader.load(project, environ={"API_PORT": "7002"})
    api = loaded.project.service("api")
    assert api.port == 7002
    assert api.share is True
    assert api.command is not None and api.command[-1] == "/from-dotenv"


def test_quoted_or_not_a_variable_takes_the_type_of_its_field(tmp_path: Path):
    """As compose: the substituted text is cast by the field's type, however it is quoted."""
    path = write(tmp_path, BASE.replace("port: ${API_PORT:-8080}", 'port: "${API_PORT:-8080}"'))
    assert loader.load(path, environ={"HOME_DIR": "/h"}).project.service("api").port == 8080


def test_unset_variable_is_a_warning_once(project: Path):
    loaded = loader.load(project, environ={})
    assert [(p.line, p.path, p.message, p.severity) for p in loaded.warnings] == [
        (
            5,
            "services.api.command",
            "variable HOME_DIR is not set (in the environment or .env); using an empty string",
            "warning",
        )
    ]


def test_mesh_secret_is_refused_and_says_where_the_secret_comes_from(tmp_path: Path):
    path = write(tmp_path, "version: 1\nmesh:\n  secret: hunter2\n")
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={})
    assert [(p.line, p.column, p.path, p.message) for p in info.value.problems] == [
        (
            3,
            3,
            "mesh.secret",
            "the team secret comes from the bundle, not from devmesh.yaml: run "
            "`devmesh mesh join FILE` (or `devmesh mesh init`) and delete this key",
        ),
    ]


def test_stdin_uses_cwd_for_name_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "From Stdin"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / ".env").write_text("V=from-dotenv\n")
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("version: 1\nservices:\n  a: {fallback: 'http://${V}'}\n")
    )
    loaded = loader.load("-", environ={})
    assert loaded.file == "<stdin>"
    assert loaded.project.name == "from-stdin"
    assert loaded.project.directory == str(folder)
    assert loaded.project.service("a").fallback == "http://from-dotenv"


def test_stdin_problems_are_shown_as_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loader.ConfigError) as info:
        loader.load("<stdin>", text="version: 1\nservices: 3\n", environ={})
    assert str(info.value) == "<stdin>:2:11: services: expected a mapping, got 3"


def test_find_config_walks_up_and_accepts_yml(tmp_path: Path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    write(tmp_path / "a", "version: 1\n", "devmesh.yml")
    assert loader.find_config(deep) == tmp_path / "a" / "devmesh.yml"
    write(tmp_path / "a" / "b", "version: 1\n")
    assert loader.find_config(deep) == tmp_path / "a" / "b" / "devmesh.yaml"


def test_find_config_names_the_start_when_nothing_is_found(tmp_path: Path):
    with pytest.raises(loader.ConfigNotFound) as info:
        loader.find_config(tmp_path)
    assert str(info.value) == (
        f"no devmesh.yaml or devmesh.yml in {tmp_path} or any parent folder; "
        "pass -f FILE (or -f - for stdin)"
    )
    assert isinstance(info.value, loader.ConfigUnusable)


def test_env_file_merge_order_and_parse_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.env").write_text("A=1\nB=1\n")
    (tmp_path / "two.env").write_text("B=2\nC=2\n")
    path = write(
        tmp_path, "version: 1\nservices:\n  s:\n    env_file: [one.env, two.env]\n    env: {C: 3}\n"
    )
    assert dict(loader.load(path, environ={}).project.service("s").env) == {
        "A": "1",
        "B": "2",
        "C": "3",
    }
    (tmp_path / "two.env").write_text("B=2\nnot a line\n")
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={})
    assert (
        str(info.value)
        == "two.env:2:1: services.s.env_file[1]: expected KEY=VALUE, got 'not a line'"
    )


def test_nested_duplicate_keys_and_anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    text = (
        "version: 1\n"
        "x-common: &common {version: 1.0.0, share: true}\n"
        "services:\n"
        "  a:\n"
        "    <<: *common\n"
        "    share: false\n"
        "    env: {K: 1, K: 2}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={})
    assert str(info.value) == (
        "devmesh.yaml:2:1: x-common: unknown key 'x-common'; expected one of: "
        "version, project, proxy, metrics, mesh, policy, services\n"
        "devmesh.yaml:7:17: services.a.env.K: duplicate key 'K' (first at line 7, column 11)"
    )


def test_interpolation_error_points_at_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "version: 1\nproject: ${NAME:?set NAME}\n")
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={})
    assert (
        str(info.value)
        == "devmesh.yaml:2:10: project: required variable NAME is missing a value: set NAME"
    )
    assert loader.load(path, environ={"NAME": "named"}).project.name == "named"


def test_command_with_an_unbalanced_quote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    text = (
        "version: 1\nservices:\n  a:\n    version: 1.0.0\n    command: echo \"it's\n"
        '    health: {command: "check \'x"}\n'
    )
    path = write(tmp_path, text)
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={})
    assert str(info.value) == (
        "devmesh.yaml:5:14: services.a.command: cannot split the command into words: "
        "no closing quotation\n"
        "devmesh.yaml:6:23: services.a.health.command: cannot split the command into words: "
        "no closing quotation"
    )


# -- interpolation as compose does it: on scalar values, typed by the field ------------------

TYPED = """\
version: 1
project: ${PROJECT:-typed}
mesh:
  node_name: ${NODE:-ana}
services:
  api:
    version: 1.0.0
    command: ./api
    cwd: ${DIR:-.}
    port: ${P:-auto}
    share: ${SHARE:-false}
    branch: ${BRANCH:-main}
    health:
      http: /healthz
      interval_s: "${INTERVAL:-1}"
      retries: ${RETRIES:-3}
"""


def test_unset_variable_is_an_empty_string_never_null(tmp_path: Path):
    text = "version: 1\nservices:\n  api:\n    version: 1.0.0\n    command: ./api\n"
    text += "    env:\n      TOKEN: ${API_TOKEN}\n"
    loaded = loader.load(write(tmp_path, text), environ={})
    assert loaded.project.service("api").env["TOKEN"] == ""
    assert [(p.line, p.column, p.path, p.message) for p in loaded.warnings] == [
        (
            7,
            14,
            "services.api.env.TOKEN",
            "variable API_TOKEN is not set (in the environment or .env); using an empty string",
        )
    ]


def test_numbers_and_booleans_convert_only_where_the_field_takes_them(tmp_path: Path):
    environ = {
        "PROJECT": "123",  # a name: stays the text "123"
        "NODE": "0755",
        "P": "8080",
        "SHARE": "Yes",
        "BRANCH": "1.10",  # a string field: not the number 1.1
        "DIR": "a: b",  # never a mapping
        "INTERVAL": "2.5",
        "RETRIES": "+4",
    }
    loaded = loader.load(write(tmp_path, TYPED), environ=environ)
    project, api = loaded.project, loaded.project.service("api")
    assert project.name == "123"
    assert project.mesh is not None and project.mesh.node_name == "0755"  # a name: text
    assert (api.port, api.share, api.branch) == (8080, True, "1.10")
    assert api.cwd == str(tmp_path / "a: b")
    assert api.health is not None
    assert (api.health.interval_s, api.health.retries) == (2.5, 4)
    assert loaded.document["services"]["api"]["port"] == 8080


def test_text_that_does_not_fit_its_field_is_reported_with_what_was_written(tmp_path: Path):
    path = write(tmp_path, TYPED)
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={"P": "eighty", "SHARE": "maybe", "RETRIES": "3.5"})
    errors = [p for p in info.value.problems if p.is_error]
    assert loader.report.render(errors) == (
        f"{path}:10:11: services.api.port: expected an integer or 'auto', "
        "got 'eighty' (from '${P:-auto}')\n"
        f"{path}:11:12: services.api.share: expected true or false, got 'maybe' "
        "(from '${SHARE:-false}')\n"
        f"{path}:16:16: services.api.health.retries: expected an integer, got '3.5' "
        "(from '${RETRIES:-3}')"
    )


@pytest.mark.parametrize(
    ("line", "column"),
    [
        ("    command: ./api --x ${BAD", 24),
        ('    command: "./api --x ${BAD"', 25),
        ("    command: './api --x ${BAD'", 25),
        ("    command: [./api, --x, '${BAD']", 28),
    ],
)
def test_a_malformed_expression_is_reported_at_its_column(tmp_path: Path, line: str, column: int):
    text = f"version: 1\nservices:\n  api:\n    version: 1.0.0\n{line}\n"
    with pytest.raises(loader.ConfigError) as info:
        loader.load(write(tmp_path, text), environ={})
    [problem] = info.value.problems
    assert (problem.line, problem.column) == (5, column)
    assert text.splitlines()[4][column - 1 :].startswith("${BAD")


def test_env_file_compose_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.env").write_text("A=base\nB=base\n")
    (tmp_path / "local.env").write_text("B=local\n")
    text = (
        "version: 1\nservices:\n  s:\n    env_file:\n      - base.env\n"
        "      - {path: local.env, required: false}\n"
        "      - path: absent.env\n        required: ${REQUIRED:-false}\n"
    )
    path = write(tmp_path, text)
    service = loader.load(path, environ={}).project.service("s")
    assert dict(service.env) == {"A": "base", "B": "local"}
    assert service.env_file == ("base.env", "local.env", "absent.env")
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={"REQUIRED": "true"})
    assert str(info.value) == (
        "devmesh.yaml:7:15: services.s.env_file[2].path: env file 'absent.env' not found "
        "(looked for absent.env); write {path: FILE, required: false} for a file that may "
        "be absent"
    )


def test_env_file_long_form_is_checked_by_the_schema(tmp_path: Path):
    text = "version: 1\nservices:\n  s:\n    env_file: [{required: false, pth: a.env}]\n"
    with pytest.raises(loader.ConfigError) as info:
        loader.load(write(tmp_path, text), environ={})
    assert [(p.line, p.column, p.path, p.message) for p in info.value.problems] == [
        (4, 16, "services.s.env_file[0]", "missing required key 'path'"),
        (4, 34, "services.s.env_file[0].pth", "unknown key 'pth'; did you mean 'path'?"),
    ]


def test_a_semantic_error_in_an_interpolated_value_is_at_the_value(tmp_path: Path):
    text = (
        "version: 1\nservices:\n  api: {version: 1.0.0}\n  web:\n    version: 1.0.0\n"
        "    depends_on:\n      api: {version: '${RANGE}'}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(loader.ConfigError) as info:
        loader.load(path, environ={"RANGE": "^^2"})
    assert [(p.line, p.column, p.path, p.message) for p in info.value.problems] == [
        (
            7,
            22,
            "services.web.depends_on.api.version",
            "invalid version range: invalid range '^^2': unexpected '^^2' (from '${RANGE}')",
        )
    ]

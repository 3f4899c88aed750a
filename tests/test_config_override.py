"""Override files: several devmesh files merged in order, as compose merges them.

The loader end to end on files in a temp folder: how mappings, scalars and sequences merge,
the order of keys, which file and line each problem names, the override found beside the
file without -f (and not with it), compose's !reset and !override tags.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.config import loader, report

BASE = """\
version: 1
project: shop
services:
  api:
    version: 1.0.0
    command: python -m api ${PORT}
    share: true
    env:
      LOG: info
      MODE: dev
    depends_on: [auth, db]
    fallback: https://api.staging.example.com
  auth:
    version: 2.0.0
  db:
    version: 3.0.0
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "devmesh.yaml", BASE)
    return tmp_path


def load(*files: str, environ: dict[str, str] | None = None) -> loader.Loaded:
    return loader.load_files(loader.config_files(list(files) or None), environ=environ or {})


def errors(*files: str) -> list[str]:
    with pytest.raises(loader.ConfigError) as caught:
        load(*files)
    return [report.render_one(p) for p in caught.value.problems]


def rendered(*files: str) -> str:
    with pytest.raises(loader.ConfigError) as caught:
        load(*files)
    return str(caught.value)


def test_mappings_merge_key_by_key_scalars_and_sequences_replace(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        """\
services:
  api:
    share: false
    env:
      MODE: test
      EXTRA: "1"
    depends_on: [auth]
""",
    )
    loaded = load()
    api = loaded.merged["services"]["api"]
    assert api["share"] is False  # scalar replaced
    assert api["env"] == {"LOG": "info", "MODE": "test", "EXTRA": "1"}  # merged, new key last
    assert api["depends_on"] == ["auth"]  # sequence replaced, not appended
    assert api["fallback"] == "https://api.staging.example.com"  # untouched keys stay
    assert [d.name for d in loaded.project.service("api").depends_on] == ["auth"]
    assert loaded.files == ("devmesh.yaml", "devmesh.override.yaml")


def test_keys_keep_the_order_of_the_file_that_first_wrote_them(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        """\
services:
  worker:
    version: 0.1.0
    command: python -m worker
  api:
    version: 1.1.0
""",
    )
    loaded = load()
    assert list(loaded.merged["services"]) == ["api", "auth", "db", "worker"]
    assert list(loaded.merged["services"]["api"])[:2] == ["version", "command"]
    assert loaded.project.service("api").version == "1.1.0"
    assert loaded.project.service("worker").runs_here


def test_a_type_change_replaces_the_value(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    depends_on: {auth: ^2}\n")
    api = load().project.service("api")
    assert [(d.name, d.version_range) for d in api.depends_on] == [("auth", "^2")]


def test_override_is_found_beside_the_file_without_f_and_not_with_f(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    remote: true\n")
    (folder / "sub").mkdir()
    assert load().project.service("api").remote is True
    assert load("devmesh.yaml").project.service("api").remote is False
    assert load("devmesh.yaml").files == ("devmesh.yaml",)
    # found from a subfolder too: the override sits beside the devmesh.yaml found
    files = loader.config_files(None, folder / "sub")
    assert files == [folder / "devmesh.yaml", folder / "devmesh.override.yaml"]


def test_several_f_merge_in_order_the_last_wins(folder: Path):
    write(folder, "one.yaml", "services:\n  api:\n    version: 1.5.0\n    share: false\n")
    write(folder, "two.yaml", "services:\n  api:\n    version: 1.6.0\n")
    loaded = load("devmesh.yaml", "one.yaml", "two.yaml")
    assert loaded.project.service("api").version == "1.6.0"
    assert loaded.project.service("api").share is False
    assert load("devmesh.yaml", "two.yaml", "one.yaml").project.service("api").version == "1.5.0"


def test_an_error_in_a_value_from_the_override_names_the_override_and_its_line(folder: Path):
    write(
        folder, "devmesh.override.yaml", "services:\n  api:\n    env:\n      X: 1\n    port: nope\n"
    )
    assert errors() == [
        "devmesh.override.yaml:5:11: services.api.port: expected an integer or 'auto', got 'nope'"
    ]


def test_an_error_in_the_base_still_names_the_base(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    share: false\n")
    (folder / "devmesh.yaml").write_text(BASE.replace("    share: true\n", "    sharee: true\n"))
    [problem] = errors()
    assert problem.startswith("devmesh.yaml:7:5: services.api.sharee: unknown key 'sharee'")


def test_an_override_that_fixes_a_base_value_leaves_no_problem(folder: Path):
    (folder / "devmesh.yaml").write_text(BASE.replace("version: 2.0.0", "version: two"))
    assert errors("devmesh.yaml")[0].startswith("devmesh.yaml:14:14: services.auth.version")
    write(folder, "fix.yaml", "services:\n  auth:\n    version: 2.0.1\n")
    assert load("devmesh.yaml", "fix.yaml").project.service("auth").version == "2.0.1"


def test_a_problem_between_files_points_at_both(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        "services:\n  api:\n    depends_on:\n      auth: ^3\n",
    )
    loaded = load()
    [warning] = loaded.warnings
    assert warning.file == "devmesh.override.yaml" and warning.line == 4
    assert "(services.auth.version at devmesh.yaml:14:14)" in warning.message


def test_an_interpolated_value_in_the_override_is_interpolated(folder: Path):
    write(folder, ".env", "API_VERSION=1.9.0\n")
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    version: ${API_VERSION}\n")
    assert load().project.service("api").version == "1.9.0"
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    version: ${API_VERSION\n")
    assert (
        "devmesh.override.yaml:3:14: services.api.version: missing '}' to close '${API_VERSION'"
        in errors()
    )


def test_an_unset_variable_in_the_override_warns_there(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    env:\n      T: ${NOPE}\n")
    [warning] = load().warnings
    assert (warning.file, warning.line, warning.path) == (
        "devmesh.override.yaml",
        4,
        "services.api.env.T",
    )


def test_yaml_errors_in_several_files_are_all_reported(folder: Path):
    write(folder, "devmesh.yaml", "version: 1\nservices: [\n")
    write(folder, "devmesh.override.yaml", "services:\n  api: {\n")
    problems = errors()
    assert [p.split(":")[0] for p in problems] == ["devmesh.override.yaml", "devmesh.yaml"]
    assert all("not valid YAML" in p for p in problems)


def test_a_missing_file_given_with_f_is_named(folder: Path):
    with pytest.raises(loader.ConfigError) as caught:
        load("devmesh.yaml", "devmesh.local.yaml")
    assert str(caught.value) == "devmesh.local.yaml: file not found"
    assert caught.value.files == ("devmesh.yaml", "devmesh.local.yaml")


def test_an_override_that_is_not_a_mapping_is_refused(folder: Path):
    write(folder, "devmesh.override.yaml", "- api\n")
    assert errors() == [
        "devmesh.override.yaml:1:1: expected a mapping of keys (services, ...) at the top of "
        "the file, got a list"
    ]


def test_an_empty_override_changes_nothing(folder: Path):
    write(folder, "devmesh.override.yaml", "# services:\n#   api: {remote: true}\n")
    assert load().project.service("api").runs_here


def test_a_partial_service_that_no_earlier_file_has_is_refused_clearly(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  apii:\n    remote: true\n")
    [problem] = errors()
    assert problem.startswith(
        "devmesh.override.yaml:2:3: services.apii: service 'apii' is in no earlier file, and "
        "devmesh.override.yaml gives it only remote: did you mean 'api'?"
    )


def test_an_override_may_add_a_whole_service(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        "services:\n  search:\n    project: shop-search\n    fallback: https://s.example.com\n",
    )
    assert load().project.service("search").project == "shop-search"


def test_reset_removes_a_key_and_override_replaces_a_mapping(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        """\
services:
  api:
    fallback: !reset
    env: !override
      ONLY: "1"
""",
    )
    api = load().project.service("api")
    assert api.fallback is None
    assert api.env == {"ONLY": "1"}


def test_the_project_folder_is_the_first_files(folder: Path):
    other = folder / "elsewhere"
    other.mkdir()
    write(other, "extra.yaml", "services:\n  api:\n    env_file: api.env\n")
    write(folder, "api.env", "FROM_FILE=yes\n")
    loaded = load("devmesh.yaml", "elsewhere/extra.yaml")
    assert loaded.project.directory == str(folder)
    assert loaded.project.service("api").env["FROM_FILE"] == "yes"


def test_values_from_the_override_are_read_as_written_there(folder: Path):
    write(
        folder,
        "devmesh.override.yaml",
        "services:\n  api:\n    env:\n      UMASK: 0755\n      DEBUG: yes\n"
        "    restart: {policy: no}\n",
    )
    api = load().project.service("api")
    assert api.env["UMASK"] == "0755" and api.env["DEBUG"] == "yes"
    assert api.restart.policy.value == "no"


def test_duplicate_keys_are_reported_in_their_own_file(folder: Path):
    write(folder, "devmesh.override.yaml", "services:\n  api:\n    share: true\n    share: false\n")
    assert errors() == [
        "devmesh.override.yaml:4:5: services.api.share: duplicate key 'share' "
        "(first at line 3, column 5)"
    ]

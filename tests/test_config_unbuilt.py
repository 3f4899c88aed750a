"""Keys whose feature is not built yet warn at the key, in every command that loads a file;
a dependency range that the declared version does not satisfy warns naming both places and
saying what route selection will do about it.

Every key of the schema is built today (the table is empty): the mechanism is checked with a
row the test adds for the duration of a test, and the routing keys that used to be in the
table are checked to load without a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.config import loader, unbuilt

HEAD = "version: 1\n"
SERVICE = "services:\n  api:\n    version: 1.0.0\n    command: ./api\n"

# The routing keys: built, so any use of them loads without a warning.
ROUTING = [
    HEAD + "policy:\n  versions: reject\n",
    HEAD + "policy:\n  prefer: peer\n",
    HEAD + "policy:\n  prefer: fallback\n",
    HEAD + "policy:\n  balance: round_robin\n",
    HEAD + "policy:\n  balance: least_outstanding\n",
    HEAD + SERVICE + "    branch: auto\n",
    HEAD + SERVICE + "    branch: feature/login\n",
    HEAD + SERVICE + "    fallback: http://127.0.0.1:9\n",
]

# Uses that ask for what already happens: no warning.
WORKS = [
    HEAD + "policy: {versions: warn, prefer: local}\n",
    HEAD + SERVICE + "    share: false\n",
    HEAD + SERVICE + "    share: true\n",
    HEAD + "mesh:\n  name: team\n",
    HEAD
    + "services:\n  auth:\n    version: 2.0.0\n    fallback: https://auth.staging.example.com\n",
]


def warnings_of(tmp_path: Path, text: str) -> list[loader.Problem]:
    (tmp_path / "devmesh.yaml").write_text(text)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # so that the file reads "devmesh.yaml" in messages
    try:
        return loader.load("devmesh.yaml", environ={}).warnings
    finally:
        os.chdir(cwd)


def test_every_key_is_built():
    assert unbuilt.TABLE == ()


@pytest.mark.parametrize("text", ROUTING + WORKS)
def test_a_routing_key_or_a_use_that_works_does_not_warn(tmp_path: Path, text: str):
    assert warnings_of(tmp_path, text) == []


@pytest.fixture
def row_not_built(monkeypatch: pytest.MonkeyPatch) -> unbuilt.Row:
    """A row for ``services.<name>.share: true``, as the table would hold for a new key."""
    row = unbuilt.Row(
        key="services.<name>.share",
        missing="sharing; the service stays private",
        applies=lambda value, _: value is True,
        when="`true`",
    )
    monkeypatch.setattr(unbuilt, "TABLE", (row,))
    return row


def test_a_key_not_built_yet_warns_at_the_key(tmp_path: Path, row_not_built: unbuilt.Row):
    [warning] = warnings_of(tmp_path, HEAD + SERVICE + "    share: true\n")
    assert (warning.line, warning.column) == (6, 5)
    assert warning.path == "services.api.share"
    assert warning.message == f"not built yet: {row_not_built.missing}"
    assert warning.severity == "warning"


def test_a_row_warns_only_for_the_values_it_applies_to(tmp_path: Path, row_not_built: unbuilt.Row):
    assert warnings_of(tmp_path, HEAD + SERVICE + "    share: false\n") == []


VERSIONS = """\
version: 1
policy: {versions: POLICY}
services:
  api:
    version: 1.0.0
    command: ./api
  auth:
    version: 2.3.0
    fallback: https://auth.staging.example.com
  web:
    version: 1.0.0
    command: ./web
    depends_on:
      api: ^2.0
      auth: {version: "~2.2", condition: started}
"""


def test_a_range_the_local_version_does_not_satisfy_warns_naming_both_places(tmp_path: Path):
    found = warnings_of(tmp_path, VERSIONS.replace("POLICY", "warn"))
    assert [(w.line, w.column, w.path, w.message) for w in found] == [
        (
            14,
            12,
            "services.web.depends_on.api",
            "web accepts api ^2.0 (>=2.0.0 <3.0.0), but the local api is 1.0.0 "
            "(services.api.version at devmesh.yaml:5:14); "
            "calls go to a compatible instance on a peer when one is found, "
            "else to this one with a version warning (policy.versions: warn)",
        ),
        (
            15,
            23,
            "services.web.depends_on.auth.version",
            "web accepts auth ~2.2 (>=2.2.0 <2.3.0), but the declared auth is 2.3.0 "
            "(services.auth.version at devmesh.yaml:8:14); "
            "calls go to a compatible instance on a peer when one is found, "
            "else to this one with a version warning (policy.versions: warn)",
        ),
    ]


def test_under_reject_the_warning_says_where_calls_go_instead(tmp_path: Path):
    found = warnings_of(tmp_path, VERSIONS.replace("POLICY", "reject"))
    assert [w.path for w in found] == [
        "services.web.depends_on.api",
        "services.web.depends_on.auth.version",
    ]
    assert found[0].message.endswith(
        "; calls go to a compatible instance on a peer, else they get 409 (policy.versions: reject)"
    )
    assert found[1].message.endswith(
        "; calls go to a compatible instance on a peer, else to its fallback "
        "(policy.versions: reject)"
    )


def test_a_dependency_s_own_versions_rule_is_the_one_named(tmp_path: Path):
    text = VERSIONS.replace("POLICY", "warn").replace(
        "condition: started}", "condition: started, versions: reject}"
    )
    found = warnings_of(tmp_path, text)
    assert found[0].message.endswith("(policy.versions: warn)")
    assert found[1].message.endswith(
        "else to its fallback (services.web.depends_on.auth.versions: reject)"
    )


def test_a_satisfied_range_does_not_warn(tmp_path: Path):
    text = VERSIONS.replace("POLICY", "warn").replace("^2.0", "^1.0").replace("~2.2", "^2.2")
    assert warnings_of(tmp_path, text) == []


# -- the warnings reach every command that loads a file -------------------------------------

FILE = VERSIONS.replace("POLICY", "warn").replace("~2.2", "^2.3")
LINE = (
    "devmesh.yaml:14:12: warning: services.web.depends_on.api: web accepts api ^2.0 "
    "(>=2.0.0 <3.0.0), but the local api is 1.0.0 (services.api.version at devmesh.yaml:5:14); "
    "calls go to a compatible instance on a peer when one is found, else to this one with a "
    "version warning (policy.versions: warn)"
)


def devmesh(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "devmesh.yaml").write_text(FILE)
    home = tmp_path / "home"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DEVMESH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "devmesh", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_validate_prints_the_warning_and_passes(tmp_path: Path):
    result = devmesh(tmp_path, "validate")
    assert result.returncode == 0
    assert result.stderr == LINE + "\n"


def test_validate_json_lists_the_warning(tmp_path: Path):
    result = devmesh(tmp_path, "validate", "--json")
    assert result.returncode == 0
    [problem] = json.loads(result.stdout)["problems"]
    assert problem == {
        "file": "devmesh.yaml",
        "line": 14,
        "column": 12,
        "path": "services.web.depends_on.api",
        "message": LINE.split("services.web.depends_on.api: ", 1)[1],
        "severity": "warning",
    }


def test_up_prints_the_warning_before_anything_else(tmp_path: Path):
    # `up nosuchservice` loads the file, then stops before it starts an agent.
    result = devmesh(tmp_path, "up", "-d", "nosuchservice")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "warning: " + LINE.replace(" warning:", "", 1)
    assert not (tmp_path / "home" / "agent.sock").exists()

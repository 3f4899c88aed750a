"""Keys whose feature is not built yet warn at the key, in every command that loads a file;
a dependency range that the declared version does not satisfy warns naming both places."""

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

# (row key, a file that uses it so that it applies, (line, column) of the key)
APPLIES = [
    ("policy.versions", HEAD + "policy:\n  versions: reject\n", (3, 3)),
    ("policy.prefer", HEAD + "policy:\n  prefer: peer\n", (3, 3)),
    ("policy.balance", HEAD + "policy:\n  balance: round_robin\n", (3, 3)),
    ("services.<name>.branch", HEAD + SERVICE + "    branch: auto\n", (6, 5)),
    ("services.<name>.fallback", HEAD + SERVICE + "    fallback: http://127.0.0.1:9\n", (6, 5)),
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


def test_the_table_is_covered():
    assert {key for key, _, _ in APPLIES} == {row.key for row in unbuilt.TABLE}


@pytest.mark.parametrize(("key", "text", "where"), APPLIES, ids=[a[0] for a in APPLIES])
def test_a_key_not_built_yet_warns_at_the_key(
    tmp_path: Path, key: str, text: str, where: tuple[int, int]
):
    [warning] = warnings_of(tmp_path, text)
    row = next(r for r in unbuilt.TABLE if r.key == key)
    assert (warning.line, warning.column) == where
    assert warning.path == key.replace("<name>", "api")
    assert warning.message == f"not built yet: {row.missing}"
    assert warning.severity == "warning"


@pytest.mark.parametrize("text", WORKS)
def test_a_use_that_works_today_does_not_warn(tmp_path: Path, text: str):
    assert warnings_of(tmp_path, text) == []


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
            "calls go to it anyway (policy.versions: warn)",
        ),
        (
            15,
            23,
            "services.web.depends_on.auth.version",
            "web accepts auth ~2.2 (>=2.2.0 <2.3.0), but the declared auth is 2.3.0 "
            "(services.auth.version at devmesh.yaml:8:14); "
            "calls go to it anyway (policy.versions: warn)",
        ),
    ]


def test_under_reject_the_warning_says_reject_is_not_built(tmp_path: Path):
    found = warnings_of(tmp_path, VERSIONS.replace("POLICY", "reject"))
    assert [w.path for w in found] == [
        "policy.versions",
        "services.web.depends_on.api",
        "services.web.depends_on.auth.version",
    ]
    assert found[1].message.endswith(
        "; policy.versions: reject would refuse it, which is not built yet: calls still go to it"
    )


def test_a_satisfied_range_does_not_warn(tmp_path: Path):
    text = VERSIONS.replace("POLICY", "warn").replace("^2.0", "^1.0").replace("~2.2", "^2.2")
    assert warnings_of(tmp_path, text) == []


# -- the warnings reach every command that loads a file -------------------------------------

FILE = HEAD + SERVICE + "    branch: auto\n"
LINE = (
    "devmesh.yaml:6:5: warning: services.api.branch: not built yet: branch namespaces; branch "
    "is accepted but has no effect: calls are routed without regard to branches"
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
        "line": 6,
        "column": 5,
        "path": "services.api.branch",
        "message": LINE.split("services.api.branch: ", 1)[1],
        "severity": "warning",
    }


def test_up_prints_the_warning_before_anything_else(tmp_path: Path):
    # `up nosuchservice` loads the file, then stops before it starts an agent.
    result = devmesh(tmp_path, "up", "-d", "nosuchservice")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "warning: " + LINE.replace(" warning:", "", 1)
    assert not (tmp_path / "home" / "agent.sock").exists()

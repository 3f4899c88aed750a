"""`python -m devmesh validate` as a real subprocess: exit codes, streams, --json, stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "config"
VALID = """\
version: 1
project: quickstart
services:
  api:
    version: 1.0.0
    command: python -m http.server ${PORT}
  web:
    version: 1.0.0
    command: [npm, start]
    depends_on: [api]
"""


def run(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "devmesh", "validate", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    folder = tmp_path / "examples" / "quickstart"
    folder.mkdir(parents=True)
    (folder / "devmesh.yaml").write_text(VALID)
    return tmp_path


def test_valid_file_prints_one_summary_line(quickstart: Path):
    result = run(["-f", "examples/quickstart/devmesh.yaml"], quickstart)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "examples/quickstart/devmesh.yaml: valid (project quickstart, 2 services: api, web)\n"
    )
    assert result.stderr == ""


def test_found_in_a_parent_folder(quickstart: Path):
    deep = quickstart / "examples" / "quickstart" / "src" / "pkg"
    deep.mkdir(parents=True)
    result = run([], deep)
    assert result.returncode == 0, result.stderr
    path = quickstart / "examples" / "quickstart" / "devmesh.yaml"
    assert result.stdout == f"{path}: valid (project quickstart, 2 services: api, web)\n"


def test_invalid_file_prints_every_problem_and_exits_1():
    result = run(["-f", "invalid/many.yaml"], FIXTURES)
    assert result.returncode == 1
    expected = (FIXTURES / "invalid" / "many.expected").read_text()
    assert result.stderr == expected + "invalid/many.yaml: invalid (6 problems)\n"
    assert result.stdout == ""


def test_stdin(tmp_path: Path):
    result = run(["-f", "-"], tmp_path, stdin="version: 1\nservices:\n  api: {prot: 1}\n")
    assert result.returncode == 1
    assert result.stderr == (
        "<stdin>:3:9: services.api.prot: unknown key 'prot'; did you mean 'port'?\n"
        "<stdin>: invalid (1 problem)\n"
    )


def test_no_file_found_exits_1(tmp_path: Path):
    result = run([], tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"devmesh validate: no devmesh.yaml or devmesh.yml in {tmp_path} or any parent "
        "folder; pass -f FILE (or -f - for stdin)\n"
    )


def test_usage_error_exits_2(tmp_path: Path):
    result = run(["--no-such-option"], tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr


def test_json_valid_with_warning(tmp_path: Path):
    (tmp_path / "devmesh.yaml").write_text(
        "version: 1\nproject: p\nservices:\n  api:\n    version: 1.0.0\n"
        "    env: {TOKEN: '${NOT_SET_ANYWHERE}'}\n"
    )
    result = run(["--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "valid": True,
        "file": "devmesh.yaml",
        "files": ["devmesh.yaml"],
        "problems": [
            {
                "file": "devmesh.yaml",
                "line": 6,
                "column": 18,
                "path": "services.api.env.TOKEN",
                "message": "variable NOT_SET_ANYWHERE is not set (in the environment or .env); "
                "using an empty string",
                "severity": "warning",
            },
        ],
        "project": "p",
        "services": ["api"],
    }


def test_json_invalid():
    result = run(["-f", "invalid/port_clash.yaml", "--json"], FIXTURES)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "valid": False,
        "file": "invalid/port_clash.yaml",
        "files": ["invalid/port_clash.yaml"],
        "problems": [
            {
                "file": "invalid/port_clash.yaml",
                "line": 10,
                "column": 11,
                "path": "services.web.port",
                "message": "port 8080 is already used by service 'api' (line 6); two services "
                "cannot listen on one port (use port: auto)",
                "severity": "error",
            }
        ],
        "project": "invalid",  # the folder's name
        "services": ["api", "web"],
    }


def test_help_has_an_example(tmp_path: Path):
    result = run(["--help"], tmp_path)
    assert result.returncode == 0
    assert "devmesh validate -f services/devmesh.yaml" in result.stdout


def test_several_files_as_pre_commit_passes_them(quickstart: Path):
    result = run(
        ["examples/quickstart/devmesh.yaml", str(FIXTURES / "invalid" / "cycle.yaml")], quickstart
    )
    assert result.returncode == 1
    assert result.stdout == (
        "examples/quickstart/devmesh.yaml: valid (project quickstart, 2 services: api, web)\n"
    )
    cycle = FIXTURES / "invalid" / "cycle.yaml"
    assert result.stderr == (
        f"{cycle}:7:7: services.a.depends_on.b: dependency cycle: a -> b -> a\n"
        f"{cycle}: invalid (1 problem)\n"
    )
    result = run(["--json", "examples/quickstart/devmesh.yaml", str(cycle)], quickstart)
    assert [r["valid"] for r in json.loads(result.stdout)] == [True, False]


def test_global_file_before_the_command(quickstart: Path, tmp_path: Path):
    file = quickstart / "examples" / "quickstart" / "devmesh.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "devmesh", "-f", str(file), "validate"],
        cwd=elsewhere,  # no devmesh.yaml here: the global -f is what names it
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "quickstart" in r.stdout


def test_override_beside_the_file_is_merged_and_named(quickstart: Path):
    folder = quickstart / "examples" / "quickstart"
    (folder / "devmesh.override.yaml").write_text("services:\n  api:\n    port: nope\n")
    result = run([], folder)
    assert result.returncode == 1
    assert result.stderr == (
        "devmesh.override.yaml:3:11: services.api.port: expected an integer or 'auto', "
        "got 'nope'\n"
        "devmesh.yaml + devmesh.override.yaml: invalid (1 problem)\n"
    )
    # with -f, only the files given: the override is not read
    result = run(["-f", "devmesh.yaml"], folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("devmesh.yaml: valid")


def test_repeated_f_merges_in_order_before_or_after_the_command(quickstart: Path):
    folder = quickstart / "examples" / "quickstart"
    (folder / "one.yaml").write_text("services:\n  api:\n    remote: true\n")
    (folder / "two.yaml").write_text("project: renamed\n")
    result = run(["-f", "devmesh.yaml", "-f", "one.yaml", "-f", "two.yaml", "--json"], folder)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["files"] == ["devmesh.yaml", "one.yaml", "two.yaml"]
    assert doc["project"] == "renamed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "devmesh", "-f", "devmesh.yaml", "-f", "missing.yaml", "validate"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr == (
        "missing.yaml: file not found\ndevmesh.yaml + missing.yaml: invalid (1 problem)\n"
    )

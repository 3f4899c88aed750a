"""`devmesh config` as a real subprocess: the merged, interpolated file, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
version: 1
project: shop
services:
  api:
    version: 1.0.0
    command: python -m api --port ${PORT}
    env:
      LOG: info
      AUTH: Bearer ${API_TOKEN}
      DB: postgres://app:${DB_PASSWORD:-devpass}@db/app
      DB_PASS: ${DB_PASSWORD:-devpass}
      STATIC: postgres://app:written-here@db/app
      HOME_DIR: ${HOME_DIR}
    fallback: https://ci:${DEPLOY_KEY}@api.staging.example.com
  web:
    version: 1.0.0
    command: [python, -m, web]
    depends_on: [api]
"""


def devmesh(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEVMESH_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "devmesh", *args],
        cwd=folder,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SECRETS = {"API_TOKEN": "tok-123", "DEPLOY_KEY": "k$y", "HOME_DIR": "/home/ana"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "devmesh.yaml").write_text(BASE)
    (tmp_path / "devmesh.override.yaml").write_text(
        "services:\n  api:\n    remote: true\n    env:\n      LOG: debug\n"
    )
    return tmp_path


def test_prints_the_merged_interpolated_file_with_secrets_masked(folder: Path):
    r = devmesh(folder, "config", env=SECRETS)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    doc = yaml.safe_load(r.stdout)
    api = doc["services"]["api"]
    assert list(doc) == ["version", "project", "services"]
    assert api["remote"] is True  # from the override
    assert api["env"] == {
        "LOG": "debug",  # the override's value
        "AUTH": "Bearer ***",  # a secret variable's text, masked in place
        "DB": "postgres://app:***@db/app",  # a URL's password, wherever it came from
        "DB_PASS": "devpass",  # the file's own default, not a secret variable's text
        "STATIC": "postgres://app:***@db/app",  # a URL's password, wherever it came from
        "HOME_DIR": "/home/ana",  # not a secret: shown
    }
    assert api["fallback"] == "https://ci:***@api.staging.example.com"
    assert api["command"] == "python -m api --port ${PORT}"  # filled when api starts
    assert "tok-123" not in r.stdout and "k$y" not in r.stdout and "written-here" not in r.stdout


def test_show_secrets_prints_them_and_the_output_reads_back_as_the_same_project(
    folder: Path, tmp_path: Path
):
    r = devmesh(folder, "config", "--show-secrets", env=SECRETS)
    assert r.returncode == 0, r.stderr
    api = yaml.safe_load(r.stdout)["services"]["api"]
    assert api["env"]["AUTH"] == "Bearer tok-123"
    assert api["env"]["STATIC"] == "postgres://app:written-here@db/app"
    # `$` in an interpolated value is printed `$$`, so reading the output again is no
    # second interpolation: the fallback keeps its `$`.
    assert api["fallback"] == "https://ci:k$$y@api.staging.example.com"
    saved = tmp_path / "resolved"
    saved.mkdir()
    (saved / "devmesh.yaml").write_text(r.stdout)
    again = devmesh(saved, "config", "--show-secrets", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == yaml.safe_load(r.stdout)
    from devmesh.config import loader

    os.chdir(saved)
    try:
        assert loader.load("devmesh.yaml", environ={}).project.service("api").fallback == (
            "https://ci:k$y@api.staging.example.com"
        )
    finally:
        os.chdir(ROOT)


def test_json_format_and_services(folder: Path):
    r = devmesh(folder, "config", "--format", "json", env=SECRETS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["services"]["api"]["env"]["AUTH"] == "Bearer ***"
    r = devmesh(folder, "config", "--services", env=SECRETS)
    assert (r.returncode, r.stdout) == (0, "api\nweb\n")
    r = devmesh(folder, "config", "-q", env=SECRETS)
    assert (r.returncode, r.stdout) == (0, "")


def test_f_reads_only_the_files_given_in_order(folder: Path):
    (folder / "ci.yaml").write_text("services:\n  web:\n    version: 1.1.0\n")
    r = devmesh(folder, "config", "-f", "devmesh.yaml", "-f", "ci.yaml", env=SECRETS)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["services"]["web"]["version"] == "1.1.0"
    assert "remote" not in doc["services"]["api"]  # the override beside it is not read
    r = devmesh(folder, "-f", "devmesh.yaml", "config", env=SECRETS)  # the global -f too
    assert r.returncode == 0 and "remote" not in yaml.safe_load(r.stdout)["services"]["api"]


def test_an_invalid_override_exits_1_naming_the_override_and_its_line(folder: Path):
    (folder / "devmesh.override.yaml").write_text("services:\n  api:\n    port: [1]\n")
    r = devmesh(folder, "config", env=SECRETS)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (
        "devmesh.override.yaml:3:11: services.api.port: expected an integer or 'auto', "
        "got a list\n"
        "devmesh.yaml + devmesh.override.yaml: invalid (1 problem)\n"
    )


def test_warnings_go_to_stderr_and_the_exit_is_0(folder: Path):
    r = devmesh(folder, "config", env={"API_TOKEN": "t", "DEPLOY_KEY": "k"})
    assert r.returncode == 0
    assert r.stderr == (
        "devmesh.yaml:13:17: warning: services.api.env.HOME_DIR: variable HOME_DIR is not set "
        "(in the environment or .env); using an empty string\n"
    )


def test_no_file_exits_1(tmp_path: Path):
    r = devmesh(tmp_path, "config")
    assert r.returncode == 1
    assert r.stderr.startswith("devmesh config: no devmesh.yaml or devmesh.yml in ")


def test_a_missing_f_file_is_named(folder: Path):
    r = devmesh(folder, "config", "-f", "devmesh.yaml", "-f", "mine.yaml")
    assert r.returncode == 1
    assert r.stderr == "mine.yaml: file not found\ndevmesh.yaml + mine.yaml: invalid (1 problem)\n"


def test_a_url_password_left_for_the_start_of_the_service_is_shown():
    from devmesh.config import show

    assert show.mask_url_passwords("postgres://u:${PGPASSWORD}@h/db") == (
        "postgres://u:${PGPASSWORD}@h/db"
    )
    assert show.mask_url_passwords("x redis://:pw@h:6379 y") == "x redis://:***@h:6379 y"
    assert show.mask_url_passwords("https://user@h/p:q@r") == "https://user@h/p:q@r"

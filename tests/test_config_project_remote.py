"""The checks of a service's ``project:`` and ``remote:``: what validate (and up) say."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.config import loader, report

BASE = """\
version: 1
project: shop
services:
  web:
    version: 1.0.0
    command: python -m web
    depends_on: [api]
  api:
    version: 2.0.0
    command: python -m api
    share: true
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "devmesh.yaml").write_text(BASE)
    return tmp_path


def override(folder: Path, text: str) -> None:
    (folder / "devmesh.override.yaml").write_text(text)


def load() -> loader.Loaded:
    return loader.load_files(loader.config_files(None), environ={})


def problems() -> list[str]:
    with pytest.raises(loader.ConfigError) as caught:
        load()
    return [report.render_one(p) for p in caught.value.problems]


def test_project_beside_command_is_an_error_at_the_key_naming_the_command(folder: Path):
    override(folder, "services:\n  api:\n    project: shop-api\n")
    assert problems() == [
        "devmesh.override.yaml:3:5: services.api.project: project 'shop-api' on a service "
        "that has a command (devmesh.yaml:10:5): a service with a command runs here, in this "
        "project; project: names the project that runs a service declared without command. "
        "Remove project, or drop command (in an override file: command: !reset) to take api "
        "from project shop-api"
    ]


def test_project_beside_command_in_one_file(folder: Path):
    (folder / "devmesh.yaml").write_text(BASE.replace("    share: true\n", "    project: x\n"))
    [problem] = problems()
    assert problem.startswith(
        "devmesh.yaml:11:5: services.api.project: project 'x' on a service that has a command "
        "(devmesh.yaml:10:5)"
    )


def test_project_naming_this_project_is_the_default(folder: Path):
    override(folder, "services:\n  api:\n    project: shop\n")
    loaded = load()
    assert loaded.project.service("api").project is None
    assert loaded.merged["services"]["api"]["project"] == "shop"  # as written, for `config`


def test_project_on_a_service_without_command(folder: Path):
    override(folder, "services:\n  api:\n    command: !reset\n    project: shop-api\n")
    api = load().project.service("api")
    assert api.command is None and api.project == "shop-api" and not api.runs_here


def test_remote_over_a_shared_service_from_an_override_is_quiet(folder: Path):
    override(folder, "services:\n  api:\n    remote: true\n")
    loaded = load()
    assert loaded.warnings == []
    api = loaded.project.service("api")
    assert api.remote and not api.runs_here and api.command is not None


def test_remote_and_share_written_in_one_file_warn(folder: Path):
    override(folder, "services:\n  api:\n    remote: true\n    share: true\n")
    [warning] = [report.render_one(p) for p in load().warnings]
    assert warning == (
        "devmesh.override.yaml:4:5: warning: services.api.share: share: true has no effect: "
        "remote: true (devmesh.override.yaml:3:5) keeps api from running on this machine, so "
        "there is nothing to share"
    )


def test_remote_and_db_written_in_one_file_warn_the_database_is_not_provisioned(folder: Path):
    (folder / "devmesh.yaml").write_text(
        BASE.replace("    share: true\n", "    remote: true\n    db: {engine: sqlite}\n")
    )
    [warning] = [report.render_one(p) for p in load().warnings]
    assert warning.startswith(
        "devmesh.yaml:12:5: warning: services.api.db: the database is not provisioned: "
        "remote: true (devmesh.yaml:11:5) keeps api from running on this machine"
    )


def test_remote_without_command_is_allowed(folder: Path):
    override(folder, "services:\n  api:\n    command: !reset\n    remote: true\n")
    assert load().warnings == []


def test_remote_must_be_a_boolean(folder: Path):
    override(folder, "services:\n  api:\n    remote: yes please\n")
    [problem] = problems()
    assert problem.startswith("devmesh.override.yaml:3:13: services.api.remote: expected")


def test_up_refuses_project_beside_command_before_starting_anything(folder: Path):
    import os
    import subprocess
    import sys

    override(folder, "services:\n  api:\n    project: shop-api\n")
    home = folder / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMESH_")}
    env["DEVMESH_HOME"] = str(home)
    r = subprocess.run(
        [sys.executable, "-m", "devmesh", "up", "-d"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.startswith(
        "devmesh up: devmesh.override.yaml:3:5: services.api.project: project 'shop-api' on a "
        "service that has a command (devmesh.yaml:10:5)"
    )
    assert not home.exists()  # no agent was started, nothing was applied


def test_plan_says_a_remote_service_is_not_run_and_its_database_not_provisioned(folder: Path):
    from devmesh.commands import plan

    (folder / "devmesh.yaml").write_text(
        BASE.replace("    share: true\n", "    db: {engine: sqlite}\n    fallback: http://s.test\n")
    )
    override(folder, "services:\n  api:\n    remote: true\n")
    assert plan.remote_notes(load().project) == {
        "api": "not run on this machine (remote: true): calls go to a teammate's shared "
        "instance, else its fallback http://s.test; its database is not provisioned"
    }
    override(folder, "services:\n  web:\n    remote: true\n")
    assert plan.remote_notes(load().project) == {
        "web": "not run on this machine (remote: true): calls go to a teammate's shared "
        "instance (no fallback: 502 when none answers)"
    }

"""Compose's habits on the command line: global -f/-p, unknown names, each command's usage."""

from __future__ import annotations

import json
import subprocess

from agentkit import PY, SERVER, Mesh

PROJECT = """
version: 1
project: shop
services:
  api:
    version: 1.0.0
    command: {py} server.py
  web:
    version: 1.0.0
    command: {py} server.py
"""


def shop(mesh: Mesh) -> str:
    d = mesh.project("shop", PROJECT.format(py=PY), {"server.py": SERVER})
    return str(d / "devmesh.yaml")


def test_global_file_before_the_command_and_logs_f_follows(mesh: Mesh) -> None:
    file = shop(mesh)  # the CLI runs in mesh.root, where no devmesh.yaml is found
    mesh.cli("-f", file, "up", "-d", "api", check=True)
    assert set(mesh.services("shop")) == {"api"}
    out = mesh.cli("-f", file, "status", check=True).stdout
    assert "shop" in out and "api" in out
    follow = subprocess.Popen(
        [PY, "-m", "devmesh", "-f", file, "logs", "-f", "--tail", "all", "api"],
        cwd=mesh.root,
        env=mesh.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline().startswith("api ready on")
        with (mesh.home / "logs" / "shop" / "api.log").open("a") as f:
            f.write("a line written later\n")
        assert follow.stdout.readline() == "a line written later\n"  # -f followed
    finally:
        follow.terminate()
        follow.wait(10)
        follow.stdout.close()  # type: ignore[union-attr]
    mesh.cli("-p", "shop", "down", "api", check=True)
    assert mesh.services("shop") == {}


def test_global_project_and_the_commands_own_flags(mesh: Mesh) -> None:
    file = shop(mesh)
    mesh.cli("up", "-d", "--file", file, check=True)
    rows = json.loads(mesh.cli("-p", "shop", "status", "--json", check=True).stdout)["services"]
    assert sorted((r["project"], r["name"]) for r in rows) == [("shop", "api"), ("shop", "web")]
    logs = mesh.cli("logs", "--file", file, "--tail", "1", "web", check=True).stdout
    assert logs.startswith("web ready on")
    mesh.cli("-p", "shop", "down", check=True)
    assert mesh.services() == {}


def test_unknown_service_or_project_exits_1_naming_it(mesh: Mesh) -> None:
    file = shop(mesh)
    mesh.cli("-f", file, "up", "-d", check=True)
    pids = {n: s["pid"] for n, s in mesh.services("shop").items()}

    r = mesh.cli("-f", file, "down", "nosuchsvc")
    assert r.returncode == 1, r.stderr
    assert "no such service 'nosuchsvc' in project shop (services: api, web)" in r.stderr
    r = mesh.cli("-p", "shop", "down", "api", "nosuchsvc")
    assert r.returncode == 1, r.stderr
    assert "no such service 'nosuchsvc' in project shop" in r.stderr
    assert {n: s["pid"] for n, s in mesh.services("shop").items()} == pids  # nothing stopped

    for args in (
        ("down", "-p", "nosuchproj"),
        ("-p", "nosuchproj", "status"),
        ("logs", "-p", "nosuchproj"),
        ("logs", "-p", "nosuchproj", "api"),
    ):
        r = mesh.cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "no project 'nosuchproj' is applied to this agent (projects: shop)" in r.stderr

    r = mesh.cli("-f", file, "logs", "nosuchsvc")
    assert r.returncode == 1 and "no such service nosuchsvc" in r.stderr, r.stderr
    r = mesh.cli("-f", file, "up", "-d", "nosuchsvc")
    assert r.returncode == 1 and "no such service 'nosuchsvc'" in r.stderr, r.stderr


def test_a_bad_flag_prints_the_commands_usage(mesh: Mesh) -> None:
    r = mesh.cli("up", "--bogus")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: devmesh up ")
    assert "devmesh up: error: unrecognized arguments: --bogus" in r.stderr
    r = mesh.cli("ca", "install", "--bogus")
    assert r.returncode == 2 and r.stderr.startswith("usage: devmesh ca install ")
    r = mesh.cli("-f", "x.yaml", "agent")
    assert r.returncode == 2
    assert "`devmesh agent` reads no devmesh.yaml" in r.stderr

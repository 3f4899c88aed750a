"""``mesh.discovery.serf``: validate knows the keys, and a missing ``serf`` names its package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.config import loader

HEAD = "version: 1\nproject: shop\nmesh:\n  discovery:\n    interfaces: [lo]\n"


def validate(tmp_path: Path, text: str, path: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "devmesh.yaml").write_text(text)
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, "-m", "devmesh", "validate"],
        cwd=tmp_path,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_model_reads_port_and_join(tmp_path: Path) -> None:
    (tmp_path / "devmesh.yaml").write_text(
        HEAD + "    serf:\n      port: 7950\n      join: ['10.0.0.1:7946', 'ana:7946']\n"
    )
    project = loader.load(str(tmp_path / "devmesh.yaml"), environ={}).project
    assert project is not None and project.mesh is not None
    serf = project.mesh.discovery.serf
    assert serf is not None and (serf.port, serf.join) == (7950, ("10.0.0.1:7946", "ana:7946"))
    (tmp_path / "devmesh.yaml").write_text(HEAD)
    project = loader.load(str(tmp_path / "devmesh.yaml"), environ={}).project
    assert project is not None and project.mesh is not None
    assert project.mesh.discovery.serf is None  # off by default


@pytest.mark.parametrize(
    ("serf", "problem"),
    [
        ("    serf:\n      join: [ana-laptop]\n", "mesh.discovery.serf.join[0]"),
        ("    serf:\n      port: 70000\n", "mesh.discovery.serf.port"),
        ("    serf:\n      joins: ['a:1']\n", "mesh.discovery.serf"),
    ],
)
def test_validate_refuses_bad_serf_keys(tmp_path: Path, serf: str, problem: str) -> None:
    result = validate(tmp_path, HEAD + serf, os.environ["PATH"])
    assert result.returncode != 0
    assert "devmesh.yaml:7:" in result.stdout + result.stderr
    assert problem in result.stdout + result.stderr


def test_without_serf_on_path_validate_names_the_package(tmp_path: Path) -> None:
    text = HEAD + "    serf:\n      join: ['127.0.0.1:7946']\n"
    empty = tmp_path / "bin"
    empty.mkdir()
    result = validate(tmp_path, text, str(empty))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out  # a warning: the other backends still run
    assert "devmesh.yaml:6:5: warning: mesh.discovery.serf" in out
    assert "apt install serf" in out and "brew install serf" in out
    with_serf = validate(tmp_path, text, os.environ["PATH"])
    assert with_serf.returncode == 0
    assert "serf" not in with_serf.stdout + with_serf.stderr

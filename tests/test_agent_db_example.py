"""examples/notes, for real: its database is made, seeded by init, kept by down, deleted by
down --volumes, and a note written through the proxy survives a restart."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from agentkit import Mesh
from dbkit import postgres_in

from devmesh.db.cluster import Cluster

NOTES = Path(__file__).resolve().parents[1] / "examples" / "notes"


def curl(mesh: Mesh, *args: str) -> object:
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "10",
            *args,
            f"http://notes.localhost:{mesh.proxy_port}/",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_notes_example_keeps_its_notes_across_down_and_loses_them_with_volumes(
    mesh: Mesh,
) -> None:
    d = mesh.root / "notes"
    shutil.copytree(NOTES, d)
    root = mesh.home / "db" / "notes" / "postgres"
    dirs = [root, Cluster(root)._fallback()]
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        assert curl(mesh) == [{"id": 1, "body": "Hello from db/schema.sql"}]
        assert curl(mesh, "-d", "it's 'quoted'; DROP TABLE notes") == {
            "id": 2,
            "body": "it's 'quoted'; DROP TABLE notes",
        }
        mesh.cli("down", cwd=d, check=True)
        mesh.cli("up", "-d", cwd=d, check=True)
        assert [n["id"] for n in curl(mesh)] == [1, 2]  # type: ignore[union-attr]
        mesh.cli("down", "--volumes", cwd=d, check=True)
        mesh.cli("up", "-d", cwd=d, check=True)
        assert [n["id"] for n in curl(mesh)] == [1]  # type: ignore[union-attr]
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert postgres_in(dirs) == []

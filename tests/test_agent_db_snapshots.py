"""`devmesh db snapshot/restore/snapshots` through a real agent for SQLite and Docker databases.

The SQLite service keeps one connection open for its whole life, so a restore seen through
the proxy proves the restore reached an open connection. The Docker case runs against a
real engine (skipped without one on a developer's machine, never where
``DEVMESH_REQUIRE_DOCKER=1``) with a second native cluster playing staging, to show the
snapshot taken before each sync and the pruning to ``snapshots.keep``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from agentkit import PY, SERVER, Mesh
from dbkit import DbHome, build_postgres_image, make_staging
from test_agent_db import curl_json

from devmesh.db.container import connect, engine_answers

LITE_APP = """
import http.server, json, os, sqlite3
URL = os.environ["DATABASE_URL"]
DB = sqlite3.connect(URL[len("sqlite:///"):])  # one connection, open for the service's life
DB.execute("CREATE TABLE IF NOT EXISTS notes (msg TEXT)")
DB.commit()

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        rows = [r[0] for r in DB.execute("SELECT msg FROM notes ORDER BY msg")]
        data = json.dumps({"rows": rows}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass

http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

LITE_YAML = f"""
version: 1
project: litesnap
services:
  app:
    version: 1.0.0
    command: {PY} app.py
    port: auto
    health: {{http: /, interval_s: 0.5}}
    db: {{engine: sqlite}}
"""


def write(path: str, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        for s in statements:
            db.execute(s)
        db.commit()


def test_sqlite_snapshot_and_restore_through_the_cli_reach_the_running_service(
    mesh: Mesh,
) -> None:
    d = mesh.project("litesnap", LITE_YAML, {"app.py": LITE_APP})
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        path = mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip()[len("sqlite:///") :]
        write(path, "INSERT INTO notes VALUES ('kept')")
        assert curl_json(mesh, "app")["rows"] == ["kept"]

        r = mesh.cli("db", "snapshot", "app", "before", cwd=d, check=True)
        assert "before" in r.stdout + r.stderr
        write(path, "DELETE FROM notes", "INSERT INTO notes VALUES ('oops')")
        assert curl_json(mesh, "app")["rows"] == ["oops"]
        mesh.cli("db", "restore", "app", "before", cwd=d, check=True)
        assert curl_json(mesh, "app")["rows"] == ["kept"]  # the service's open connection

        mesh.cli("db", "snapshot", "app", cwd=d, check=True)  # named by the time
        snaps = json.loads(mesh.cli("db", "snapshots", "app", "--json", cwd=d, check=True).stdout)
        names = [s["name"] for s in snaps["snapshots"]]
        assert len(names) == 2 and names[0] == "before"
        assert all(s["size_bytes"] > 0 for s in snaps["snapshots"])
        status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
        assert status["databases"][0]["snapshots"] == 2

        r = mesh.cli("db", "restore", "app", "nosuch", cwd=d)
        assert r.returncode == 1 and "no snapshot 'nosuch'" in r.stderr and "before" in r.stderr
        r = mesh.cli("db", "sync", "app", cwd=d)
        assert r.returncode == 1 and "no db.sync block" in r.stderr
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert not (mesh.home / "db" / "litesnap").exists()  # snapshots went with the data


@pytest.fixture
def docker_image() -> Iterator[str]:
    if not engine_answers() and os.environ.get("DEVMESH_REQUIRE_DOCKER") != "1":
        pytest.skip("no Docker engine (set DEVMESH_REQUIRE_DOCKER=1 to fail instead)")
    client = connect()
    try:
        yield build_postgres_image(client)
    finally:
        client.close()


@pytest.fixture
def staging() -> Iterator[str]:
    home = DbHome()
    try:
        yield make_staging(home)
    finally:
        assert home.close() == []


def test_docker_snapshots_through_the_cli_one_before_each_sync_keeping_n(
    mesh: Mesh, docker_image: str, staging: str
) -> None:
    project = f"dk{uuid.uuid4().hex[:8]}"
    label = {"label": f"devmesh.project={project}"}
    text = f"""
version: 1
project: {project}
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: docker
      image: {docker_image}
      sync:
        from: ${{STAGING_URL}}
        tables: {{orders: "id <= 3"}}
      snapshots: {{keep: 2}}
"""
    d = mesh.project(project, text, {"server.py": SERVER})
    mesh.env["STAGING_URL"] = staging
    client = connect()
    try:
        mesh.cli("up", "-d", cwd=d, check=True, timeout=180)
        r = mesh.cli("db", "sync", "shop", cwd=d, check=True, timeout=180)
        assert "snapshot pre-sync-" in r.stderr
        snaps = json.loads(mesh.cli("db", "snapshots", "shop", "--json", cwd=d, check=True).stdout)
        assert [s["name"][:9] for s in snaps["snapshots"]] == ["pre-sync-"]

        url = mesh.cli("db", "url", "shop", cwd=d, check=True).stdout.strip()
        mesh.cli("db", "snapshot", "shop", "synced", cwd=d, check=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM orders")
        mesh.cli("db", "restore", "shop", "synced", cwd=d, check=True)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)

        mesh.cli("db", "sync", "shop", cwd=d, check=True, timeout=180)  # keeps the newest 2
        out = mesh.cli("db", "snapshots", "shop", cwd=d, check=True).stdout
        names = [line.split()[0] for line in out.splitlines()]
        assert len(names) == 2 and names[0] == "synced" and names[1].startswith("pre-sync-")
        status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
        assert status["databases"][0]["snapshots"] == 2
    finally:
        mesh.cli("down", "--volumes", cwd=d)
        mesh.env.pop("STAGING_URL", None)
        leftovers = client.containers.list(all=True, filters=label)
        for c in leftovers:
            c.remove(force=True)
        vols = client.volumes.list(filters=label)
        for v in vols:
            v.remove(force=True)
        client.close()
    assert (leftovers, vols) == ([], [])

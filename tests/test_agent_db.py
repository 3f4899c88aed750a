"""Databases through a real agent: provisioned before the service, in its environment, kept
by `down`, deleted by `down --volumes`, adopted after `kill -9` of the agent, synced from a
second cluster and snapshotted through the CLI.

The service (``APP``) reads ``DATABASE_URL`` once, at start, and answers ``/`` with the rows
of table ``greet``, so a row reaching the test through the proxy proves the whole chain:
provisioning, ``init``, the environment and the start order. The native tests share one
agent and one project cluster per module (a cluster costs a second or two to create); each
test leaves the project down with its data deleted, and the module checks that no
PostgreSQL process is left anywhere.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from agentkit import PY, SERVER, Mesh, alive
from dbkit import DbHome, make_staging, postgres_in, postmasters_in
from psycopg.conninfo import conninfo_to_dict

from devmesh.db.cluster import Cluster

APP = """
import http.server, json, os, sqlite3
URL = os.environ["DATABASE_URL"]  # read at start: the database must be ready before

def rows():
    if URL.startswith("sqlite:"):
        conn = sqlite3.connect(URL[len("sqlite:///"):])
        try:
            return [r[0] for r in conn.execute("SELECT msg FROM greet ORDER BY msg")]
        finally:
            conn.close()
    import psycopg
    with psycopg.connect(URL, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT msg FROM greet ORDER BY msg")]

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            status, body = 200, json.dumps({"rows": rows(), "pg": os.environ.get("PGDATABASE")})
        except Exception as exc:
            status, body = 500, repr(exc)
        data = body.encode()
        self.send_response(status); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass

print("app up with", URL.split("@")[-1], flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

INIT = """
CREATE TABLE greet (msg text NOT NULL);
INSERT INTO greet VALUES ('hello from init');
"""


def project_yaml(name: str, db: str) -> str:
    return f"""
version: 1
project: {name}
services:
  app:
    version: 1.0.0
    command: {PY} app.py
    port: auto
    health: {{http: /, interval_s: 0.5}}
    db: {db}
"""


def curl_json(mesh: Mesh, host: str) -> dict:
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://{host}.localhost:{mesh.proxy_port}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def on_a_terminal(mesh: Mesh, cwd: Path, *args: str) -> str:
    """Run the CLI with stderr on a pseudo-terminal; everything written to it."""
    main, side = pty.openpty()
    try:
        proc = subprocess.Popen(
            [PY, "-m", "devmesh", *args],
            cwd=cwd,
            env=mesh.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=side,
        )
        os.close(side)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0, b"".join(chunks).decode()
    finally:
        os.close(main)
    return b"".join(chunks).decode()


def cluster_dirs(mesh: Mesh, project: str) -> list[Path]:
    root = mesh.home / "db" / project / "postgres"
    return [root, Cluster(root)._fallback()]


# ---------------------------------------------------------------------------- sqlite


def test_sqlite_database_is_made_before_the_service_kept_by_down_deleted_by_volumes(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "lite",
        project_yaml("lite", "{engine: sqlite, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    assert curl_json(mesh, "app")["rows"] == ["hello from init"]
    path = mesh.home / "db" / "lite" / "sqlite" / "app.sqlite3"
    url = mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip()
    assert url == f"sqlite:///{path}"
    with psycopg_free_sqlite(path) as conn:
        conn.execute("INSERT INTO greet VALUES ('written while up')")

    status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
    [row] = status["databases"]
    assert (row["service"], row["engine"], row["provider"], row["state"]) == (
        "app",
        "sqlite",
        "sqlite",
        "running",
    )
    assert row["size_bytes"] > 0

    mesh.cli("down", cwd=d, check=True)
    assert path.exists()
    mesh.cli("up", "-d", cwd=d, check=True)  # init does not run again: the data is kept
    assert curl_json(mesh, "app")["rows"] == ["hello from init", "written while up"]

    r = mesh.cli("down", "--volumes", cwd=d, check=True)  # stdin is not a terminal: no question
    assert "deleted" in r.stderr
    assert not path.exists()
    assert not (mesh.home / "db" / "lite").exists()


def test_db_status_outside_a_project_folder_lists_every_applied_project(mesh: Mesh) -> None:
    for project, service in (("shop", "api"), ("blog", "web")):
        yaml_text = project_yaml(project, "{engine: sqlite, init: [init.sql]}")
        d = mesh.project(
            project, yaml_text.replace("  app:", f"  {service}:"), {"app.py": APP, "init.sql": INIT}
        )
        mesh.cli("up", "-d", cwd=d, check=True)
    plain = mesh.project("plain", "version: 1\nproject: plain\nservices: {}\n")
    mesh.cli("up", "-d", cwd=plain, check=True)  # applied, with no database: no row
    elsewhere = mesh.root / "elsewhere"  # no devmesh.yaml here or above
    elsewhere.mkdir()

    data = json.loads(mesh.cli("db", "status", "--json", cwd=elsewhere, check=True).stdout)
    assert data["project"] is None
    got = [(r["project"], r["service"], r["engine"], r["state"]) for r in data["databases"]]
    assert got == [("blog", "web", "sqlite", "running"), ("shop", "api", "sqlite", "running")]

    text = mesh.cli("db", "status", cwd=elsewhere, check=True).stdout
    header, *lines = text.splitlines()
    assert header.split()[:3] == ["PROJECT", "SERVICE", "ENGINE"]
    assert [line.split()[:4] for line in lines] == [
        ["blog", "web", "sqlite", "sqlite"],
        ["shop", "api", "sqlite", "sqlite"],
    ]

    # A project named (-p, -f, or the devmesh.yaml in reach): that project only, as before.
    one = json.loads(mesh.cli("db", "status", "--json", "-p", "shop", cwd=elsewhere).stdout)
    assert [(r["project"], r["service"]) for r in one["databases"]] == [("shop", "api")]
    text = mesh.cli("db", "status", cwd=mesh.root / "blog", check=True).stdout
    assert text.split()[0] == "SERVICE" and "shop" not in text and "web" in text
    blog = str(mesh.root / "blog" / "devmesh.yaml")
    one = json.loads(mesh.cli("db", "status", "--json", "-f", blog, cwd=elsewhere).stdout)
    assert [r["service"] for r in one["databases"]] == ["web"]

    for project in ("shop", "blog", "plain"):
        mesh.cli("down", "--volumes", cwd=mesh.root / project, check=True)
    empty = mesh.cli("db", "status", cwd=elsewhere, check=True).stdout
    assert "No applied project has a service with a database." in empty


def test_down_volumes_deletes_the_data_of_a_project_the_agent_no_longer_runs(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "lite",
        project_yaml("lite", "{engine: sqlite, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    path = mesh.home / "db" / "lite" / "sqlite" / "app.sqlite3"
    agent_pid = mesh.agent_pid()
    assert agent_pid is not None and path.exists()
    os.kill(agent_pid, signal.SIGTERM)
    mesh.wait_for(lambda: not alive(agent_pid), timeout=30, what="agent exit")
    assert path.exists()  # stopping the agent keeps the data
    r = mesh.cli("down", "--volumes", cwd=d, check=True)
    assert "deleted the databases' data" in r.stderr
    assert not path.exists()


def test_an_adopted_service_is_probed_with_its_database_variables(mesh: Mesh) -> None:
    check = "import os, sys; sys.exit(0 if os.environ.get('DATABASE_URL') else 1)"
    text = f"""
version: 1
project: lite
services:
  app:
    version: 1.0.0
    command: {PY} app.py
    port: auto
    health:
      command: [{PY}, -c, "{check}"]
      interval_s: 0.2
    db: {{engine: sqlite, init: [init.sql]}}
"""
    d = mesh.project("lite", text, {"app.py": APP, "init.sql": INIT})
    mesh.cli("up", "-d", cwd=d, check=True)
    agent_pid = mesh.agent_pid()
    assert agent_pid is not None
    os.kill(agent_pid, signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent_pid), what="agent death")
    mesh.cli("up", "-d", cwd=d, check=True)  # a new agent adopts app
    assert "adopted running pid" in (mesh.home / "agent.log").read_text()
    row = mesh.wait_for(
        lambda: (r := mesh.services("lite")["app"])["health_probes"] >= 5 and r,
        what="five probes of the adopted service",
    )
    assert (row["health"], row["health_failures"]) == ("healthy", 0)
    mesh.cli("down", "--volumes", cwd=d, check=True)


class psycopg_free_sqlite:
    """A sqlite3 connection that commits and closes on exit."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        self.conn = sqlite3.connect(path)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.commit()
        self.conn.close()


def test_a_failing_init_file_fails_the_start_with_its_cause_and_leaves_no_database(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "bad",
        project_yaml("bad", "{engine: sqlite, init: [init.sql]}"),
        {
            "app.py": APP,
            "init.sql": "CREATE TABLE greet (msg text);\nINSERT INTO nope VALUES (1);\n",
        },
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "init.sql failed" in r.stderr and "no such table: nope" in r.stderr
    [svc] = mesh.services("bad").values()
    assert svc["state"] == "failed" and "database: init file" in svc["reason"]
    assert not (mesh.home / "db" / "bad" / "sqlite" / "app.sqlite3").exists()
    mesh.cli("down", "--volumes", cwd=d, check=True)


def test_provider_docker_without_an_engine_fails_the_start_naming_it(mesh: Mesh) -> None:
    mesh.env["DOCKER_HOST"] = f"unix://{mesh.root}/no-docker.sock"
    d = mesh.project(
        "nodock",
        project_yaml("nodock", "{engine: postgres, provider: docker}"),
        {"app.py": APP},
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "no Docker engine answers at unix://" in r.stderr
    [svc] = mesh.services("nodock").values()
    assert svc["state"] == "failed" and "database: no Docker engine" in svc["reason"]
    assert not (mesh.home / "db" / "nodock").exists()


def test_no_postgresql_binaries_of_the_version_fails_the_start_naming_the_package(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "nobin",
        project_yaml("nobin", "{engine: postgres, provider: native, version: 99}"),
        {"app.py": APP},
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "no PostgreSQL 99 server binaries" in r.stderr
    assert "apt-get install postgresql-99" in r.stderr
    status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
    [row] = status["databases"]
    assert row["state"] == "failed" and "no PostgreSQL 99" in row["error"]
    assert not (mesh.home / "db" / "nobin" / "postgres" / "cluster.json").exists()


def test_auto_takes_the_native_provider_when_no_docker_engine_answers(mesh: Mesh) -> None:
    mesh.env["DOCKER_HOST"] = f"unix://{mesh.root}/no-docker.sock"  # the agent inherits it
    d = mesh.project(
        "autopg",
        project_yaml("autopg", "{engine: postgres, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        assert curl_json(mesh, "app")["rows"] == ["hello from init"]
        status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
        assert status["databases"][0]["provider"] == "native"
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert postgres_in(cluster_dirs(mesh, "autopg")) == []


# ---------------------------------------------------------------------------- native


@pytest.fixture(scope="module")
def agent() -> Iterator[Mesh]:
    """One agent for the native tests; every cluster it made is gone afterwards."""
    m = Mesh()
    try:
        yield m
    finally:
        for name in ("pg", "pgsync"):
            if (m.root / name / "devmesh.yaml").exists():
                m.cli("down", "--volumes", cwd=m.root / name)
        dirs = [p for name in ("pg", "pgsync") for p in cluster_dirs(m, name)]
        left = postgres_in(dirs)
        for p in left:
            p.kill()
        m.close()
        assert left == [], f"postgres processes left behind: {left}"


def test_native_postgres_serves_a_row_kept_by_down_adopted_after_kill_9_deleted_by_volumes(
    agent: Mesh,
) -> None:
    mesh = agent
    d = mesh.project(
        "pg",
        project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    assert curl_json(mesh, "app") == {"rows": ["hello from init"], "pg": "app"}

    url = mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip()
    assert url.startswith("postgresql://app:") and url.endswith("/app")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO greet VALUES ('written while up')")
    status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
    [row] = status["databases"]
    assert row["provider"] == "native" and row["state"] == "running"
    password = url.split(":")[2].split("@")[0]
    assert password not in json.dumps(status) and ":***@" in row["url"]
    assert password not in mesh.cli("db", "status", cwd=d, check=True).stdout

    # kill -9 of the agent: the service and the cluster survive; a new agent adopts both
    [pm] = postmasters_in(cluster_dirs(mesh, "pg"))
    app_pid = mesh.services("pg")["app"]["pid"]
    agent_pid = mesh.agent_pid()
    assert agent_pid is not None
    os.kill(agent_pid, signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent_pid), what="agent death")
    mesh.cli("up", "-d", cwd=d, check=True)
    assert mesh.services("pg")["app"]["pid"] == app_pid
    assert [p.pid for p in postmasters_in(cluster_dirs(mesh, "pg"))] == [pm.pid]
    assert mesh.wait_for(
        lambda: (
            json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)["databases"][
                0
            ]["state"]
            == "running"
        ),
        what="adopted database",
    )

    # down stops the cluster and keeps the data; up starts it again and finds the row
    mesh.cli("down", cwd=d, check=True)
    assert postmasters_in(cluster_dirs(mesh, "pg")) == []
    mesh.cli("up", "-d", cwd=d, check=True)
    assert curl_json(mesh, "app")["rows"] == ["hello from init", "written while up"]
    assert mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip() == url

    # down --volumes deletes the cluster: a new up makes a fresh database (init again)
    mesh.cli("down", "--volumes", cwd=d, check=True)
    assert postgres_in(cluster_dirs(mesh, "pg")) == []
    assert not (mesh.home / "db" / "pg").exists()
    mesh.cli("up", "-d", cwd=d, check=True)
    assert curl_json(mesh, "app")["rows"] == ["hello from init"]
    mesh.cli("down", "--volumes", cwd=d, check=True)
    assert postgres_in(cluster_dirs(mesh, "pg")) == []


def test_a_taken_port_fails_the_start_naming_the_holder_and_up_recovers(agent: Mesh) -> None:
    mesh = agent
    d = mesh.project(
        "pg",
        project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        url = mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        mesh.cli("down", cwd=d, check=True)
        with socket.socket() as holder:
            # As servers do: the cluster's own closed connections may leave the port in
            # TIME_WAIT, which is not a holder; only a listener is.
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            r = mesh.cli("up", "-d", cwd=d)
            assert r.returncode == 1
            assert f"port 127.0.0.1:{port} (kept for this cluster)" in r.stderr
            assert f"pid {os.getpid()}" in r.stderr
            assert url.split(":")[2].split("@")[0] not in r.stderr
        mesh.cli("up", "-d", cwd=d, check=True)  # `up` again retries the database
        assert curl_json(mesh, "app")["rows"] == ["hello from init"]
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert postgres_in(cluster_dirs(mesh, "pg")) == []


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ('{nosuch: "true"}', "nosuch"),
        ('{orders: "id <<< 3"}', "id <<< 3"),
    ],
    ids=["missing-table", "invalid-where"],
)
def test_a_bad_sync_block_fails_naming_the_cause_and_leaves_the_database_as_it_was(
    agent: Mesh, staging: str, tables: str, expected: str
) -> None:
    mesh = agent
    text = f"""
version: 1
project: pgsync
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: native
      init: [init.sql]
      sync: {{from: "${{STAGING_URL}}", tables: {tables}}}
"""
    d = mesh.project("pgsync", text, {"server.py": SERVER, "init.sql": INIT})
    mesh.env["STAGING_URL"] = staging
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        r = mesh.cli("db", "sync", "shop", cwd=d)
        assert r.returncode == 1, r
        assert "sync of shop's database failed" in r.stderr and expected in r.stderr
        assert staging.split(":")[2].split("@", maxsplit=1)[0] not in r.stderr
        url = mesh.cli("db", "url", "shop", cwd=d, check=True).stdout.strip()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT msg FROM greet").fetchall() == [("hello from init",)]
    finally:
        mesh.cli("down", "--volumes", cwd=d)
        mesh.env.pop("STAGING_URL", None)


def test_sigterm_of_the_agent_stops_the_cluster_and_the_next_up_finds_the_data(
    agent: Mesh,
) -> None:
    mesh = agent
    d = mesh.project(
        "pg",
        project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        url = mesh.cli("db", "url", "app", cwd=d, check=True).stdout.strip()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO greet VALUES ('before sigterm')")
        agent_pid = mesh.agent_pid()
        assert agent_pid is not None and postmasters_in(cluster_dirs(mesh, "pg"))
        os.kill(agent_pid, signal.SIGTERM)
        mesh.wait_for(lambda: not alive(agent_pid), timeout=60, what="agent exit")
        assert postmasters_in(cluster_dirs(mesh, "pg")) == []  # nothing outlives the agent
        mesh.cli("up", "-d", cwd=d, check=True)
        assert curl_json(mesh, "app")["rows"] == ["before sigterm", "hello from init"]
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert postgres_in(cluster_dirs(mesh, "pg")) == []


def test_the_agent_answers_while_a_database_is_provisioned(agent: Mesh) -> None:
    # init holds provisioning for a while (the server sleeps, not the test); status must
    # answer meanwhile and say why the service waits: provisioning is off the event loop
    mesh = agent
    d = mesh.project(
        "pg",
        project_yaml("pg", "{engine: postgres, provider: native, init: [slow.sql, init.sql]}"),
        {"app.py": APP, "init.sql": INIT, "slow.sql": "SELECT pg_sleep(4);\n"},
    )
    up = subprocess.Popen(
        [PY, "-m", "devmesh", "up", "-d"],
        cwd=d,
        env=mesh.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def provisioning() -> bool:
            r = mesh.cli("status", "--json", "-p", "pg", timeout=10)
            rows = json.loads(r.stdout).get("services", []) if r.returncode == 0 else []
            return any(
                (s["name"], s["state"], s["reason"])
                == ("app", "waiting", "provisioning its database")
                for s in rows
            )

        mesh.wait_for(provisioning, timeout=30, what="status during provisioning")
        _, err = up.communicate(timeout=120)
        assert up.returncode == 0, err
        assert curl_json(mesh, "app")["rows"] == ["hello from init"]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        mesh.cli("down", "--volumes", cwd=d)


def test_switching_provider_of_an_existing_database_is_refused_not_orphaned(
    agent: Mesh,
) -> None:
    mesh = agent
    native = project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}")
    d = mesh.project("pg", native, {"app.py": APP, "init.sql": INIT})
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        (d / "devmesh.yaml").write_text(native.replace("provider: native", "provider: docker"))
        r = mesh.cli("up", "-d", cwd=d)
        assert r.returncode == 1
        assert "held by the native provider, and db.provider now says docker" in r.stderr
        assert len(postmasters_in(cluster_dirs(mesh, "pg"))) == 1  # the data is still there
        (d / "devmesh.yaml").write_text(native)
        mesh.cli("up", "-d", cwd=d, check=True)
        assert curl_json(mesh, "app")["rows"] == ["hello from init"]
    finally:
        mesh.cli("down", "--volumes", cwd=d)


def test_down_volumes_after_a_rename_of_the_database_leaves_nothing(agent: Mesh) -> None:
    mesh = agent
    first = project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}")
    d = mesh.project("pg", first, {"app.py": APP, "init.sql": INIT})
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        (d / "devmesh.yaml").write_text(
            first.replace("provider: native", "provider: native, name: renamed")
        )
        mesh.cli("up", "-d", cwd=d, check=True)
        assert curl_json(mesh, "app")["pg"] == "renamed"
    finally:
        mesh.cli("down", "--volumes", cwd=d, check=True)
    dirs = cluster_dirs(mesh, "pg")
    assert postgres_in(dirs) == [] and not any(p.exists() for p in dirs)


def test_db_shell_runs_psql_on_the_service_database(agent: Mesh) -> None:
    mesh = agent
    d = mesh.project(
        "pg",
        project_yaml("pg", "{engine: postgres, provider: native, init: [init.sql]}"),
        {"app.py": APP, "init.sql": INIT},
    )
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        shell = subprocess.run(
            [PY, "-m", "devmesh", "db", "shell", "app"],
            cwd=d,
            env=mesh.env,
            input="SELECT 'got:' || msg FROM greet;\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shell.returncode == 0, shell.stderr
        assert "got:hello from init" in shell.stdout
    finally:
        mesh.cli("down", "--volumes", cwd=d)


@pytest.fixture(scope="module")
def staging() -> Iterator[str]:
    """A second, independent cluster playing staging (see dbkit.STAGING_SCHEMA)."""
    home = DbHome()
    try:
        yield make_staging(home)
    finally:
        assert home.close() == []


def test_db_sync_from_staging_then_snapshots_and_restore_round_trip(
    agent: Mesh, staging: str
) -> None:
    mesh = agent
    text = f"""
version: 1
project: pgsync
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: native
      sync:
        from: ${{STAGING_URL}}
        tables: {{orders: "id <= 3"}}
        exclude_columns: {{customers: [ssn]}}
      snapshots: {{keep: 2}}
"""
    d = mesh.project("pgsync", text, {"server.py": SERVER})
    mesh.env["STAGING_URL"] = staging
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        r = mesh.cli("db", "sync", "shop", cwd=d, check=True)
        assert "Synced shop's database" in r.stderr
        url = mesh.cli("db", "url", "shop", cwd=d, check=True).stdout.strip()
        with psycopg.connect(url) as conn:
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()
            dangling = conn.execute(
                "SELECT count(*) FROM orders o LEFT JOIN customers c ON c.id = o.customer_id"
                " WHERE c.id IS NULL"
            ).fetchone()
            ssn = conn.execute("SELECT count(*) FROM customers WHERE ssn IS NOT NULL").fetchone()
        assert orders == (3,) and dangling == (0,) and ssn == (0,)
        status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
        assert status["databases"][0]["last_sync"]["rows"] >= 3
        snaps = json.loads(mesh.cli("db", "snapshots", "shop", "--json", cwd=d, check=True).stdout)
        assert [s["name"][:9] for s in snaps["snapshots"]] == ["pre-sync-"]

        mesh.cli("db", "snapshot", "shop", "synced", cwd=d, check=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM orders")
        mesh.cli("db", "restore", "shop", "synced", cwd=d, check=True)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)

        # a second sync, on a terminal: a progress bar per table; keeps the newest 2 snapshots
        screen = on_a_terminal(mesh, d, "db", "sync", "shop")
        assert "[########################] 3/3 rows" in screen  # orders: id <= 3
        assert "customers" in screen and "Synced shop's database" in screen
        out = mesh.cli("db", "snapshots", "shop", cwd=d, check=True).stdout
        names = [line.split()[0] for line in out.splitlines()]
        assert len(names) == 2 and names[0] == "synced" and names[1].startswith("pre-sync-")

        # errors name the cause, exit 1, never show the source's password
        r = mesh.cli("db", "restore", "shop", "nosuch", cwd=d)
        assert r.returncode == 1 and "no snapshot 'nosuch'" in r.stderr
        r = mesh.cli("db", "url", "nosuch", cwd=d)
        assert r.returncode == 1 and "no service 'nosuch'" in r.stderr
        r = mesh.cli("db", "snapshot", cwd=d)
        assert r.returncode == 2
    finally:
        mesh.cli("down", "--volumes", cwd=d)
        mesh.env.pop("STAGING_URL", None)
    assert postgres_in(cluster_dirs(mesh, "pgsync")) == []


def test_db_sync_reads_the_file_in_its_own_environment_and_names_the_source(
    agent: Mesh, staging: str
) -> None:
    """`up` interpolated ${STAGING_URL} with a URL that leads nowhere; `db sync` run with the
    right one reads the file again, as compose does for each command, and uses it."""
    mesh = agent
    text = f"""
version: 1
project: pgsync
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: native
      sync: {{from: "${{STAGING_URL}}", tables: {{regions: "id <= 2"}}}}
"""
    d = mesh.project("pgsync", text, {"server.py": SERVER})
    src = conninfo_to_dict(staging)
    mesh.env["STAGING_URL"] = "postgresql://u:old-s3cret@127.0.0.1:1/old"
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        mesh.env["STAGING_URL"] = staging
        r = mesh.cli("db", "sync", "shop", cwd=d, check=True)
        assert (
            f"Syncing shop's database from host {src['host']}, port {src['port']}, "
            f"database {src['dbname']}." in r.stderr
        ), r.stderr
        assert str(src["password"]) not in r.stderr + r.stdout
        url = mesh.cli("db", "url", "shop", cwd=d, check=True).stdout.strip()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM regions").fetchone() == (2,)
        # -p NAME alone reads no file: the block as applied, whose source it names.
        r = mesh.cli("db", "sync", "shop", "-p", "pgsync", cwd=mesh.root)
        assert r.returncode == 1
        assert "from host 127.0.0.1, port 1, database old." in r.stderr, r.stderr
        assert "old-s3cret" not in r.stderr + r.stdout
    finally:
        mesh.cli("down", "--volumes", cwd=d)
        mesh.env.pop("STAGING_URL", None)


def test_on_first_up_syncs_when_up_creates_the_database_only(agent: Mesh, staging: str) -> None:
    mesh = agent
    text = f"""
version: 1
project: pgsync
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: native
      sync: {{from: "${{STAGING_URL}}", tables: {{regions: "id <= 2"}}, on_first_up: true}}
"""
    d = mesh.project("pgsync", text, {"server.py": SERVER})
    mesh.env["STAGING_URL"] = staging
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        url = mesh.cli("db", "url", "shop", cwd=d, check=True).stdout.strip()
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM regions").fetchone() == (2,)
            conn.execute("DELETE FROM regions")
        mesh.cli("down", cwd=d, check=True)
        mesh.cli("up", "-d", cwd=d, check=True)  # the database exists: no sync this time
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM regions").fetchone() == (0,)
    finally:
        mesh.cli("down", "--volumes", cwd=d)
        mesh.env.pop("STAGING_URL", None)


def test_a_sync_from_an_unreachable_source_fails_naming_it_without_the_password(
    agent: Mesh,
) -> None:
    mesh = agent
    secret = "s3cr3t-pw"
    text = f"""
version: 1
project: pgsync
services:
  shop:
    version: 1.0.0
    command: {PY} server.py
    db:
      engine: postgres
      provider: native
      sync:
        from: postgresql://u:{secret}@127.0.0.1:1/nowhere
        tables: {{orders: "true"}}
"""
    d = mesh.project("pgsync", text, {"server.py": SERVER})
    try:
        mesh.cli("up", "-d", cwd=d, check=True)
        r = mesh.cli("db", "sync", "shop", cwd=d)
        assert r.returncode == 1
        assert "sync of shop's database failed" in r.stderr and "127.0.0.1:1" in r.stderr
        assert secret not in r.stderr + r.stdout
        assert secret not in (mesh.home / "agent.log").read_text()
    finally:
        mesh.cli("down", "--volumes", cwd=d)
    assert postgres_in(cluster_dirs(mesh, "pgsync")) == []

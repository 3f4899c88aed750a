"""The native PostgreSQL provider against real clusters made with the machine's initdb.

One cluster is shared by the module (initdb costs about a second); tests that must own a
cluster (adoption after a kill, a crash, a taken port, placement) make their own.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from dbkit import ROOT, DbHome, postmasters_in

from devmesh.db import wiring
from devmesh.db.errors import (
    ClusterError,
    DatabaseNotFoundError,
    NoPostgresBinariesError,
    PortTakenError,
    SnapshotError,
)
from devmesh.db.native import NativePostgres
from devmesh.db.spec import DbSpec, DbState

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[DbHome, NativePostgres]]:
    home = DbHome()
    try:
        provider = home.native("shared")
        provider.ensure(DbSpec(project="shared", service="anchor"))
        yield home, provider
    finally:
        assert home.close() == [], "postgres processes were left behind"


@pytest.fixture
def own() -> Iterator[DbHome]:
    home = DbHome()
    try:
        yield home
    finally:
        assert home.close() == [], "postgres processes were left behind"


def fresh(project: str = "shared") -> DbSpec:
    return DbSpec(project=project, service=f"svc-{uuid.uuid4().hex[:8]}")


def query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(sql)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def test_ensure_creates_a_database_and_role_and_is_idempotent(shared) -> None:
    home, provider = shared
    spec = fresh()
    info = provider.ensure(spec)
    try:
        pid = provider.cluster.running_pid(provider.cluster.meta())
        assert info.host == "127.0.0.1" and info.database == spec.database == info.user
        assert len(info.password) >= 24
        assert query(wiring.url(info), "SELECT current_user, current_database()") == [
            (spec.database, spec.database)
        ]
        # the password is stored as SCRAM, and the server listens on loopback only
        assert query(wiring.url(info), "SHOW password_encryption") == [("scram-sha-256",)]
        assert query(wiring.url(info), "SHOW listen_addresses") == [("127.0.0.1",)]
        # again: same values, same server, nothing new
        assert provider.ensure(spec) == info
        assert provider.cluster.running_pid(provider.cluster.meta()) == pid
        assert [p.pid for p in postmasters_in([home.home, home.fallback])] == [pid]
    finally:
        provider.drop(spec)


def test_services_cannot_reach_each_others_database(shared) -> None:
    _, provider = shared
    a, b = fresh(), fresh()
    ia, ib = provider.ensure(a), provider.ensure(b)
    try:
        foreign = wiring.url(ia).rsplit("/", 1)[0] + "/" + ib.database
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(foreign).close()
    finally:
        provider.drop(a)
        provider.drop(b)


def test_status_reports_state_size_and_a_url_without_password(shared) -> None:
    _, provider = shared
    spec = fresh()
    assert provider.status(spec).state is DbState.ABSENT
    info = provider.ensure(spec)
    try:
        st = provider.status(spec)
        assert st.state is DbState.RUNNING and st.provider == "native"
        assert st.size_bytes and st.size_bytes > 1_000_000
        assert info.password not in st.url and ":***@127.0.0.1:" in st.url
    finally:
        provider.drop(spec)
    assert provider.status(spec).state is DbState.ABSENT
    with pytest.raises(DatabaseNotFoundError, match=spec.database):
        provider.conninfo(spec)


def test_a_service_reads_its_database_url_and_pg_variables_at_start(shared, tmp_path) -> None:
    _, provider = shared
    spec = fresh()
    info = provider.ensure(spec)
    try:
        env = {"PATH": os.environ["PATH"], **wiring.environment(info)}
        # a Python service using DATABASE_URL
        script = (
            "import os, psycopg; c = psycopg.connect(os.environ['DATABASE_URL']);"
            " c.execute('CREATE TABLE hits (n int)'); c.execute('INSERT INTO hits VALUES (7)');"
            " c.commit(); print('ok')"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "ok"
        # psql with nothing but libpq's PG* variables
        out = subprocess.run(
            ["psql", "-XAtc", "SELECT n FROM hits"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "7"
    finally:
        provider.drop(spec)


def test_adopted_after_its_owner_is_killed(own) -> None:
    """The owner (an agent) is SIGKILLed; a new owner adopts the running postmaster."""
    root = own.home / "db" / "p" / "postgres"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from devmesh.db.native import NativePostgres
        from devmesh.db.spec import DbSpec
        p = NativePostgres(Path({str(root)!r}), fallback_base=Path({str(own.fallback)!r}))
        p.ensure(DbSpec(project="p", service="api"))
        print("ready", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            assert owner.stdout.readline().strip() == "ready"
            before = postmasters_in([own.home, own.fallback])
            assert len(before) == 1
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=30)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()
    provider = own.native("p")
    assert provider.status(DbSpec(project="p", service="api")).state is DbState.RUNNING
    info = provider.ensure(DbSpec(project="p", service="api"))
    after = postmasters_in([own.home, own.fallback])
    assert [p.pid for p in after] == [before[0].pid]  # adopted: the same, the only one
    assert query(wiring.url(info), "SELECT 1") == [(1,)]


def test_a_crashed_server_is_started_again_and_keeps_its_data(own) -> None:
    provider = own.native("p")
    spec = DbSpec(project="p", service="api")
    info = provider.ensure(spec)
    # synchronous_commit is off in devmesh clusters (a crash may lose the last commits, never
    # corrupt): this write asks for a durable commit, so it must survive the crash
    query(
        wiring.url(info),
        "SET synchronous_commit = on; CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)",
    )
    [postmaster] = postmasters_in([own.home, own.fallback])
    postmaster.kill()  # SIGKILL: a stale postmaster.pid stays behind, its children linger
    postmaster.wait(30)
    meta = provider.cluster.meta()
    assert (Path(meta.data_dir) / "postmaster.pid").exists()
    assert provider.status(spec).state is DbState.STOPPED
    assert provider.ensure(spec) == info
    assert query(wiring.url(info), "SELECT x FROM kept") == [(42,)]


def test_stop_keeps_data_and_start_brings_it_back(own) -> None:
    provider = own.native("p")
    spec = DbSpec(project="p", service="api")
    info = provider.ensure(spec)
    query(wiring.url(info), "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    running_size = provider.status(spec).size_bytes
    provider.stop(spec)
    stopped = provider.status(spec)
    assert stopped.state is DbState.STOPPED
    # read from the files while stopped: about what the server said (it may flush a little)
    assert stopped.size_bytes and abs(stopped.size_bytes - running_size) < 1_000_000
    assert postmasters_in([own.home, own.fallback]) == []
    provider.stop(spec)  # idempotent
    provider.start(spec)
    assert query(wiring.url(info), "SELECT x FROM kept") == [(1,)]


def test_a_taken_port_is_named_with_its_holder(own) -> None:
    provider = own.native("p")
    spec = DbSpec(project="p", service="api")
    info = provider.ensure(spec)
    provider.stop(spec)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", info.port))
        squatter.listen()
        with pytest.raises(PortTakenError, match=rf"port 127.0.0.1:{info.port}.*pid {os.getpid()}"):
            provider.ensure(spec)
    assert postmasters_in([own.home, own.fallback]) == []
    provider.ensure(spec)


def test_missing_binaries_name_the_package_and_create_nothing(own) -> None:
    provider = own.native("p")
    with pytest.raises(NoPostgresBinariesError, match=r"apt-get install postgresql-99"):
        provider.ensure(DbSpec(project="p", service="api", version=99))
    assert provider.cluster.meta() is None
    assert list(own.fallback.iterdir()) == []


def test_a_version_other_than_the_clusters_is_refused(shared) -> None:
    _, provider = shared
    major = provider.cluster.meta().major
    with pytest.raises(
        ClusterError, match=f"asks for PostgreSQL {major + 1}.*is PostgreSQL {major}"
    ):
        provider.ensure(DbSpec(project="shared", service="other", version=major + 1))


@ROOT
def test_as_root_the_cluster_runs_unprivileged_and_data_moves_when_home_is_closed() -> None:
    home = DbHome(traversable=False)  # mode 0700, like /root
    try:
        provider = home.native("p")
        provider.ensure(DbSpec(project="p", service="api"))
        [postmaster] = postmasters_in([home.home, home.fallback])
        user = postmaster.username()
        assert user in ("postgres", "devmesh-pg")
        meta = provider.cluster.meta()
        assert meta.os_user == user
        assert Path(meta.data_dir).is_relative_to(home.fallback)
        assert Path(meta.data_dir).stat().st_uid == pwd.getpwnam(user).pw_uid
        assert (provider.cluster.root / "cluster.json").stat().st_mode & 0o777 == 0o600
        assert provider.cluster.root.stat().st_uid == 0  # the record stays root's
        provider.drop(DbSpec(project="p", service="api"))
        assert list(home.fallback.iterdir()) == []
        assert not provider.cluster.root.exists()
    finally:
        assert home.close() == []


@ROOT
def test_as_root_in_a_reachable_home_the_record_stays_roots(own) -> None:
    provider = own.native("p")
    provider.ensure(DbSpec(project="p", service="api"))
    meta = provider.cluster.meta()
    root = provider.cluster.root
    assert Path(meta.data_dir).parent == root  # data in the home: no fallback needed
    assert root.stat().st_uid == 0 and root.stat().st_mode & 0o777 == 0o711
    assert (root / "cluster.json").stat().st_uid == 0
    assert Path(meta.data_dir).stat().st_uid == pwd.getpwnam(meta.os_user).pw_uid


def test_drop_of_the_last_database_removes_the_cluster(own) -> None:
    provider = own.native("p")
    a, b = DbSpec(project="p", service="a"), DbSpec(project="p", service="b")
    provider.ensure(a)
    provider.ensure(b)
    provider.drop(a)
    assert provider.status(a).state is DbState.ABSENT
    assert provider.status(b).state is DbState.RUNNING
    provider.drop(b)
    provider.drop(b)  # idempotent
    assert postmasters_in([own.home, own.fallback]) == []
    assert not provider.cluster.root.exists()


def test_snapshot_restore_round_trip_list_and_keep(shared) -> None:
    _, provider = shared
    spec = fresh()
    url = wiring.url(provider.ensure(spec))
    try:
        query(url, "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
        provider.snapshot(spec, "before")
        query(url, "DELETE FROM t; INSERT INTO t VALUES (99)")
        provider.snapshot(spec, "after")
        provider.restore(spec, "before")
        assert query(url, "SELECT x FROM t ORDER BY x") == [(1,), (2,)]
        # the service still owns its tables and can write after a restore
        query(url, "INSERT INTO t VALUES (3)")
        provider.restore(spec, "after")
        assert query(url, "SELECT x FROM t") == [(99,)]
        assert [s.name for s in provider.snapshots(spec)] == ["before", "after"]
        with pytest.raises(SnapshotError, match=r"no snapshot 'nope'.*before, after"):
            provider.restore(spec, "nope")
        with pytest.raises(SnapshotError, match="already exists"):
            provider.snapshot(spec, "after")
        with pytest.raises(SnapshotError, match="use a-z"):
            provider.snapshot(spec, "Bad Name")
        provider.snapshot(spec)  # a name from the clock
        assert provider.prune_snapshots(spec, keep=2) == ["before"]
        assert next(s.name for s in provider.snapshots(spec)) == "after"
        # no temporary database left behind, and snapshots refuse connections
        meta = provider.cluster.meta()
        with provider.cluster.admin(meta) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s", (spec.database + "%",)
                ).fetchall()
            ]
            assert not [n for n in names if "restoring" in n or "replaced" in n]
            assert conn.execute(
                "SELECT bool_or(datallowconn) FROM pg_database WHERE datname LIKE %s",
                (spec.database + "__snap__%",),
            ).fetchone() == (False,)
    finally:
        provider.drop(spec)
    # drop took the snapshots with it
    with provider.cluster.admin(provider.cluster.meta()) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s", (spec.database + "%",)
        ).fetchone() == (0,)

"""Snapshots of a docker provider database: template copies inside the container's server.

Against a real Docker engine and a PostgreSQL image built locally (see test_db_docker).
Skipped without an engine on a developer's machine, never where ``DEVMESH_REQUIRE_DOCKER=1``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from dbkit import build_postgres_image

from devmesh.db import wiring
from devmesh.db.container import DockerPostgres, connect, engine_answers
from devmesh.db.errors import DatabaseNotFoundError, SnapshotError
from devmesh.db.spec import DbSpec

if not engine_answers() and os.environ.get("DEVMESH_REQUIRE_DOCKER") != "1":
    pytest.skip(
        "no Docker engine (set DEVMESH_REQUIRE_DOCKER=1 to fail instead)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def image() -> str:
    client = connect()
    try:
        return build_postgres_image(client)
    finally:
        client.close()


@pytest.fixture
def provider(image: str) -> Iterator[tuple[DockerPostgres, DbSpec]]:
    p = DockerPostgres(image=image)
    spec = DbSpec(project=f"t{uuid.uuid4().hex[:8]}", service="api")
    try:
        yield p, spec
    finally:
        p.drop(spec)
        client = p.client
        left = client.containers.list(
            all=True, filters={"label": f"devmesh.project={spec.project}"}
        )
        vols = client.volumes.list(filters={"label": f"devmesh.project={spec.project}"})
        p.close()
        assert (left, vols) == ([], []), "containers or volumes were left behind"


def test_snapshot_restore_list_and_keep_n_in_a_container(provider) -> None:
    p, spec = provider
    info = p.ensure(spec)
    url = wiring.url(info)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
    snap = p.snapshot(spec, "two")
    assert snap.name == "two" and snap.size_bytes > 0

    service = psycopg.connect(url, autocommit=True)  # the service's session: ended by restore
    try:
        service.execute("DELETE FROM t")
        p.restore(spec, "two")
        with pytest.raises(psycopg.OperationalError):
            service.execute("SELECT 1")
    finally:
        service.close()
    with psycopg.connect(url) as conn:  # the service's own role reaches it and owns it
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert owner == (info.user,)
        conn.execute("INSERT INTO t VALUES (3)")  # and can write

    p.snapshot(spec, "b")
    default = p.snapshot(spec)  # named by the UTC time
    assert [s.name for s in p.snapshots(spec)] == ["two", "b", default.name]
    assert p.prune_snapshots(spec, 1) == ["two", "b"]
    assert [s.name for s in p.snapshots(spec)] == [default.name]
    with pytest.raises(SnapshotError, match=rf"no snapshot 'two' .*\(snapshots: {default.name}\)"):
        p.restore(spec, "two")
    with pytest.raises(SnapshotError, match="already exists"):
        p.snapshot(spec, default.name)

    p.stop(spec)
    with pytest.raises(DatabaseNotFoundError, match="container of service 'api' is exited"):
        p.snapshots(spec)
    p.start(spec)
    assert [s.name for s in p.snapshots(spec)] == [default.name]  # kept in the volume

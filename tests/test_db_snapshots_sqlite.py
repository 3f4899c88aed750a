"""Snapshots of SQLite databases: online-backup copies beside the file, restored in place.

Real files and real sqlite3 connections throughout; "the service" is a second connection
(or, for the open-connection case, a second process) that stays open across the restore.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmesh.db.errors import SnapshotError
from devmesh.db.spec import DbSpec, Engine
from devmesh.db.sqlite import Sqlite

SPEC = DbSpec(project="p", service="notes", engine=Engine.SQLITE)


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Sqlite]:
    provider = Sqlite(tmp_path / "db" / "p" / "sqlite", busy_timeout_s=0.2)
    provider.ensure(SPEC)
    with contextlib.closing(sqlite3.connect(provider.path(SPEC))) as db:
        db.execute("CREATE TABLE notes (n INTEGER)")
        db.executemany("INSERT INTO notes VALUES (?)", [(i,) for i in range(3)])
        db.commit()
    yield provider
    provider.drop(SPEC)


def rows(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute("SELECT n FROM notes ORDER BY n")]


def test_snapshot_then_restore_round_trip_seen_by_an_open_connection(lite: Sqlite) -> None:
    path = lite.path(SPEC)
    info = lite.snapshot(SPEC, "before")
    assert info.name == "before" and info.size_bytes > 0
    copy = lite.snapshot_dir(SPEC) / "before.sqlite3"
    assert copy.parent.parent == path.parent  # beside the database file
    with contextlib.closing(sqlite3.connect(copy)) as db:  # a plain, self-contained file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert [r[0] for r in db.execute("SELECT n FROM notes ORDER BY n")] == [0, 1, 2]

    service = sqlite3.connect(path)  # the service's connection stays open throughout
    try:
        service.execute("DELETE FROM notes")
        service.execute("INSERT INTO notes VALUES (99)")
        service.commit()
        lite.restore(SPEC, "before")
        assert [r[0] for r in service.execute("SELECT n FROM notes ORDER BY n")] == [0, 1, 2]
        service.execute("INSERT INTO notes VALUES (3)")  # and it can still write
        service.commit()
    finally:
        service.close()
    assert rows(path) == [0, 1, 2, 3]
    with contextlib.closing(sqlite3.connect(path)) as db:  # still the live file's WAL mode
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_snapshot_is_consistent_while_a_writer_is_mid_transaction(lite: Sqlite) -> None:
    writer = sqlite3.connect(lite.path(SPEC), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO notes VALUES (42)")
        lite.snapshot(SPEC, "mid")  # WAL: the writer does not block the copy
        writer.execute("COMMIT")
    finally:
        writer.close()
    copy = lite.snapshot_dir(SPEC) / "mid.sqlite3"
    assert rows(copy) == [0, 1, 2]  # committed rows only
    assert rows(lite.path(SPEC)) == [0, 1, 2, 42]


def test_a_restore_blocked_by_a_writer_fails_and_leaves_the_data(lite: Sqlite) -> None:
    lite.snapshot(SPEC, "before")
    writer = sqlite3.connect(lite.path(SPEC), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO notes VALUES (7)")
        with pytest.raises(SnapshotError, match=r"restore of SQLite database .*notes\.sqlite3"):
            lite.restore(SPEC, "before")
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert rows(lite.path(SPEC)) == [0, 1, 2, 7]


def test_listing_keep_n_names_and_drop(lite: Sqlite) -> None:
    assert lite.snapshots(SPEC) == []
    for name in ("a", "b", "c"):
        lite.snapshot(SPEC, name)
    default = lite.snapshot(SPEC)  # named by the UTC time
    assert [s.name for s in lite.snapshots(SPEC)] == ["a", "b", "c", default.name]
    assert lite.prune_snapshots(SPEC, 2) == ["a", "b"]
    assert [s.name for s in lite.snapshots(SPEC)] == ["c", default.name]
    assert sorted(p.name for p in lite.snapshot_dir(SPEC).iterdir()) == sorted(
        [f"{default.name}.json", f"{default.name}.sqlite3", "c.json", "c.sqlite3"]
    )
    with pytest.raises(SnapshotError, match="snapshot 'c' of database 'notes' already exists"):
        lite.snapshot(SPEC, "c")
    with pytest.raises(SnapshotError, match=r"no snapshot 'a' .*\(snapshots: c, "):
        lite.restore(SPEC, "a")
    with pytest.raises(SnapshotError, match=r"use a-z, 0-9"):
        lite.snapshot(SPEC, "../escape")
    lite.drop(SPEC)
    assert not lite.snapshot_dir(SPEC).exists()
    assert list(lite.root.iterdir()) == []


def test_a_restore_reaches_a_service_process_holding_its_connection(lite: Sqlite) -> None:
    """A separate process with one connection open for its whole life, as a service has."""
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1])\n"
            "for line in sys.stdin:\n"
            "    print([r[0] for r in db.execute('SELECT n FROM notes ORDER BY n')], flush=True)\n",
            str(lite.path(SPEC)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert service.stdin is not None and service.stdout is not None
    try:

        def ask() -> str:
            assert service.stdin is not None and service.stdout is not None
            service.stdin.write("?\n")
            service.stdin.flush()
            return service.stdout.readline().strip()

        assert ask() == "[0, 1, 2]"
        lite.snapshot(SPEC, "three")
        with contextlib.closing(sqlite3.connect(lite.path(SPEC))) as db:
            db.execute("DELETE FROM notes")
            db.commit()
        assert ask() == "[]"
        lite.restore(SPEC, "three")
        assert ask() == "[0, 1, 2]"
    finally:
        service.stdin.close()
        service.wait(timeout=30)
        service.stdout.close()

"""The SQLite provider: a file per service in the project's state.

Why so small: SQLite has no server, so "start" and "stop" have nothing to do and "ready"
means the file exists. ``ensure`` creates the file (an empty database, WAL mode so a
service's readers do not block its writer) and keeps an existing one as it is.
``drop`` deletes the file with its ``-wal``/``-shm``/``-journal`` companions and its
snapshots.

Snapshots are copies made with SQLite's online backup API (``Connection.backup``), which
reads the live database in one read transaction: the copy is consistent even while the
service writes (in WAL mode the writer is not blocked). They sit beside the database, in
``DATABASE.snapshots/NAME.sqlite3`` (a single file, rollback journal) with ``NAME.json``
saying when it was taken. A restore runs the backup the other way, into the live file
through SQLite itself, so the service's open connections see the restored data at their
next transaction, as after any other write; it waits (``busy_timeout_s``) for a writer to
finish, and a failed restore leaves the database as it was (the backup is one transaction).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from devmesh.db import snapshots, wiring
from devmesh.db.errors import DatabaseNotFoundError, SnapshotError
from devmesh.db.snapshots import SnapshotInfo
from devmesh.db.spec import ConnInfo, DbSpec, DbState, DbStatus, Engine

_COMPANIONS = ("-wal", "-shm", "-journal")
_MAX_NAME = 100


class Sqlite:
    """``spec.Provider`` for SQLite files under ``root`` (``DEVMESH_HOME/db/PROJECT/sqlite``)."""

    name = "sqlite"

    def __init__(self, root: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.root = root.absolute()
        self.busy_timeout_s = busy_timeout_s

    def path(self, spec: DbSpec) -> Path:
        return self.root / f"{spec.database}.sqlite3"

    def ensure(self, spec: DbSpec) -> ConnInfo:
        path = self.path(spec)
        self.root.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        return self._conninfo(path)

    def start(self, spec: DbSpec) -> None:
        self.conninfo(spec)

    def stop(self, spec: DbSpec) -> None:
        """Nothing runs: a no-op."""

    def status(self, spec: DbSpec) -> DbStatus:
        path = self.path(spec)
        exists = path.exists()
        size = None
        if exists:
            size = sum(
                p.stat().st_size
                for p in (path, *(Path(f"{path}{c}") for c in _COMPANIONS))
                if p.exists()
            )
        return DbStatus(
            service=spec.service,
            engine=Engine.SQLITE,
            provider=self.name,
            state=DbState.RUNNING if exists else DbState.ABSENT,
            size_bytes=size,
            url=wiring.display_url(self._conninfo(path)),
        )

    def conninfo(self, spec: DbSpec) -> ConnInfo:
        path = self.path(spec)
        if not path.exists():
            raise DatabaseNotFoundError(
                f"no SQLite database for service {spec.service!r}: {path} does not exist"
            )
        return self._conninfo(path)

    def drop(self, spec: DbSpec) -> None:
        path = self.path(spec)
        for p in (path, *(Path(f"{path}{c}") for c in _COMPANIONS)):
            p.unlink(missing_ok=True)
        folder = self.snapshot_dir(spec)
        if folder.is_dir():
            for p in folder.iterdir():
                p.unlink(missing_ok=True)
            folder.rmdir()

    # -- snapshots ----------------------------------------------------------------------

    def snapshot_dir(self, spec: DbSpec) -> Path:
        return self.root / f"{spec.database}.snapshots"

    def _snapshot_file(self, spec: DbSpec, name: str) -> Path:
        snapshots.check_name(spec.database, name, _MAX_NAME)
        return self.snapshot_dir(spec) / f"{name}.sqlite3"

    def snapshot(self, spec: DbSpec, name: str | None = None) -> SnapshotInfo:
        """A consistent copy of the live database; ``name`` defaults to the UTC time."""
        live = self.conninfo(spec).path
        assert live is not None
        now = datetime.now(UTC)
        name = name or now.strftime("%Y%m%d-%H%M%S-%f")
        target = self._snapshot_file(spec, name)
        if target.exists():
            raise SnapshotError(f"snapshot {name!r} of database {spec.database!r} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".tmp")
        os.close(fd)
        try:
            with (
                contextlib.closing(self._open(live)) as src,
                contextlib.closing(sqlite3.connect(tmp)) as dst,
            ):
                src.backup(dst, progress=self._deadline(live))
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            meta = {"devmesh_snapshot_of": spec.database, "name": name, "at": now.isoformat()}
            target.with_suffix(".json").write_text(json.dumps(meta))
            os.replace(tmp, target)
        except (sqlite3.Error, _BusyError) as exc:
            raise SnapshotError(
                f"snapshot {name!r} of SQLite database {live} failed: {exc}"
            ) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return SnapshotInfo(name=name, created_at=now.isoformat(), size_bytes=target.stat().st_size)

    def restore(self, spec: DbSpec, name: str) -> None:
        """Write snapshot ``name`` back into the live file, in one transaction."""
        live = self.conninfo(spec).path
        assert live is not None
        source = self._snapshot_file(spec, name)
        if not source.exists():
            known = ", ".join(s.name for s in self.snapshots(spec)) or "none"
            raise SnapshotError(
                f"no snapshot {name!r} of database {spec.database!r} (snapshots: {known})"
            )
        try:
            with (
                contextlib.closing(sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)) as src,
                contextlib.closing(self._open(live)) as dst,
            ):
                src.backup(dst, progress=self._deadline(live))
        except (sqlite3.Error, _BusyError) as exc:
            raise SnapshotError(
                f"restore of SQLite database {live} from {name!r} failed: {exc}"
            ) from None

    def snapshots(self, spec: DbSpec) -> list[SnapshotInfo]:
        """The snapshots, oldest first (a copy without its ``.json`` is not one: skipped)."""
        folder = self.snapshot_dir(spec)
        out: list[SnapshotInfo] = []
        if not folder.is_dir():
            return out
        for copy in folder.glob("*.sqlite3"):
            try:
                meta = json.loads(copy.with_suffix(".json").read_text())
                size = copy.stat().st_size
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or meta.get("devmesh_snapshot_of") != spec.database:
                continue
            out.append(SnapshotInfo(name=copy.stem, created_at=str(meta["at"]), size_bytes=size))
        return sorted(out, key=lambda s: (s.created_at, s.name))

    def delete_snapshot(self, spec: DbSpec, name: str) -> None:
        copy = self._snapshot_file(spec, name)
        copy.unlink(missing_ok=True)
        copy.with_suffix(".json").unlink(missing_ok=True)

    def prune_snapshots(self, spec: DbSpec, keep: int) -> list[str]:
        """Keep the newest ``keep`` snapshots; returns the names deleted."""
        snaps = self.snapshots(spec)
        doomed = snaps[: max(0, len(snaps) - keep)]
        for s in doomed:
            self.delete_snapshot(spec, s.name)
        return [s.name for s in doomed]

    def _open(self, path: Path) -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=self.busy_timeout_s)

    def _deadline(self, path: Path) -> Callable[[int, int, int], None]:
        """A backup ``progress`` that gives up past ``busy_timeout_s`` of lock waits.

        Why: Python's ``Connection.backup`` retries a busy database forever (it ignores the
        busy timeout), so a writer holding its transaction open would hang the agent.
        """
        deadline = time.monotonic() + self.busy_timeout_s

        def progress(status: int, remaining: int, total: int) -> None:
            busy = status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if busy and time.monotonic() > deadline:
                raise _BusyError(
                    f"{path} stayed locked by another connection's transaction for "
                    f"{self.busy_timeout_s:g} s"
                )

        return progress

    def _conninfo(self, path: Path) -> ConnInfo:
        return ConnInfo(engine=Engine.SQLITE, path=path)


class _BusyError(Exception):
    """The database stayed locked past the busy timeout during a backup."""

"""The SQLite provider: a file per service in the project's state.

Why so small: SQLite has no server, so "start" and "stop" have nothing to do and "ready"
means the file exists. ``ensure`` creates the file (an empty database, WAL mode so a
service's readers do not block its writer) and keeps an existing one as it is.
``drop`` deletes the file with its ``-wal``/``-shm``/``-journal`` companions.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from devmesh.db import wiring
from devmesh.db.errors import DatabaseNotFoundError
from devmesh.db.spec import ConnInfo, DbSpec, DbState, DbStatus, Engine

_COMPANIONS = ("-wal", "-shm", "-journal")


class Sqlite:
    """``spec.Provider`` for SQLite files under ``root`` (``DEVMESH_HOME/db/PROJECT/sqlite``)."""

    name = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

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

    def _conninfo(self, path: Path) -> ConnInfo:
        return ConnInfo(engine=Engine.SQLITE, path=path)

"""The metrics history's SQLite file: per-minute rollups per route, in DEVMESH_HOME.

Why SQLite, WAL and this shape: the history must survive an agent restart and a crash, and be
read while it is written (``devmesh metrics`` asks the agent, which reads as it writes). WAL
with ``synchronous=NORMAL`` makes each write one append to the log, durable once the agent
is gone (a power cut may lose the last writes, never the file). A row is one route's counts
in one minute; the counts that several writes of the same minute bring are added up in the
row (``add``), so the agent may write as often as it likes.

A file that is not a database, or not one this code wrote, is moved aside
(``metrics.db.corrupt-UNIX``) with a warning and a new one is started: a history is worth
less than an agent that runs. Every other failure of SQLite is reported the same way and
never raised to the caller.

This module is the only one that speaks SQL; the arithmetic is ``core.metrics``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from devmesh.core import metrics as core

log = logging.getLogger("devmesh.agent.metrics")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollups (
    minute INTEGER NOT NULL,
    kind TEXT NOT NULL,
    project TEXT NOT NULL,
    caller TEXT NOT NULL,
    service TEXT NOT NULL,
    target TEXT NOT NULL,
    node TEXT NOT NULL,
    requests INTEGER NOT NULL,
    stats TEXT NOT NULL,
    PRIMARY KEY (minute, kind, project, caller, service, target, node)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_by_service ON rollups (service, minute);
"""


class MetricsDB:
    """The history file; every method answers (or does nothing) rather than raise."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """``clock`` names a moved-aside file (Unix seconds)."""
        self.path = path
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self.moved_aside: list[Path] = []
        """Files this object moved aside, oldest first (tests and ``status`` read it)."""

    def open(self) -> None:
        """Open (or create) the file; a corrupt one is moved aside and a new one started."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as again:
                log.warning("metrics history disabled: cannot create %s: %s", self.path, again)
                self._db = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check says {check[0] if check else '?'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this devmesh writes {SCHEMA_VERSION}"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        return db

    def _move_aside(self, exc: BaseException) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        kept = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
        try:
            os.replace(self.path, kept)
        except FileNotFoundError:
            return
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(
                    self.path.with_name(self.path.name + suffix),
                    kept.with_name(kept.name + suffix),
                )
        self.moved_aside.append(kept)
        log.warning(
            "metrics history %s is unreadable (%s): moved aside to %s; starting a new one",
            self.path,
            exc,
            kept,
        )

    def _failed(self, exc: sqlite3.Error) -> None:
        """A read or write failed: a corrupt file goes aside and a new one is opened."""
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            self._move_aside(exc)
            self.open()
        else:
            log.warning("metrics history %s: %s", self.path, exc)

    def add(self, minute: int, rows: Mapping[core.RouteKey, core.Stats]) -> None:
        """Add ``rows`` (counts per route) to the rollups of ``minute`` (Unix seconds)."""
        if self._db is None or not rows:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, stats in rows.items():
                    found = db.execute(
                        "SELECT stats FROM rollups WHERE minute=? AND kind=? AND project=? "
                        "AND caller=? AND service=? AND target=? AND node=?",
                        (minute, *key),
                    ).fetchone()
                    total = stats
                    if found is not None:
                        total = _decode(found[0])
                        total.add(stats)
                    db.execute(
                        "INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (minute, *key, total.requests, json.dumps(total.to_dict())),
                    )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._failed(exc)

    def read(self, since_minute: int) -> list[tuple[int, core.RouteKey, core.Stats]]:
        """Every rollup row from ``since_minute`` on, oldest first; unreadable rows skipped."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute(
                "SELECT minute, kind, project, caller, service, target, node, stats "
                "FROM rollups WHERE minute >= ? ORDER BY minute",
                (since_minute,),
            ).fetchall()
        except sqlite3.Error as exc:
            self._failed(exc)
            return []
        out = []
        for minute, *labels, raw in rows:
            try:
                out.append((int(minute), core.RouteKey(*labels), _decode(raw)))
            except ValueError:
                continue
        return out

    def prune(self, before_minute: int) -> int:
        """Delete the rows of minutes before ``before_minute``; how many went."""
        if self._db is None:
            return 0
        try:
            cur = self._db.execute("DELETE FROM rollups WHERE minute < ?", (before_minute,))
        except sqlite3.Error as exc:
            self._failed(exc)
            return 0
        return cur.rowcount

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


def _decode(raw: str) -> core.Stats:
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable rollup: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("unreadable rollup")
    return core.Stats.from_dict(data)

"""Snapshots of one native PostgreSQL database, as template copies.

Why template copies: ``CREATE DATABASE copy TEMPLATE db`` copies the database's files inside
the server (``STRATEGY FILE_COPY``: one checkpoint, then a file copy), which is far faster
than dump and restore and needs no client tools. A snapshot is a database named
``DB__snap__NAME`` that refuses connections (so nobody writes to it and restoring from it
never waits), described by a JSON comment (what it copies, when it was taken).

What it costs: PostgreSQL copies only a database nobody is connected to, so taking a
snapshot or restoring one ends the service's open sessions on that database (the service's
driver reconnects; ``ALLOW_CONNECTIONS`` is off for the moment of the copy so it cannot
reconnect mid-copy). Restore builds the copy under a temporary name first and swaps names,
so a failed restore leaves the database as it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from devmesh.db.errors import SnapshotError

SEP = "__snap__"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_MAX_IDENT = 63


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotInfo:
    name: str
    created_at: str
    """ISO 8601, UTC."""
    size_bytes: int


def check_name(database: str, name: str, max_chars: int) -> None:
    """``SnapshotError`` unless ``name`` is a-z, 0-9, '_' and '-', at most ``max_chars``."""
    if not _NAME.match(name) or len(name) > max_chars:
        raise SnapshotError(
            f"snapshot name {name!r} of database {database!r}: use a-z, 0-9, '_' and '-', "
            f"at most {max_chars} characters"
        )


def snapshot_db(database: str, name: str) -> str:
    """The database holding snapshot ``name`` of ``database``; ``SnapshotError`` when invalid."""
    check_name(database, name, _MAX_IDENT - len(database.encode()) - len(SEP))
    return f"{database}{SEP}{name}"


def _quiesce(conn: psycopg.Connection[TupleRow], database: str) -> None:
    """Refuse new sessions to ``database`` and end the open ones (not ours)."""
    conn.execute(
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(database))
    )
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )


def _reopen(conn: psycopg.Connection[TupleRow], database: str) -> None:
    conn.execute(
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(database))
    )


def take(
    conn: psycopg.Connection[TupleRow], database: str, name: str, created_at: str
) -> SnapshotInfo:
    """Copy ``database`` into snapshot ``name`` (``conn``: superuser, autocommit)."""
    target = snapshot_db(database, name)
    if _exists(conn, target):
        raise SnapshotError(f"snapshot {name!r} of database {database!r} already exists")
    _quiesce(conn, database)
    try:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(target), sql.Identifier(database)
            )
        )
    except psycopg.Error as exc:
        raise SnapshotError(f"snapshot {name!r} of database {database!r} failed: {exc}") from exc
    finally:
        _reopen(conn, database)
    ident = sql.Identifier(target)
    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
    comment = json.dumps({"devmesh_snapshot_of": database, "name": name, "at": created_at})
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(comment)))
    return SnapshotInfo(name=name, created_at=created_at, size_bytes=_size(conn, target))


def restore(conn: psycopg.Connection[TupleRow], database: str, owner: str, name: str) -> None:
    """Make ``database`` a copy of snapshot ``name`` again; on failure it stays as it was."""
    source = snapshot_db(database, name)
    if not _exists(conn, source):
        known = ", ".join(s.name for s in listing(conn, database)) or "none"
        raise SnapshotError(f"no snapshot {name!r} of database {database!r} (snapshots: {known})")
    fresh, old = f"{database}__restoring", f"{database}__replaced"
    for leftover in (fresh, old):
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(leftover)))
    try:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
                sql.Identifier(fresh), sql.Identifier(source), sql.Identifier(owner)
            )
        )
        conn.execute(
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(fresh)
            )
        )
        _quiesce(conn, database)
        try:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(database), sql.Identifier(old)
                )
            )
        except psycopg.Error:
            _reopen(conn, database)
            raise
    except psycopg.Error as exc:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(fresh)))
        raise SnapshotError(f"restore of {database!r} from {name!r} failed: {exc}") from exc
    conn.execute(
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(fresh), sql.Identifier(database)
        )
    )
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(old)))


def listing(conn: psycopg.Connection[TupleRow], database: str) -> list[SnapshotInfo]:
    """Snapshots of ``database``, oldest first."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database'), pg_database_size(oid)"
        " FROM pg_database WHERE starts_with(datname, %s)",
        (database + SEP,),
    ).fetchall()
    out: list[SnapshotInfo] = []
    for datname, comment, size in rows:
        try:
            meta = json.loads(comment or "{}")
        except ValueError:
            continue
        if meta.get("devmesh_snapshot_of") != database:
            continue
        out.append(
            SnapshotInfo(
                name=str(datname)[len(database) + len(SEP) :],
                created_at=meta["at"],
                size_bytes=int(size),
            )
        )
    return sorted(out, key=lambda s: (s.created_at, s.name))


def delete(conn: psycopg.Connection[TupleRow], database: str, name: str) -> None:
    conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(snapshot_db(database, name)))
    )


def prune(conn: psycopg.Connection[TupleRow], database: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` snapshots; the names deleted."""
    snaps = listing(conn, database)
    doomed = snaps[: max(0, len(snaps) - keep)]
    for s in doomed:
        delete(conn, database, s.name)
    return [s.name for s in doomed]


def _exists(conn: psycopg.Connection[TupleRow], datname: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (datname,)).fetchone()
    return row is not None


def _size(conn: psycopg.Connection[TupleRow], datname: str) -> int:
    row = conn.execute("SELECT pg_database_size(%s)", (datname,)).fetchone()
    return int(row[0]) if row else 0

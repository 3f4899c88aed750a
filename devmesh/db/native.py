"""The native provider: one PostgreSQL cluster per project, a database and role per service.

Why one cluster per project, not per service: a postmaster costs ~30 MB and ~0.1 s to
start, a database inside it costs nothing; isolation between a project's services comes
from roles (each owns its database; CONNECT is revoked from everyone else). The cluster
(``cluster.Cluster``) handles processes and files; this module handles roles, databases and
snapshots, and implements ``spec.Provider``.

What it does not guarantee: ``stop`` stops the whole project cluster, so the agent calls it
when the project goes ``down`` (every service's database at once), not per service.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from devmesh.db import snapshots, wiring
from devmesh.db.cluster import DEFAULT_FALLBACK, Cluster, ClusterMeta
from devmesh.db.errors import ClusterError, DatabaseNotFoundError
from devmesh.db.snapshots import SnapshotInfo
from devmesh.db.spec import ConnInfo, DbSpec, DbState, DbStatus, Engine


class NativePostgres:
    """``spec.Provider`` over the project's cluster under ``root``."""

    name = "native"

    def __init__(
        self,
        root: Path,
        *,
        fallback_base: Path = DEFAULT_FALLBACK,
        start_timeout_s: float = 60.0,
        extra_bindirs: list[Path] | None = None,
    ) -> None:
        self.cluster = Cluster(
            root,
            fallback_base=fallback_base,
            start_timeout_s=start_timeout_s,
            extra_bindirs=extra_bindirs,
        )

    # -- Provider -----------------------------------------------------------------------

    def ensure(self, spec: DbSpec) -> ConnInfo:
        """Make (or adopt) the cluster, start it, make the service's role and database.

        Idempotent: an existing cluster, role and database are kept as they are.
        """
        db = spec.database
        with self.cluster.locked():
            meta = self.cluster.meta()
            if meta is None:
                meta = self.cluster.create(spec.version)
            elif spec.version is not None and spec.version != meta.major:
                raise ClusterError(
                    f"service {spec.service!r} asks for PostgreSQL {spec.version}, but the "
                    f"project's cluster ({self.cluster.root}) is PostgreSQL {meta.major}; "
                    f"one cluster serves one major version: align `version`, or drop the "
                    f"project's databases to make a new cluster"
                )
            self.cluster.start(meta)
            password = meta.roles.get(db) or secrets.token_urlsafe(24)
            if db not in meta.roles:
                meta = self.cluster.with_role(meta, db, password)
                self.cluster.save(meta)  # before CREATE ROLE: a crash never loses a password
            with self.cluster.admin(meta) as conn:
                _ensure_role_and_db(conn, db, password)
                meta = self.cluster.note_oid(meta, conn, db)
        return self._conninfo(meta, db)

    def start(self, spec: DbSpec) -> None:
        with self.cluster.locked():
            self.cluster.start(self._meta(spec))

    def stop(self, spec: DbSpec | None = None) -> None:
        """Stop the project's cluster (every service's database), keeping the data."""
        if self.cluster.meta() is None:
            return
        with self.cluster.locked():
            meta = self.cluster.meta()
            if meta is not None:
                self.cluster.stop(meta)

    def status(self, spec: DbSpec) -> DbStatus:
        meta = self.cluster.meta()
        db = spec.database
        if meta is None or db not in meta.roles:
            return DbStatus(
                service=spec.service,
                engine=Engine.POSTGRES,
                provider=self.name,
                state=DbState.ABSENT,
                size_bytes=None,
                url="",
            )
        size = self.cluster.size_on_disk(meta, db)
        state = DbState.STOPPED
        if self.cluster.running_pid(meta) is not None:
            state = DbState.RUNNING
            with self.cluster.admin(meta) as conn:
                row = conn.execute(
                    "SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s", (db,)
                ).fetchone()
            size = int(row[0]) if row else None
        return DbStatus(
            service=spec.service,
            engine=Engine.POSTGRES,
            provider=self.name,
            state=state,
            size_bytes=size,
            url=wiring.display_url(self._conninfo(meta, db)),
        )

    def conninfo(self, spec: DbSpec) -> ConnInfo:
        return self._conninfo(self._meta(spec), spec.database)

    def drop(self, spec: DbSpec) -> None:
        """Drop the service's database, its snapshots and role; the last one takes the
        cluster with it (its files, its port)."""
        db = spec.database
        if self.cluster.meta() is None:
            return
        with self.cluster.locked():
            meta = self.cluster.meta()
            if meta is None:
                return
            if db in meta.roles:
                if set(meta.roles) == {db}:
                    self.cluster.destroy()
                    return
                was_running = self.cluster.running_pid(meta) is not None
                self.cluster.start(meta)
                with self.cluster.admin(meta) as conn:
                    for snap in snapshots.listing(conn, db):
                        snapshots.delete(conn, db, snap.name)
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(db)
                        )
                    )
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(db)))
                self.cluster.save(self.cluster.without_role(meta, db))
                if not was_running:
                    self.cluster.stop(meta)
            elif not meta.roles:
                self.cluster.destroy()

    def destroy(self) -> None:
        """Delete the whole project cluster, every service's data included."""
        if not self.cluster.root.exists():
            return
        with self.cluster.locked():
            self.cluster.destroy()

    # -- for sync and snapshots ---------------------------------------------------------

    def admin_conninfo(self, spec: DbSpec) -> str:
        """A superuser conninfo into the service's database (the target of a sync)."""
        return self.cluster.admin_conninfo(self._running(spec), spec.database)

    def snapshot(self, spec: DbSpec, name: str | None = None) -> SnapshotInfo:
        """Copy the service's database; ``name`` defaults to the UTC time."""
        now = datetime.now(UTC)
        name = name or now.strftime("%Y%m%d-%H%M%S-%f")
        with self.cluster.admin(self._running(spec)) as conn:
            return snapshots.take(conn, spec.database, name, now.isoformat())

    def restore(self, spec: DbSpec, name: str) -> None:
        meta = self._running(spec)
        with self.cluster.locked(), self.cluster.admin(meta) as conn:
            snapshots.restore(conn, spec.database, spec.database, name)
            self.cluster.note_oid(self.cluster.meta() or meta, conn, spec.database)

    def snapshots(self, spec: DbSpec) -> list[SnapshotInfo]:
        with self.cluster.admin(self._running(spec)) as conn:
            return snapshots.listing(conn, spec.database)

    def prune_snapshots(self, spec: DbSpec, keep: int) -> list[str]:
        """Keep the newest ``keep`` snapshots; returns the names deleted."""
        with self.cluster.admin(self._running(spec)) as conn:
            return snapshots.prune(conn, spec.database, keep)

    # -- helpers ------------------------------------------------------------------------

    def _meta(self, spec: DbSpec) -> ClusterMeta:
        meta = self.cluster.meta()
        if meta is None or spec.database not in meta.roles:
            raise DatabaseNotFoundError(
                f"no PostgreSQL database {spec.database!r} for service {spec.service!r} in "
                f"{self.cluster.root} (not created yet, or dropped)"
            )
        return meta

    def _running(self, spec: DbSpec) -> ClusterMeta:
        meta = self._meta(spec)
        if self.cluster.running_pid(meta) is None:
            with self.cluster.locked():
                self.cluster.start(meta)
        return meta

    def _conninfo(self, meta: ClusterMeta, db: str) -> ConnInfo:
        return ConnInfo(
            engine=Engine.POSTGRES,
            host="127.0.0.1",
            port=meta.port,
            user=db,
            password=meta.roles[db],
            database=db,
        )


def _ensure_role_and_db(conn: psycopg.Connection[TupleRow], db: str, password: str) -> None:
    """Create the role (login, given password) and its database unless they exist."""
    ident = sql.Identifier(db)
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db,)).fetchone() is None:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
        )
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, ident))
        conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident))

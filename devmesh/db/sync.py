"""Staging subset sync: copy a consistent, complete subset of a source database locally.

Strategy, and why:

- **One snapshot of the source.** Everything is read in one ``READ ONLY``, ``REPEATABLE
  READ`` transaction, on a session whose ``default_transaction_read_only`` is on (so even a
  ``where`` clause that tried to end the transaction could not write). The schema comes from
  the source's own ``pg_dump`` (the oldest installed one that can read the source's
  version), run with ``--snapshot`` set to the snapshot this transaction exported: schema
  and rows are of the same instant. pg_dump rather than introspection because it already
  knows every kind of object (types, sequences, defaults, checks, partitions, indexes,
  triggers, views, functions) in every server version; rebuilding that would be a second,
  worse pg_dump. Its output is split as pg_dump splits it: ``pre-data`` (types, tables,
  sequences) before the rows, ``post-data`` (primary keys, indexes, foreign keys, triggers)
  after, which is also why cycles of foreign keys load in any order.
- **The rows** are those of ``subset.Walker``: the chosen rows plus their foreign-key
  closure. They stream with ``COPY (SELECT ...) TO STDOUT`` from the source into ``COPY ...
  FROM STDIN`` locally, chunk by chunk, never materialised here.
- **All or nothing locally.** The local database is rewritten in ONE transaction: drop the
  user schemas, create the source's schema, copy, add constraints, set sequences, commit.
  Any failure rolls it back, so the local database is exactly as it was (PostgreSQL DDL is
  transactional). The objects are created under ``SET ROLE`` of the service's role, so the
  service owns its tables.

What it does not guarantee: objects needing a superuser in the source (untrusted
extensions) are not recreated (the error names them); rows reached through foreign keys are
not limited by ``limit``; ``exclude_columns`` leave their column to its default (or NULL),
and a NOT NULL column without default cannot be excluded (said before anything is copied).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg import IsolationLevel, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from devmesh.db import pgbin, subset, wiring
from devmesh.db.errors import DbError, SyncError, SyncInputError, SyncSourceError

PROGRESS_EVERY_BYTES = 1 << 20
WRITE_BLOCK_BYTES = 1 << 18


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncSpec:
    """The ``sync:`` block of a service's database."""

    source_url: str
    tables: Mapping[str, str]
    """Table name (``orders`` or ``schema.orders``) -> SQL ``where`` choosing its rows."""
    limit: int | None = None
    """At most this many rows per chosen table (before following foreign keys)."""
    follow_foreign_keys: bool = True
    exclude_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Columns not copied (left to their default or NULL locally), per table."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """One table's copy so far; ``done`` on its last report."""

    table: str
    rows: int
    bytes: int
    rows_total: int | None
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TableCopied:
    table: str
    rows: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResult:
    tables: tuple[TableCopied, ...]
    elapsed_s: float

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Where a sync reads from, as `db sync` prints it before it starts: never the password."""

    host: str
    port: str
    database: str

    def text(self) -> str:
        return f"host {self.host}, port {self.port}, database {self.database}"


def source_of(url: str) -> Source | None:
    """The host, port and database of ``sync.from`` as libpq reads them, with libpq's
    defaults for what it leaves out (the local socket, 5432, a database named after the
    user); None when it is not a PostgreSQL URL (the sync itself then says so)."""
    try:
        info = conninfo_to_dict(make_conninfo(url))
    except psycopg.Error:
        return None
    return Source(
        host=str(info.get("host") or info.get("hostaddr") or "the local socket"),
        port=str(info.get("port") or 5432),
        database=str(info.get("dbname") or info.get("user") or "the user's name"),
    )


def run(
    spec: SyncSpec,
    target: str,
    owner: str,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> SyncResult:
    """Replace the database ``target`` (a libpq conninfo, as a superuser) with the subset.

    ``owner`` is the role that will own the copied objects (the service's role).
    Raises ``SyncSourceError`` (source unreachable, login refused), ``SyncInputError`` (a
    missing table or column, a rejected ``where``), ``SyncError`` (the subset does not load,
    e.g. a dangling reference with ``follow_foreign_keys: false``). On any error the local
    database is unchanged. No message carries the source's password.
    """
    started = time.monotonic()
    secret = conninfo_to_dict(_conninfo(spec.source_url)).get("password") or ""
    try:
        with _open_source(spec.source_url) as src:
            return _run(
                spec, src=src, target=target, owner=owner, progress=progress, started=started
            )
    except DbError as exc:
        exc.args = (wiring.scrub(exc.message, [str(secret)]),)
        exc.message = exc.args[0]
        raise
    except psycopg.Error as exc:
        raise SyncError(
            f"sync from {wiring.redact_url(spec.source_url)} failed, local database "
            f"unchanged: {wiring.scrub(str(exc), [str(secret)])}"
        ) from exc


def _conninfo(url: str) -> str:
    try:
        return make_conninfo(url)
    except psycopg.ProgrammingError as exc:
        raise SyncSourceError(
            f"sync.from {wiring.redact_url(url)} is not a PostgreSQL URL: {exc}"
        ) from None


def _open_source(url: str) -> psycopg.Connection[TupleRow]:
    try:
        conn = psycopg.connect(
            _conninfo(url),
            options="-c default_transaction_read_only=on",
            connect_timeout=10,
            application_name="devmesh-sync",
        )
    except psycopg.Error as exc:
        secret = conninfo_to_dict(_conninfo(url)).get("password") or ""
        raise SyncSourceError(
            f"cannot connect to the sync source {wiring.redact_url(url)}: "
            f"{wiring.scrub(str(exc).strip(), [str(secret)])}"
        ) from None
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def _run(
    spec: SyncSpec,
    *,
    src: psycopg.Connection[TupleRow],
    target: str,
    owner: str,
    progress: Callable[[Progress], None] | None,
    started: float,
) -> SyncResult:
    row = src.execute(
        "SELECT pg_export_snapshot(), current_setting('server_version_num')::int"
    ).fetchone()
    assert row is not None
    snapshot, version_num = str(row[0]), int(row[1])
    catalog = subset.read_catalog(src)
    chosen = {name: subset.resolve(src, catalog, name) for name in spec.tables}
    excluded = _check_excluded(spec, src, catalog)
    pre, post = _schema(spec.source_url, snapshot, version_num // 10000)

    walker = subset.Walker(src, catalog, follow_foreign_keys=spec.follow_foreign_keys)
    totals: dict[int, int] = {}
    for name, table in chosen.items():
        totals[table.oid] = walker.seed(table, spec.tables[name], spec.limit)
    walker.close()
    sequences = src.execute(
        "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value"
        " FROM pg_sequences WHERE last_value IS NOT NULL"
    ).fetchall()

    copied: list[TableCopied] = []
    with psycopg.connect(target) as dst:
        try:
            with dst.transaction():
                _clear(dst)
                dst.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
                _execute_script(dst, pre, "the source's schema (pre-data)")
                for table in catalog.tables.values():
                    sel = walker.selection[table.oid]
                    seeded = totals.get(table.oid, 0) if sel.where is not None else 0
                    copied.append(
                        _copy_table(
                            src=src,
                            dst=dst,
                            table=table,
                            sel=sel,
                            excluded=excluded.get(table.oid, ()),
                            expected=seeded + len(sel.tids),
                            progress=progress,
                        )
                    )
                try:
                    _execute_script(dst, post, "constraints and indexes (post-data)")
                except psycopg.errors.ForeignKeyViolation as exc:
                    raise SyncError(
                        "the subset has rows that reference rows outside it: "
                        f"{exc.diag.message_primary}; {exc.diag.message_detail or ''} "
                        "(set follow_foreign_keys: true, or widen the where clauses); "
                        "local database unchanged"
                    ) from None
                for name, value in sequences:
                    dst.execute("SELECT setval(%s, %s)", (name, value))
        except psycopg.Error as exc:
            raise SyncError(f"loading the subset failed, local database unchanged: {exc}") from exc
    return SyncResult(tables=tuple(copied), elapsed_s=time.monotonic() - started)


def _check_excluded(
    spec: SyncSpec, src: psycopg.Connection[TupleRow], catalog: subset.Catalog
) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for name, cols in spec.exclude_columns.items():
        table = subset.resolve(src, catalog, name)
        by_name = {c.name: c for c in table.columns}
        for col in cols:
            c = by_name.get(col)
            if c is None:
                raise SyncInputError(
                    f"sync.exclude_columns.{name}: no column {col!r} in {table.label} "
                    f"(columns: {', '.join(by_name)})"
                )
            if c.not_null and not c.has_default:
                raise SyncInputError(
                    f"sync.exclude_columns.{name}: {table.label}.{col} is NOT NULL without a "
                    f"default, so it cannot be left out"
                )
        out[table.oid] = tuple(cols)
    return out


def _schema(url: str, snapshot: str, server_major: int) -> tuple[str, str]:
    """pre-data and post-data DDL of the source at ``snapshot``, by its pg_dump."""
    client = pgbin.client_for(server_major)
    params = conninfo_to_dict(_conninfo(url))
    password = str(params.pop("password", "") or "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password  # never on the command line, where ps shows it
    env["PGOPTIONS"] = "-c default_transaction_read_only=on"
    out = []
    for section in ("pre-data", "post-data"):
        done = subprocess.run(
            [
                client.tool("pg_dump"),
                f"--section={section}",
                f"--snapshot={snapshot}",
                "--no-owner",
                "--no-privileges",
                "--no-tablespaces",
                "--no-publications",
                "--no-subscriptions",
                "--no-security-labels",
                "--dbname",
                make_conninfo(**params),  # type: ignore[arg-type]
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise SyncSourceError(
                f"pg_dump --section={section} of {wiring.redact_url(url)} failed: "
                f"{wiring.scrub(done.stderr.strip(), [password])}"
            )
        out.append(done.stdout)
    return out[0], out[1]


def _execute_script(conn: psycopg.Connection[TupleRow], script: str, what: str) -> None:
    """Run pg_dump's SQL; psql meta-commands (``\\restrict``, ``\\connect``) are dropped."""
    body = "\n".join(line for line in script.splitlines() if not line.startswith("\\"))
    if not body.strip():
        return
    try:
        conn.execute(body.encode())
    except psycopg.errors.ForeignKeyViolation:
        raise
    except psycopg.Error as exc:
        raise SyncError(
            f"{what} did not load locally: {exc.diag.message_primary or exc}; "
            "local database unchanged"
        ) from None


def _clear(conn: psycopg.Connection[TupleRow]) -> None:
    """Drop every user schema and make an empty ``public`` as a new database has it."""
    for (name,) in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog',"
        " 'information_schema') AND nspname NOT LIKE 'pg\\_%'"
    ).fetchall():
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
    conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
    conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
    conn.execute("COMMENT ON SCHEMA public IS 'standard public schema'")


def _copy_table(
    *,
    src: psycopg.Connection[TupleRow],
    dst: psycopg.Connection[TupleRow],
    table: subset.Table,
    sel: subset.Selection,
    excluded: tuple[str, ...],
    expected: int | None,
    progress: Callable[[Progress], None] | None,
) -> TableCopied:
    cols = [c.name for c in table.columns if c.name not in excluded]
    col_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    queries: list[sql.Composable] = []
    if sel.where is not None:
        queries.append(
            sql.SQL("SELECT {} FROM {} WHERE {}").format(
                col_list, table.ident, subset.where_sql(sel.where, with_params=False)
            )
        )
    tids = sorted(sel.tids)
    for start in range(0, len(tids), subset.BATCH):
        queries.append(
            sql.SQL("SELECT {} FROM {} WHERE ctid = ANY({}::tid[])").format(
                col_list, table.ident, sql.Literal(tids[start : start + subset.BATCH])
            )
        )
    rows = nbytes = reported = 0
    if queries and cols:
        with (
            dst.cursor().copy(
                sql.SQL("COPY {} ({}) FROM STDIN").format(table.ident, col_list)
            ) as sink,
            src.cursor() as cur,
        ):
            # The server sends one message per row: gather them into blocks so the local
            # side gets few large writes (and counting rows is one scan per block).
            block = bytearray()
            for query in queries:
                with cur.copy(sql.SQL("COPY ({}) TO STDOUT").format(query)) as source:
                    for chunk in source:
                        block += chunk
                        if len(block) < WRITE_BLOCK_BYTES:
                            continue
                        rows += block.count(b"\n")
                        nbytes += len(block)
                        sink.write(block)
                        block = bytearray()
                        if progress and nbytes - reported >= PROGRESS_EVERY_BYTES:
                            reported = nbytes
                            progress(
                                Progress(
                                    table=table.label,
                                    rows=rows,
                                    bytes=nbytes,
                                    rows_total=expected,
                                    done=False,
                                )
                            )
            if block:
                rows += block.count(b"\n")
                nbytes += len(block)
                sink.write(block)
    if progress:
        progress(
            Progress(table=table.label, rows=rows, bytes=nbytes, rows_total=expected, done=True)
        )
    return TableCopied(table=table.label, rows=rows, bytes=nbytes)


__all__ = ["Progress", "SyncInputError", "SyncResult", "SyncSpec", "run"]

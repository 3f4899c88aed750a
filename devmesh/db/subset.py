"""Which rows a staging subset holds: the chosen rows and everything they reference.

Why: a subset with a dangling foreign key does not load (the constraint fails) or, worse,
loads into an app that then trips over it. So the subset is closed under "references":
starting from each chosen table's ``where`` (at most ``limit`` rows), every row a selected
row points at through a foreign key is selected too, transitively, until nothing new
appears. Self-references (``employees.manager_id``) and cycles (``a -> b -> a``) need no
special case: a row is added once, so the walk ends.

How, without writing to the source: everything runs inside the caller's read-only,
repeatable-read transaction (temporary tables would be writes), so the walk keeps its state
here: for each table either its seed predicate (a ``where`` with no limit: copied later with
the same ``where``, no row ids kept) and/or a set of row ids (``ctid``, stable within the
snapshot). Foreign-key values travel as text and are joined back with ``unnest`` of arrays
cast to the key's types, in batches, so any key type and any key width works.

What it does not guarantee: rows reached through a foreign key are not limited by
``limit`` (a complete subset may hold more than ``limit`` rows per table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from devmesh.db.errors import SyncInputError

BATCH = 10_000
"""Foreign keys looked up, or row ids copied, per query."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Column:
    name: str
    type: str
    not_null: bool
    has_default: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    oid: int
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        return self.name if self.schema == "public" else f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ForeignKey:
    name: str
    child: int
    child_columns: tuple[str, ...]
    parent: int
    parent_columns: tuple[str, ...]
    parent_types: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    tables: dict[int, Table]
    foreign_keys: tuple[ForeignKey, ...]

    def outgoing(self, oid: int) -> list[ForeignKey]:
        return [fk for fk in self.foreign_keys if fk.child == oid]


@dataclass(slots=True)
class Selection:
    """One table's rows: those matching ``where`` (when set) plus those with these ids."""

    where: str | None = None
    tids: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.where is None and not self.tids


def read_catalog(conn: psycopg.Connection[TupleRow]) -> Catalog:
    """User tables (plain and partitioned roots), their columns, keys and foreign keys."""
    tables: dict[int, Table] = {}
    rows = conn.execute(
        """
        SELECT c.oid, n.nspname, c.relname,
               coalesce((SELECT array_agg(a.attname ORDER BY k.i)
                         FROM pg_index x
                         CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(att, i)
                         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.att
                         WHERE x.indrelid = c.oid AND x.indisprimary), '{}')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_%'
        """
    ).fetchall()
    columns: dict[int, list[Column]] = {}
    for oid, name, typ, not_null, has_default in conn.execute(
        """
        SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.atthasdef
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = ''
        ORDER BY a.attrelid, a.attnum
        """
    ).fetchall():
        columns.setdefault(oid, []).append(
            Column(name=name, type=typ, not_null=not_null, has_default=has_default)
        )
    for oid, schema, name, pk in rows:
        tables[oid] = Table(
            oid=oid,
            schema=schema,
            name=name,
            columns=tuple(columns.get(oid, [])),
            primary_key=tuple(pk),
        )
    fks = [
        ForeignKey(
            name=name,
            child=child,
            child_columns=tuple(ccols),
            parent=parent,
            parent_columns=tuple(pcols),
            parent_types=tuple(ptypes),
        )
        for name, child, ccols, parent, pcols, ptypes in conn.execute(
            """
            SELECT con.conname, con.conrelid,
                   (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(con.conkey)
                      WITH ORDINALITY AS k(att, i)
                    JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.att),
                   con.confrelid,
                   (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(con.confkey)
                      WITH ORDINALITY AS k(att, i)
                    JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.att),
                   (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.i)
                    FROM unnest(con.confkey) WITH ORDINALITY AS k(att, i)
                    JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.att)
            FROM pg_constraint con
            WHERE con.contype = 'f'
            ORDER BY con.conname
            """
        ).fetchall()
        if child in tables and parent in tables
    ]
    return Catalog(tables=tables, foreign_keys=tuple(fks))


def resolve(conn: psycopg.Connection[TupleRow], catalog: Catalog, name: str) -> Table:
    """The table ``name`` (``orders`` or ``schema.orders``) names; ``SyncInputError`` if none."""
    row = conn.execute("SELECT to_regclass(%s)::oid", (name,)).fetchone()
    oid = row[0] if row else None
    if oid is None or oid not in catalog.tables:
        known = ", ".join(sorted(t.label for t in catalog.tables.values())) or "none"
        raise SyncInputError(
            f"sync.tables.{name}: no such table in the sync source (tables: {known})"
        )
    return catalog.tables[oid]


def where_sql(where: str, *, with_params: bool = True) -> sql.Composable:
    """A user's ``where`` as SQL, parenthesised; ``%`` escaped when the query has parameters
    (psycopg reads ``%`` as a placeholder then, and gives ``%%`` back as ``%``)."""
    return sql.SQL("(" + (where.replace("%", "%%") if with_params else where) + ")")


def _keys_of(fk: ForeignKey) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(c)) for c in fk.child_columns
    )


class Walker:
    """Computes every table's ``Selection`` inside the caller's source transaction."""

    def __init__(
        self,
        conn: psycopg.Connection[TupleRow],
        catalog: Catalog,
        *,
        follow_foreign_keys: bool,
        on_rows: Callable[[str, int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.catalog = catalog
        self.follow = follow_foreign_keys
        self.selection: dict[int, Selection] = {oid: Selection() for oid in catalog.tables}
        self.pending: dict[str, set[tuple[str, ...]]] = {}
        self.seen: dict[str, set[tuple[str, ...]]] = {}
        self.on_rows = on_rows

    def seed(self, table: Table, where: str, limit: int | None) -> int:
        """Select ``table``'s rows matching ``where`` (at most ``limit``); their count.

        Raises ``SyncInputError`` when the source rejects ``where``. The count query runs
        with a bound parameter, so PostgreSQL parses it as one statement: a ``where`` that
        smuggles a second statement is rejected, not run.
        """
        out = self.catalog.outgoing(table.oid) if self.follow else []
        try:
            with self.conn.transaction():  # a savepoint: the error names this table
                if limit is None:
                    row = self.conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE {} AND %s").format(
                            table.ident, where_sql(where)
                        ),
                        (True,),
                    ).fetchone()
                    count = int(row[0]) if row else 0
                    self.selection[table.oid].where = where
                    if out:
                        self._scan(table, out, where_sql(where))
                    return count
                order = sql.SQL(", ").join(
                    sql.Identifier(c) for c in (table.primary_key or ("ctid",))
                )
                fk_cols = [_keys_of(fk) for fk in out]
                query = sql.SQL(
                    "SELECT {}.ctid::text{} FROM {} WHERE {} AND %s ORDER BY {} LIMIT %s"
                )
                rows = self.conn.execute(
                    query.format(
                        table.ident,
                        sql.SQL("").join(sql.SQL(", ") + c for c in fk_cols),
                        table.ident,
                        where_sql(where),
                        order,
                    ),
                    (True, limit),
                ).fetchall()
        except psycopg.Error as exc:
            diag = (exc.diag.message_primary or str(exc)).strip()
            raise SyncInputError(
                f"sync.tables.{table.label}: the source rejected the where clause {where!r}: {diag}"
            ) from exc
        self._take(table, out, rows)
        return len(rows)

    def _scan(self, table: Table, out: list[ForeignKey], where: sql.Composable) -> None:
        """Collect the foreign keys of every row matching ``where``, streamed."""
        cols = sql.SQL(", ").join(_keys_of(fk) for fk in out)
        with self.conn.cursor(name="devmesh_seed_scan") as cur:
            cur.itersize = BATCH
            cur.execute(
                sql.SQL("SELECT {} FROM {} WHERE {} AND %s").format(cols, table.ident, where),
                (True,),
            )
            for row in cur:
                self._note_keys(out, row)

    def _take(self, table: Table, out: list[ForeignKey], rows: Iterable[tuple[object, ...]]) -> int:
        """Add rows (ctid first, then each outgoing key's columns); the number new."""
        sel = self.selection[table.oid]
        new = 0
        for row in rows:
            tid = str(row[0])
            if tid in sel.tids:
                continue
            sel.tids.add(tid)
            new += 1
            self._note_keys(out, row[1:])
        if new and self.on_rows:
            self.on_rows(table.label, new)
        return new

    def _note_keys(self, out: list[ForeignKey], values: tuple[object, ...]) -> None:
        i = 0
        for fk in out:
            width = len(fk.child_columns)
            key = tuple(values[i : i + width])
            i += width
            if any(v is None for v in key):
                continue  # MATCH SIMPLE: a NULL in the key references nothing
            skey = tuple(str(v) for v in key)
            seen = self.seen.setdefault(fk.name + str(fk.child), set())
            if skey not in seen:
                seen.add(skey)
                self.pending.setdefault(fk.name + str(fk.child), set()).add(skey)

    def close(self) -> None:
        """Follow foreign keys until no new row appears."""
        if not self.follow:
            return
        by_id = {fk.name + str(fk.child): fk for fk in self.catalog.foreign_keys}
        while self.pending:
            fk_id = next(iter(self.pending))
            keys = self.pending.pop(fk_id)
            fk = by_id[fk_id]
            ordered = sorted(keys)
            for start in range(0, len(ordered), BATCH):
                self._fetch_parents(fk, ordered[start : start + BATCH])

    def _fetch_parents(self, fk: ForeignKey, keys: list[tuple[str, ...]]) -> None:
        parent = self.catalog.tables[fk.parent]
        out = self.catalog.outgoing(parent.oid)
        width = len(fk.parent_columns)
        names = [sql.Identifier(f"__devmesh_k{i}") for i in range(width)]
        arrays = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(width))
        join = sql.SQL(" AND ").join(
            sql.SQL("{}.{} = __devmesh_keys.{}::{}").format(
                parent.ident, sql.Identifier(col), n, sql.SQL(typ)
            )
            for col, n, typ in zip(fk.parent_columns, names, fk.parent_types, strict=True)
        )
        extra: sql.Composable = sql.SQL("")
        seed_where = self.selection[parent.oid].where
        if seed_where is not None:  # those rows are copied by their where already
            extra = sql.SQL(" WHERE NOT coalesce({}, false)").format(where_sql(seed_where))
        fk_cols = sql.SQL("").join(sql.SQL(", ") + _keys_of(o) for o in out)
        query = sql.SQL(
            "SELECT {}.ctid::text{} FROM {} JOIN unnest({}) AS __devmesh_keys({}) ON {}{}"
        ).format(
            parent.ident, fk_cols, parent.ident, arrays, sql.SQL(", ").join(names), join, extra
        )
        columns = [[k[i] for k in keys] for i in range(width)]
        self._take(parent, out, self.conn.execute(query, columns).fetchall())

"""Staging subset sync against two real, independent PostgreSQL clusters.

"staging" is one native cluster with tables linked by foreign keys (a self-reference, a
cycle employees <-> teams, a two-column key); the local side is another cluster, a fresh
database per test. Completeness is checked with SQL of its own (no dangling reference for
any foreign key, and every row of the closure computed by a recursive query on staging),
the source's untouchedness with checksums of every table.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from dbkit import DbHome, checksums, make_staging

from devmesh.db import sync, wiring
from devmesh.db.errors import SyncError, SyncInputError, SyncSourceError
from devmesh.db.native import NativePostgres
from devmesh.db.spec import DbSpec


@dataclass
class Env:
    source: str
    local: NativePostgres


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    home = DbHome()
    try:
        local = home.native("proj")
        # one database that stays, so the cluster outlives each test's own database
        local.ensure(DbSpec(project="proj", service="anchor"))
        yield Env(source=make_staging(home), local=local)
    finally:
        assert home.close() == [], "postgres processes were left behind"


@pytest.fixture
def target(env: Env) -> Iterator[tuple[DbSpec, str]]:
    """A fresh local database: its spec and its URL."""
    spec = DbSpec(project="proj", service=f"svc_{uuid.uuid4().hex[:8]}")
    info = env.local.ensure(spec)
    try:
        yield spec, wiring.url(info)
    finally:
        env.local.drop(spec)


def run(env: Env, spec: DbSpec, s: sync.SyncSpec, progress=None) -> sync.SyncResult:
    return sync.run(s, env.local.admin_conninfo(spec), spec.database, progress=progress)


def ids(url: str, query: str) -> set[tuple]:
    with psycopg.connect(url) as conn:
        return set(conn.execute(query).fetchall())


DANGLING = {
    "customers.region_id": "SELECT count(*) FROM customers c WHERE region_id IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM regions r WHERE r.id = c.region_id)",
    "customers.referred_by": "SELECT count(*) FROM customers c WHERE referred_by IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM customers p WHERE p.id = c.referred_by)",
    "employees.team_id": "SELECT count(*) FROM employees e WHERE team_id IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM teams t WHERE t.id = e.team_id)",
    "teams.lead_id": "SELECT count(*) FROM teams t WHERE lead_id IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM employees e WHERE e.id = t.lead_id)",
    "orders.customer_id": "SELECT count(*) FROM orders o"
    " WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)",
    "orders.sold_by": "SELECT count(*) FROM orders o WHERE sold_by IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM employees e WHERE e.id = o.sold_by)",
    "order_lines.order_id": "SELECT count(*) FROM order_lines l"
    " WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = l.order_id)",
    "shipments.(order_id,line)": "SELECT count(*) FROM shipments s WHERE NOT EXISTS"
    " (SELECT 1 FROM order_lines l WHERE l.order_id = s.order_id AND l.line = s.line)",
}

WHERE_ORDERS = "created_at >= '2026-02-09' AND note LIKE '%100\\%%'"
"""Orders of the last days (a literal '%' in it, which psycopg must not read as a placeholder)."""

# The closure computed independently on staging, by recursive SQL.
EXPECTED_CUSTOMERS = f"""
WITH RECURSIVE picked AS (
    SELECT customer_id AS id FROM orders WHERE {WHERE_ORDERS}
    UNION SELECT o.customer_id FROM orders o JOIN order_lines l ON l.order_id = o.id
          JOIN shipments s ON s.order_id = l.order_id AND s.line = l.line WHERE s.id % 7 = 0
    UNION SELECT c.referred_by FROM customers c JOIN picked p ON c.id = p.id
          WHERE c.referred_by IS NOT NULL
) SELECT id FROM picked
"""


def test_subset_is_complete_consistent_and_the_source_untouched(env: Env, target) -> None:
    spec, url = target
    before = checksums(env.source)
    reports: list[sync.Progress] = []
    result = run(
        env,
        spec,
        sync.SyncSpec(
            source_url=env.source,
            tables={"orders": WHERE_ORDERS, "public.shipments": "id % 7 = 0"},
            exclude_columns={"customers": ("ssn",)},
        ),
        progress=reports.append,
    )
    # No dangling reference, checked foreign key by foreign key.
    with psycopg.connect(url) as conn:
        dangling = {k: conn.execute(q).fetchone()[0] for k, q in DANGLING.items()}
        assert dangling == dict.fromkeys(DANGLING, 0)
        # the service's role owns what was copied, and the constraints exist locally
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        assert owners == [(spec.database,)]
        fks = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'").fetchone()
        assert fks == (8,)
        assert conn.execute("SELECT count(*) FROM customers WHERE ssn IS NOT NULL").fetchone() == (
            0,
        )
        # the sequence continues after the source's last value, so inserts do not collide
        assert conn.execute("SELECT nextval('orders_id_seq')").fetchone() == (1001,)

    # The chosen rows are all there, and the closure matches the recursive query on staging.
    assert ids(url, "SELECT id FROM orders WHERE " + WHERE_ORDERS) == ids(
        env.source, "SELECT id FROM orders WHERE " + WHERE_ORDERS
    )
    assert ids(url, "SELECT id FROM shipments") == ids(
        env.source, "SELECT id FROM shipments WHERE id % 7 = 0"
    )
    assert ids(url, "SELECT id FROM customers") == ids(env.source, EXPECTED_CUSTOMERS)
    # Rows are copied as they are (the excluded column aside).
    assert ids(url, "SELECT id, name, region_id, referred_by FROM customers") <= ids(
        env.source, "SELECT id, name, region_id, referred_by FROM customers"
    )
    # The cycle employees <-> teams was followed: every team of a copied employee, every lead.
    assert ids(url, "SELECT count(*) FROM teams") == {(5,)}
    assert ids(url, "SELECT count(*) FROM audit") == {(0,)}
    # a real subset, not a copy
    assert ids(url, "SELECT count(*) < 1000 FROM orders") == {(True,)}

    assert checksums(env.source) == before
    by_table = {t.table: t for t in result.tables}
    final = {p.table: p for p in reports if p.done}
    assert set(final) == set(by_table)
    assert all(final[t].rows == by_table[t].rows == final[t].rows_total for t in final)
    assert by_table["orders"].bytes > 0


def test_limit_takes_at_most_n_chosen_rows_plus_their_references(env: Env, target) -> None:
    spec, url = target
    run(env, spec, sync.SyncSpec(source_url=env.source, tables={"customers": "id > 150"}, limit=3))
    # the three lowest ids above 150 (ordered by primary key), plus their referral chain
    assert ids(url, "SELECT id FROM customers WHERE id > 150") == {(151,), (152,), (153,)}
    with psycopg.connect(url) as conn:
        assert conn.execute(DANGLING["customers.referred_by"]).fetchone() == (0,)


def local_state(url: str) -> dict[str, object]:
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
        rows = conn.execute("SELECT string_agg(x::text, ',' ORDER BY x) FROM mine x").fetchone()
    return {"tables": tables, "rows": rows}


def test_a_failed_load_leaves_the_local_database_exactly_as_it_was(env: Env, target) -> None:
    spec, url = target
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE mine (x int); INSERT INTO mine VALUES (1), (2), (3)")
    before = local_state(url)
    # Without following foreign keys the chosen orders reference customers not copied: the
    # load fails when the constraints are added, after the schema was replaced and the rows
    # copied inside the local transaction.
    with pytest.raises(SyncError, match="reference rows outside") as err:
        run(
            env,
            spec,
            sync.SyncSpec(
                source_url=env.source, tables={"orders": "id < 10"}, follow_foreign_keys=False
            ),
        )
    assert "local database unchanged" in str(err.value)
    assert local_state(url) == before


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable", "wrong-password", "not-a-url"])
def test_a_bad_source_is_named_without_its_password(env: Env, target, case: str) -> None:
    spec, url = target
    secret = "s3cret-Pa55"
    good = psycopg.conninfo.conninfo_to_dict(env.source)
    source = {
        "unreachable": f"postgresql://app:{secret}@127.0.0.1:{closed_port()}/app",
        "wrong-password": f"postgresql://app:{secret}@127.0.0.1:{good['port']}/app",
        "not-a-url": f"postgresql://app:{secret}@127.0.0.1:notaport/app",
    }[case]
    before = local_state_or_none(url)
    with pytest.raises(SyncSourceError) as err:
        run(env, spec, sync.SyncSpec(source_url=source, tables={"orders": "true"}))
    message = str(err.value)
    assert secret not in message
    assert "app:***@127.0.0.1" in message
    expected = {
        "unreachable": "Connection refused",
        "wrong-password": "password authentication failed",
        "not-a-url": 'invalid integer value "notaport" for connection option "port"',
    }[case]
    assert expected in message
    assert local_state_or_none(url) == before


def local_state_or_none(url: str) -> object:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public'"
        ).fetchone()


@pytest.mark.parametrize(
    ("tables", "exclude", "message"),
    [
        ({"ordrs": "true"}, {}, "sync.tables.ordrs: no such table in the sync source"),
        ({"orders": "created_att > now()"}, {}, 'column "created_att" does not exist'),
        ({"orders": "true); DELETE FROM audit; SELECT (1"}, {}, "rejected the where clause"),
        ({"orders": "true"}, {"customers": ("nope",)}, "no column 'nope' in customers"),
        ({"orders": "true"}, {"customers": ("name",)}, "NOT NULL without a default"),
    ],
    ids=["missing-table", "bad-where", "two-statements", "missing-column", "not-null-column"],
)
def test_bad_input_is_named_and_changes_nothing(env: Env, target, tables, exclude, message) -> None:
    spec, url = target
    before = checksums(env.source)
    with pytest.raises(SyncInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(env, spec, sync.SyncSpec(source_url=env.source, tables=tables, exclude_columns=exclude))
    assert checksums(env.source) == before
    assert local_state_or_none(url) == (0,)


def test_a_second_sync_replaces_the_first(env: Env, target) -> None:
    spec, url = target
    run(env, spec, sync.SyncSpec(source_url=env.source, tables={"regions": "id <= 2"}))
    assert ids(url, "SELECT id FROM regions") == {(1,), (2,)}
    run(env, spec, sync.SyncSpec(source_url=env.source, tables={"regions": "id = 5"}))
    assert ids(url, "SELECT id FROM regions") == {(5,)}


def test_writes_to_the_source_during_a_sync_do_not_reach_the_subset(env: Env, target) -> None:
    """The copy reads the snapshot the walk and pg_dump read, whatever staging does meanwhile.

    The progress callback (run between tables, while the copy is under way) commits writes
    to staging from another session: new rows in three tables, a changed row in a fourth.
    Whichever table was copied first, the others are copied after those commits.
    """
    spec, url = target
    writes = [
        "INSERT INTO customers (id, name) VALUES (5000, 'late')",
        "INSERT INTO orders (id, customer_id, created_at) VALUES (5000, 5000, now())",
        "INSERT INTO audit VALUES ('late')",
        "UPDATE regions SET name = 'renamed' WHERE id = 1",
    ]
    undo = [
        "DELETE FROM orders WHERE id = 5000",
        "DELETE FROM customers WHERE id = 5000",
        "DELETE FROM audit WHERE msg = 'late'",
        "UPDATE regions SET name = 'region 1' WHERE id = 1",
    ]
    written: list[str] = []

    def meanwhile(p: sync.Progress) -> None:
        if p.done and not written:
            written.append(p.table)
            with psycopg.connect(env.source, autocommit=True) as conn:
                for statement in writes:
                    conn.execute(statement)  # type: ignore[arg-type]

    try:
        run(
            env,
            spec,
            sync.SyncSpec(
                source_url=env.source,
                tables={"orders": "true", "audit": "true", "regions": "true"},
            ),
            progress=meanwhile,
        )
        assert written, "the callback never ran"
        assert ids(url, "SELECT count(*) FROM orders") == {(1000,)}
        assert ids(url, "SELECT count(*) FROM customers WHERE id = 5000") == {(0,)}
        assert ids(url, "SELECT count(*) FROM audit") == {(50,)}
        assert ids(url, "SELECT name FROM regions WHERE id = 1") == {("region 1",)}
        # and staging did change meanwhile
        assert ids(env.source, "SELECT count(*) FROM orders") == {(1001,)}
    finally:
        with psycopg.connect(env.source, autocommit=True) as conn:
            for statement in undo:
                conn.execute(statement)  # type: ignore[arg-type]

"""Test helpers for the database drivers: private homes, real clusters, leftover checks.

Every cluster a test makes lives under a ``DbHome`` (two temp dirs: the devmesh home and
the root fallback for data). ``DbHome.close`` destroys the clusters through the provider,
then kills any postgres process still working in those dirs (found with psutil by its
working directory) and fails the test if it had to: a leftover is a bug, not noise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import psycopg

from devmesh.db.native import NativePostgres
from devmesh.db.spec import DbSpec


def traversable_tmp(prefix: str) -> Path:
    """A temp dir another system user can pass through (0711), as a home usually is."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o711)
    return path


def postgres_in(paths: list[Path]) -> list[psutil.Process]:
    """postgres processes whose working directory lies under one of ``paths``."""
    roots = [str(p.resolve()) for p in paths]
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if "postgres" not in (proc.info["name"] or ""):
                continue
            cwd = proc.cwd()
        except psutil.Error:
            continue
        if any(cwd == r or cwd.startswith(r + "/") for r in roots):
            found.append(proc)
    return found


def postmasters_in(paths: list[Path]) -> list[psutil.Process]:
    """Only the postmasters (a postgres whose parent is not a postgres of the same dir)."""
    procs = postgres_in(paths)
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid() not in pids]


class DbHome:
    """A devmesh home and a data fallback dir, both removed with every process in them."""

    def __init__(self, *, traversable: bool = True) -> None:
        self.home = (
            traversable_tmp("devmesh-db-")
            if traversable
            else Path(tempfile.mkdtemp(prefix="devmesh-db-closed-"))
        )
        self.fallback = traversable_tmp("devmesh-dbfb-")
        self.providers: list[NativePostgres] = []

    def native(self, project: str = "proj", **kwargs: object) -> NativePostgres:
        p = NativePostgres(
            self.home / "db" / project / "postgres",
            fallback_base=self.fallback,
            **kwargs,  # type: ignore[arg-type]
        )
        self.providers.append(p)
        return p

    def close(self) -> list[int]:
        """Tear down; the pids that had to be killed (should be none)."""
        for p in self.providers:
            with contextlib.suppress(Exception):
                p.destroy()
        killed = []
        for proc in postgres_in([self.home, self.fallback]):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
        psutil.wait_procs(
            [psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)], timeout=10
        )
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.fallback, ignore_errors=True)
        return killed


STAGING_SCHEMA = """
CREATE TABLE regions (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    ssn text,
    region_id int REFERENCES regions (id),
    referred_by int REFERENCES customers (id)          -- a self-reference
);
CREATE TABLE employees (id int PRIMARY KEY, name text NOT NULL, team_id int);
CREATE TABLE teams (id int PRIMARY KEY, name text NOT NULL, lead_id int REFERENCES employees (id));
ALTER TABLE employees ADD CONSTRAINT employees_team_fk
    FOREIGN KEY (team_id) REFERENCES teams (id);      -- a cycle: employees <-> teams
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers (id),
    sold_by int REFERENCES employees (id),
    created_at timestamptz NOT NULL,
    note text
);
CREATE TABLE order_lines (
    order_id bigint REFERENCES orders (id),
    line int,
    sku text NOT NULL,
    PRIMARY KEY (order_id, line)
);
CREATE TABLE shipments (                             -- a two-column foreign key
    id int PRIMARY KEY,
    order_id bigint NOT NULL,
    line int NOT NULL,
    FOREIGN KEY (order_id, line) REFERENCES order_lines (order_id, line)
);
CREATE TABLE audit (msg text);                       -- no key, referenced by nobody
CREATE INDEX orders_created ON orders (created_at);

INSERT INTO regions SELECT i, 'region ' || i FROM generate_series(1, 5) i;
INSERT INTO customers (name, ssn, region_id, referred_by)
    SELECT 'customer ' || i, 'ssn-' || i, 1 + i % 5, CASE WHEN i % 10 <> 1 THEN i - 1 END
    FROM generate_series(1, 200) i;
INSERT INTO employees SELECT i, 'employee ' || i, NULL FROM generate_series(1, 20) i;
INSERT INTO teams SELECT i, 'team ' || i, i * 4 FROM generate_series(1, 5) i;
UPDATE employees SET team_id = 1 + (id - 1) / 4;
INSERT INTO orders (customer_id, sold_by, created_at, note)
    SELECT 1 + (i * 37) % 200, CASE WHEN i % 3 <> 0 THEN 1 + i % 20 END,
           timestamptz '2026-01-01 00:00+00' + i * interval '1 hour', 'note 100% ' || i
    FROM generate_series(1, 1000) i;
INSERT INTO order_lines SELECT o, l, 'sku-' || o || '-' || l
    FROM generate_series(1, 1000) o, generate_series(1, 3) l;
INSERT INTO shipments SELECT i, 1 + (i * 7) % 1000, 1 + i % 3 FROM generate_series(1, 300) i;
INSERT INTO audit SELECT 'event ' || i FROM generate_series(1, 50) i;
"""

TABLES = (
    "regions",
    "customers",
    "employees",
    "teams",
    "orders",
    "order_lines",
    "shipments",
    "audit",
)


def checksums(url: str) -> dict[str, str]:
    """One md5 of every row of each staging table, in a stable order."""
    with psycopg.connect(url) as conn:
        return {
            t: str(
                conn.execute(
                    f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), ''))"
                    f" FROM {t} x"
                ).fetchone()[0]  # type: ignore[index]
            )
            for t in TABLES
        }


def make_staging(home: DbHome) -> str:
    """An independent cluster with the staging schema; its app's URL (with password)."""
    from devmesh.db import wiring

    provider = home.native("staging")
    info = provider.ensure(DbSpec(project="staging", service="app"))
    url = wiring.url(info)
    with psycopg.connect(url) as conn:
        conn.execute(STAGING_SCHEMA)  # type: ignore[arg-type]
    return url

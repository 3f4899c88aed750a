"""Database benchmark: native provisioning, subset sync throughput, snapshots.

Why a script and not a test: the figures depend on the machine, so they are printed next
to a baseline measured in the same run (``pg_dump | psql`` of the same rows) and never
asserted. Run it from the repository root:

    python bench/db.py               # one million rows, about a minute on 2 cores
    python bench/db.py --rows 200000

Everything lives in temporary directories (two native clusters: "staging" and the local
one), removed at the end with every server process; all traffic is on 127.0.0.1.

What is measured:
- provisioning cold: ``ensure`` of a service database with no cluster (initdb, start,
  role, database); warm: ``ensure`` by a new provider object while the cluster runs (what
  an agent restart does: adopt, check, return); a new database in a running cluster;
- sync: a table of N rows (``where: true``) through ``devmesh.db.sync`` (rows/s), and the
  same rows with ``pg_dump --data-only -t TABLE | psql`` into another empty database with
  the same schema;
- snapshot and restore of the synced database (template copies);
- with ``--agent``: ``devmesh up -d`` of a service with a native database through a real
  agent, until the service answers: cold (the project's cluster made), after ``down``
  (the cluster started again), and the same service without a database as the baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import psycopg
from dbkit import DbHome

from devmesh.db import pgbin, sync, wiring
from devmesh.db.spec import DbSpec

SCHEMA = """
CREATE TABLE events (
    id bigint PRIMARY KEY,
    account int NOT NULL,
    kind text NOT NULL,
    payload text,
    created_at timestamptz NOT NULL
);
INSERT INTO events
SELECT i, i % 5000, (ARRAY['click', 'view', 'buy'])[1 + i % 3], md5(i::text),
       timestamptz '2026-01-01' + i * interval '1 second'
FROM generate_series(1, {rows}) i;
ANALYZE events;
"""


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--agent", action="store_true", help="only the `up` through an agent")
    args = ap.parse_args()
    if args.agent:
        _agent_up()
        return
    home = DbHome()
    try:
        local = home.native("proj")
        api = DbSpec(project="proj", service="api")
        cold, _ = timed(lambda: local.ensure(api))
        warm, _ = timed(lambda: home.native("proj").ensure(api))
        new_db, _ = timed(lambda: local.ensure(DbSpec(project="proj", service="baseline")))
        print(f"provision cold (initdb+start+db): {cold:6.2f} s   (goal < 3 s)")
        print(f"provision warm (adopt running):   {warm:6.3f} s   (goal < 0.5 s)")
        print(f"new database in a running cluster: {new_db:5.3f} s")

        staging = home.native("staging")
        src_url = wiring.url(staging.ensure(DbSpec(project="staging", service="app")))
        t_fill, _ = timed(lambda: _fill(src_url, args.rows))
        print(f"staging filled with {args.rows} rows in {t_fill:.1f} s")

        spec = sync.SyncSpec(source_url=src_url, tables={"events": "true"})
        t_sync, result = timed(lambda: sync.run(spec, local.admin_conninfo(api), api.database))
        mb = sum(t.bytes for t in result.tables) / 1e6
        print(
            f"devmesh sync:  {result.rows} rows, {mb:.0f} MB in {t_sync:5.2f} s = "
            f"{result.rows / t_sync:9.0f} rows/s   (goal > 100k rows/s)"
        )

        base = DbSpec(project="proj", service="baseline")
        t_dump = _pg_dump_psql(src_url, wiring.url(local.conninfo(base)))
        print(
            f"pg_dump|psql:  {args.rows} rows (schema first, then data) in {t_dump:5.2f} s = "
            f"{args.rows / t_dump:9.0f} rows/s   ratio devmesh/pg_dump = {t_sync / t_dump:.2f}x"
        )

        t_snap, snap = timed(lambda: local.snapshot(api, "bench"))
        t_restore, _ = timed(lambda: local.restore(api, "bench"))
        print(f"snapshot ({snap.size_bytes / 1e6:.0f} MB database): {t_snap:5.2f} s")
        print(f"restore:                        {t_restore:5.2f} s")
    finally:
        left = home.close()
        if left:
            print(f"warning: killed leftover postgres processes {left}")


def _fill(url: str, rows: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(SCHEMA.format(rows=rows).encode())


def _pg_dump_psql(src_url: str, dst_url: str) -> float:
    """Schema-only restore first (not timed), then time data-only dump piped into psql."""
    client = pgbin.find()
    env = dict(os.environ)
    schema = subprocess.run(
        [client.tool("pg_dump"), "--schema-only", "-t", "events", "--no-owner", src_url],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(
        [client.tool("psql"), "-Xq", dst_url], input=schema, check=True, capture_output=True
    )
    t = time.perf_counter()
    dump = subprocess.Popen(
        [client.tool("pg_dump"), "--data-only", "-t", "events", src_url],
        stdout=subprocess.PIPE,
        env=env,
    )
    subprocess.run(
        [client.tool("psql"), "-Xq", "-v", "ON_ERROR_STOP=1", dst_url],
        stdin=dump.stdout,
        check=True,
        capture_output=True,
    )
    assert dump.stdout is not None
    dump.stdout.close()
    dump.wait()
    return time.perf_counter() - t


def _agent_up() -> None:
    """`up -d` until ready, through a real agent in a private home (see tests/agentkit)."""
    from agentkit import PY, SERVER, Mesh

    m = Mesh()
    try:
        m.start_agent()  # so that no `up` below includes the agent's start
        for name, db in (("nodb", ""), ("withdb", "    db: {engine: postgres, provider: native}")):
            text = f"""
version: 1
project: {name}
services:
  app:
    version: 1.0.0
    command: {PY} server.py
    port: auto
{db}
"""
            d = m.project(name, text, {"server.py": SERVER})
            up, _ = timed(lambda d=d: m.cli("up", "-d", cwd=d, check=True))
            m.cli("down", cwd=d, check=True)
            again, _ = timed(lambda d=d: m.cli("up", "-d", cwd=d, check=True))
            print(f"up -d {name:7}: first {up:5.2f} s, after down {again:5.2f} s")
            m.cli("down", "--volumes", cwd=d, check=True)
    finally:
        m.close()


if __name__ == "__main__":
    main()

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
import pytest

from devmesh.db.native import NativePostgres
from devmesh.db.spec import DbSpec

ROOT = pytest.mark.needs_root("a cluster run by its own system user")
"""The mark of a test of what the native provider does as root: skipped as another user, a
failure under DEVMESH_REQUIRE_ROOT=1 (see conftest.py)."""


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
    """Only the postmasters (a postgres whose parent is not a postgres of the same dir).

    Backends come and go while we look (a client's backend exits when the client dies), so
    one that vanished mid-look is simply not counted.
    """
    procs = postgres_in(paths)
    pids = {p.pid for p in procs}
    out = []
    for p in procs:
        try:
            if p.ppid() not in pids:
                out.append(p)
        except psutil.Error:
            continue
    return out


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


# -- a local PostgreSQL image, built from this machine's binaries ---------------------------
# Registries are unreachable here, so the docker provider's tests build an image that keeps
# the official postgres image's contract (POSTGRES_USER/PASSWORD/DB on first start, data in
# /var/lib/postgresql/data, pg_isready on the PATH) from the host's own PostgreSQL files and
# the shared libraries they link (found with ldd). No shell tools beyond dash and coreutils.

ENTRYPOINT = r"""#!/bin/sh
set -e
export PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "$POSTGRES_PASSWORD" > /tmp/pwfile
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile -E UTF8 --locale=C \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 --no-instructions
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -w start -o "-c listen_addresses='' -k /tmp"
    if [ "$POSTGRES_DB" != "postgres" ]; then
        PGPASSWORD="$POSTGRES_PASSWORD" psql -X -h /tmp -U "$POSTGRES_USER" -d postgres \
            -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    pg_ctl -D "$PGDATA" -w stop -m fast
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -k /tmp
"""


def _ldd(path: str) -> set[str]:
    import subprocess

    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.add(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.add(parts[0])
    return libs


def build_postgres_image(client, tag: str = "devmesh-test/postgres:local") -> str:
    """Build (once per engine) ``tag`` from the host's PostgreSQL; the tag."""
    import io
    import tarfile

    import docker.errors

    from devmesh.db import pgbin

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    pg = pgbin.find()
    share = Path(f"/usr/share/postgresql/{pg.major}")
    libdir = pg.bindir.parent / "lib"
    tools = ["/bin/sh", "/bin/rm", "/bin/cat", "/bin/mkdir"]
    binaries = [str(pg.bindir / t) for t in ("postgres", "initdb", "pg_ctl", "pg_isready", "psql")]
    modules = [str(p) for p in libdir.glob("*.so") if "llvmjit" not in p.name]
    files: set[str] = set(tools + binaries + modules)
    for f in list(files):
        files |= _ldd(f)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", dereference=True) as tar:
        for f in sorted(files):
            tar.add(f, arcname=f.lstrip("/"))
        tar.add(str(share), arcname=str(share).lstrip("/"))
        if Path("/usr/share/zoneinfo/UTC").exists():
            tar.add("/usr/share/zoneinfo/UTC", arcname="usr/share/zoneinfo/UTC")

        def text(name: str, body: str, mode: int = 0o644, uid: int = 0) -> None:
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
            tar.addfile(info, io.BytesIO(data))

        def folder(name: str, uid: int, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
            tar.addfile(info)

        text(
            "etc/passwd",
            "root:x:0:0::/root:/bin/sh\npostgres:x:999:999::/var/lib/postgresql:/bin/sh\n",
        )
        text("etc/group", "root:x:0:\npostgres:x:999:\n")
        text("usr/local/bin/docker-entrypoint.sh", ENTRYPOINT, 0o755)
        folder("tmp", 0, 0o1777)
        folder("var", 0)
        folder("var/lib", 0)
        folder("var/lib/postgresql", 999, 0o755)
        folder("var/lib/postgresql/data", 999, 0o700)
    rootfs = buf.getvalue()
    dockerfile = (
        "FROM scratch\nADD rootfs.tar /\n"
        f"ENV PATH={pg.bindir}:/usr/local/bin:/bin TZ=UTC LANG=C\n"
        "USER postgres\nEXPOSE 5432\n"
        'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]\n'
    ).encode()
    ctx = io.BytesIO()
    with tarfile.open(fileobj=ctx, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("rootfs.tar", rootfs)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ctx.seek(0)
    client.images.build(fileobj=ctx, custom_context=True, tag=tag, rm=True)
    return tag

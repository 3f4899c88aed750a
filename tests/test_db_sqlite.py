"""The SQLite provider and the wiring values, with real files and a real service process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.db import wiring
from devmesh.db.errors import DatabaseNotFoundError
from devmesh.db.spec import ConnInfo, DbSpec, DbState, Engine
from devmesh.db.sqlite import Sqlite

SPEC = DbSpec(project="p", service="notes", engine=Engine.SQLITE)

SERVICE = """
import os, sqlite3
url = os.environ["DATABASE_URL"]
assert url.startswith("sqlite:///"), url
path = url[len("sqlite:///"):]
with sqlite3.connect(path) as db:
    db.execute("CREATE TABLE IF NOT EXISTS hits (n INTEGER)")
    db.execute("INSERT INTO hits VALUES (1)")
print(path)
"""


def test_a_file_per_service_read_by_the_service_through_database_url(tmp_path: Path) -> None:
    provider = Sqlite(tmp_path / "db" / "p" / "sqlite")
    assert provider.status(SPEC).state is DbState.ABSENT
    info = provider.ensure(SPEC)
    url = wiring.url(info)
    assert url == f"sqlite:///{(tmp_path / 'db/p/sqlite/notes.sqlite3').resolve().as_posix()}"
    assert url.startswith("sqlite:////")  # three slashes, then the absolute path
    env = {"PATH": os.environ["PATH"], **wiring.environment(info)}
    assert set(wiring.environment(info)) == {"DATABASE_URL"}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", SERVICE],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    assert Path(out.stdout.strip()) == provider.path(SPEC)
    assert provider.ensure(SPEC) == info  # idempotent: the data stays
    with sqlite3.connect(provider.path(SPEC)) as db:
        assert db.execute("SELECT count(*) FROM hits").fetchone() == (2,)
    st = provider.status(SPEC)
    assert st.state is DbState.RUNNING and st.size_bytes and st.size_bytes > 0
    provider.stop(SPEC)  # nothing runs: the data stays
    assert provider.status(SPEC).state is DbState.RUNNING
    provider.drop(SPEC)
    assert list((tmp_path / "db/p/sqlite").iterdir()) == []
    with pytest.raises(DatabaseNotFoundError, match=r"notes\.sqlite3 does not exist"):
        provider.conninfo(SPEC)
    provider.drop(SPEC)  # idempotent


def test_postgres_environment_has_the_url_and_libpq_variables() -> None:
    info = ConnInfo(
        engine=Engine.POSTGRES,
        host="127.0.0.1",
        port=5433,
        user="api",
        password="p@ss/w:rd",
        database="api",
    )
    env = wiring.environment(info)
    assert env == {
        "DATABASE_URL": "postgresql://api:p%40ss%2Fw%3Ard@127.0.0.1:5433/api",
        "PGHOST": "127.0.0.1",
        "PGPORT": "5433",
        "PGUSER": "api",
        "PGPASSWORD": "p@ss/w:rd",
        "PGDATABASE": "api",
    }
    assert wiring.display_url(info) == "postgresql://api:***@127.0.0.1:5433/api"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:secret@h:5/db", "postgresql://u:***@h:5/db"),
        ("postgresql://u:se@cret@h/db", "postgresql://u:***@h/db"),
        ("failed: postgres://u:secret@h/db: refused", "failed: postgres://u:***@h/db: refused"),
        ("host=h password=secret user=u", "host=h password=*** user=u"),
        ("host=h password='se cret' user=u", "host=h password=*** user=u"),
        (
            "postgresql://h/db?password=secret&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////tmp/x.sqlite3", "sqlite:////tmp/x.sqlite3"),
    ],
)
def test_redaction_hides_every_password_form(text: str, shown: str) -> None:
    assert wiring.redact_url(text) == shown
    assert "secret" not in wiring.redact_url(text)


def test_names_are_checked() -> None:
    assert DbSpec(project="p", service="Web-App").database == "web_app"
    with pytest.raises(ValueError, match="must be 1-48 characters"):
        _ = DbSpec(project="p", service="x", name="drop table;").database


def test_auto_prefers_docker_then_native_then_names_what_is_missing() -> None:
    from devmesh.db.choose import NoProviderError, choose

    pg = DbSpec(project="p", service="api")
    ok, no_docker, no_pg = (lambda: None), (lambda: "no engine"), (lambda: "no initdb")
    assert choose(pg, "auto", docker_probe=ok, native_probe=ok) == "docker"
    assert choose(pg, "auto", docker_probe=no_docker, native_probe=ok) == "native"
    assert choose(pg, "native", docker_probe=ok, native_probe=ok) == "native"
    assert choose(SPEC, "auto", docker_probe=no_docker, native_probe=no_pg) == "sqlite"
    with pytest.raises(NoProviderError, match="docker: no engine; native: no initdb"):
        choose(pg, "auto", docker_probe=no_docker, native_probe=no_pg)
    with pytest.raises(ValueError, match="expected one of auto, native, docker"):
        choose(pg, "podman", docker_probe=ok, native_probe=ok)

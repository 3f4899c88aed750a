"""The `db:` keys of devmesh.yaml: the model they build and the problems `validate` reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.config import loader
from devmesh.core import model

HEAD = "version: 1\nproject: shop\nservices:\n  api:\n    version: 1.0.0\n    command: ./api\n"


def load(tmp_path: Path, db: str, files: dict[str, str] | None = None) -> loader.Loaded:
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    path = tmp_path / "devmesh.yaml"
    path.write_text(HEAD + "    db:\n" + "".join(f"      {line}\n" for line in db.splitlines()))
    return loader.load(path, environ={"STAGING": "postgresql://u:pw@127.0.0.1:5/s"})


def problems(tmp_path: Path, db: str, files: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(loader.ConfigError) as info:
        load(tmp_path, db, files)
    return [f"{p.line}:{p.column}: {p.path}: {p.message}" for p in info.value.problems]


def test_every_db_key_reaches_the_model_and_survives_the_round_trip(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """engine: postgres
version: 16
provider: docker
name: shop_api
image: postgres:16-alpine
init: [db/schema.sql, db/seed.sql]
snapshots: {keep: 2}
sync:
  from: ${STAGING}
  tables: {orders: "id < 10", customers: "true"}
  limit: 100
  follow_foreign_keys: false
  exclude_columns: {customers: [ssn]}
  on_first_up: true""",
        {"db/schema.sql": "", "db/seed.sql": ""},
    )
    assert loaded.warnings == []
    db = loaded.project.services["api"].db
    assert db == model.Db(
        engine=model.DbEngine.POSTGRES,
        version="16",
        provider=model.DbProvider.DOCKER,
        name="shop_api",
        image="postgres:16-alpine",
        init=(str(tmp_path / "db/schema.sql"), str(tmp_path / "db/seed.sql")),
        sync=model.DbSync(
            source="postgresql://u:pw@127.0.0.1:5/s",
            tables={"orders": "id < 10", "customers": "true"},
            limit=100,
            follow_foreign_keys=False,
            exclude_columns={"customers": ("ssn",)},
            on_first_up=True,
        ),
        snapshots_keep=2,
    )
    again = model.from_document(
        model.to_document(loaded.project), directory=str(tmp_path), default_name="shop"
    )
    assert again.services["api"].db == db


def test_defaults(tmp_path: Path) -> None:
    db = load(tmp_path, "engine: postgres").project.services["api"].db
    assert db == model.Db(engine=model.DbEngine.POSTGRES)
    assert (db.provider, db.init, db.sync, db.snapshots_keep) == (
        model.DbProvider.AUTO,
        (),
        None,
        5,
    )


def test_a_missing_init_file_is_an_error_at_its_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "engine: sqlite\ninit: [db/nope.sql]") == [
        f"9:14: services.api.db.init[0]: init file 'db/nope.sql' not found "
        f"(looked for {tmp_path / 'db/nope.sql'})"
    ]


def test_postgres_only_keys_on_sqlite(tmp_path: Path) -> None:
    found = problems(tmp_path, 'engine: sqlite\nversion: 16\nsync: {from: x, tables: {t: "true"}}')
    assert found == [
        "9:7: services.api.db.version: version applies to PostgreSQL only; this database is "
        "sqlite (ignored)",
        "10:7: services.api.db.sync: sync applies to PostgreSQL only; this database is sqlite",
    ]
    loaded = load(tmp_path, "engine: sqlite\nversion: 16")
    assert [w.message for w in loaded.warnings] == [
        "version applies to PostgreSQL only; this database is sqlite (ignored)"
    ]


def test_a_version_that_is_not_a_major_version(tmp_path: Path) -> None:
    assert problems(tmp_path, "engine: postgres\nversion: 16.2") == [
        "9:16: services.api.db.version: version 16.2 is not a PostgreSQL major version (like 16)"
    ]


def test_a_database_name_postgres_refuses(tmp_path: Path) -> None:
    [found] = problems(tmp_path, "engine: postgres\nname: " + "x" * 60)
    assert found.startswith("9:13: services.api.db.name: database name 'xxx")
    assert "1-48 characters" in found


def test_two_services_sharing_a_database_get_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "devmesh.yaml"
    path.write_text(
        HEAD
        + "    db: {engine: postgres, name: shared}\n"
        + "  worker:\n    version: 1.0.0\n    command: ./w\n"
        + "    db: {engine: postgres, name: shared}\n"
    )
    loaded = loader.load(path, environ={})
    assert [(w.path, w.line) for w in loaded.warnings] == [("services.worker.db.name", 11)]
    assert "also the database of service 'api'" in loaded.warnings[0].message


def test_the_database_variables_replace_the_shells_but_the_services_env_wins(
    tmp_path: Path,
) -> None:
    from devmesh.core import desired

    path = tmp_path / "devmesh.yaml"
    path.write_text(
        HEAD.replace("./api", "./api --db ${DATABASE_URL}")
        + "    env: {PGUSER: admin, WHERE: '${DATABASE_URL}', HOST: '${PGHOST}'}\n"
        + "    db: {engine: postgres}\n"
    )
    proj = loader.load(path, environ={}).project
    svc = proj.services["api"]
    db_env = {"DATABASE_URL": "postgresql://api:pw@127.0.0.1:5/api", "PGHOST": "127.0.0.1"}
    db_env |= {"PGUSER": "api"}
    base = {"DATABASE_URL": "from the shell", "PGHOST": "elsewhere", "HOME": "/root"}
    env = desired.launch_env(base, proj, svc, port=None, urls={}, db_env=db_env)
    assert env["DATABASE_URL"] == db_env["DATABASE_URL"]
    assert (env["PGHOST"], env["PGUSER"], env["WHERE"], env["HOME"]) == (
        "127.0.0.1",
        "admin",
        db_env["DATABASE_URL"],
        "/root",
    )
    assert env["HOST"] == "127.0.0.1"  # PG* are left for the start, as DATABASE_URL is
    argv = desired.launch_argv(proj, svc, port=None, urls={}, db_env=db_env)
    assert argv[-1] == db_env["DATABASE_URL"]

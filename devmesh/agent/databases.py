"""The services' databases, as the agent runs them: provisioned before a service starts.

Why a module of its own: the engine plans processes; a database is a precondition of a
process, not a process. So each round the engine asks ``Databases.gate`` to hold back the
start of a service whose database is not ready (the start becomes a ``wait`` the status
shows, "provisioning its database"), while a task provisions it in a worker thread
(``anyio.to_thread``): ``initdb``, ``pg_ctl`` and psycopg block, and the proxy and the API
must stay live meanwhile. When provisioning ends, the task wakes the engine, which starts
the service with ``DATABASE_URL`` and the libpq ``PG*`` variables in its environment; a
provisioning failure turns the start into a failed one whose reason is the driver's
message (passwords never appear: the drivers redact them).

Every provider call is idempotent and adopts what exists, so after an agent restart
(``kill -9``) the first round simply provisions again: the running cluster or container is
adopted, never started twice.

What is recorded on disk, per project (``DEVMESH_HOME/db/PROJECT/databases.json``): which
provider holds each service's database (``auto`` decides once, so a Docker engine that
goes away later does not make the data look lost), and the last sync. That record is what
``down --volumes`` deletes by, even for a project no longer applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from devmesh.agent.paths import Home
from devmesh.core import model, plan
from devmesh.db import choose, pgbin, wiring
from devmesh.db import sync as sync_mod
from devmesh.db.container import DEFAULT_IMAGE, DockerPostgres, DockerUnavailableError, connect
from devmesh.db.errors import DbError, NoPostgresBinariesError, PermanentDbError
from devmesh.db.native import NativePostgres
from devmesh.db.spec import ConnInfo, DbSpec, DbState, Engine, Provider
from devmesh.db.sqlite import Sqlite

log = logging.getLogger("devmesh.agent")

PROVISIONING = "provisioning"
READY = "ready"
FAILED = "failed"


Snapshotting = NativePostgres | DockerPostgres | Sqlite
"""The providers with snapshots (all of them): ``snapshot``, ``restore``, ``snapshots``,
``prune_snapshots``."""


class DbCommandError(Exception):
    """A ``devmesh db`` request that cannot be done; the message names the cause."""


@dataclass(slots=True, kw_only=True)
class Entry:
    """One service's database as this agent knows it (agent-internal, mutable)."""

    state: str
    digest: str
    provider: str = ""
    env: dict[str, str] | None = None
    error: str | None = None


def digest(db: model.Db) -> str:
    """What the database was provisioned from: a change provisions (and starts) anew."""
    return hashlib.sha256(repr(db).encode()).hexdigest()


class Databases:
    """Provisioning, environment, stop and drop of every applied project's databases."""

    def __init__(self, home: Home, *, wake: Callable[[], None]) -> None:
        self.home = home
        self.wake = wake
        self.entries: dict[plan.Key, Entry] = {}
        self.tg: anyio.abc.TaskGroup | None = None

    # ---------------------------------------------------------------- places

    def root(self, project: str) -> Path:
        return self.home.root / "db" / project

    def native(self, project: str) -> NativePostgres:
        return NativePostgres(self.root(project) / "postgres")

    def sqlite(self, project: str) -> Sqlite:
        return Sqlite(self.root(project) / "sqlite")

    @staticmethod
    def spec(project: str, svc: model.Service) -> DbSpec:
        assert svc.db is not None
        return DbSpec(
            project=project,
            service=svc.name,
            engine=Engine(svc.db.engine.value),
            name=svc.db.name or "",
            version=int(svc.db.version) if svc.db.version else None,
        )

    def provider(self, project: str, name: str, image: str | None) -> Provider:
        if name == "sqlite":
            return self.sqlite(project)
        if name == "native":
            return self.native(project)
        return DockerPostgres(image=image or DEFAULT_IMAGE)

    # ---------------------------------------------------------------- the record

    def _record_path(self, project: str) -> Path:
        return self.root(project) / "databases.json"

    def record(self, project: str) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._record_path(project).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_record(self, project: str, data: dict[str, dict[str, Any]]) -> None:
        path = self._record_path(project)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".databases-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def _note(self, project: str, service: str, **values: Any) -> None:
        data = self.record(project)
        data.setdefault(service, {}).update(values)
        self._save_record(project, data)

    # ---------------------------------------------------------------- the engine's hooks

    def gate(
        self,
        actions: tuple[plan.Action, ...],
        wants: Mapping[plan.Key, plan.Want],
        models: Mapping[str, model.Project],
    ) -> tuple[plan.Action, ...]:
        """The round's actions, with the start of a service whose database is not ready
        turned into a ``wait``; begins provisioning every wanted database not yet ready."""
        for key in wants:
            svc = models[key[0]].services[key[1]]
            if svc.db is None:
                continue
            entry = self.entries.get(key)
            if entry is None or entry.digest != digest(svc.db):
                self._begin(key, svc)
        out: list[plan.Action] = []
        for a in actions:
            entry = self.entries.get(a.key)
            if a.verb is plan.Verb.START and entry is not None and entry.state == PROVISIONING:
                out.append(
                    plan.Action(verb=plan.Verb.WAIT, key=a.key, reason="provisioning its database")
                )
            else:
                out.append(a)
        return tuple(out)

    def launch_env(self, key: plan.Key) -> tuple[dict[str, str], str | None]:
        """(environment, error) for a start of ``key``: its database's values, or why not."""
        entry = self.entries.get(key)
        if entry is None:
            return {}, None
        if entry.state == FAILED:
            return {}, f"database: {entry.error}"
        return dict(entry.env or {}), None

    def recorded_env(self, project: str, svc: model.Service) -> dict[str, str]:
        """The database variables of an existing database, from files only (no server).

        For the probes of a process adopted after an agent restart: it was started with
        them, and its health command may use them. Docker's would need the engine (a
        network call at start-up), so an adopted process of that provider gets none until
        it is started again.
        """
        r = self.record(project).get(svc.name, {})
        name = r.get("provider")
        if name not in ("native", "sqlite") or svc.db is None:
            return {}
        provider = self.native(project) if name == "native" else self.sqlite(project)
        try:
            return wiring.environment(provider.conninfo(self.spec(project, svc)))
        except DbError:
            return {}

    def retry(self, project: str) -> None:
        """An `up` asks again: failed provisioning of ``project`` is tried anew."""
        for key, entry in list(self.entries.items()):
            if key[0] == project and entry.state == FAILED:
                del self.entries[key]

    def _begin(self, key: plan.Key, svc: model.Service) -> None:
        assert svc.db is not None and self.tg is not None
        entry = Entry(state=PROVISIONING, digest=digest(svc.db))
        self.entries[key] = entry
        self.tg.start_soon(self._provision, key, svc, entry)

    async def _provision(self, key: plan.Key, svc: model.Service, entry: Entry) -> None:
        started = time.monotonic()
        try:
            provider, env = await anyio.to_thread.run_sync(self.provision_blocking, key[0], svc)
        except DbError as exc:
            if self.entries.get(key) is entry:
                entry.state, entry.error = FAILED, exc.message
            log.warning("%s: database: %s", plan.key_text(key), exc.message)
        except Exception as exc:  # a driver bug must not take the agent down
            log.exception("%s: database provisioning failed", plan.key_text(key))
            if self.entries.get(key) is entry:
                entry.state, entry.error = FAILED, wiring.redact_url(f"{exc!r}")
        else:
            if self.entries.get(key) is entry:
                entry.state, entry.env, entry.provider = READY, env, provider
            log.info(
                "%s: database ready (%s, %.2f s)",
                plan.key_text(key),
                provider,
                time.monotonic() - started,
            )
        self.wake()

    # ---------------------------------------------------------------- blocking work

    def choose_provider(self, project: str, svc: model.Service) -> str:
        """The provider of ``svc``'s database: the recorded one, else the config's choice."""
        assert svc.db is not None
        recorded = self.record(project).get(svc.name, {}).get("provider")
        spec = self.spec(project, svc)
        if spec.engine is Engine.SQLITE:
            return "sqlite"
        wanted = svc.db.provider.value
        if recorded in ("native", "docker"):
            if wanted in ("auto", recorded):
                return str(recorded)
            raise PermanentDbError(
                f"the database of service {svc.name!r} is held by the {recorded} provider, "
                f"and db.provider now says {wanted}; its data would be left behind. "
                f"`devmesh down --volumes {svc.name}` deletes it (then `up` makes it anew "
                f"with {wanted}), or set provider back to {recorded}"
            )
        return choose.choose(
            spec, wanted, docker_probe=_docker_reason, native_probe=lambda: _native_reason(spec)
        )

    def provision_blocking(self, project: str, svc: model.Service) -> tuple[str, dict[str, str]]:
        """Create (or adopt) ``svc``'s database; (provider, environment). Runs in a thread.

        A database this call creates is dropped again when its ``init`` files or its first
        sync fail: nothing is left half made, and the next `up` tries again from scratch.
        """
        assert svc.db is not None
        name = self.choose_provider(project, svc)
        provider = self.provider(project, name, svc.db.image)
        spec = self.spec(project, svc)
        try:
            existed = provider.status(spec).state is not DbState.ABSENT
            info = provider.ensure(spec)
            if not existed:
                try:
                    _run_init(info, svc.db.init, provider, spec)
                    if svc.db.sync is not None and svc.db.sync.on_first_up:
                        self._sync(project, svc, provider, name, progress=None, snapshot=False)
                except BaseException:
                    try:
                        provider.drop(spec)
                    except DbError as exc:  # say what is left; the first error is the cause
                        log.warning(
                            "%s/%s: could not drop the database again: %s",
                            project,
                            svc.name,
                            exc.message,
                        )
                    raise
            self._note(
                project,
                svc.name,
                provider=name,
                engine=spec.engine.value,
                database=spec.database,
                version=svc.db.version,
                image=svc.db.image,
            )
            return name, wiring.environment(info)
        finally:
            _close(provider)

    async def stop_project(self, project: str) -> None:
        """Stop what serves the project's databases (data kept); for `down`."""
        for key in [k for k in self.entries if k[0] == project]:
            del self.entries[key]
        await anyio.to_thread.run_sync(self._stop_blocking, project)

    def _stop_blocking(self, project: str) -> None:
        record = self.record(project)
        if any(r.get("provider") == "native" for r in record.values()):
            self.native(project).stop()
        for service, r in record.items():
            if r.get("provider") == "docker":
                spec = _recorded_spec(project, service, r)
                docker = DockerPostgres(image=r.get("image") or DEFAULT_IMAGE)
                try:
                    docker.stop(spec)
                except DbError as exc:
                    log.warning("%s/%s: database stop: %s", project, service, exc.message)
                finally:
                    docker.close()

    async def drop_project(self, project: str, services: list[str] | None) -> list[str]:
        """Delete the data of the project's databases (``down --volumes``); the names."""
        for key in [k for k in self.entries if k[0] == project]:
            if services is None or key[1] in services:
                del self.entries[key]
        return await anyio.to_thread.run_sync(self._drop_blocking, project, services)

    def _drop_blocking(self, project: str, services: list[str] | None) -> list[str]:
        record = self.record(project)
        dropped: list[str] = []
        for service, r in sorted(record.items()):
            if services is not None and service not in services:
                continue
            spec = _recorded_spec(project, service, r)
            provider = self.provider(project, str(r.get("provider")), r.get("image"))
            try:
                provider.drop(spec)
            finally:
                _close(provider)
            dropped.append(service)
            del record[service]
        if record:
            self._save_record(project, record)
        else:
            # Nothing of the project is left: the whole cluster goes (with any database a
            # renamed db.name left in it, and its data wherever it was placed), then the rest.
            self.native(project).destroy()
            shutil.rmtree(self.root(project), ignore_errors=True)
        return dropped

    # ---------------------------------------------------------------- devmesh db

    def _target(
        self, project: str, proj: model.Project, service: str
    ) -> tuple[model.Service, str, Provider, DbSpec]:
        svc = proj.services.get(service)
        if svc is None:
            known = ", ".join(sorted(proj.services)) or "none"
            raise DbCommandError(
                f"project {project} has no service {service!r} (services: {known})"
            )
        if svc.db is None:
            with_db = ", ".join(sorted(n for n, s in proj.services.items() if s.db)) or "none"
            raise DbCommandError(
                f"service {service!r} of project {project} has no db: block "
                f"(services with a database: {with_db})"
            )
        r = self.record(project).get(service)
        if r is None:
            raise DbCommandError(
                f"the database of service {service!r} does not exist yet; `devmesh up` creates it"
            )
        name = str(r.get("provider"))
        return svc, name, self.provider(project, name, svc.db.image), self.spec(project, svc)

    def status_blocking(self, project: str, proj: model.Project) -> list[dict[str, Any]]:
        rows = []
        record = self.record(project)
        for name, svc in sorted(proj.services.items()):
            if svc.db is None:
                continue
            spec = self.spec(project, svc)
            entry = self.entries.get((project, name))
            r = record.get(name, {})
            row: dict[str, Any] = {
                "service": name,
                "engine": spec.engine.value,
                "provider": r.get("provider"),
                "database": spec.database,
                "state": "absent",
                "size_bytes": None,
                "url": None,
                "last_sync": r.get("last_sync"),
                "snapshots": None,
                "error": entry.error if entry and entry.state == FAILED else None,
            }
            if entry is not None and entry.state == PROVISIONING:
                row["state"] = PROVISIONING
            elif r.get("provider"):
                provider = self.provider(project, str(r["provider"]), svc.db.image)
                try:
                    st = provider.status(spec)
                    row.update(state=st.state.value, size_bytes=st.size_bytes, url=st.url)
                    if isinstance(provider, Snapshotting) and st.state is DbState.RUNNING:
                        row["snapshots"] = len(provider.snapshots(spec))
                except DbError as exc:
                    row["error"] = exc.message
                finally:
                    _close(provider)
            if row["error"] and row["state"] == "absent":
                row["state"] = FAILED
            rows.append(row)
        return rows

    def conninfo_blocking(self, project: str, proj: model.Project, service: str) -> ConnInfo:
        _, _, provider, spec = self._target(project, proj, service)
        try:
            if provider.status(spec).state is not DbState.RUNNING:
                provider.start(spec)
            return provider.conninfo(spec)
        finally:
            _close(provider)

    def url_blocking(self, project: str, proj: model.Project, service: str) -> dict[str, Any]:
        info = self.conninfo_blocking(project, proj, service)
        return {"url": wiring.url(info), "env": wiring.environment(info)}

    def shell_blocking(self, project: str, proj: model.Project, service: str) -> dict[str, Any]:
        """The argv and environment of an interactive client on the service's database."""
        info = self.conninfo_blocking(project, proj, service)
        env = wiring.environment(info)
        if info.engine is Engine.SQLITE:
            tool = shutil.which("sqlite3")
            if tool is None:
                raise DbCommandError(
                    "sqlite3 is not installed; `apt-get install sqlite3` on Debian/Ubuntu"
                )
            return {"argv": [tool, str(info.path)], "env": env}
        psql = _psql()
        if psql is None:
            raise DbCommandError(
                "psql is not installed; `apt-get install postgresql-client` on Debian/Ubuntu"
            )
        return {"argv": [psql], "env": env}

    def sync_blocking(
        self,
        project: str,
        proj: model.Project,
        service: str,
        progress: Callable[[sync_mod.Progress], None] | None,
    ) -> dict[str, Any]:
        svc, name, provider, _ = self._target(project, proj, service)
        try:
            return self._sync(project, svc, provider, name, progress=progress, snapshot=True)
        finally:
            _close(provider)

    def _sync(
        self,
        project: str,
        svc: model.Service,
        provider: Provider,
        provider_name: str,
        *,
        progress: Callable[[sync_mod.Progress], None] | None,
        snapshot: bool,
    ) -> dict[str, Any]:
        assert svc.db is not None
        sy = svc.db.sync
        if sy is None:
            raise DbCommandError(
                f"service {svc.name!r} has no db.sync block: nothing says what to copy"
            )
        if not isinstance(provider, NativePostgres | DockerPostgres):
            raise DbCommandError(f"service {svc.name!r}: a sync needs a PostgreSQL database")
        spec = self.spec(project, svc)
        snap_name = None
        if snapshot:
            snap_name = "pre-sync-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
            provider.snapshot(spec, snap_name)
            provider.prune_snapshots(spec, svc.db.snapshots_keep)
        result = sync_mod.run(
            sync_mod.SyncSpec(
                source_url=sy.source,
                tables=dict(sy.tables),
                limit=sy.limit,
                follow_foreign_keys=sy.follow_foreign_keys,
                exclude_columns=dict(sy.exclude_columns),
            ),
            provider.admin_conninfo(spec),
            spec.database,
            progress=progress,
        )
        last = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": result.rows,
            "tables": len(result.tables),
            "elapsed_s": round(result.elapsed_s, 3),
        }
        self._note(project, svc.name, last_sync=last)
        return {
            **last,
            "snapshot": snap_name,
            "per_table": [
                {"table": t.table, "rows": t.rows, "bytes": t.bytes} for t in result.tables
            ],
        }

    def _snap_target(
        self, project: str, proj: model.Project, service: str
    ) -> tuple[Snapshotting, DbSpec]:
        """The service's provider for a snapshot command: every provider takes them."""
        _, _, provider, spec = self._target(project, proj, service)
        assert isinstance(provider, Snapshotting)
        return provider, spec

    def snapshot_blocking(
        self, project: str, proj: model.Project, service: str, name: str | None
    ) -> dict[str, Any]:
        provider, spec = self._snap_target(project, proj, service)
        try:
            info = provider.snapshot(spec, name)
        finally:
            _close(provider)
        return {"name": info.name, "created_at": info.created_at, "size_bytes": info.size_bytes}

    def restore_blocking(self, project: str, proj: model.Project, service: str, name: str) -> None:
        provider, spec = self._snap_target(project, proj, service)
        try:
            provider.restore(spec, name)
        finally:
            _close(provider)

    def snapshots_blocking(
        self, project: str, proj: model.Project, service: str
    ) -> list[dict[str, Any]]:
        provider, spec = self._snap_target(project, proj, service)
        try:
            snaps = provider.snapshots(spec)
        finally:
            _close(provider)
        return [
            {"name": s.name, "created_at": s.created_at, "size_bytes": s.size_bytes} for s in snaps
        ]


def _recorded_spec(project: str, service: str, r: Mapping[str, Any]) -> DbSpec:
    version = r.get("version")
    return DbSpec(
        project=project,
        service=service,
        engine=Engine(r.get("engine", "postgres")),
        name=str(r.get("database") or ""),
        version=int(version) if version else None,
    )


def _close(provider: Provider) -> None:
    if isinstance(provider, DockerPostgres):
        provider.close()


def _docker_reason() -> str | None:
    try:
        connect(2.0).close()
    except DockerUnavailableError as exc:
        return exc.message
    return None


def _native_reason(spec: DbSpec) -> str | None:
    try:
        pgbin.find(spec.version)
    except NoPostgresBinariesError as exc:
        return exc.message
    return None


def _psql() -> str | None:
    with contextlib.suppress(NoPostgresBinariesError):
        tool = pgbin.find(None).tool("psql")
        if Path(tool).exists():
            return tool
    return shutil.which("psql")


def _run_init(info: ConnInfo, files: tuple[str, ...], provider: Provider, spec: DbSpec) -> None:
    """Run the ``init`` SQL files, in order, as the service's own role."""
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PermanentDbError(f"init file {path}: {exc.strerror or exc}") from None
        try:
            if info.engine is Engine.SQLITE:
                with contextlib.closing(sqlite3.connect(str(info.path))) as conn:
                    conn.executescript(text)
                    conn.commit()
            else:
                _run_pg_script(info, text)
        except (sqlite3.Error, _PgError) as exc:
            raise PermanentDbError(
                f"init file {path} failed on database {spec.database!r}: "
                f"{wiring.scrub(str(exc), [info.password])}; the database was not kept"
            ) from None


class _PgError(Exception):
    pass


def _run_pg_script(info: ConnInfo, text: str) -> None:
    import psycopg

    try:
        with psycopg.connect(
            host=info.host,
            port=info.port,
            user=info.user,
            password=info.password,
            dbname=info.database,
            connect_timeout=10,
        ) as conn:
            conn.execute(text.encode())
    except psycopg.Error as exc:
        raise _PgError(str(exc).strip()) from None

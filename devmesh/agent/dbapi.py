"""The control API's database endpoints: what `devmesh db` asks the agent.

Why through the agent: the agent owns the databases (it provisions, adopts and stops them),
so a second owner in the CLI would race it, and the CLI may not import the drivers. Every
driver call blocks, so each runs in a worker thread (``anyio.to_thread``): the proxy and
the rest of the API stay live during a long sync.

Endpoints (JSON; ``sync`` answers NDJSON):
  GET  /v1/db/status?project=P              one row per service with a database; without
                                            ``project``, those of every applied project
  GET  /v1/db/url?project=P&service=S       {url, env}: the full URL, password included
  GET  /v1/db/shell?project=P&service=S     {argv, env} of psql or sqlite3 on it
  POST /v1/db/sync        {project, service, document?}   stream: the source, progress per
                          table, then done; ``document`` is the project as the CLI reads
                          devmesh.yaml now (interpolated with its environment): its
                          ``db.sync`` is what is copied, not the one of the last ``up``
  POST /v1/db/snapshot    {project, service, name?}
  POST /v1/db/restore     {project, service, name}
  GET  /v1/db/snapshots?project=P&service=S
Errors are 404 (no such project or service), 409 (a database error, naming the cause).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio

from devmesh.agent import databases
from devmesh.agent.engine import Engine
from devmesh.agent.http_server import ApiError, Request, Response, Router, StreamResponse
from devmesh.core import model
from devmesh.db import sync as sync_mod
from devmesh.db.errors import DbError

T = TypeVar("T")
log = logging.getLogger("devmesh.agent")


def register(router: Router, engine: Engine) -> None:
    dbs = engine.databases

    @router.route("GET", "/v1/db/status")
    async def status(req: Request) -> Response:
        # No project: every applied one, as `devmesh status` lists services across projects
        # (`devmesh db status` run outside a project folder). Each row names its project.
        if req.query.get("project") is None:
            projects = sorted(engine.models.items())
            name = None
        else:
            name, proj = _project(engine, req.query.get("project"))
            projects = [(name, proj)]
        rows = []
        for project, proj in projects:
            for row in await _call(dbs.status_blocking, project, proj):
                rows.append({"project": project, **row})
        return Response(200, {"project": name, "databases": rows})

    @router.route("GET", "/v1/db/url")
    async def url(req: Request) -> Response:
        project, proj = _project(engine, req.query.get("project"))
        return Response(200, await _call(dbs.url_blocking, project, proj, _service(req.query)))

    @router.route("GET", "/v1/db/shell")
    async def shell(req: Request) -> Response:
        project, proj = _project(engine, req.query.get("project"))
        return Response(200, await _call(dbs.shell_blocking, project, proj, _service(req.query)))

    @router.route("GET", "/v1/db/snapshots")
    async def snapshots(req: Request) -> Response:
        project, proj = _project(engine, req.query.get("project"))
        rows = await _call(dbs.snapshots_blocking, project, proj, _service(req.query))
        return Response(200, {"snapshots": rows})

    @router.route("POST", "/v1/db/snapshot")
    async def snapshot(req: Request) -> Response:
        body = _body(req)
        project, proj = _project(engine, body.get("project"))
        name = body.get("name") or None
        info = await _call(dbs.snapshot_blocking, project, proj, _service(body), name)
        return Response(200, info)

    @router.route("POST", "/v1/db/restore")
    async def restore(req: Request) -> Response:
        body = _body(req)
        project, proj = _project(engine, body.get("project"))
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "restore: 'name' must be a snapshot name")
        await _call(dbs.restore_blocking, project, proj, _service(body), name)
        return Response(200, {"restored": name})

    @router.route("POST", "/v1/db/sync")
    async def sync(req: Request) -> StreamResponse:
        body = _body(req)
        project, proj = _project(engine, body.get("project"))
        service = _service(body)
        proj = _with_sync_of(proj, service, body.get("document"))
        svc = proj.services.get(service)
        sync_block = svc.db.sync if svc is not None and svc.db is not None else None
        source = sync_mod.source_of(sync_block.source) if sync_block is not None else None
        assert dbs.tg is not None
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](1000)

        def progress(p: sync_mod.Progress) -> None:
            item = {
                "table": p.table,
                "rows": p.rows,
                "bytes": p.bytes,
                "rows_total": p.rows_total,
                "done": p.done,
            }
            # The CLI may have gone (Ctrl-C): the sync still ends, all or nothing.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                anyio.from_thread.run(send.send, {"progress": item})

        async def worker() -> None:
            async with send:
                try:
                    result = await anyio.to_thread.run_sync(
                        dbs.sync_blocking, project, proj, service, progress
                    )
                except (DbError, databases.DbCommandError) as exc:
                    last = {"done": True, "ok": False, "error": _message(exc)}
                except Exception as exc:  # a driver bug: say so rather than hang up
                    log.exception("%s/%s: sync failed", project, service)
                    last = {"done": True, "ok": False, "error": repr(exc)}
                else:
                    last = {"done": True, "ok": True, "result": result}
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(last)

        dbs.tg.start_soon(worker)

        async def items() -> AsyncIterator[dict[str, Any]]:
            if source is not None:  # first, so it is printed even when the sync fails
                yield {"source": dataclasses.asdict(source), "text": source.text()}
            async with recv:
                async for item in recv:
                    yield item

        return StreamResponse(200, items())


def _with_sync_of(proj: model.Project, service: str, document: Any) -> model.Project:
    """``proj`` (as applied) with the ``db.sync`` block of ``service`` taken from
    ``document``, the file as the CLI reads it now: compose re-reads the file and the
    environment for each command, so `STAGING_URL=... devmesh db sync` must use the new
    URL. Everything else (which database, its provider) stays as applied. No document
    (`-p NAME` without a file): the applied block."""
    if document is None:
        return proj
    if not isinstance(document, dict):
        raise ApiError(400, "'document' must be the project document")
    try:
        fresh = model.from_document(
            document, directory=proj.directory, default_name=proj.name, source=proj.source
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ApiError(400, f"sync: invalid project document: {exc!r}") from exc
    applied, now = proj.services.get(service), fresh.services.get(service)
    if applied is None or applied.db is None:
        return proj  # the sync names what is missing
    if now is None:
        raise ApiError(404, f"service {service!r} is no longer in {proj.source or 'devmesh.yaml'}")
    sync_block = now.db.sync if now.db is not None else None
    db = dataclasses.replace(applied.db, sync=sync_block)
    services = {**proj.services, service: dataclasses.replace(applied, db=db)}
    return dataclasses.replace(proj, services=services)


async def _call(func: Callable[..., T], *args: Any) -> T:
    try:
        return await anyio.to_thread.run_sync(func, *args)
    except databases.DbCommandError as exc:
        raise ApiError(409, str(exc)) from None
    except DbError as exc:
        raise ApiError(409, exc.message) from None


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, DbError) else str(exc)


def _body(req: Request) -> dict[str, Any]:
    body = req.json()
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


def _project(engine: Engine, project: Any) -> tuple[str, model.Project]:
    if not isinstance(project, str) or not project:
        raise ApiError(400, "'project' must be a project name")
    proj = engine.models.get(project)
    if proj is None:
        known = ", ".join(sorted(engine.models)) or "none"
        raise ApiError(
            404,
            f"project {project} is not applied to this agent (projects: {known}); "
            f"`devmesh up` it first",
        )
    return project, proj


def _service(q: dict[str, Any]) -> str:
    service = q.get("service")
    if not isinstance(service, str) or not service:
        raise ApiError(400, "'service' must be a service name")
    return service

"""The control API: the agent's endpoints, which the CLI calls over the Unix socket.

Every endpoint is a thin translation between JSON and the engine. Anything that could leave
a half-applied project (an unknown service name, a port another process holds, a command that
does not exist) is checked in ``preflight`` *before* the engine sees the new desired state, and
rejected as a whole with every problem listed (HTTP 422).

Endpoints (all JSON; ``stream`` ones answer NDJSON, one document per line):
  GET  /v1/status[?project=P]         services, peers, routes, agent
  GET  /v1/peers                      the mesh: this node, peers, backends, drop counters
  GET  /v1/route?project=P&service=S[&caller=C][&branch=B]   where such a call goes, and why
  GET  /v1/graph[?project=P]          machines, services and where each call goes (graphview)
  POST /v1/apply                      {document, directory, source, services, no_deps, base_env,
                                       dry_run}
  GET  /v1/wait?project=P&services=a,b    stream: progress, then {"done": true, "ok": ...}
  POST /v1/down                       {project, services, volumes}; answers when they are
       stopped (``volumes``: their databases deleted too)
  /v1/db/...                          the databases (see ``dbapi``)
  GET  /v1/logs?project=P&services=a,b&tail=N|all&since=UNIX_S&follow=1   stream of
       {service, line, time}; proxy=1 (&format=text) for the access log
  POST /v1/mesh/reload                the team identity changed on disk: see identity_api
  GET  /v1/metrics?since=1h&service=S  the proxy's per-route numbers (see metricsapi)
  GET  /v1/dashboard                  {url, urls, token}: the dashboard's (see dashboardhost)
  POST /v1/shutdown
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio

from devmesh import __version__
from devmesh.agent import (
    dbapi,
    gitbranch,
    graphview,
    identity_api,
    logfeed,
    meshhost,
    metricsapi,
    preflight,
    routeview,
    routing,
    snapshot,
    views,
)
from devmesh.agent import state as state_mod
from devmesh.agent.engine import Engine
from devmesh.agent.http_server import ApiError, Request, Response, Router, StreamResponse
from devmesh.core import branches, desired, model, plan


def build_router(engine: Engine, on_shutdown: Any) -> Router:
    router = Router()
    # POST /v1/mesh/reload: `devmesh mesh init|join` changed the identity on disk
    identity_api.register(router, engine.mesh.reload_identity)
    metricsapi.register(router, lambda: engine.metrics)  # GET /v1/metrics

    @router.route("GET", "/v1/status")
    async def status(req: Request) -> Response:
        project = req.query.get("project")
        snap = engine.snapshot()
        return Response(
            200,
            {
                "services": views.rows(snap, project),
                "peers": engine.mesh.peers(),
                "routes": routeview.rows(
                    snap, engine.routes, engine.explain, engine.node_name(), project
                ),
                "agent": {
                    "pid": os.getpid(),
                    "version": __version__,
                    "home": str(snap.home.root),
                    "started_at": snap.started_at,
                    "projects": [p.name for p in snap.projects],
                },
                "proxy": _proxy_info(snap, engine),
                "mesh_off": engine.mesh.off,
            },
        )

    @router.route("POST", "/v1/apply")
    async def apply(req: Request) -> Response:
        body = _object(req.json())
        rec, proj, branch_warnings = await _record(engine, body)
        dry_run = bool(body.get("dry_run"))
        if folder := engine.folder_conflict(rec.name, rec.directory, rec.source):
            raise ApiError(409, folder)
        problems = engine.preflight(rec, proj)
        conflict = engine.mesh.conflict(proj, engine.mesh_view())
        if conflict:
            problems.append(conflict)
        preview = engine.preview(rec)
        warnings = branch_warnings + _warnings(engine, proj, rec)
        result: dict[str, Any] = {
            "project": rec.name,
            "services": sorted(rec.enabled),
            "routed": _routed(proj, body, rec),
            "actions": [_action(a) for a in preview.actions if a.key[0] == rec.name],
            "problems": problems,
            "warnings": warnings,
            "mesh_off": None,
        }
        if problems:
            raise ApiError(422, "; ".join(problems))
        if not dry_run:
            try:
                await engine.mesh.ensure(proj, engine.mesh_view())
            except meshhost.MeshError as exc:
                raise ApiError(422, str(exc)) from exc
            # Checked again with no await before the apply: of two applies of one project
            # from two folders racing through the awaits above, the second one loses here.
            if folder := engine.folder_conflict(rec.name, rec.directory, rec.source):
                await engine.mesh.release(engine.mesh_view())
                raise ApiError(409, folder)
            engine.apply(rec, proj)
            await engine.mesh.release(engine.mesh_view())  # it may have dropped its mesh:
        if engine.mesh.off_for(proj):
            result["mesh_off"] = meshhost.MESH_OFF
            warnings.append(_mesh_off_warning(proj))
        return Response(200, result)

    @router.route("GET", "/v1/wait")
    async def wait(req: Request) -> StreamResponse:
        project = _need(req.query, "project")
        names = [n for n in req.query.get("services", "").split(",") if n]
        return StreamResponse(200, _wait_stream(engine, project, names))

    @router.route("POST", "/v1/down")
    async def down(req: Request) -> Response:
        body = _object(req.json())
        project = body.get("project")
        if not isinstance(project, str):
            raise ApiError(400, "down: 'project' must be a project name")
        services = body.get("services") or None
        volumes = bool(body.get("volumes"))
        if not engine.knows(project):
            dropped = await engine.databases.drop_project(project, services) if volumes else []
            return Response(
                200, {"project": project, "stopped": [], "known": False, "dropped": dropped}
            )
        stopped = await engine.down(project, services, volumes=volumes)
        await engine.mesh.release(engine.mesh_view())
        return Response(200, {"project": project, "stopped": stopped, "known": True})

    @router.route("GET", "/v1/logs")
    async def get_logs(req: Request) -> StreamResponse:
        q = req.query
        proxy = q.get("proxy") == "1"
        paths = _log_paths(engine.snapshot(), q.get("project"), q.get("services"), proxy)
        tail = None if q.get("tail") == "all" else _number(q, "tail", int, 0)
        since_s = _number(q, "since", float, None)
        follow = q.get("follow") == "1"
        items = logfeed.feed(paths, tail=tail, follow=follow, since_s=since_s)
        if proxy and q.get("format") == "text":
            items = _access_text(items)
        return StreamResponse(200, items)

    @router.route("GET", "/v1/route")
    async def route(req: Request) -> Response:
        q = req.query
        project, service = _need(q, "project"), _need(q, "service")
        caller, branch = q.get("caller") or None, q.get("branch") or None
        snap = engine.snapshot()
        applied = snap.project(project)
        if applied is None:
            known = ", ".join(p.name for p in snap.projects) or "none"
            raise ApiError(
                404, f"no project {project!r} is applied to this agent (projects: {known})"
            )
        names = ", ".join(applied.project.services) or "none"
        if service not in applied.project.services:
            raise ApiError(404, f"no service {service!r} in project {project} (services: {names})")
        if caller is not None and caller not in applied.project.services:
            raise ApiError(404, f"no service {caller!r} in project {project} (services: {names})")
        if branch is not None and (problem := branches.problem(branch)):
            raise ApiError(400, problem)
        decision = engine.explain(project, service, caller=caller, branch=branch)
        route_, backend = routing.find(engine.routes, project, service)
        if decision is None:
            raise ApiError(404, f"service {service} of project {project} has no route")
        return Response(
            200,
            routeview.decision_doc(
                decision,
                project=project,
                route=route_,
                backend=backend,
                node_name=engine.node_name(),
            ),
        )

    @router.route("GET", "/v1/graph")
    async def graph(req: Request) -> Response:
        project = req.query.get("project") or None
        snap = engine.snapshot()
        if project is not None and snap.project(project) is None:
            known = ", ".join(p.name for p in snap.projects) or "none"
            raise ApiError(
                404, f"no project {project!r} is applied to this agent (projects: {known})"
            )
        n = engine.mesh.node
        return Response(
            200,
            graphview.document(
                snap,
                engine.explain,
                machine_name=engine.node_name() or socket.gethostname(),
                node_id=n.identity.node_id if n is not None else None,
                peer_rows=engine.mesh.peers(),
                history=engine.metrics,
                project=project,
            ),
        )

    @router.route("GET", "/v1/peers")
    async def peers(req: Request) -> Response:
        doc = engine.mesh.status()
        if doc.get("running") and engine.proxy is not None:
            # The peer listener is the proxy's: its connection counts live there.
            doc["listener"] = engine.proxy.peer_stats()
        return Response(200, doc)

    @router.route("POST", "/v1/shutdown")
    async def shutdown(req: Request) -> Response:
        on_shutdown()
        return Response(200, {"stopping": True})

    dbapi.register(router, engine)
    return router


def _proxy_info(snap: snapshot.Snapshot, engine: Engine) -> dict[str, Any] | None:
    if snap.proxy_port is None:
        return None
    info: dict[str, Any] = {
        "http_port": snap.proxy_port,
        "https_port": snap.https_port,
        "log": str(snap.home.proxy_log),
    }
    if engine.proxy is not None:
        info.update(engine.proxy.load())
        ws = engine.proxy_workers
        count, ready = (ws.count, ws.ready_count()) if ws is not None else (0, 0)
        info["workers"] = count
        info["ready"] = ready == count  # every process of the proxy accepts
        info["workers_ready"] = ready
        info["peer_listener"] = engine.proxy.peer_stats()
    return info


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object")
    return value


def _need(q: dict[str, str], key: str) -> str:
    if not q.get(key):
        raise ApiError(400, f"missing query parameter {key!r}")
    return q[key]


async def _record(
    engine: Engine, body: dict[str, Any]
) -> tuple[state_mod.ProjectRecord, model.Project, list[str]]:
    """The record and model an apply would store, and warnings about branches.

    ``branch: auto`` is resolved here, once (git runs in a worker thread); an invalid
    ``branch: NAME`` refuses the apply (422) before anything changes.
    """
    doc = body.get("document")
    directory = body.get("directory")
    if not isinstance(doc, dict) or not isinstance(directory, str):
        raise ApiError(400, "apply: 'document' (object) and 'directory' (string) are required")
    name = str(doc.get("project") or os.path.basename(directory))
    try:
        proj = model.from_document(
            doc, directory=directory, default_name=name, source=str(body.get("source", ""))
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ApiError(400, f"apply: invalid project document: {exc!r}") from exc
    selected = body.get("services")
    if body.get("no_deps") and not selected:
        raise ApiError(400, "apply: no_deps needs the services to start")
    if selected is not None:
        unknown = [s for s in selected if s not in proj.services]
        if unknown:
            raise ApiError(
                422,
                f"no such service {', '.join(map(repr, unknown))} in project {proj.name} "
                f"(services: {', '.join(proj.services)})",
            )
    resolved = await anyio.to_thread.run_sync(gitbranch.resolve, proj)
    if resolved.problems:
        raise ApiError(422, f"project {proj.name}: " + "; ".join(resolved.problems))
    proj = desired.resolve_branches(proj, resolved.branches)
    base_env = body.get("base_env")
    try:
        rec = engine.prepare(
            proj,
            directory=directory,
            source=str(body.get("source", "")),
            selected=selected,
            base_env={str(k): str(v) for k, v in (base_env or dict(os.environ)).items()},
            branches=resolved.branches,
            no_deps=bool(body.get("no_deps")),
        )
    except preflight.NoFreePortError as exc:
        raise ApiError(503, str(exc)) from exc
    return rec, proj, list(resolved.warnings)


def _routed(
    proj: model.Project, body: dict[str, Any], rec: state_mod.ProjectRecord
) -> list[dict[str, Any]]:
    """``up --no-deps``: the dependencies it does not start, and what becomes of their calls."""
    if not body.get("no_deps"):
        return []
    return [
        {
            "service": r.service,
            "callers": list(r.callers),
            "running": r.running,
            "reason": r.words(proj),
        }
        for r in desired.routed_instead(proj, body.get("services") or [], rec.enabled)
    ]


def _warnings(engine: Engine, proj: model.Project, rec: state_mod.ProjectRecord) -> list[str]:
    out = []
    snap = engine.snapshot()
    agent_ports = (snap.proxy_port, snap.https_port)
    if snap.proxy_port is not None and (proj.proxy.port, proj.proxy.https_port) != agent_ports:
        out.append(
            f"project {proj.name} asks for proxy ports {proj.proxy.port}/{proj.proxy.https_port} "
            f"but this agent's proxy listens on {agent_ports[0]}/{agent_ports[1]} (one proxy per "
            "agent, set when it started); URLs use the agent's ports"
        )
    history = engine.metrics
    if history is not None and proj.metrics.retention_days != history.retention_days:
        out.append(
            f"project {proj.name} asks for metrics.retention_days "
            f"{proj.metrics.retention_days:g} but this agent keeps {history.retention_days:g} "
            "days (one history per agent, set when it started)"
        )
    if proj.mesh is None or engine.mesh.off_for(proj):
        # Without a mesh, a dependency that runs elsewhere can only be reached at its
        # fallback: its NAME_URL (the edge listener) would answer every call with a 502.
        for n in rec.enabled:
            svc = proj.services[n]
            for dep in svc.depends_on:
                target = proj.services.get(dep.name)
                if (
                    target is not None
                    and not target.runs_here
                    and not target.fallback
                    and target.project is None  # another project applied here may run it
                ):
                    out.append(
                        f"service {n}: dependency {dep.name} does not run here, has no "
                        f"fallback and project {proj.name} "
                        + ("has no mesh: section" if proj.mesh is None else "has its mesh off")
                        + f"; calls to {desired.url_var(dep.name)} will answer 502"
                    )
    return out


def _mesh_off_warning(proj: model.Project) -> str:
    return (
        f"project {proj.name} has a mesh: section but {meshhost.MESH_OFF}: the mesh is off, "
        "its services run, and calls to services that do not run here go to their fallback. "
        "Join your team with `devmesh mesh join FILE` (a teammate's bundle, from `devmesh mesh "
        "export`) or start one with `devmesh mesh init`; the mesh starts then, and no service "
        "restarts"
    )


def _action(a: plan.Action) -> dict[str, Any]:
    return {"service": a.key[1], "action": a.verb.value, "reason": a.reason}


async def _wait_stream(
    engine: Engine, project: str, names: list[str]
) -> AsyncIterator[dict[str, Any]]:
    applied = engine.snapshot().project(project)
    if applied is None:
        yield {"done": True, "ok": False, "failures": {"*": f"project {project} is not applied"}}
        return
    if not names:
        names = list(applied.enabled)
    last: dict[str, tuple[str, str | None]] = {}
    while True:
        seen_generation = engine.generation
        snap = engine.snapshot()
        now = views.readiness(snap, project, names)
        for n, st in now.items():
            if last.get(n) != st:
                url = views.url(snap, (project, n)) if st[0] == "ready" else None
                yield {"service": n, "status": st[0], "reason": st[1], "url": url}
        last = now
        if all(st[0] != "pending" for st in now.values()):
            failures = {n: st[1] for n, st in now.items() if st[0] == "failed"}
            yield {"done": True, "ok": not failures, "failures": failures}
            return
        with anyio.move_on_after(1.0) as timer:
            await engine.changed(seen_generation)
        if timer.cancelled_caught:
            yield {"heartbeat": True}  # lets the CLI enforce --wait-timeout


def _number(q: dict[str, str], key: str, kind: Any, default: Any) -> Any:
    raw = q.get(key)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {key}: expected a number, got {raw!r}") from None


async def _access_text(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The access log is kept as JSON lines; people read them as text."""
    async for item in items:
        if "line" in item:
            item["line"] = Engine.access_text(item["line"])
        yield item


def _log_paths(
    snap: snapshot.Snapshot, project: str | None, services: str | None, proxy: bool
) -> dict[str, Any]:
    if proxy:
        return {"proxy": snap.home.proxy_log}
    wanted = [s for s in (services or "").split(",") if s]
    applied = snap.project(project) if project else None
    if project and wanted and applied is None:
        # Attached `up` opens its feed before the first apply: name the files up front.
        return {s: snap.home.service_log(project, s) for s in wanted}
    if project and applied is None:
        known = ", ".join(p.name for p in snap.projects) or "none"
        raise ApiError(404, f"no project {project!r} is applied to this agent (projects: {known})")
    out = {}
    for p in snap.projects:
        if project is not None and p.name != project:
            continue
        for s, svc in p.project.services.items():
            if not svc.runs_here or (wanted and s not in wanted):
                continue
            if not wanted and s not in p.enabled and (p.name, s) not in snap.instances:
                continue
            out[s if project is not None else f"{p.name}/{s}"] = snap.home.service_log(p.name, s)
    if wanted:
        missing = [s for s in wanted if s not in out and not any(k.endswith("/" + s) for k in out)]
        if missing:
            where = f"project {project}" if project else "any applied project"
            raise ApiError(404, f"no such service {', '.join(missing)} in {where}")
    return out

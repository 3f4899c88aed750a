"""The control API: the agent's endpoints, which the CLI calls over the Unix socket.

Every endpoint is a thin translation between JSON and the engine. Anything that could leave
a half-applied project (an unknown service name, a port another process holds, a command that
does not exist) is checked in ``preflight`` *before* the engine sees the new desired state, and
rejected as a whole with every problem listed (HTTP 422).

Endpoints (all JSON; ``stream`` ones answer NDJSON, one document per line):
  GET  /v1/status[?project=P]         services, peers, routes, agent
  POST /v1/apply                      {document, directory, source, services, base_env, dry_run}
  GET  /v1/wait?project=P&services=a,b    stream: progress, then {"done": true, "ok": ...}
  POST /v1/down                       {project, services}; answers when they are stopped
  GET  /v1/logs?project=P&services=a,b&tail=N|all&since=UNIX_S&follow=1   stream of
       {service, line, time}; proxy=1 (&format=text) for the access log
  GET  /v1/ca                         {path, pem} of the local CA (created on first use)
  POST /v1/shutdown
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio

from devmesh import __version__
from devmesh.agent import logfeed, views
from devmesh.agent import state as state_mod
from devmesh.agent.engine import Engine
from devmesh.agent.http_server import ApiError, Request, Response, Router, StreamResponse
from devmesh.core import desired, model, plan
from devmesh.proxy import accesslog, ca
from devmesh.supervisor import ports, process


def build_router(engine: Engine, on_shutdown: Any) -> Router:
    router = Router()

    @router.route("GET", "/v1/status")
    async def status(req: Request) -> Response:
        project = req.query.get("project")
        return Response(
            200,
            {
                "services": views.rows(engine, project),
                "peers": [],
                "routes": views.routes(engine, project),
                "agent": {
                    "pid": os.getpid(),
                    "version": __version__,
                    "home": str(engine.home.root),
                    "started_at": engine.started_at,
                    "projects": sorted(engine.state.projects),
                },
                "proxy": _proxy_info(engine),
            },
        )

    @router.route("POST", "/v1/apply")
    async def apply(req: Request) -> Response:
        body = _object(req.json())
        rec, proj = _record(engine, body)
        dry_run = bool(body.get("dry_run"))
        problems = preflight(engine, rec, proj)
        wants = engine.wants({rec.name: rec})
        preview = plan.plan(wants, engine.seen(), engine.clock())
        result = {
            "project": rec.name,
            "services": sorted(rec.enabled),
            "actions": [_action(a) for a in preview.actions if a.key[0] == rec.name],
            "problems": problems,
            "warnings": _warnings(engine, proj, rec),
        }
        if problems:
            raise ApiError(422, "; ".join(problems))
        if not dry_run:
            engine.apply(rec, proj)
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
        if project not in engine.state.projects and not any(
            k[0] == project for k in engine.instances
        ):
            return Response(200, {"project": project, "stopped": [], "known": False})
        targets = [
            k
            for k in engine.instances
            if k[0] == project and (services is None or k[1] in services)
        ]
        engine.remove(project, services)
        while True:
            generation = engine.generation
            if not any(k in engine.instances for k in targets):
                break
            await engine.changed(generation)
        return Response(
            200, {"project": project, "stopped": [k[1] for k in targets], "known": True}
        )

    @router.route("GET", "/v1/logs")
    async def get_logs(req: Request) -> StreamResponse:
        q = req.query
        proxy = q.get("proxy") == "1"
        paths = _log_paths(engine, q.get("project"), q.get("services"), proxy)
        tail = None if q.get("tail") == "all" else _number(q, "tail", int, 0)
        since_s = _number(q, "since", float, None)
        follow = q.get("follow") == "1"
        items = logfeed.feed(paths, tail=tail, follow=follow, since_s=since_s)
        if proxy and q.get("format") == "text":
            items = _access_text(items)
        return StreamResponse(200, items)

    @router.route("GET", "/v1/ca")
    async def get_ca(req: Request) -> Response:
        # The CLI's `ca path|export|install` come here rather than open the proxy's CA
        # themselves: one owner creates the CA, on first use, the same way every time.
        local = ca.LocalCA(engine.home.root)
        pem = local.cert_pem()
        return Response(200, {"path": str(local.cert_path()), "pem": pem.decode()})

    @router.route("POST", "/v1/shutdown")
    async def shutdown(req: Request) -> Response:
        on_shutdown()
        return Response(200, {"stopping": True})

    return router


def _proxy_info(engine: Engine) -> dict[str, Any] | None:
    p = engine.proxy
    if p is None:
        return None
    return {"http_port": p.http_port, "https_port": p.https_port, "log": str(engine.home.proxy_log)}


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object")
    return value


def _need(q: dict[str, str], key: str) -> str:
    if not q.get(key):
        raise ApiError(400, f"missing query parameter {key!r}")
    return q[key]


def _record(engine: Engine, body: dict[str, Any]) -> tuple[state_mod.ProjectRecord, model.Project]:
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
    if selected is not None:
        unknown = [s for s in selected if s not in proj.services]
        if unknown:
            raise ApiError(
                422,
                f"no such service {', '.join(map(repr, unknown))} in project {proj.name} "
                f"(services: {', '.join(proj.services)})",
            )
    enabled = desired.enabled_closure(proj, selected)
    old = engine.state.projects.get(proj.name)
    if selected is not None and old is not None:
        enabled |= {s for s in old.enabled if s in proj.services and proj.services[s].runs_here}
    port_map = dict(old.ports) if old else {}
    taken = _fixed_ports(engine, proj.name)
    for n in sorted(enabled):
        svc = proj.services[n]
        if svc.port is None and n not in port_map:
            port_map[n] = _pick(taken)
        taken.add(port_map.get(n, svc.port or 0))
    base_env = body.get("base_env")
    rec = state_mod.ProjectRecord(
        name=proj.name,
        document=model.to_document(proj),
        directory=directory,
        source=str(body.get("source", "")),
        enabled=sorted(enabled),
        base_env={str(k): str(v) for k, v in (base_env or dict(os.environ)).items()},
        ports={k: v for k, v in port_map.items() if k in proj.services},
        edges=dict(old.edges) if old else {},
        applied_at=engine.clock(),
    )
    return rec, proj


def _fixed_ports(engine: Engine, except_project: str) -> set[int]:
    out: set[int] = set()
    for name, rec in engine.state.projects.items():
        if name == except_project:
            continue
        out.update(rec.ports.values())
        out.update(s.port for s in engine.models[name].services.values() if s.port)
    return out


def _pick(taken: set[int]) -> int:
    for _ in range(50):
        port = ports.pick_free()
        if port not in taken:
            return port
    raise ApiError(503, "could not find a free port on 127.0.0.1")


def preflight(engine: Engine, rec: state_mod.ProjectRecord, proj: model.Project) -> list[str]:
    """Problems that would make the apply fail half-way; none means it is safe to apply."""
    problems: list[str] = []
    path = rec.base_env.get("PATH", os.defpath)
    ours = {
        i.port: k
        for k, i in engine.instances.items()
        if i.port is not None and i.phase is not plan.Phase.FAILED
    }
    for n in rec.enabled:
        svc = proj.services[n]
        cwd = svc.cwd or proj.directory
        if not os.path.isdir(cwd):
            problems.append(f"service {n}: working folder {cwd} does not exist")
            continue
        argv0 = (svc.command or ("",))[0]
        if "${" not in argv0:
            try:
                process.resolve(argv0, cwd, path)
            except process.SpawnError as exc:
                problems.append(f"service {n}: {exc}")
        if svc.port is not None:
            owner_key = ours.get(svc.port)
            if owner_key is not None and owner_key != (proj.name, n):
                problems.append(
                    f"service {n}: port {svc.port} is already in use by devmesh service "
                    f"{plan.key_text(owner_key)}"
                )
            elif owner_key is None:
                owner = ports.check_free(svc.port)
                if owner is not None:
                    who = f" by pid {owner.pid} ({owner.name})" if owner.pid else ""
                    problems.append(f"service {n}: port {svc.port} is already in use{who}")
    return problems


def _warnings(engine: Engine, proj: model.Project, rec: state_mod.ProjectRecord) -> list[str]:
    out = []
    p = engine.proxy
    if p is not None and (proj.proxy.port, proj.proxy.https_port) != (p.http_port, p.https_port):
        out.append(
            f"project {proj.name} asks for proxy ports {proj.proxy.port}/{proj.proxy.https_port} "
            f"but this agent's proxy listens on {p.http_port}/{p.https_port} (one proxy per "
            "agent, set when it started); URLs use the agent's ports"
        )
    for n in rec.enabled:
        svc = proj.services[n]
        urls = engine.urls(proj, rec, svc)
        for dep in desired.unreachable(svc, urls):
            out.append(
                f"service {n}: dependency {dep} does not run here and has no fallback; "
                f"{desired.url_var(dep)} is not set"
            )
    return out


def _action(a: plan.Action) -> dict[str, Any]:
    return {"service": a.key[1], "action": a.verb.value, "reason": a.reason}


async def _wait_stream(
    engine: Engine, project: str, names: list[str]
) -> AsyncIterator[dict[str, Any]]:
    if project not in engine.state.projects:
        yield {"done": True, "ok": False, "failures": {"*": f"project {project} is not applied"}}
        return
    if not names:
        names = list(engine.state.projects[project].enabled)
    last: dict[str, tuple[str, str | None]] = {}
    while True:
        seen_generation = engine.generation
        now = views.readiness(engine, project, names)
        for n, st in now.items():
            if last.get(n) != st:
                yield {"service": n, "status": st[0], "reason": st[1]}
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
    import json

    async for item in items:
        if "line" in item:
            try:
                item["line"] = accesslog.format_text(accesslog.Entry(**json.loads(item["line"])))
            except (ValueError, TypeError):
                pass  # not an entry (a line of an older format): shown as it is
        yield item


def _log_paths(
    engine: Engine, project: str | None, services: str | None, proxy: bool
) -> dict[str, Any]:
    if proxy:
        return {"proxy": engine.home.proxy_log}
    wanted = [s for s in (services or "").split(",") if s]
    proj = engine.models.get(project) if project else None
    if project and wanted and proj is None:
        # Attached `up` opens its feed before the first apply: name the files up front.
        return {s: engine.home.service_log(project, s) for s in wanted}
    if project and proj is None:
        known = ", ".join(sorted(engine.state.projects)) or "none"
        raise ApiError(404, f"no project {project!r} is applied to this agent (projects: {known})")
    out = {}
    for name, rec in engine.state.projects.items():
        if project is not None and name != project:
            continue
        for s, svc in engine.models[name].services.items():
            if not svc.runs_here or (wanted and s not in wanted):
                continue
            if not wanted and s not in rec.enabled and (name, s) not in engine.instances:
                continue
            out[s if project is not None else f"{name}/{s}"] = engine.home.service_log(name, s)
    if wanted:
        missing = [s for s in wanted if s not in out and not any(k.endswith("/" + s) for k in out)]
        if missing:
            where = f"project {project}" if project else "any applied project"
            raise ApiError(404, f"no such service {', '.join(missing)} in {where}")
    return out

"""What `devmesh status` and `up -d` see: one row per service, in words a developer reads.

Why separate from the engine: the engine keeps facts for the planner; this module turns
facts and the last plan into the stable JSON contract documented in docs/cli.md
(``project, name, version, state, health, pid, port, url, node, restarts``; more keys may be
added, none of these removed).
"""

from __future__ import annotations

import socket
from typing import Any

from devmesh.agent.engine import Engine, Instance
from devmesh.core import model, plan
from devmesh.supervisor import logs

# States in which `up -d` stops waiting for a service and reports it as failed.
FAILED_STATES = frozenset(
    {"failed", "blocked", "exited", "crash-looping", "unhealthy", "restarting"}
)


def _node() -> str:
    return socket.gethostname()


def service_state(inst: Instance | None, actions: list[plan.Action]) -> tuple[str, str | None]:
    """(state, reason) of one wanted-or-running service."""
    verbs = {a.verb: a for a in actions}
    if inst is None:
        if plan.Verb.HOLD in verbs:
            return "blocked", verbs[plan.Verb.HOLD].reason
        if plan.Verb.WAIT in verbs:
            return "waiting", verbs[plan.Verb.WAIT].reason
        return "starting", None
    if inst.phase is plan.Phase.RUNNING:
        if plan.Verb.STOP in verbs:
            return "stopping", verbs[plan.Verb.STOP].reason
        h = inst.health()
        detail = inst.tracker.last_detail if inst.tracker else None
        if h is plan.Health.STARTING:
            return "starting", detail
        if h is plan.Health.UNHEALTHY:
            return "unhealthy", detail
        return "running", None
    if inst.phase is plan.Phase.STOPPING:
        return "stopping", None
    if inst.phase is plan.Phase.FAILED:
        return "failed", inst.reason
    # EXITED
    reason = verbs[plan.Verb.WAIT].reason if plan.Verb.WAIT in verbs else None
    if plan.Verb.HOLD in verbs:
        reason = verbs[plan.Verb.HOLD].reason
        return ("crash-looping" if inst.failures > 1 else "exited"), reason
    if inst.failures > 1:
        return "crash-looping", reason
    return "restarting", reason


def rows(engine: Engine, project: str | None = None) -> list[dict[str, Any]]:
    now = engine.clock()
    node = _node()
    out: list[dict[str, Any]] = []
    wants = engine.wants()
    keys: list[plan.Key] = []
    for name, proj in engine.models.items():
        if project is not None and name != project:
            continue
        rec = engine.state.projects[name]
        keys.extend(
            (name, s) for s in proj.services if s in rec.enabled or (name, s) in engine.instances
        )
        out.extend(_external_rows(proj, rec.enabled, node))
    keys.extend(
        k for k in engine.instances if k not in keys and (project is None or k[0] == project)
    )
    for key in keys:
        inst = engine.instances.get(key)
        if inst is None and key not in wants:
            continue
        svc = engine.service_of(key)
        actions = list(engine.actions_for(key))
        state, reason = service_state(inst, actions)
        port = inst.port if inst else _planned_port(engine, key)
        row: dict[str, Any] = {
            "project": key[0],
            "name": key[1],
            "version": svc.version if svc else None,
            "state": state,
            "health": inst.health().value if inst and inst.phase is plan.Phase.RUNNING else "none",
            "health_probes": inst.tracker.probes if inst and inst.tracker else 0,
            "health_failures": inst.tracker.failures if inst and inst.tracker else 0,
            "pid": inst.proc.pid
            if inst and inst.proc and inst.phase is plan.Phase.RUNNING
            else None,
            "port": port,
            "url": _url(engine, key),
            "address": f"127.0.0.1:{port}" if port else None,
            "node": node,
            "restarts": inst.restarts if inst else 0,
            "reason": reason,
            "uptime_s": round(now - inst.proc.started_at, 1)
            if inst and inst.proc and inst.phase is plan.Phase.RUNNING
            else None,
            "last_exit": inst.exit.describe() if inst and inst.exit else None,
            "log": str(engine.home.service_log(*key)),
        }
        if state in FAILED_STATES:
            row["last_log"] = logs.tail(engine.home.service_log(*key), 10)
        out.append(row)
    out.sort(key=lambda r: (r["project"], r["name"]))
    return out


def _url(engine: Engine, key: plan.Key) -> str | None:
    """The stable address through the proxy: NAME.localhost resolves to loopback by itself."""
    if engine.proxy is None or engine.proxy.http_port is None:
        return None
    clash = any(key[1] in p.services for n, p in engine.models.items() if n != key[0])
    host = f"{key[1]}.{key[0]}" if clash else key[1]
    return f"http://{host}.localhost:{engine.proxy.http_port}"


def _planned_port(engine: Engine, key: plan.Key) -> int | None:
    svc = engine.service_of(key)
    if svc is None:
        return None
    if svc.port is not None:
        return svc.port
    return engine.state.projects[key[0]].ports.get(key[1])


def _external_rows(proj: model.Project, enabled: list[str], node: str) -> list[dict[str, Any]]:
    """Dependencies that do not run here: shown so the user sees where calls will go."""
    needed = {d.name for n in enabled for d in proj.services[n].depends_on if n in proj.services}
    out = []
    for name in sorted(needed):
        svc = proj.services.get(name)
        if svc is None or svc.runs_here:
            continue
        out.append(
            {
                "project": proj.name,
                "name": name,
                "version": svc.version,
                "state": "external",
                "health": "none",
                "pid": None,
                "port": None,
                "url": svc.fallback,
                "node": None,
                "restarts": 0,
                "reason": "fallback" if svc.fallback else "not running anywhere known",
            }
        )
    return out


def readiness(engine: Engine, project: str, names: list[str]) -> dict[str, tuple[str, str | None]]:
    """Per service: ("ready" | "failed" | "pending", reason) for `up -d`."""
    by_name = {r["name"]: r for r in rows(engine, project)}
    out: dict[str, tuple[str, str | None]] = {}
    for n in names:
        r = by_name.get(n)
        if r is None:
            out[n] = ("pending", None)
        elif r["state"] == "running":
            out[n] = ("ready", None)
        elif r["state"] in FAILED_STATES:
            reason = r.get("reason") or r.get("last_exit") or r["state"]
            out[n] = ("failed", f"{r['state']}: {reason}")
        else:
            out[n] = ("pending", r.get("reason"))
    # A service waiting on a failed dependency will not start by itself: report it too.
    proj = engine.models.get(project)
    changed = proj is not None
    while changed and proj is not None:
        changed = False
        for n, (status, _) in list(out.items()):
            svc = proj.services.get(n)
            if status != "pending" or svc is None:
                continue
            bad = [d.name for d in svc.depends_on if out.get(d.name, ("", None))[0] == "failed"]
            if bad:
                out[n] = ("failed", f"not started: dependency {', '.join(bad)} failed")
                changed = True
    return out


def routes(engine: Engine, project: str | None = None) -> list[dict[str, Any]]:
    """Where each dependency call goes, and why: one entry per caller -> dependency edge."""
    out: list[dict[str, Any]] = []
    for name, rec in engine.state.projects.items():
        if project is not None and name != project:
            continue
        proj = engine.models[name]
        for caller in sorted(rec.enabled):
            svc = proj.services.get(caller)
            if svc is None:
                continue
            urls = engine.urls(proj, rec, svc)
            for dep in svc.depends_on:
                target = proj.services.get(dep.name)
                if target is None:
                    continue
                edge_port = rec.edges.get(f"{caller}->{dep.name}")
                if target.runs_here:
                    inst = engine.instances.get((name, dep.name))
                    port = inst.port if inst else _planned_port(engine, (name, dep.name))
                    via, to = "local", f"127.0.0.1:{port}" if port else None
                    why = "runs on this machine"
                elif target.fallback:
                    via, to, why = "fallback", target.fallback, "nobody runs it here; fallback URL"
                else:
                    via, to, why = "none", None, "does not run here and has no fallback"
                out.append(
                    {
                        "project": name,
                        "caller": caller,
                        "service": dep.name,
                        "range": dep.version_range,
                        "url": urls.get(dep.name),
                        "listener": f"127.0.0.1:{edge_port}" if edge_port else None,
                        "via": via,
                        "target": to,
                        "version": target.version,
                        "why": why,
                    }
                )
    return out

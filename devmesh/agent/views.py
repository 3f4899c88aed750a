"""What `devmesh status` and `up -d` see: one row per service, in words a developer reads.

Why separate from the engine: the engine keeps facts for the planner; this module turns a
frozen snapshot of them (``snapshot.Snapshot``) and the last plan into the stable JSON
contract documented in docs/cli.md (``project, name, version, state, health, pid, port,
url, node, restarts``; more keys may be added, none of these removed).
"""

from __future__ import annotations

import socket
from typing import Any

from devmesh.agent.snapshot import InstanceView, Snapshot
from devmesh.core import model, plan
from devmesh.supervisor import logs

# States in which `up -d` stops waiting for a service and reports it as failed.
FAILED_STATES = frozenset(
    {"failed", "blocked", "exited", "crash-looping", "unhealthy", "restarting"}
)


def _node() -> str:
    return socket.gethostname()


def service_state(
    inst: InstanceView | None, actions: tuple[plan.Action, ...], now: float
) -> tuple[str, str | None]:
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
        if inst.health is plan.Health.STARTING:
            return "starting", inst.health_detail
        if inst.health is plan.Health.UNHEALTHY:
            return "unhealthy", inst.health_detail
        return "running", None
    if inst.phase is plan.Phase.STOPPING:
        return "stopping", None
    if inst.phase is plan.Phase.FAILED:
        return "failed", inst.reason
    # EXITED: restarting while the policy restarts it; crash-looping only once a bounded
    # policy gave up; else it simply exited (policy no, or a clean exit under on-failure).
    if inst.will_restart:
        if inst.retry_at is not None and inst.retry_at > now:
            when = f"next try in {inst.retry_at - now:.1f} s"
        else:
            when = "starting again now"
        return "restarting", f"attempt {inst.failures}, {when} (it {inst.exit_text})"
    reason = verbs[plan.Verb.HOLD].reason if plan.Verb.HOLD in verbs else inst.exit_text
    return ("crash-looping" if inst.gave_up else "exited"), reason


def rows(snap: Snapshot, project: str | None = None) -> list[dict[str, Any]]:
    now = snap.now
    node = _node()
    out: list[dict[str, Any]] = []
    keys: list[plan.Key] = []
    for p in snap.projects:
        if project is not None and p.name != project:
            continue
        keys.extend(
            (p.name, s)
            for s in p.project.services
            if s in p.enabled or (p.name, s) in snap.instances
        )
        running = {k[1] for k in snap.instances if k[0] == p.name}
        out.extend(
            r for r in _external_rows(p.project, p.enabled, node) if r["name"] not in running
        )
    keys.extend(k for k in snap.instances if k not in keys and (project is None or k[0] == project))
    for key in keys:
        inst = snap.instances.get(key)
        if inst is None and key not in snap.wants:
            continue
        svc = snap.service(key)
        state, reason = service_state(inst, snap.actions.get(key, ()), now)
        port = inst.port if inst else _planned_port(snap, key)
        row: dict[str, Any] = {
            "project": key[0],
            "name": key[1],
            "version": svc.version if svc else None,
            "state": state,
            "health": inst.health.value if inst and inst.phase is plan.Phase.RUNNING else "none",
            "health_probes": inst.health_probes if inst else 0,
            "health_failures": inst.health_failures if inst else 0,
            "pid": inst.pid if inst else None,
            "port": port,
            "url": url(snap, key),
            "address": f"127.0.0.1:{port}" if port else None,
            "node": node,
            "restarts": inst.restarts if inst else 0,
            "reason": reason,
            "uptime_s": round(now - inst.started_at, 1)
            if inst and inst.started_at is not None
            else None,
            "last_exit": inst.exit_text if inst else None,
            "log": str(snap.service_log(key)),
        }
        if inst is not None and inst.will_restart:
            row["attempt"] = inst.failures
            row["retry_at"] = inst.retry_at
        if state in FAILED_STATES:
            row["last_log"] = logs.tail(snap.service_log(key), 10)
        out.append(row)
    out.sort(key=lambda r: (r["project"], r["name"]))
    return out


def url(snap: Snapshot, key: plan.Key) -> str | None:
    """The stable address through the proxy: NAME.localhost resolves to loopback by itself.

    The project applied first keeps ``NAME.localhost``; another project's service of the same
    name answers at ``NAME.PROJECT.localhost``. A service without a port has no address.
    """
    host = snap.hosts.get(key)
    if snap.proxy_port is None or host is None:
        return None
    return f"http://{host}.localhost:{snap.proxy_port}"


def _planned_port(snap: Snapshot, key: plan.Key) -> int | None:
    svc = snap.service(key)
    p = snap.project(key[0])
    if svc is None or p is None or not svc.wants_port:
        return None
    if svc.port is not None:
        return svc.port
    return p.ports.get(key[1])


def _external_rows(
    proj: model.Project, enabled: tuple[str, ...], node: str
) -> list[dict[str, Any]]:
    """Dependencies that do not run here, and every ``remote: true`` service: shown so the
    user sees where calls will go (state ``external``, or ``remote`` for a service this
    machine could run but does not because of ``remote: true``)."""
    needed = {d.name for n in enabled for d in proj.services[n].depends_on if n in proj.services}
    needed |= {n for n, s in proj.services.items() if s.remote}
    out = []
    for name in sorted(needed):
        svc = proj.services.get(name)
        if svc is None or svc.runs_here:
            continue
        elsewhere = "on a peer that shares it" + (", else at its fallback" if svc.fallback else "")
        out.append(
            {
                "project": proj.name,
                "name": name,
                "version": svc.version,
                "state": "remote" if svc.remote else "external",
                "health": "none",
                "pid": None,
                "port": None,
                "url": svc.fallback,
                "node": None,
                "restarts": 0,
                "reason": (
                    "remote: true, not run on this machine: " if svc.remote else "runs elsewhere: "
                )
                + f"{elsewhere} (see routes)",
            }
        )
    return out


def readiness(snap: Snapshot, project: str, names: list[str]) -> dict[str, tuple[str, str | None]]:
    """Per service: ("ready" | "failed" | "pending", reason) for `up -d`."""
    by_name = {r["name"]: r for r in rows(snap, project)}
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
    applied = snap.project(project)
    proj = applied.project if applied else None
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

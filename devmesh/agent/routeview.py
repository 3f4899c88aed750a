"""Route decisions as the control API shows them: ``GET /v1/route`` and status ``routes``.

Why apart from ``views``: these read route selection's ``Decision`` (from the proxy's
``explain``, which knows its down marks and in-flight counts) rather than the snapshot alone,
and their JSON is a contract of its own (docs/cli.md, ``devmesh route --json``): ``target`` is
where the call goes (local, peer, fallback or null), ``target_project`` the project whose
service answers (another one for a dependency with ``project: NAME``), ``node`` the node that
would answer (this agent's node name for local, null without a mesh or for the fallback),
``reason`` the decision's explanation in words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from devmesh.agent.snapshot import ProjectView, Snapshot
from devmesh.core import desired, model, routes
from devmesh.proxy import table

Explain = Callable[..., routes.Decision | None]
"""``(project, service, *, caller=None, branch=None)``: the engine's ``explain``."""


def _url(
    target: routes.Target,
    service: str,
    route: table.MeshRoute | None,
    backend: table.Backend | None,
) -> str | None:
    if target.kind is routes.Kind.FALLBACK:
        return target.url
    if target.kind is routes.Kind.LOCAL:
        if backend is None:
            return None
        return f"{backend.scheme}://{backend.host}:{backend.port}"
    for p in route.peers if route is not None else ():
        if p.node_id == target.node_id and p.service == service:
            return f"https://{p.host}:{p.port}"
    return None


def _node(target: routes.Target | None, node_name: str | None) -> str | None:
    if target is None or target.kind is routes.Kind.FALLBACK:
        return None
    if target.kind is routes.Kind.LOCAL:
        return node_name
    return target.node_name


def decision_doc(
    decision: routes.Decision,
    *,
    project: str,
    route: table.MeshRoute | None,
    backend: table.Backend | None,
    node_name: str | None,
) -> dict[str, Any]:
    """The ``GET /v1/route`` document of one decision."""
    service = decision.request.service
    chosen = decision.chosen
    return {
        "project": project,
        "service": service,
        "target_project": route.target_project if route is not None else project,
        "caller": decision.request.caller,
        "branch": decision.request.branch,
        "outcome": decision.outcome.value,
        "status": decision.status,
        "target": chosen.kind.value if chosen is not None else None,
        "node": _node(chosen, node_name),
        "version": chosen.version if chosen is not None else None,
        "url": _url(chosen, service, route, backend) if chosen is not None else None,
        "warning": decision.warning,
        "message": decision.message,
        "reason": decision.explanation,
        "targets": [
            {
                "kind": t.kind.value,
                "node": _node(t, node_name),
                "node_id": t.node_id,
                "version": t.version,
                "branch": t.branch,
                "url": _url(t, service, route, backend),
            }
            for t in decision.targets
        ],
        "verdicts": [
            {
                "kind": v.target.kind.value,
                "node": _node(v.target, node_name),
                "version": v.target.version,
                "branch": v.target.branch,
                "url": _url(v.target, service, route, backend),
                "routable": v.routable,
                "compatible": v.compatible,
                "reason": v.reason,
            }
            for v in decision.verdicts
        ],
    }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EdgeDecision:
    """One caller -> dependency edge of a local service, and where its calls go now."""

    project: ProjectView
    caller: str
    dependency: model.Dependency
    decision: routes.Decision | None
    """None when the dependency runs here but listens on no port (it has no route)."""


def edge_decisions(
    snap: Snapshot, explain: Explain, project: str | None = None
) -> Iterator[EdgeDecision]:
    """Every dependency edge of every enabled local service of the applied projects (or of
    ``project``), with the decision its calls get: what ``status`` ROUTES and ``devmesh
    graph`` show."""
    for p in snap.projects:
        if project is not None and p.name != project:
            continue
        proj = p.project
        for caller in sorted(p.enabled):
            svc = proj.services.get(caller)
            if svc is None or not svc.runs_here:
                continue
            edges = set(desired.local_edges(proj, [caller]))
            for dep in svc.depends_on:
                if dep.name not in proj.services:
                    continue
                routed = (caller, dep.name) in edges
                decision = explain(p.name, dep.name, caller=caller) if routed else None
                yield EdgeDecision(project=p, caller=caller, dependency=dep, decision=decision)


def unrouted_reason(dep: model.Dependency) -> str:
    """Why an edge without a decision goes nowhere."""
    return f"{dep.name} runs here but listens on no port"


def rows(
    snap: Snapshot,
    routes_table: table.RouteTable,
    explain: Explain,
    node_name: str | None,
    project: str | None = None,
) -> list[dict[str, Any]]:
    """Where each dependency call of each local service goes now, and why: one entry per
    caller -> dependency edge of every applied project (``status`` ``routes``).

    Besides the documented keys (project, caller, service, target_project, target, node,
    version, branch, reason, warning), each entry says the caller's range, the NAME_URL it
    was given and the edge listener behind it.
    """
    out: list[dict[str, Any]] = []
    for e in edge_decisions(snap, explain, project):
        p, caller, dep, decision = e.project, e.caller, e.dependency, e.decision
        edge_port = p.edges.get(f"{caller}->{dep.name}")
        route = routes_table.mesh_route(p.name, dep.name)
        chosen = decision.chosen if decision is not None else None
        reason = unrouted_reason(dep) if decision is None else decision.explanation
        target = chosen.kind.value if chosen is not None else None
        out.append(
            {
                "project": p.name,
                "caller": caller,
                "service": dep.name,
                "target_project": route.target_project if route else p.name,
                "target": target,
                "node": _node(chosen, node_name),
                "version": chosen.version if chosen is not None else None,
                "branch": decision.request.branch if decision is not None else None,
                "reason": reason,
                "warning": decision.warning if decision is not None else None,
                "range": dep.version_range,
                "url": p.urls.get(caller, {}).get(dep.name),
                "listener": f"127.0.0.1:{edge_port}" if edge_port else None,
                "via": target or "none",
                "why": reason,
            }
        )
    return out

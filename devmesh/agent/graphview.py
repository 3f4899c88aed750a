"""``GET /v1/graph``: the mesh graph from the facts `status` shows, gathered for core.graph.

Why apart from ``views`` and ``routeview``: the graph is one more reading of the same
snapshot (the services' rows of ``views``, the peers of the mesh node, the decision of every
edge from ``routeview``), joined with the proxy's traffic per edge. This module only
gathers those facts into ``core.graph``'s inputs; the nodes, edges and words are decided
there, so the dashboard, the JSON and the CLI's renderings cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from devmesh.agent import metrics, routeview, views
from devmesh.agent.snapshot import Snapshot
from devmesh.core import catalog, graph, graphtraffic


def local_services(snap: Snapshot, project: str | None = None) -> list[graph.LocalService]:
    """The services this agent runs or waits for, in ``status`` words (no external rows)."""
    out = []
    for row in views.rows(snap, project):
        if row["state"] == "external":
            continue
        svc = snap.service((row["project"], row["name"]))
        out.append(
            graph.LocalService(
                project=row["project"],
                name=row["name"],
                version=row.get("version"),
                branch=svc.branch if svc is not None else None,
                state=row["state"],
                health=row.get("health") or "none",
                shared=bool(svc is not None and svc.share),
                url=row.get("url"),
                reason=row.get("reason"),
            )
        )
    return out


def peers(rows: Iterable[Mapping[str, Any]]) -> list[graph.Peer]:
    """The mesh node's peers (``status`` ``peers`` rows) as graph inputs."""
    out = []
    for p in rows:
        out.append(
            graph.Peer(
                node_id=str(p["node"]),
                name=str(p["name"]),
                address=p.get("address"),
                state=str(p["state"]),
                services=tuple(
                    catalog.SharedService(
                        name=s["name"],
                        project=s["project"],
                        version=s["version"],
                        branch=s.get("branch"),
                        health=s.get("health") or "starting",
                    )
                    for s in p.get("services") or ()
                ),
            )
        )
    return out


def calls(
    snap: Snapshot, explain: routeview.Explain, project: str | None = None
) -> list[graph.Call]:
    """Every local dependency edge with its decision (the ones `status` ROUTES shows)."""
    out = []
    for e in routeview.edge_decisions(snap, explain, project):
        dep_svc = e.project.project.services.get(e.dependency.name)
        out.append(
            graph.Call(
                project=e.project.name,
                caller=e.caller,
                dependency=e.dependency,
                decision=e.decision,
                unrouted_reason=routeview.unrouted_reason(e.dependency),
                serving_project=dep_svc.target_project if dep_svc is not None else None,
            )
        )
    return out


def document(
    snap: Snapshot,
    explain: routeview.Explain,
    *,
    machine_name: str,
    node_id: str | None,
    peer_rows: Iterable[Mapping[str, Any]],
    history: metrics.History | None,
    project: str | None = None,
) -> dict[str, Any]:
    """The ``GET /v1/graph`` document (docs/cli.md, ``devmesh graph --format json``).

    ``history`` is the proxy's metrics (None when they are off): each edge's traffic over
    the last ``graph.WINDOW_S`` seconds, counted from the start of that minute as every
    metrics query is (so the window is 5 to 6 minutes, and the document says which).
    """
    traffic: dict[graph.TrafficKey, graph.Traffic] = {}
    inbound: dict[graph.InboundKey, graph.Traffic] = {}
    window_s = graph.WINDOW_S
    if history is not None:
        counts, window_s = history.counts(graph.WINDOW_S, now=snap.now)
        traffic = graphtraffic.edge_traffic(counts, seconds=window_s)
        inbound = graphtraffic.inbound_traffic(counts, seconds=window_s)
    g = graph.build(
        machine_name=machine_name,
        node_id=node_id,
        services=local_services(snap, project),
        peers=peers(peer_rows),
        calls=calls(snap, explain, project),
        traffic=traffic,
        inbound=inbound,
        project=project,
        window_s=round(window_s, 1),
        metrics_on=history is not None,
    )
    return graph.document(g, generated_at=snap.now)

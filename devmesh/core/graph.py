"""Dependency graphs: a project's (cycle reporting) and the mesh's (`devmesh graph`).

``find_cycle`` is kept apart from the model so the planner and the validator share one
definition of "a dependency cycle". Edges that point at unknown services are ignored there:
reporting them is the validator's job, and the planner only ever sees validated projects.

The mesh graph (``build``, ``document``) is what `devmesh graph`, ``GET /v1/graph`` and the
dashboard show; see below. Its traffic comes from ``core.graphtraffic``, its renderings
from ``core.graphrender``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from devmesh.core import catalog, model, routes


def find_cycle(deps: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts (``a -> b -> a``), or None."""
    edges = {n: list(ds) for n, ds in deps.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in edges.get(n, ()):
            if d not in edges:
                continue
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in edges:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# ---------------------------------------------------------------------------- the mesh graph
#
# What `devmesh graph`, ``GET /v1/graph`` and the dashboard draw: who runs what where
# (machines, and the services on each), and where each dependency call goes now. Built from
# facts the agent already holds (its services, the peers' catalogs, route selection's
# decision for every edge, the proxy's traffic), so the picture cannot disagree with
# `status` or with where calls really go. Pure: the agent gathers the facts, this module
# decides the nodes and edges and their words.

WINDOW_S = 300.0
"""The traffic on each edge is counted over the last five minutes."""

LOCAL_MACHINE = "local"
"""The id of the machine the agent runs on."""


class NodeKind(enum.Enum):
    SERVICE = "service"
    """A process: on this machine, or one a peer shares."""
    FALLBACK = "fallback"
    """A dependency's ``fallback`` URL: outside the mesh, devmesh knows nothing of it."""
    MISSING = "missing"
    """A dependency no instance serves now: the end of an edge that goes nowhere."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    """This machine or a peer, a group of service nodes."""

    id: str
    name: str
    local: bool
    state: str
    """``local`` for this machine; a peer's ``alive``, ``expired`` or ``refused``."""
    address: str | None = None
    node_id: str | None = None
    """The mesh node id; None for this machine without a mesh."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    id: str
    kind: NodeKind
    machine: str | None
    """The ``Machine.id`` the service runs on; None for a fallback or a missing node."""
    project: str
    name: str
    version: str | None = None
    branch: str | None = None
    state: str | None = None
    """The local service's state (``status`` words); None for the others."""
    health: str | None = None
    shared: bool = False
    url: str | None = None
    reason: str | None = None
    """Why it is not running (local), or why no instance serves it (missing)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Traffic:
    """Calls through one edge over the window, as the proxy recorded them."""

    requests: int
    rps: float
    error_rate: float
    """Share of the requests answered 5xx (by the service or by devmesh), 0..1."""
    p50_ms: float | None = None
    p99_ms: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    """One caller -> dependency edge of a local service, and where its calls go now."""

    id: str
    project: str
    caller: str
    service: str
    source: str
    """The caller's node id."""
    dest: str
    """The node that serves the calls now; for an edge that goes nowhere, the dependency's
    local node when it runs here (without a port), else its missing node."""
    range: str | None
    target: str | None
    """``local``, ``peer``, ``fallback``; None when calls go nowhere."""
    node: str | None
    """The node name that answers (this node's for local, a peer's); None otherwise."""
    version: str | None
    branch: str | None
    outcome: str | None
    """Route selection's ``route``, ``reject`` or ``no-route``; None without a decision."""
    status: int | None
    """409 or 502 when devmesh answers the calls itself; None when they are routed."""
    mismatch: bool
    """The instance chosen is outside the caller's range, or every one is (409)."""
    warning: str | None
    reason: str
    failover: tuple[str, ...] = ()
    """Node ids tried after ``dest`` when a connection fails, in order."""
    traffic: Traffic | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """Calls a teammate's node made into one of this machine's shared services."""

    id: str
    node: str
    """The calling node's name."""
    machine: str | None
    """Its ``Machine.id`` when the mesh node knows it; None otherwise."""
    project: str
    service: str
    dest: str
    """The local service's node id."""
    traffic: Traffic


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Graph:
    machines: tuple[Machine, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    inbound: tuple[Inbound, ...] = ()
    project: str | None = None
    """The one project shown; None for every applied project."""
    window_s: float = WINDOW_S
    """The span the traffic covers, in seconds."""
    metrics: bool = True
    """Whether the proxy counts calls at all (False: DEVMESH_METRICS=off, no traffic known)."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocalService:
    """A service this agent runs or waits for, in ``status`` words."""

    project: str
    name: str
    version: str | None
    branch: str | None
    state: str
    health: str
    shared: bool
    url: str | None
    reason: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """A peer as the mesh node knows it, with what its catalog shares."""

    node_id: str
    name: str
    address: str | None
    state: str
    services: tuple[catalog.SharedService, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One caller -> dependency edge and route selection's decision for it."""

    project: str
    caller: str
    dependency: model.Dependency
    decision: routes.Decision | None
    """None when the dependency runs here but listens on no port."""
    unrouted_reason: str = ""
    """Why calls go nowhere when there is no decision."""
    serving_project: str | None = None
    """The project whose instances answer (a service's ``project:``); None: ``project``."""


TrafficKey = tuple[str, str, str]
"""(project, caller, service): the caller's project, the caller, the dependency."""

InboundKey = tuple[str, str, str]
"""(node, project, service): the calling teammate's node name, the local shared service."""


def local_id(project: str, service: str) -> str:
    return f"local:{project}/{service}"


def peer_id(node_id: str, project: str, service: str) -> str:
    return f"peer:{node_id}:{project}/{service}"


def fallback_id(project: str, service: str) -> str:
    return f"fallback:{project}/{service}"


def missing_id(project: str, service: str) -> str:
    return f"missing:{project}/{service}"


def machine_id(node_id: str) -> str:
    return f"peer:{node_id}"


def build(
    *,
    machine_name: str,
    node_id: str | None,
    services: Iterable[LocalService],
    peers: Iterable[Peer],
    calls: Iterable[Call],
    traffic: Mapping[TrafficKey, Traffic] | None = None,
    inbound: Mapping[InboundKey, Traffic] | None = None,
    project: str | None = None,
    window_s: float = WINDOW_S,
    metrics_on: bool = True,
) -> Graph:
    """The graph of this machine (``machine_name``, mesh ``node_id``), its peers and calls.

    With ``project`` set, only that project's services and edges are shown (peers stay, as
    machines, with that project's shared services only). ``traffic`` maps an edge to its
    calls over the window; an edge without an entry had none (``metrics_on`` False: the
    proxy counts nothing, so none is known). ``inbound`` maps a teammate's node and a local
    service to the calls it made into it. Every node an edge names
    exists: a target that is not among ``services`` or the peers' catalogs (they are read
    a moment apart from the decisions) is added from the decision's own words.
    """
    traffic = traffic or {}
    machines: dict[str, Machine] = {
        LOCAL_MACHINE: Machine(
            id=LOCAL_MACHINE, name=machine_name, local=True, state="local", node_id=node_id
        )
    }
    nodes: dict[str, Node] = {}
    for s in services:
        if project is not None and s.project != project:
            continue
        nodes[local_id(s.project, s.name)] = Node(
            id=local_id(s.project, s.name),
            kind=NodeKind.SERVICE,
            machine=LOCAL_MACHINE,
            project=s.project,
            name=s.name,
            version=s.version,
            branch=s.branch,
            state=s.state,
            health=s.health,
            shared=s.shared,
            url=s.url,
            reason=s.reason,
        )
    for p in sorted(peers, key=lambda p: (p.name, p.node_id)):
        mid = machine_id(p.node_id)
        machines[mid] = Machine(
            id=mid, name=p.name, local=False, state=p.state, address=p.address, node_id=p.node_id
        )
        for shared in p.services:
            if project is not None and shared.project != project:
                continue
            nid = peer_id(p.node_id, shared.project, shared.name)
            nodes[nid] = Node(
                id=nid,
                kind=NodeKind.SERVICE,
                machine=mid,
                project=shared.project,
                name=shared.name,
                version=shared.version,
                branch=shared.branch,
                health=shared.health,
                shared=True,
            )
    edges = []
    for c in calls:
        if project is not None and c.project != project:
            continue
        edges.append(
            _edge(c, machines, nodes, traffic.get((c.project, c.caller, c.dependency.name)))
        )
    calls_in = []
    by_name = {m.name: m.id for m in machines.values() if not m.local}
    for (caller_node, proj_name, service), t in sorted((inbound or {}).items()):
        if project is not None and proj_name != project:
            continue
        dest = local_id(proj_name, service)
        nodes.setdefault(
            dest,
            Node(
                id=dest,
                kind=NodeKind.SERVICE,
                machine=LOCAL_MACHINE,
                project=proj_name,
                name=service,
                shared=True,
            ),
        )
        calls_in.append(
            Inbound(
                id=f"{caller_node}->{proj_name}/{service}",
                node=caller_node,
                machine=by_name.get(caller_node),
                project=proj_name,
                service=service,
                dest=dest,
                traffic=t,
            )
        )
    ordered = sorted(machines.values(), key=lambda m: (not m.local, m.name, m.id))
    order = {m.id: i for i, m in enumerate(ordered)}
    kinds = list(NodeKind)
    return Graph(
        machines=tuple(ordered),
        nodes=tuple(
            sorted(
                nodes.values(),
                key=lambda n: (
                    kinds.index(n.kind),
                    order.get(n.machine or "", 0),
                    n.project,
                    n.name,
                ),
            )
        ),
        edges=tuple(sorted(edges, key=lambda e: (e.project, e.caller, e.service))),
        inbound=tuple(calls_in),
        project=project,
        window_s=window_s,
        metrics=metrics_on,
    )


def _target_node(
    target: routes.Target,
    project: str,
    service: str,
    machines: dict[str, Machine],
    nodes: dict[str, Node],
) -> str:
    """The id of the node ``target`` stands for, added when it is not known yet."""
    if target.kind is routes.Kind.LOCAL:
        nid = local_id(project, service)
        nodes.setdefault(
            nid,
            Node(
                id=nid,
                kind=NodeKind.SERVICE,
                machine=LOCAL_MACHINE,
                project=project,
                name=service,
                version=target.version,
                branch=target.branch,
            ),
        )
        return nid
    if target.kind is routes.Kind.PEER:
        node_id = target.node_id or ""
        mid = machine_id(node_id)
        machines.setdefault(
            mid,
            Machine(
                id=mid,
                name=target.node_name or node_id,
                local=False,
                state="alive",
                node_id=node_id,
            ),
        )
        nid = peer_id(node_id, project, service)
        nodes.setdefault(
            nid,
            Node(
                id=nid,
                kind=NodeKind.SERVICE,
                machine=mid,
                project=project,
                name=service,
                version=target.version,
                branch=target.branch,
                shared=True,
            ),
        )
        return nid
    nid = fallback_id(project, service)
    nodes.setdefault(
        nid,
        Node(
            id=nid,
            kind=NodeKind.FALLBACK,
            machine=None,
            project=project,
            name=service,
            url=target.url,
        ),
    )
    return nid


def _edge(
    c: Call,
    machines: dict[str, Machine],
    nodes: dict[str, Node],
    traffic: Traffic | None,
) -> Edge:
    service = c.dependency.name
    serving = c.serving_project or c.project
    source = local_id(c.project, c.caller)
    nodes.setdefault(
        source,
        Node(
            id=source,
            kind=NodeKind.SERVICE,
            machine=LOCAL_MACHINE,
            project=c.project,
            name=c.caller,
        ),
    )
    d = c.decision
    targets = [_target_node(t, serving, service, machines, nodes) for t in d.targets] if d else []
    chosen = d.chosen if d is not None else None
    if targets:
        dest = targets[0]
    elif d is None and local_id(serving, service) in nodes:
        dest = local_id(serving, service)  # runs here, but listens on no port
    else:
        dest = missing_id(serving, service)
        why = c.unrouted_reason if d is None else d.message
        nodes.setdefault(
            dest,
            Node(
                id=dest,
                kind=NodeKind.MISSING,
                machine=None,
                project=serving,
                name=service,
                reason=why,
            ),
        )
    node_name = None
    if chosen is not None and chosen.kind is routes.Kind.PEER:
        node_name = chosen.node_name
    elif chosen is not None and chosen.kind is routes.Kind.LOCAL:
        local = machines[LOCAL_MACHINE]
        node_name = local.name if local.node_id is not None else None
    return Edge(
        id=f"{c.project}/{c.caller}->{service}",
        project=c.project,
        caller=c.caller,
        service=service,
        source=source,
        dest=dest,
        range=c.dependency.version_range,
        target=chosen.kind.value if chosen is not None else None,
        node=node_name,
        version=chosen.version if chosen is not None else None,
        branch=d.request.branch if d is not None else None,
        outcome=d.outcome.value if d is not None else None,
        status=d.status if d is not None else None,
        mismatch=d is not None and (d.warning is not None or d.outcome is routes.Outcome.REJECT),
        warning=d.warning if d is not None else None,
        reason=d.explanation if d is not None else c.unrouted_reason,
        failover=tuple(targets[1:]),
        traffic=traffic,
    )


# ----------------------------------------------------------------------------- document


def document(graph: Graph, *, generated_at: float) -> dict[str, Any]:
    """The ``GET /v1/graph`` document (``devmesh graph --format json``; docs/cli.md)."""
    return {
        "generated_at": generated_at,
        "project": graph.project,
        "window_s": graph.window_s,
        "metrics": graph.metrics,
        "machines": [
            {
                "id": m.id,
                "name": m.name,
                "local": m.local,
                "state": m.state,
                "address": m.address,
                "node_id": m.node_id,
            }
            for m in graph.machines
        ],
        "nodes": [
            {
                "id": n.id,
                "kind": n.kind.value,
                "machine": n.machine,
                "project": n.project,
                "name": n.name,
                "version": n.version,
                "branch": n.branch,
                "state": n.state,
                "health": n.health,
                "shared": n.shared,
                "url": n.url,
                "reason": n.reason,
            }
            for n in graph.nodes
        ],
        "edges": [_edge_doc(e) for e in graph.edges],
        "inbound": [
            {
                "id": i.id,
                "node": i.node,
                "machine": i.machine,
                "project": i.project,
                "service": i.service,
                "to": i.dest,
                **_traffic_doc(i.traffic),
            }
            for i in graph.inbound
        ],
    }


def _edge_doc(e: Edge) -> dict[str, Any]:
    t = e.traffic
    return {
        "id": e.id,
        "project": e.project,
        "caller": e.caller,
        "service": e.service,
        "from": e.source,
        "to": e.dest,
        "range": e.range,
        "target": e.target,
        "node": e.node,
        "version": e.version,
        "branch": e.branch,
        "outcome": e.outcome,
        "status": e.status,
        "mismatch": e.mismatch,
        "warning": e.warning,
        "reason": e.reason,
        "failover": list(e.failover),
        **_traffic_doc(t),
    }


def _traffic_doc(t: Traffic | None) -> dict[str, Any]:
    return {
        "requests": t.requests if t is not None else None,
        "rps": t.rps if t is not None else None,
        "error_rate": t.error_rate if t is not None else None,
        "p50_ms": t.p50_ms if t is not None else None,
        "p99_ms": t.p99_ms if t is not None else None,
    }

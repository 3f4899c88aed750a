"""Publishing routes: what the proxy routes by, rebuilt from the engine's facts after a round.

Why it exists apart from the reconciler: routing is read by another driver (the proxy, in
this process and in worker processes) and has its own rules: which project keeps the short
``NAME.localhost`` (the one applied first; a later project with the same service name is
reached at ``NAME.PROJECT.localhost``), what a request to a service that is not running is
told (restarting, attempt N, next try at T; or stopped; or crash-looping under a bounded
policy that gave up), and which services have an address at all (a worker without a port
has none).

Mesh routes: every service an applied project declares gets a ``MeshRoute`` (whether it runs
here, on peers, or only has a ``fallback``), except one that runs here and listens on no port (a
worker: it has no address, here or anywhere, as it has no ``NAME_URL``). A route holds the
peers' shared instances of the same project and service name as the mesh node's registry holds
them (live peers only; for a dependency that names the project running it, ``project: NAME``,
the instances of that project, whose local Backend is a candidate too), the ranges and policy of
each caller (``CallerRule``), and the branch of each caller that runs under one. The table is
rebuilt after every round and whenever the node reports that what peers share changed (a catalog
fetched, a peer expired, left or was refused), so a peer's instance is routable from the moment
its catalog arrives and not after it has gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from devmesh.agent import launch
from devmesh.agent import state as state_mod
from devmesh.agent.instance import Instance
from devmesh.core import desired, model, nodenames, peers, plan, routes
from devmesh.mesh import identity as ids
from devmesh.proxy import selection, server, table


def build_table(
    projects: Sequence[tuple[state_mod.ProjectRecord, model.Project]],
    wants: Mapping[plan.Key, plan.Want],
    instances: Mapping[plan.Key, Instance],
    actions: Mapping[plan.Key, Sequence[plan.Action]],
    *,
    mesh_peers: Sequence[peers.Peer] = (),
    identity: ids.Identity | None = None,
    names: Mapping[str, str] | None = None,
    agent: table.Backend | None = None,
) -> table.RouteTable:
    """One backend per service with a port, projects in the order they were first applied,
    and one mesh route per declared service.

    The proxy gives the short name to the first backend of a name, so that order is the
    contract. Services without a port have no backend: nothing can route to them here.
    ``mesh_peers`` are the node's peers and ``identity`` its identity while this agent is
    a mesh node (the peers' server names and ``peer_tls`` come from it); ``names`` the
    node names to show (node id -> ``NAME`` or ``NAME#ID6``, see ``core.nodenames``), so
    route reasons and the access log tell two peers of one name apart. ``agent`` is
    where devmesh.localhost goes: the agent's dashboard.
    """
    backends: list[table.Backend] = []
    for rec, proj in projects:
        for name, svc in proj.services.items():
            key = (proj.name, name)
            inst = instances.get(key)
            if not svc.runs_here or (inst is None and not svc.wants_port):
                continue
            port = inst.port if inst is not None else launch.port_of(rec, svc)
            if port is None:
                continue
            backends.append(
                _backend(
                    key,
                    port,
                    svc.scheme.value,
                    inst=inst,
                    want=wants.get(key),
                    actions=actions.get(key, ()),
                    svc=svc,
                )
            )
    mesh_name = identity.team.mesh if identity is not None else None
    mesh = tuple(
        mesh_route(proj, name, mesh_peers if mesh_name is not None else (), mesh_name or "", names)
        for _, proj in projects
        for name, svc in proj.services.items()
        if not svc.runs_here or svc.wants_port  # a worker here listens on nothing: no route
    )
    shown = tuple(sorted((i, n) for i, n in (names or {}).items() if "#" in n))
    return table.RouteTable(
        tuple(backends), agent, mesh=mesh, peer_tls=peer_tls(identity), node_names=shown
    )


def peer_tls(identity: ids.Identity | None) -> table.PeerTLS | None:
    """The node's files for dialling peers (paths, so proxy workers can load them too)."""
    if identity is None:
        return None
    return table.PeerTLS(
        ca_file=str(identity.ca_path),
        cert_file=str(identity.node_cert_path),
        key_file=str(identity.node_key_path),
        node_id=identity.node_id,
        node_name=identity.node_name,
    )


def mesh_route(
    proj: model.Project,
    service: str,
    mesh_peers: Sequence[peers.Peer],
    mesh_name: str,
    names: Mapping[str, str] | None = None,
) -> table.MeshRoute:
    """Where calls to ``service`` of ``proj`` may go besides its local backend, and the
    rules of each caller."""
    svc = proj.services[service]
    rules: list[table.CallerRule] = []
    caller_branches: list[tuple[str, str]] = []
    for caller, csvc in proj.services.items():
        dep = next((d for d in csvc.depends_on if d.name == service), None)
        if dep is None or not csvc.runs_here:
            continue
        rules.append(
            table.CallerRule(
                caller=caller,
                requirements=routes.requirements_for(proj, caller, service),
                settings=routes.Settings.from_policy(proj.policy, versions_override=dep.versions),
            )
        )
        if csvc.branch is not None:
            caller_branches.append((caller, csvc.branch))
    rules.append(
        table.CallerRule(
            caller=None,
            requirements=routes.requirements_for(proj, None, service),
            settings=routes.Settings.from_policy(proj.policy),
        )
    )
    owner = target_project(proj, service)
    found = []
    for p in mesh_peers:
        if p.state is not peers.PeerState.ALIVE or p.catalog is None:
            continue
        for s in p.catalog.services:
            if s.project != owner or s.name != service:
                continue
            found.append(
                table.PeerInstance(
                    node_id=p.node_id,
                    node_name=nodenames.shown(names or {}, p.node_id, p.name),
                    server_name=ids.node_dns_name(p.node_id, mesh_name),
                    host=p.address,
                    port=p.port,
                    project=s.project,
                    service=s.name,
                    version=s.version,
                    branch=s.branch,
                    health=s.health,
                )
            )
    return table.MeshRoute(
        project=proj.name,
        service=service,
        owner=owner if owner != proj.name else None,
        peers=tuple(found),
        fallback=svc.fallback,
        rules=tuple(rules),
        caller_branches=tuple(caller_branches),
    )


def target_project(proj: model.Project, service: str) -> str:
    """The project whose instances answer calls to ``service`` of ``proj``: the one its
    ``project:`` names when it does not run here, else ``proj`` itself."""
    svc = proj.services[service]
    return svc.project if svc.project and not svc.runs_here else proj.name


def hosts(routes: table.RouteTable) -> dict[plan.Key, str]:
    """The host name (before ``.localhost``) each routed service answers at."""
    out: dict[plan.Key, str] = {}
    first: set[str] = set()
    for b in routes.backends:
        name = b.service.lower()
        out[(b.project, b.service)] = b.service if name not in first else b.label
        first.add(name)
    return out


def _backend(
    key: plan.Key,
    port: int,
    scheme: str,
    *,
    inst: Instance | None,
    want: plan.Want | None,
    actions: Iterable[plan.Action],
    svc: model.Service,
) -> table.Backend:
    attempt: int | None = None
    retry_at: float | None = None
    reason: str | None = None
    state = table.State.STOPPED
    if inst is None:
        if want is None:
            reason = f"not started (`devmesh up {key[1]}` starts it)"
        else:
            reason = next((a.reason for a in actions), "not started")
    elif inst.phase is plan.Phase.FAILED:
        reason = inst.reason
    elif inst.phase is plan.Phase.STOPPING:
        reason = "stopping"
    elif inst.phase is plan.Phase.EXITED:
        seen = inst.seen()
        reason = inst.exit.describe() if inst.exit else None
        if want is not None and plan.will_restart(want, seen):
            state, attempt, retry_at = table.State.RESTARTING, inst.failures, inst.retry_at
        elif want is not None and plan.gave_up(want, seen):
            state = table.State.CRASH_LOOPING
    elif inst.health() is plan.Health.STARTING:
        state = table.State.STARTING
    else:
        state = table.State.RUNNING
    return table.Backend(
        project=key[0],
        service=key[1],
        port=port,
        scheme=scheme,
        state=state.value,
        reason=reason,
        attempt=attempt,
        retry_at=retry_at,
        version=svc.version,
        branch=svc.branch,
        shared=svc.share,
        health=health_word(inst),
    )


def find(
    routes_table: table.RouteTable, project: str, service: str
) -> tuple[table.MeshRoute | None, table.Backend | None]:
    """The mesh route of (project, service) and the local backend its calls may go to (that
    of the project running it, for a dependency naming another one); either may be None."""
    route = next(
        (m for m in routes_table.mesh if m.project == project and m.service == service), None
    )
    owner = route.target_project if route is not None else project
    backend = next(
        (b for b in routes_table.backends if b.project == owner and b.service == service), None
    )
    return route, backend


def decide(
    routes_table: table.RouteTable,
    project: str,
    service: str,
    *,
    caller: str | None,
    branch: str | None,
    now_s: float,
) -> routes.Decision | None:
    """Route selection over the table alone (no down marks, no outstanding requests).

    What the proxy's ``explain`` does with its runtime state, through the same function and
    a fresh ``Router``; used when no proxy runs.
    """
    return selection.explain(
        routes_table,
        selection.Router(clock=lambda: now_s),
        project,
        service,
        caller=caller,
        branch=branch,
    )


def health_word(inst: Instance | None) -> str:
    """Readiness in ``routes.Health`` words (what the catalog announces, same rule)."""
    if inst is None or inst.phase is not plan.Phase.RUNNING:
        return routes.Health.STOPPED.value
    h = inst.health()
    if h is plan.Health.NONE:
        return routes.Health.HEALTHY.value  # no check: running is ready
    return routes.Health(h.value).value


async def sync_edges(
    proxy: server.ProxyServer,
    projects: Sequence[tuple[state_mod.ProjectRecord, model.Project]],
) -> None:
    """One proxy listener per local dependency edge, on the port it had before if free.

    The bound ports are written back into each project's record (``edges``), so a restarted
    agent gives every caller the same NAME_URL.
    """
    wanted: dict[table.Edge, int | None] = {}
    for rec, proj in projects:
        for caller, target in desired.local_edges(proj, rec.enabled):
            edge = table.Edge(caller_project=rec.name, caller_service=caller, target_service=target)
            wanted[edge] = rec.edges.get(f"{caller}->{target}")
    bound = await proxy.set_edges(wanted)
    for rec, _ in projects:
        rec.edges = {
            f"{e.caller_service}->{e.target_service}": port
            for e, port in bound.items()
            if e.caller_project == rec.name
        }

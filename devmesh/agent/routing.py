"""Publishing routes: what the proxy routes by, rebuilt from the engine's facts after a round.

Why it exists apart from the reconciler: routing is read by another driver (the proxy, in
this process and in worker processes) and has its own rules: which project keeps the short
``NAME.localhost`` (the one applied first; a later project with the same service name is
reached at ``NAME.PROJECT.localhost``), what a request to a service that is not running is
told (restarting, attempt N, next try at T; or stopped; or crash-looping under a bounded
policy that gave up), and which services have an address at all (a worker without a port
has none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from devmesh.agent import launch
from devmesh.agent import state as state_mod
from devmesh.agent.instance import Instance
from devmesh.core import desired, model, plan
from devmesh.proxy import server, table


def build_table(
    projects: Sequence[tuple[state_mod.ProjectRecord, model.Project]],
    wants: Mapping[plan.Key, plan.Want],
    instances: Mapping[plan.Key, Instance],
    actions: Mapping[plan.Key, Sequence[plan.Action]],
) -> table.RouteTable:
    """One backend per service with a port, projects in the order they were first applied.

    The proxy gives the short name to the first backend of a name, so that order is the
    contract. Services without a port are left out: nothing can route to them.
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
                )
            )
    return table.RouteTable(tuple(backends))


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
    )


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

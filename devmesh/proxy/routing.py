"""Where a request goes: a service, a plan of mesh targets, or a page the proxy answers itself.

Why a module of its own: it is the one routing decision of the proxy, made once per request
whichever way the exchange then runs (in the connection's callbacks or in a task, see
``forward``). It is plain code over the route table and the selection state (``selection``):
no socket, and the clocks are passed in.

The fast path: a service with no ``MeshRoute`` (a standalone proxy's table), or with one that
has no peer, no fallback and no caller under a branch, while the request names no branch,
goes to its local backend exactly as without a mesh; only its callers' version ranges are
checked, by a decision remembered per table (``Router.static``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from devmesh.core import branches, routes
from devmesh.proxy import errors, headers, selection, table


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnPage:
    """A request the proxy answers itself, with the list of known services."""

    status: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """A routing decision that answers the call (409 for REJECT, 502 for NO_ROUTE)."""

    decision: routes.Decision


@dataclass(frozen=True, slots=True, kw_only=True)
class Local:
    """The local backend, with the warning of the decision (fast path)."""

    backend: table.Backend
    warning: str | None


def _names_branch(hdrs: headers.Headers) -> bool:
    """Whether the request may name a branch by header (the host is checked by resolution)."""
    return any(name in _BRANCH_NAMES for name, _ in hdrs)


_BRANCH_NAMES = (selection.BRANCH_HEADER, b"baggage")


def _check_running(target: table.Backend, now_s: Callable[[], float]) -> None:
    if target.state not in table.ROUTABLE_STATES:
        raise errors.ServiceNotRunningError(
            target.service, target.project, table.state_words(target, now_s()), target.reason
        )


def choose(
    routes_table: table.RouteTable,
    *,
    edge: table.Edge | None,
    host: bytes,
    hdrs: headers.Headers,
    router: selection.Router,
    now_s: Callable[[], float],
) -> table.Backend | Local | selection.Plan | Refused | OwnPage:
    """Where a request for ``host`` (or arriving on ``edge``'s listener) goes.

    Raises NoRouteError (an edge whose target left the caller's project),
    ServiceNotRunningError (the local service is stopped, restarting or crash-looping: the
    client gets a 502 saying so at once) and BadRequestError (an invalid branch name).
    ``now_s`` gives Unix seconds.
    """
    host_branch: str | None = None
    caller: str | None = None
    route: table.MeshRoute | None = None
    if edge is not None:
        backend = routes_table.for_edge(edge)
        caller = edge.caller_service
        if routes_table.mesh:
            route = routes_table.mesh_route(edge.caller_project, edge.target_service)
        if backend is None and route is None:
            raise errors.NoRouteError(edge.target_service, edge.caller_project, edge.caller_service)
    else:
        text = host.decode("latin-1")
        resolved = routes_table.resolve_host(text)
        if type(resolved) is table.Backend:
            backend = resolved
            if routes_table.mesh:
                route = routes_table.mesh_route(backend.project, backend.service)
        elif type(resolved) is table.Reserved:
            if routes_table.agent is None:
                return OwnPage(status=200, message="devmesh agent")
            _check_running(routes_table.agent, now_s)
            return routes_table.agent
        else:
            found = routes_table.mesh_host(text) if routes_table.mesh else None
            if found is None:
                assert type(resolved) is table.Unknown
                return OwnPage(status=404, message=f"no service is named by host {resolved.host!r}")
            route, host_branch = found
            backend = routes_table.backend(route.target_project, route.service)
    if route is None:
        assert backend is not None
        _check_running(backend, now_s)
        return backend
    if (
        backend is not None
        and not route.peers
        and route.fallback is None
        and not route.caller_branches
        and host_branch is None
        and backend.branch is None
        and not _names_branch(hdrs)
    ):
        decision = router.static(routes_table, route, backend, caller)
        if decision.outcome is not routes.Outcome.ROUTE:
            return Refused(decision=decision)
        _check_running(backend, now_s)
        return Local(backend=backend, warning=decision.warning) if decision.warning else backend
    branch = branches.extract(hdrs, host, projects=routes_table.projects)
    plan = router.plan(routes_table, route, caller=caller, branch=branch, edge=edge is not None)
    if type(plan) is routes.Decision:
        return Refused(decision=plan)
    assert type(plan) is selection.Plan
    return plan

"""Where a request goes: a service, or a page the proxy answers itself.

Why a module of its own: it is the one routing decision of the proxy, made once per request
whichever way the exchange then runs (in the connection's callbacks or in a task, see
``forward``), and the mesh's peer hop asks the same question. It is plain code over the route
table: no socket, and the clock is passed in (only a restarting service's page reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from devmesh.proxy import errors, table


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnPage:
    """A request the proxy answers itself, with the list of known services."""

    status: int
    message: str


def choose(
    routes: table.RouteTable,
    *,
    edge: table.Edge | None,
    host: bytes,
    now_s: Callable[[], float],
) -> table.Backend | OwnPage:
    """The backend a request for ``host`` (or arriving on ``edge``'s listener) goes to.

    Raises NoRouteError (an edge whose target left the caller's project) and
    ServiceNotRunningError (the service is stopped, restarting or crash-looping: the client
    gets a 502 saying so at once, no connection is attempted). ``now_s`` gives Unix seconds.
    """
    if edge is not None:
        target: table.Backend | table.Reserved | table.Unknown | None = routes.for_edge(edge)
        if target is None:
            raise errors.NoRouteError(edge.target_service, edge.caller_project, edge.caller_service)
    else:
        target = routes.resolve_host(host.decode("latin-1"))
        if type(target) is table.Unknown:
            return OwnPage(status=404, message=f"no service is named by host {target.host!r}")
        if type(target) is table.Reserved:
            if routes.agent is None:
                return OwnPage(status=200, message="devmesh agent")
            target = routes.agent
    assert type(target) is table.Backend
    if target.state not in table.ROUTABLE_STATES:
        raise errors.ServiceNotRunningError(
            target.service, target.project, table.state_words(target, now_s()), target.reason
        )
    return target

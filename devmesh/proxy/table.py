"""The route table: plain data the agent builds and swaps in whole.

Why immutable and swapped atomically: the proxy reads the table on every request from many
connections at once; handing it a new frozen object (through ``table_provider``) means a
request sees either the old routes or the new ones, never half of an update, and no lock is
taken on the hot path.

Ambiguity rule: when two projects run a service of the same NAME, ``NAME.localhost`` goes to
the one that appears FIRST in ``backends``. The agent lists projects in the order it first
applied them, so the project that had the name first keeps it (a later ``up`` elsewhere never
silently takes a URL over); ``NAME.PROJECT.localhost`` is always exact.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from devmesh.core import hostroute, routes


class State(enum.Enum):
    RUNNING = "running"
    STARTING = "starting"
    RESTARTING = "restarting"
    """Exited and will be started again (``attempt`` and ``retry_at`` say when)."""
    CRASH_LOOPING = "crash-looping"
    """Exited repeatedly under a policy that gives up after a bounded number of retries."""
    STOPPED = "stopped"


ROUTABLE_STATES = frozenset({State.RUNNING.value, State.STARTING.value})
RESOLVED_MEMO_SIZE = 1024
"""Host headers whose routing each RouteTable remembers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    project: str
    service: str
    port: int
    host: str = "127.0.0.1"
    """Address of the service's own listener; loopback for local services."""
    scheme: str = "http"
    """What the service's port speaks: "http", or "https" when the proxy must dial TLS."""
    state: str = State.RUNNING.value
    """One of ``State``'s values; stopped and crash-looping backends get an immediate 502."""
    reason: str | None = None
    """Why the service is not running (last exit status, ...), shown in the 502 page."""
    attempt: int | None = None
    """For a restarting service: which restart comes next (1 for the first)."""
    retry_at: float | None = None
    """For a restarting service: when the next start is due, in Unix seconds."""
    version: str | None = None
    """The service's declared ``version`` (route selection checks callers' ranges on it)."""
    branch: str | None = None
    """The branch namespace this instance runs in (``branch:`` resolved); None = default."""
    shared: bool = False
    """``share: true``: teammates' proxies may call it through this agent's peer listener."""
    health: str = "healthy"
    """Readiness in ``routes.Health`` words; only a healthy, running backend takes mesh calls."""

    @property
    def label(self) -> str:
        return f"{self.service}.{self.project}"


MESH_SCHEME = "mesh"
"""The scheme of a peer hop: TLS with this node's certificate, checked against the team CA."""
VERIFIED_TLS_SCHEME = "https-verified"
"""The scheme of an https ``fallback``: TLS verified against the system's (or the configured)
trust store, unlike a local service's self-signed port."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Dial(Backend):
    """A target that is not a local service, as the forwarding path dials it.

    Why a Backend: the one forwarding path (pool, exchange, callbacks, error words) knows how
    to reach a ``Backend``; a peer hop or a fallback is one more kind of upstream, not a
    second path. ``scheme`` says how to dial (``MESH_SCHEME`` for a peer).
    """

    server_name: str = ""
    """The DNS name the peer's certificate must carry (peer hop only)."""
    node_name: str = ""
    """The peer's node name (peer hop only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInstance:
    """A teammate's shared instance of a service, reached through its agent's peer listener.

    The calling proxy dials ``host:port`` with TLS, presents this node's certificate
    (``RouteTable.peer_tls``), checks the peer's certificate against the team CA for
    ``server_name``, and names the service it wants in the ``x-devmesh-service`` header
    (``SERVICE.PROJECT``, the owner's names). It never connects to a peer's service port.
    """

    node_id: str
    node_name: str
    server_name: str
    """DNS name in the peer's node certificate (``NODE.MESH.devmesh.internal``)."""
    host: str
    """The peer listener's address, as discovery saw it."""
    port: int
    project: str
    service: str
    version: str | None = None
    branch: str | None = None
    health: str = "healthy"
    """As the peer's catalog announces it, in ``routes.Health`` words."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerRule:
    """What applies to calls from one caller: its ranges and its routing settings.

    ``caller`` None is the rule for calls with no known caller (a browser, curl): every range
    the project declares for the service, and the project's policy.
    """

    caller: str | None
    requirements: tuple[routes.Requirement, ...] = ()
    settings: routes.Settings = field(default_factory=routes.Settings)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshRoute:
    """Where calls to one service of one local project may go besides its local backend.

    There is one per service that the project declares and that has a local backend, peers'
    instances, or a ``fallback``; a service that runs only on peers has a MeshRoute and no
    Backend. The proxy runs ``routes.select`` per request over: the local Backend of
    (project, service) when there is one, ``peers``, and ``fallback``.
    """

    project: str
    service: str
    owner: str | None = None
    """The project that runs the service, when the dependency names another one
    (``project: NAME``): its local Backend and the peers' instances of (owner, service) are
    the candidates. None: ``project`` itself."""
    peers: tuple[PeerInstance, ...] = ()
    fallback: str | None = None
    """The service's ``fallback`` URL (http or https), the last resort."""
    rules: tuple[CallerRule, ...] = ()
    """One per caller with a ``depends_on`` edge to the service, and one with caller None."""
    caller_branches: tuple[tuple[str, str], ...] = ()
    """(caller service, branch) for local callers started under a branch: their calls
    through the injected ``NAME_URL`` go to that branch and carry ``X-Devmesh-Branch``."""

    @property
    def target_project(self) -> str:
        """The project whose instances answer: ``owner``, else the route's own project."""
        return self.owner or self.project

    def rule(self, caller: str | None) -> CallerRule:
        """The caller's rule, else the no-caller rule, else defaults."""
        fallback_rule = None
        for r in self.rules:
            if r.caller == caller:
                return r
            if r.caller is None:
                fallback_rule = r
        return fallback_rule or CallerRule(caller=caller)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerTLS:
    """This node's files for the peer channel: paths, so worker processes can load them too."""

    ca_file: str
    """The team CA certificate (PEM) that peers' certificates must chain to."""
    cert_file: str
    """This node's certificate chain (PEM)."""
    key_file: str
    node_id: str
    node_name: str


def state_words(backend: Backend, now_s: float) -> str:
    """The backend's state as the proxy's pages say it, e.g. "restarting, attempt 2, next try
    in 3 s". ``now_s`` is the reader's clock in Unix seconds (this module has none): the wait
    is ``retry_at - now_s`` rounded up, and never negative (a start that is due says 0 s)."""
    if backend.state != State.RESTARTING.value:
        return backend.state
    words = [backend.state]
    if backend.attempt is not None:
        words.append(f"attempt {backend.attempt}")
    if backend.retry_at is not None:
        words.append(f"next try in {max(0, math.ceil(backend.retry_at - now_s))} s")
    return ", ".join(words)


@dataclass(frozen=True, slots=True)
class Reserved:
    """The host names the agent's own pages (devmesh.localhost)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """No service matches; ``host`` is the name the client asked for."""

    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    """One dependency edge: caller_service of caller_project calls target_service.

    Each edge gets its own loopback listener, so the caller's NAME_URL works without any
    resolver and the proxy knows who calls without trusting a header.
    """

    caller_project: str
    caller_service: str
    target_service: str

    @property
    def label(self) -> str:
        return f"{self.caller_service}.{self.caller_project}->{self.target_service}"


@dataclass(frozen=True, slots=True)
class RouteTable:
    backends: tuple[Backend, ...] = ()
    agent: Backend | None = None
    """Where devmesh.localhost goes (the agent's dashboard); None serves the index page."""
    mesh: tuple[MeshRoute, ...] = ()
    """Mesh routing per (project, service); a service absent here routes to its Backend only."""
    peer_tls: PeerTLS | None = None
    """Set while this agent is a mesh node; None means no peer can be called."""
    node_names: tuple[tuple[str, str], ...] = ()
    """(node id, name as shown) of the nodes whose name two live nodes share, shown as
    ``NAME#ID6`` (the agent decides: ``core.nodenames``); for the access log's callers."""
    _by_name: dict[str, Backend] = field(init=False, repr=False, compare=False)
    _mesh_by_pair: dict[tuple[str, str], MeshRoute] = field(init=False, repr=False, compare=False)
    _mesh_by_name: dict[str, MeshRoute] = field(init=False, repr=False, compare=False)
    projects: frozenset[str] = field(init=False, repr=False, compare=False)
    """Project names (lower case) that have a backend or a mesh route: a host's middle label
    that is one of them names a project, not a branch (``core.branches``)."""
    _by_pair: dict[tuple[str, str], Backend] = field(init=False, repr=False, compare=False)
    _resolved: dict[str, Backend | Reserved | Unknown] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_name: dict[str, Backend] = {}
        by_pair: dict[tuple[str, str], Backend] = {}
        for backend in self.backends:
            by_name.setdefault(backend.service.lower(), backend)  # the first project keeps it
            by_pair[(backend.service.lower(), backend.project.lower())] = backend
        mesh_by_pair: dict[tuple[str, str], MeshRoute] = {}
        mesh_by_name: dict[str, MeshRoute] = {}
        for route in self.mesh:
            mesh_by_pair[(route.service.lower(), route.project.lower())] = route
            mesh_by_name.setdefault(route.service.lower(), route)
        object.__setattr__(self, "_mesh_by_pair", mesh_by_pair)
        object.__setattr__(self, "_mesh_by_name", mesh_by_name)
        names = {b.project.lower() for b in self.backends}
        object.__setattr__(self, "projects", frozenset(names | {p for _, p in mesh_by_pair}))
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_pair", by_pair)
        object.__setattr__(self, "_resolved", {})

    def node_name(self, node_id: str, name: str) -> str:
        """The name to show for a node: ``NAME#ID6`` when listed in ``node_names``."""
        for listed, shown in self.node_names:
            if listed == node_id:
                return shown
        return name

    def resolve_host(self, host_header: str) -> Backend | Reserved | Unknown:
        """Map a Host header to a backend; never raises.

        Answers are remembered per table (a client sends the same Host on every request, and
        parsing it costs more than the lookup); the memo is bounded, so hosts a client makes
        up cannot grow it without limit, and a new table starts with an empty one.
        """
        resolved = self._resolved.get(host_header)
        if resolved is None:
            if len(self._resolved) >= RESOLVED_MEMO_SIZE:
                self._resolved.clear()
            resolved = self._resolved[host_header] = self._resolve(host_header)
        return resolved

    def _resolve(self, host_header: str) -> Backend | Reserved | Unknown:
        found = hostroute.match(host_header)
        if found.kind is hostroute.HostKind.RESERVED:
            return Reserved()
        if found.kind is hostroute.HostKind.SERVICE and found.service is not None:
            if found.project is None:
                backend = self._by_name.get(found.service)
            else:
                backend = self._by_pair.get((found.service, found.project))
            if backend is not None:
                return backend
        return Unknown(hostroute.hostname(host_header))

    def for_edge(self, edge: Edge) -> Backend | None:
        """The local target of an edge: the service of that name in the project that runs it
        (the dependency's ``project:``, else the caller's own project)."""
        service = edge.target_service.lower()
        route = self._mesh_by_pair.get((service, edge.caller_project.lower()))
        project = route.target_project if route is not None else edge.caller_project
        return self._by_pair.get((service, project.lower()))

    def backend(self, project: str, service: str) -> Backend | None:
        return self._by_pair.get((service.lower(), project.lower()))

    def mesh_route(self, project: str, service: str) -> MeshRoute | None:
        """The MeshRoute of (project, service), or None: that service routes to its Backend."""
        return self._mesh_by_pair.get((service.lower(), project.lower()))

    def mesh_host(self, host_header: str) -> tuple[MeshRoute, str | None] | None:
        """A host that names a MeshRoute rather than a Backend: ``NAME.localhost`` and
        ``NAME.PROJECT.localhost`` of a service with no local backend, ``NAME.BRANCH.localhost``
        (BRANCH not a project) and ``NAME.BRANCH.PROJECT.localhost``; (route, branch label)."""
        labels = hostroute.hostname(host_header).split(".")
        if not all(labels) or labels[-1] != hostroute.SUFFIX or len(labels) < 2:
            return None
        route: MeshRoute | None = None
        branch: str | None = None
        if len(labels) == 2:
            route = self._mesh_by_name.get(labels[0])
        elif len(labels) == 3 and labels[1] in self.projects:
            route = self._mesh_by_pair.get((labels[0], labels[1]))
        elif len(labels) == 3:
            route, branch = self._mesh_by_name.get(labels[0]), labels[1]
        elif len(labels) == 4:
            route, branch = self._mesh_by_pair.get((labels[0], labels[2])), labels[1]
        return (route, branch) if route is not None else None

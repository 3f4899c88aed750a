"""Per-request route selection: which targets a call may go to, in which order, and the
runtime state that decision reads (round-robin cursors, outstanding counts, down marks).

Why a module of its own: the decision is ``core.routes.select``'s (pure, explained in words);
what the proxy adds is the state it is run against and the translation of its targets into
things the one forwarding path can dial (``Hop``): the local ``Backend``, a peer's listener
(``table.Dial`` with ``MESH_SCHEME``), or the ``fallback`` URL. ``ProxyServer.explain`` runs
the very same selection without advancing any cursor, so what ``devmesh route`` says is what
the next call does.

Cost: a service with a local backend and no peer, no fallback and no caller under a branch
(every service of a machine that is not in a mesh) takes the fast path: its decision depends
only on the table, so it is made once per (table, service, caller) and remembered; a request
then costs one dictionary lookup and a scan of its header names for a branch.

Down marks: a target whose connection failed is skipped for ``DOWN_MARK_S``; the first call
after that tries it again (the probe) and clears the mark when it connects. Down marks are
kept only where there is something else to try: a lone local backend is always tried (its
connection error is the answer the developer needs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
import urllib.parse
from collections.abc import Callable

from devmesh.core import branches, routes
from devmesh.proxy import errors, headers, table

DOWN_MARK_S = 3.0
"""How long a target whose connection failed is skipped; the next call after is the probe."""
SERVICE_HEADER = b"x-devmesh-service"
"""Which service of the peer a peer hop asks for (``SERVICE.PROJECT``, the owner's names)."""
BRANCH_HEADER = b"x-devmesh-branch"
UNAVAILABLE_HEADER = b"x-devmesh-unavailable"
WARNING_HEADER = b"x-devmesh-version-warning"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})

_LOCAL_STATES = {s.value: s for s in routes.LocalState}
_HEALTH = {h.value: h for h in routes.Health}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hop:
    """One target of a decision, ready to dial."""

    target: routes.Target
    backend: table.Backend
    """What the forwarding path dials: the local Backend, or a ``table.Dial``."""
    route: str
    """``local``, ``peer`` or ``fallback`` (the access log's ``route``)."""
    node: str | None
    """The peer's node name; None for local and fallback."""
    add: headers.Headers
    """Headers added to the forwarded request (service and branch for a peer hop)."""
    host: bytes | None
    """The Host to send instead of the client's (a fallback's); None keeps it."""
    prefix: bytes = b""
    """A fallback URL's path, put before the request's target."""
    drop: frozenset[bytes] = frozenset()


@dataclasses.dataclass(slots=True, kw_only=True)
class Plan:
    """A routed request's targets and what became of the ones tried."""

    project: str
    """The caller's project (the route's): down marks and in-flight counts are kept per
    (project, service)."""
    service: str
    hops: list[Hop]
    decision: routes.Decision
    target_project: str = ""
    """The project whose service answers (a dependency's ``project:``); the access log names
    it when it is not the caller's."""
    index: int = 0
    tried: list[str] = dataclasses.field(default_factory=list)
    """``node-b api 2.3.0: connection refused on ...``, one per failed target."""
    retried: bool = False
    """An idempotent request already moved once after its upstream died."""

    @property
    def hop(self) -> Hop:
        return self.hops[self.index]


class Router:
    """The selection state of one proxy process, and the selection itself."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: routes.RandomSource | None = None,
    ) -> None:
        """``clock``: seconds for down marks (monotonic). ``rng``: for ``balance: random``."""
        self.clock = clock
        self.rng: routes.RandomSource = rng or random.Random()
        self.cursors: dict[tuple[str, str, str | None], int] = {}
        self.outstanding: dict[tuple[str, str], dict[str, int]] = {}
        self.down: dict[tuple[str, str], dict[str, tuple[float, str]]] = {}
        self._memo_table: table.RouteTable | None = None
        self._memo: dict[tuple[str, str, str | None], routes.Decision] = {}
        self._plans: dict[tuple[object, ...], tuple[routes.Decision, tuple[Hop, ...]]] = {}

    # -- the fast path ----------------------------------------------------------------------

    def static(
        self,
        routes_table: table.RouteTable,
        route: table.MeshRoute,
        backend: table.Backend,
        caller: str | None,
    ) -> routes.Decision:
        """The decision for a lone local backend in the default namespace, remembered per
        table: only the caller's version ranges decide it (the backend's state is the
        forwarding path's business, as without a mesh)."""
        if routes_table is not self._memo_table:
            self._memo_table, self._memo, self._plans = routes_table, {}, {}
        key = (route.project, route.service, caller)
        decision = self._memo.get(key)
        if decision is None:
            rule = route.rule(caller)
            local = routes.LocalInstance(
                state=routes.LocalState.RUNNING,
                health=routes.Health.HEALTHY,
                version=backend.version,
                branch=backend.branch,
            )
            decision = routes.select(
                routes.Request(
                    service=route.service, caller=caller, requirements=rule.requirements
                ),
                routes.Candidates(local=local),
                rule.settings,
                now_s=0.0,
                rng=self.rng,
            )
            self._memo[key] = decision
        return decision

    # -- the full selection -----------------------------------------------------------------

    def decide(
        self,
        routes_table: table.RouteTable,
        route: table.MeshRoute,
        *,
        caller: str | None,
        branch: str | None,
        advance: bool = True,
    ) -> routes.Decision:
        """Run ``routes.select`` against the current state; ``advance`` moves the cursor.

        The local candidate is the Backend of the project that runs the service
        (``route.target_project``); down marks, cursors and in-flight counts are the route's,
        per (caller's project, service): each project's fallback is its own."""
        backend = routes_table.backend(route.target_project, route.service)
        pair = (route.project, route.service)
        marks = self.down.get(pair, {})
        local = None
        if backend is not None:
            until, why = marks.get(routes.Kind.LOCAL.value, (None, ""))
            local = routes.LocalInstance(
                state=_LOCAL_STATES.get(backend.state, routes.LocalState.STOPPED),
                health=_HEALTH.get(backend.health, routes.Health.UNHEALTHY),
                version=backend.version,
                branch=backend.branch,
                reason=backend.reason,
                down_until_s=until,
                down_reason=why,
            )
        peers = []
        for p in route.peers:
            until, why = marks.get(f"peer:{p.node_id}", (None, ""))
            peers.append(
                routes.PeerInstance(
                    node_id=p.node_id,
                    node_name=p.node_name,
                    version=p.version,
                    health=_HEALTH.get(p.health, routes.Health.UNHEALTHY),
                    branch=p.branch,
                    down_until_s=until,
                    down_reason=why,
                )
            )
        rule = route.rule(caller)
        key = (route.project, route.service, caller)
        cursor = self.cursors.get(key, 0)
        decision = routes.select(
            routes.Request(
                service=route.service, caller=caller, requirements=rule.requirements, branch=branch
            ),
            routes.Candidates(local=local, peers=tuple(peers), fallback=route.fallback),
            rule.settings,
            now_s=self.clock(),
            cursor=cursor,
            outstanding=self.outstanding.get(pair, {}),
            rng=self.rng,
        )
        if advance:
            self.cursors[key] = decision.next_cursor
        return decision

    def plan(
        self,
        routes_table: table.RouteTable,
        route: table.MeshRoute,
        *,
        caller: str | None,
        branch: branches.Branch,
        edge: bool,
    ) -> Plan | routes.Decision:
        """The hops of a routed call, or the decision that answers it (409/502).

        Raises BadRequestError for an invalid branch name.
        """
        if branch.error is not None:
            raise errors.BadRequestError(400, branch.error)
        name = branch.name
        propagate = False
        if name is None and edge and caller is not None:
            for who, caller_branch in route.caller_branches:
                if who == caller:
                    name, propagate = caller_branch, True
                    break
        pair = (route.project, route.service)
        marks = self.down.get(pair)
        if marks:  # an expired mark decides nothing: the next call is the probe
            now = self.clock()
            for key in [k for k, (until, _) in marks.items() if until <= now]:
                del marks[key]
        memo_key = None
        if not marks and route.rule(caller).settings.balance in _MEMO_BALANCE:
            # Nothing but the cursor moves the decision: remember it per cursor position.
            period = _period(1 + len(route.peers))
            if period:
                cursor = self.cursors.get((*pair, caller), 0)
                memo_key = (*pair, caller, name, propagate, cursor % period)
                if routes_table is not self._memo_table:
                    self._memo_table, self._memo, self._plans = routes_table, {}, {}
                hit = self._plans.get(memo_key)
                if hit is not None:
                    self.cursors[(*pair, caller)] = cursor + 1
                    return Plan(
                        project=route.project,
                        service=route.service,
                        hops=list(hit[1]),
                        decision=hit[0],
                        target_project=route.target_project,
                    )
        decision = self.decide(routes_table, route, caller=caller, branch=name)
        if decision.outcome is not routes.Outcome.ROUTE:
            return decision
        hops = self._hops(routes_table, route, decision, name, propagate)
        if memo_key is not None:
            self._plans[memo_key] = (decision, tuple(hops))
        return Plan(
            project=route.project,
            service=route.service,
            hops=hops,
            decision=decision,
            target_project=route.target_project,
        )

    def _hops(
        self,
        routes_table: table.RouteTable,
        route: table.MeshRoute,
        decision: routes.Decision,
        name: str | None,
        propagate: bool,
    ) -> list[Hop]:
        backend = routes_table.backend(route.target_project, route.service)
        branch_add = [(BRANCH_HEADER, name.encode())] if propagate and name else []
        hops: list[Hop] = []
        for target in decision.targets:
            if target.kind is routes.Kind.LOCAL:
                assert backend is not None
                hops.append(
                    Hop(
                        target=target,
                        backend=backend,
                        route="local",
                        node=None,
                        add=branch_add,
                        host=None,
                    )
                )
            elif target.kind is routes.Kind.PEER:
                peer = next(p for p in route.peers if p.node_id == target.node_id)
                add = [(SERVICE_HEADER, f"{peer.service}.{peer.project}".encode())]
                if name:
                    add.append((BRANCH_HEADER, name.encode()))
                hops.append(
                    Hop(
                        target=target,
                        backend=_peer_dial(peer),
                        route="peer",
                        node=peer.node_name,
                        add=add,
                        host=None,
                    )
                )
            else:
                assert target.url is not None
                dial, host, prefix = _fallback_dial(route.project, route.service, target.url)
                hops.append(
                    Hop(
                        target=target,
                        backend=dial,
                        route="fallback",
                        node=None,
                        add=branch_add,
                        host=host,
                        prefix=prefix,
                    )
                )
        return hops

    # -- runtime state ----------------------------------------------------------------------

    def enter(self, project: str, service: str, key: str) -> None:
        counts = self.outstanding.setdefault((project, service), {})
        counts[key] = counts.get(key, 0) + 1

    def leave(self, project: str, service: str, key: str) -> None:
        counts = self.outstanding.get((project, service))
        if counts is not None:
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def mark_down(self, project: str, service: str, key: str, reason: str) -> None:
        marks = self.down.setdefault((project, service), {})
        marks[key] = (self.clock() + DOWN_MARK_S, reason)

    def mark_up(self, project: str, service: str, key: str) -> None:
        marks = self.down.get((project, service))
        if marks and key in marks:
            del marks[key]


_MEMO_BALANCE = (routes.Balance.ROUND_ROBIN, routes.Balance.FIRST)
MEMO_MAX_PERIOD = 60


@functools.lru_cache(maxsize=64)
def _period(candidates: int) -> int:
    """After how many cursor steps every tier's rotation repeats (0: too many to remember)."""
    period = math.lcm(*range(1, candidates + 1))
    return period if period <= MEMO_MAX_PERIOD else 0


def explain(
    routes_table: table.RouteTable,
    router: Router,
    project: str,
    service: str,
    *,
    caller: str | None = None,
    branch: str | None = None,
) -> routes.Decision | None:
    """The decision a call to (project, service) from ``caller`` in ``branch`` would get
    from ``router`` over ``routes_table``, without advancing any cursor; None when the pair
    has neither a MeshRoute nor a Backend. A caller running under a branch is asked for with
    its branch, as its calls are routed.

    One function for every explanation (the proxy's, with its down marks and outstanding
    counts; the agent's when no proxy runs, with a fresh Router), so they cannot drift."""
    route = routes_table.mesh_route(project, service)
    if route is None:
        backend = routes_table.backend(project, service)
        if backend is None:
            return None
        route = table.MeshRoute(project=backend.project, service=backend.service)
    if branch is None and caller is not None:
        branch = dict(route.caller_branches).get(caller)
    return router.decide(routes_table, route, caller=caller, branch=branch, advance=False)


def _peer_dial(peer: table.PeerInstance) -> table.Dial:
    return table.Dial(
        project=peer.project,
        service=peer.service,
        host=peer.host,
        port=peer.port,
        scheme=table.MESH_SCHEME,
        server_name=peer.server_name,
        node_name=peer.node_name,
        version=peer.version,
        branch=peer.branch,
    )


@functools.lru_cache(maxsize=256)
def _fallback_dial(project: str, service: str, url: str) -> tuple[table.Dial, bytes, bytes]:
    """(what to dial, the Host to send, the path prefix) for a fallback URL."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    dial = table.Dial(
        project=project,
        service=service,
        host=host,
        port=port,
        scheme=table.VERIFIED_TLS_SCHEME if secure else "http",
        server_name=host,
    )
    return dial, parts.netloc.encode("idna"), parts.path.rstrip("/").encode()


def failed_words(plan: Plan, reason: str) -> str:
    """``node-b api 2.3.0: connection refused`` for the 502 that names every target tried."""
    return f"{routes.describe(plan.service, plan.hop.target)}: {reason}"

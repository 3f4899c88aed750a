"""Route selection: where one call to a service goes, in which order to fail over, and why.

Why it is pure: this is the decision a developer most needs explained ("why did my call land
on Ben's laptop?"), and the one with the most cases (health, versions, branches, preferences,
load spreading, passive down marks). As a function over plain frozen data it is tested in
microseconds, and ``devmesh route`` can replay it to explain a decision. The clock, the
round-robin cursor, outstanding-request counts and the random source are all passed in.

The rules, in the order they are applied to every candidate:

1. **Branch namespace**: a request for branch B sees only instances of branch B, anywhere in
   the mesh; a request with no branch sees only instances with no branch (the default).
2. **Down marks**: an instance marked down after a failed connection is skipped until the mark
   expires; the first call after that is the probe that brings it back.
3. **Health**: only a healthy instance (and a local one that is running) takes calls.
4. **Versions**: an instance must satisfy every range that applies (the caller's range from
   its ``depends_on``; with no caller, every range this project declares for the service). A
   compatible instance always wins over an incompatible one. With none compatible,
   ``policy.versions: warn`` routes to the best incompatible one and carries a warning;
   ``reject`` answers 409 naming the caller, the ranges, the versions found and where.

The ``fallback`` URL is the service's declared last resort: it is not health-, branch- or
version-checked (devmesh knows nothing of what answers there), so it comes after every mesh
instance, or first with ``policy.prefer: fallback``. Under ``reject`` it still answers when
only incompatible instances exist: the user named it as where calls go when the mesh cannot
serve them.

Survivors are ordered in tiers: compatible before incompatible, then by ``policy.prefer``
(local, peer or fallback first). Within a tier the candidates are equal and ``policy.balance``
spreads the load: ``round_robin`` rotates by the cursor (returned advanced by one),
``least_outstanding`` orders by in-flight requests (ties by the cursor), ``random`` shuffles
with the source given, ``first`` keeps a stable order (node name). The targets, in order, are
what the proxy tries when a connection fails before the request is sent.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping
from typing import Protocol

from devmesh.core import model, versions


class Balance(enum.Enum):
    """How load is spread across equal candidates."""

    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"
    RANDOM = "random"
    FIRST = "first"


class LocalState(enum.Enum):
    """What the supervisor says of the local process."""

    RUNNING = "running"
    STARTING = "starting"
    RESTARTING = "restarting"
    CRASH_LOOPING = "crash-looping"
    STOPPED = "stopped"


class Health(enum.Enum):
    """Readiness as probed locally or announced in a peer's catalog (same words)."""

    HEALTHY = "healthy"
    STARTING = "starting"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


class Kind(enum.Enum):
    LOCAL = "local"
    PEER = "peer"
    FALLBACK = "fallback"


class Outcome(enum.Enum):
    """ROUTE: try ``targets`` in order. REJECT: answer 409. NO_ROUTE: answer 502."""

    ROUTE = "route"
    REJECT = "reject"
    NO_ROUTE = "no-route"


class RandomSource(Protocol):
    """The one method of ``random.Random`` route selection needs."""

    def randrange(self, stop: int, /) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LocalInstance:
    """The service as this agent runs it."""

    state: LocalState
    health: Health
    version: str | None = None
    branch: str | None = None
    reason: str | None = None
    """Why a stopped instance is not running (``not started ...``, ``stopped by devmesh
    down``), said in its verdict."""
    down_until_s: float | None = None
    """Clock reading until which a failed connection keeps it out; None when not marked."""
    down_reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerInstance:
    """One peer's shared instance of the service, as its catalog announces it."""

    node_id: str
    node_name: str
    version: str | None
    health: Health
    branch: str | None = None
    down_until_s: float | None = None
    """Clock reading until which a failed connection keeps it out; None when not marked."""
    down_reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Candidates:
    """Everything that could answer a call to one service."""

    local: LocalInstance | None = None
    peers: tuple[PeerInstance, ...] = ()
    fallback: str | None = None
    """The service's ``fallback`` URL."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    """One semver range that applies to the call, and who declared it."""

    range_text: str
    declared_by: str
    """The calling service whose ``depends_on`` holds the range."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The routing policy in force for one dependency."""

    versions: model.VersionPolicy = model.VersionPolicy.WARN
    prefer: model.Prefer = model.Prefer.LOCAL
    balance: Balance = Balance.ROUND_ROBIN

    @classmethod
    def from_policy(
        cls, policy: model.Policy, *, versions_override: model.VersionPolicy | None = None
    ) -> Settings:
        """The project's policy, with a dependency's own ``versions`` when it sets one."""
        return cls(
            versions=versions_override or policy.versions,
            prefer=policy.prefer,
            balance=Balance(policy.balance.value),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One call to route."""

    service: str
    caller: str | None = None
    """The calling service (known from the injected ``NAME_URL`` listener); None for a browser."""
    requirements: tuple[Requirement, ...] = ()
    branch: str | None = None
    """Requested branch namespace; None is the default."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One place a call can go."""

    kind: Kind
    node_id: str | None = None
    node_name: str | None = None
    version: str | None = None
    branch: str | None = None
    url: str | None = None
    """Only for the fallback."""

    @property
    def key(self) -> str:
        """Stable identity, for outstanding counts and down marks."""
        if self.kind is Kind.PEER:
            return f"peer:{self.node_id}"
        return self.kind.value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What became of one candidate, in words."""

    target: Target
    routable: bool
    compatible: bool
    reason: str
    """E.g. ``skipped node-c api 1.9.0: outside ^2.1``."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Where a call goes and why; ``explanation`` is the sentence shown to people."""

    request: Request
    outcome: Outcome
    targets: tuple[Target, ...]
    """Order to try: the chosen one first, then the failover order."""
    verdicts: tuple[Verdict, ...]
    """One per candidate, in the order they were considered (local, peers, fallback)."""
    warning: str | None = None
    """Version mismatch under ``policy.versions: warn`` (header, log and status)."""
    message: str = ""
    """For REJECT (the 409 body) and NO_ROUTE (the 502 body)."""
    next_cursor: int = 0

    @property
    def chosen(self) -> Target | None:
        return self.targets[0] if self.targets else None

    @property
    def status(self) -> int | None:
        """HTTP status to answer with instead of forwarding; None when routing."""
        return {Outcome.ROUTE: None, Outcome.REJECT: 409, Outcome.NO_ROUTE: 502}[self.outcome]

    @property
    def explanation(self) -> str:
        """Every candidate's reason, in the order considered; the 409/502 message leads."""
        text = "; ".join(v.reason for v in self.verdicts)
        if self.outcome is not Outcome.ROUTE:
            text = f"{self.message}: {text}" if text else self.message
        if self.warning:
            text += f" (warning: {self.warning})"
        return text


def describe(service: str, target: Target) -> str:
    """``local api 2.3.1``, ``node-b api 2.3.0 (branch feat)``, ``fallback https://...``."""
    if target.kind is Kind.FALLBACK:
        return f"fallback {target.url}"
    where = "local" if target.kind is Kind.LOCAL else target.node_name
    text = f"{where} {service}" + (f" {target.version}" if target.version else "")
    return text + (f" (branch {target.branch})" if target.branch else "")


def requirements_for(
    project: model.Project, caller: str | None, service: str
) -> tuple[Requirement, ...]:
    """The ranges that apply to a call: the caller's, or with no caller every one declared.

    A caller that does not declare the service in ``depends_on`` (or declares no range) has no
    requirement. With no caller (a browser, curl), the instance must fit every service of this
    project that depends on it, so what a developer sees is what those services get.
    """
    callers = [caller] if caller is not None else list(project.services)
    out: list[Requirement] = []
    for name in callers:
        svc = project.services.get(name)
        if svc is None:
            continue
        for dep in svc.depends_on:
            if dep.name == service and dep.version_range:
                out.append(Requirement(range_text=dep.version_range, declared_by=name))
    return tuple(out)


def _ranges(request: Request) -> str:
    return ", ".join(
        r.range_text if request.caller is not None else f"{r.range_text} ({r.declared_by})"
        for r in request.requirements
    )


@functools.lru_cache(maxsize=256)
def _parse_range(text: str) -> versions.Range:
    """Ranges come from a handful of depends_on entries and are read on every call: parse once."""
    return versions.parse_range(text)


def _version_check(request: Request, version: str | None) -> tuple[bool, str]:
    """Whether ``version`` satisfies every requirement, and the words for it."""
    if not request.requirements:
        return True, ""
    if version is None:
        return False, f"declares no version, {_ranges(request)} needs one"
    try:
        parsed = versions.parse_version(version)
    except versions.VersionError:
        return False, f"version {version!r} is not semver"
    failed = [
        r.range_text
        for r in request.requirements
        if not _parse_range(r.range_text).contains(parsed)
    ]
    if failed:
        return False, "outside " + ", ".join(failed)
    return True, " ".join(f"{r.range_text} ok" for r in request.requirements)


def _branch_text(branch: str | None) -> str:
    return f"branch {branch}" if branch else "the default namespace"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Screened:
    """A mesh instance after the filters: ``words`` is the skip reason or the version words."""

    target: Target
    routable: bool
    compatible: bool
    words: str


def _screen(
    request: Request,
    target: Target,
    *,
    health_problem: str | None,
    down_until_s: float | None,
    down_reason: str,
    now_s: float,
) -> _Screened:
    """Apply the branch, down-mark, health and version rules, in that order."""
    name = describe(request.service, target)

    def skipped(words: str) -> _Screened:
        return _Screened(target=target, routable=False, compatible=False, words=words)

    if target.branch != request.branch:
        return skipped(
            f"skipped {name}: in {_branch_text(target.branch)}, not {_branch_text(request.branch)}"
        )
    if down_until_s is not None and now_s < down_until_s:
        why = f" ({down_reason})" if down_reason else ""
        return skipped(f"{name} is marked down{why} for another {down_until_s - now_s:.1f} s")
    if health_problem is not None:
        return skipped(f"{name} is {health_problem}")
    ok, words = _version_check(request, target.version)
    return _Screened(target=target, routable=True, compatible=ok, words=words)


def _local_problem(local: LocalInstance) -> str | None:
    if local.state is LocalState.STOPPED and local.reason:
        return f"{local.state.value}: {local.reason}"
    if local.state is not LocalState.RUNNING:
        return local.state.value
    if local.health is not Health.HEALTHY:
        return local.health.value
    return None


def _order(
    tier: list[Target],
    settings: Settings,
    cursor: int,
    outstanding: Mapping[str, int],
    rng: RandomSource | None,
) -> list[Target]:
    """Spread load across equal candidates (see the module docstring)."""
    ordered = sorted(tier, key=lambda t: (t.node_name or "", t.node_id or ""))
    if len(ordered) < 2 or settings.balance is Balance.FIRST:
        return ordered
    if settings.balance is Balance.RANDOM:
        if rng is None:
            raise ValueError("policy.balance random needs a random source")
        shuffled: list[Target] = []
        while ordered:
            shuffled.append(ordered.pop(rng.randrange(len(ordered)) % len(ordered)))
        return shuffled
    shift = cursor % len(ordered)
    rotated = ordered[shift:] + ordered[:shift]
    if settings.balance is Balance.LEAST_OUTSTANDING:
        rotated.sort(key=lambda t: outstanding.get(t.key, 0))
    return rotated


def select(
    request: Request,
    candidates: Candidates,
    settings: Settings,
    *,
    now_s: float,
    cursor: int = 0,
    outstanding: Mapping[str, int] | None = None,
    rng: RandomSource | None = None,
) -> Decision:
    """Decide where ``request`` goes among ``candidates``.

    ``now_s`` is read against down marks (same clock). ``cursor`` is the round-robin position
    of this (caller, service) pair; the decision returns the next one. ``outstanding`` maps
    ``Target.key`` to in-flight requests. Raises VersionError when a requirement's range is
    malformed (config validation rejects those first) and ValueError when ``balance`` is
    random and no ``rng`` is given.
    """
    service = request.service
    considered: list[_Screened] = []
    if candidates.local is not None:
        local = candidates.local
        considered.append(
            _screen(
                request,
                Target(kind=Kind.LOCAL, version=local.version, branch=local.branch),
                health_problem=_local_problem(local),
                down_until_s=local.down_until_s,
                down_reason=local.down_reason,
                now_s=now_s,
            )
        )
    for peer in sorted(candidates.peers, key=lambda p: (p.node_name, p.node_id)):
        target = Target(
            kind=Kind.PEER,
            node_id=peer.node_id,
            node_name=peer.node_name,
            version=peer.version,
            branch=peer.branch,
        )
        considered.append(
            _screen(
                request,
                target,
                health_problem=None if peer.health is Health.HEALTHY else peer.health.value,
                down_until_s=peer.down_until_s,
                down_reason=peer.down_reason,
                now_s=now_s,
            )
        )
    fallback = Target(kind=Kind.FALLBACK, url=candidates.fallback) if candidates.fallback else None

    def tier(kind: Kind, compatible: bool) -> list[Target]:
        """Equal candidates: same kind, same compatibility, all routable."""
        return [
            c.target
            for c in considered
            if c.routable and c.compatible == compatible and c.target.kind is kind
        ]

    mesh_order = (
        (Kind.PEER, Kind.LOCAL) if settings.prefer is model.Prefer.PEER else (Kind.LOCAL, Kind.PEER)
    )
    counts = outstanding or {}
    compatible = [_order(tier(kind, True), settings, cursor, counts, rng) for kind in mesh_order]
    incompatible = [_order(tier(kind, False), settings, cursor, counts, rng) for kind in mesh_order]
    good = [t for group in compatible for t in group]
    bad = [t for group in incompatible for t in group]
    warning = None
    message = ""
    outcome = Outcome.ROUTE
    if good or not bad:
        mesh = good
    elif settings.versions is model.VersionPolicy.WARN:
        mesh = bad
        warning = _mismatch(request, bad, reject=False)
    else:
        mesh = []
        if fallback is None:
            outcome = Outcome.REJECT
            message = _mismatch(request, bad, reject=True)
    if fallback is not None and settings.prefer is model.Prefer.FALLBACK:
        targets = [fallback, *mesh]
    elif fallback is not None:
        targets = [*mesh, fallback]
    else:
        targets = mesh
    if not targets and outcome is Outcome.ROUTE:
        outcome = Outcome.NO_ROUTE
        message = f"no route to {service}" + (
            f" in {_branch_text(request.branch)}" if request.branch else ""
        )
        if not considered:
            message += ": no instance runs here or on any peer, and it has no fallback"
    verdicts = _verdicts(request, considered, fallback, targets)
    return Decision(
        request=request,
        outcome=outcome,
        targets=tuple(targets) if outcome is Outcome.ROUTE else (),
        verdicts=verdicts,
        warning=warning,
        message=message,
        next_cursor=cursor + 1,
    )


def _mismatch(request: Request, found: list[Target], *, reject: bool) -> str:
    """Names the caller, the ranges, and every version found with where it runs."""
    who = f"{request.caller} needs" if request.caller else "this project declares"
    where = ", ".join(describe(request.service, t) for t in found)
    head = f"{who} {request.service} {_ranges(request)}"
    if reject:
        return f"{head} and policy.versions is reject; found only {where}, none compatible"
    return f"{head}; no compatible instance, so routed to {describe(request.service, found[0])}"


def _verdicts(
    request: Request,
    considered: list[_Screened],
    fallback: Target | None,
    targets: list[Target],
) -> tuple[Verdict, ...]:
    chosen = targets[0] if targets else None
    out: list[Verdict] = []
    for c in considered:
        target, ok, compatible, words = c.target, c.routable, c.compatible, c.words
        name = describe(request.service, target)
        verb = "chose" if target == chosen else "then"
        if not ok:
            reason = words
        elif target not in targets:
            reason = f"skipped {name}: {words}" if not compatible else f"{name} not tried"
        elif compatible:
            reason = f"{verb} {name}" + (f" ({words})" if words else "")
        else:
            reason = f"{verb} {name} ({words}, no compatible instance)"
        out.append(Verdict(target=target, routable=ok, compatible=compatible, reason=reason))
    if fallback is not None:
        name = describe(request.service, fallback)
        reason = f"chose {name}" if fallback == chosen else f"then {name}"
        out.append(Verdict(target=fallback, routable=True, compatible=True, reason=reason))
    return tuple(out)

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

from devmesh.core import hostroute


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

    @property
    def label(self) -> str:
        return f"{self.service}.{self.project}"


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
    _by_name: dict[str, Backend] = field(init=False, repr=False, compare=False)
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
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_pair", by_pair)
        object.__setattr__(self, "_resolved", {})

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
        """The target of an edge: the service of that name in the caller's own project."""
        return self._by_pair.get((edge.target_service.lower(), edge.caller_project.lower()))

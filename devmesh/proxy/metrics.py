"""The proxy's metrics: counted per request at the forwarding path, shared by every process.

Why it looks like this:

- The proxy runs in several processes (the agent's and its workers, ``workers``), and
  ``/metrics`` is answered by whichever process takes the connection, with every process's
  counts. So counts live in prometheus-client's multiprocess files
  (``PROMETHEUS_MULTIPROC_DIR``, one folder per agent under ``DEVMESH_HOME``): each process
  writes its own memory-mapped file, and any process (or the agent) reads them all. A worker
  that dies leaves its counts behind (they are still added up); its open WebSocket gauge
  goes with it (``worker_died``, prometheus-client's ``mark_process_dead``).
- A request must not pay for that: writing one value to a mapped file takes a lock, a pid
  check and a pack, a few microseconds, and a request touches six of them. ``finished``
  therefore adds to plain per-route lists in this process (a dict lookup and a few integer
  additions), and ``flush`` moves those into the shared files four times a second (the proxy's
  flush tick) and before this process answers ``/metrics``. A process killed with SIGKILL loses
  at most its last quarter second; SIGTERM flushes.
- Labels are names the proxy routed by (project, service, the calling service of a
  dependency listener, the kind of target, a peer's node name from its certificate), never
  a URL, a Host or any header value: nothing a client sends becomes a label.

``DEVMESH_METRICS=off`` (documented for benchmarking) starts the agent without a
``Recorder``: nothing is counted and ``/metrics`` says so.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import multiprocess, values
from prometheus_client.registry import CollectorRegistry

from devmesh.core import metrics as core
from devmesh.proxy import peering, selection, table

if TYPE_CHECKING:
    from devmesh.proxy import forward

OFF_ENV = "DEVMESH_METRICS"
"""``off`` turns the proxy's metrics off (to measure what they cost); anything else: on."""
PATH = b"/metrics"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST.encode()

ROUTE_LABELS = ("project", "caller", "service", "target", "node")
SERVED_LABELS = ("project", "service", "caller_node")
ROUTE_PREFIX = "devmesh_proxy_"
SERVED_PREFIX = "devmesh_peer_served_"

# The layout of a route's pending list: codes, buckets, then the sums.
_CODES = 0
_BUCKETS = len(core.CODE_CLASSES)
_DURATION = _BUCKETS + len(core.BUCKETS_S) + 1
_BYTES_IN = _DURATION + 1
_BYTES_OUT = _BYTES_IN + 1
_WS_TOTAL = _BYTES_OUT + 1
_WS_OPEN = _WS_TOTAL + 1
_RETRIES = _WS_OPEN + 1
_FAILOVERS = _RETRIES + 1
_WARNINGS = _FAILOVERS + 1
_CONFLICTS = _WARNINGS + 1
_SIZE = _CONFLICTS + 1
_BOUNDS = core.BUCKETS_S
_NO_CODE = len(core.CODE_CLASSES) - 1
_SERVED_KEY = 4
"""Pending keys: (project, edge, service, target, node) for a routed call, (SERVED, project,
service, caller node) for one served to a peer."""

_COUNTERS = (
    (_BYTES_IN, "request_bytes_total", "Bytes of request bodies (and WebSocket data) received"),
    (_BYTES_OUT, "response_bytes_total", "Bytes of response bodies (and WebSocket data) sent"),
    (_WS_TOTAL, "websocket_connections_total", "WebSocket connections opened"),
    (_RETRIES, "retries_total", "Idempotent requests sent again after their upstream died"),
    (_FAILOVERS, "failovers_total", "Moves to the next target after one could not be reached"),
    (_WARNINGS, "version_warnings_total", "Calls forwarded with a version-mismatch warning"),
    (_CONFLICTS, "version_conflicts_total", "Calls refused with 409 (no compatible version)"),
)

_claimed: set[Path] = set()
"""Folders a Recorder of this process writes to: one Recorder per folder and process."""
_storage_lock = threading.Lock()
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def off(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether ``DEVMESH_METRICS=off`` asks for no metrics."""
    env = os.environ if environ is None else environ
    return env.get(OFF_ENV, "").strip().lower() in ("off", "0", "false", "no")


def prepare(directory: Path) -> None:
    """Empty ``directory`` (the previous agent's counts) and create it: at the owner's start."""
    if directory.exists():
        for old in directory.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


@contextlib.contextmanager
def _storage(value_class: Any, directory: Path) -> Iterator[None]:
    """Create prometheus-client values in ``directory`` while this block runs.

    prometheus-client picks one storage per process, from the environment, when it is first
    imported, and names each file from the environment when a value is made. A proxy learns
    its folder later (and a test runs several proxies in one process), so each Recorder has
    its own multiprocess value class and folder, put in place only while it makes a metric
    or a labelled child; the lock keeps two proxies' threads from interleaving that.
    """
    with _storage_lock:
        saved_class, saved_env = values.ValueClass, os.environ.get(_MULTIPROC_ENV)
        values.ValueClass = value_class
        os.environ[_MULTIPROC_ENV] = str(directory)
        try:
            yield
        finally:
            values.ValueClass = saved_class
            if saved_env is None:
                os.environ.pop(_MULTIPROC_ENV, None)
            else:
                os.environ[_MULTIPROC_ENV] = saved_env


class _Families:
    """The metric families of one kind of route (routed calls, or calls served to peers)."""

    def __init__(self, prefix: str, labels: tuple[str, ...], what: str) -> None:
        self.requests = prometheus_client.Counter(
            f"{prefix}requests_total",
            f"{what}, by status class (none: cut without an answer)",
            [*labels, "code"],
            registry=None,
        )
        self.duration = prometheus_client.Histogram(
            f"{prefix}request_duration_seconds",
            f"{what}: time from the request head to the end of the answer",
            labels,
            buckets=_BOUNDS,
            registry=None,
        )
        self.counters = {
            index: prometheus_client.Counter(f"{prefix}{name}", text, labels, registry=None)
            for index, name, text in _COUNTERS
        }
        self.ws_open = prometheus_client.Gauge(
            f"{prefix}websocket_connections_open",
            "WebSocket connections open now",
            labels,
            multiprocess_mode="livesum",
            registry=None,
        )


class Recorder:
    """Counts of one proxy process, flushed to the shared folder (see the module's words)."""

    def __init__(self, directory: Path) -> None:
        """``directory``: the multiprocess folder (``prepare``d by the owner). Raises
        ValueError when another Recorder of this process writes there (both would write
        the same file)."""
        directory = directory.absolute()
        if directory in _claimed:
            raise ValueError(f"a recorder of this process already writes to {directory}")
        _claimed.add(directory)
        self.directory = directory
        self._values = values.MultiProcessValue()
        self._pending: dict[tuple[Any, ...], list[float]] = {}
        with _storage(self._values, directory):
            self._route = _Families(ROUTE_PREFIX, ROUTE_LABELS, "Requests the proxy routed")
            self._served = _Families(
                SERVED_PREFIX, SERVED_LABELS, "Requests teammates' nodes made to shared services"
            )
        self._children: dict[tuple[Any, ...], dict[int | str, Any]] = {}

    def close(self) -> None:
        """Flush, close this process's files and free the folder for another Recorder."""
        self.flush()
        self._values.close_all_files()
        _claimed.discard(self.directory)

    # -- the hot path: plain additions ------------------------------------------------------

    def finished(self, ex: forward.Exchange, routes_table: table.RouteTable) -> None:
        """Count ``ex`` (its access log moment: the exchange is over)."""
        v = self._slot(ex, routes_table)
        if v is None:
            return
        result = ex.result
        status = result.status
        v[status // 100 - 1 if 100 <= status < 600 else _NO_CODE] += 1
        took = perf_counter() - ex.clock
        v[_BUCKETS + _bucket(_BOUNDS, took)] += 1
        v[_DURATION] += took
        v[_BYTES_IN] += result.bytes_in
        v[_BYTES_OUT] += result.bytes_out
        if status == 101 and result.on_open is not None:
            v[_WS_OPEN] -= 1
        plan = ex.plan
        if plan is not None and plan.index:
            retried = 1 if plan.retried else 0
            v[_RETRIES] += retried
            v[_FAILOVERS] += plan.index - retried
        extra = result.extra
        if extra and any(name == selection.WARNING_HEADER for name, _ in extra):
            v[_WARNINGS] += 1
        if status == 409 and ex.backend is None:
            v[_CONFLICTS] += 1

    def opened(self, ex: forward.Exchange, routes_table: table.RouteTable) -> None:
        """A WebSocket tunnel of ``ex`` just opened (its 101 was sent)."""
        v = self._slot(ex, routes_table)
        if v is None:
            return
        v[_WS_OPEN] += 1
        v[_WS_TOTAL] += 1

    def _slot(self, ex: forward.Exchange, routes_table: table.RouteTable) -> list[float] | None:
        """The pending counts of ``ex``'s route; None when it is not counted."""
        key = self._key(ex, routes_table)
        if key is None:
            return None
        v = self._pending.get(key)
        if v is None:
            v = self._pending[key] = [0] * _SIZE
        return v

    def _key(self, ex: forward.Exchange, routes_table: table.RouteTable) -> tuple[Any, ...] | None:
        client = ex.client
        if client.mesh is not None:
            return self._served_key(ex, routes_table)
        edge = client.edge
        plan = ex.plan
        if plan is not None:
            hop = ex.hop
            assert hop is not None
            return (plan.project, edge, plan.service, hop.route, hop.node or "")
        backend = ex.backend
        if backend is not None:
            if backend is routes_table.agent:
                return None  # the agent's own pages (the dashboard) are not a route
            return (backend.project, edge, backend.service, "local", "")
        if ex.request is None or ex.result.status < 400:
            return None  # not a request, or the proxy's index page
        named = _named(ex, routes_table)
        if named is None:
            return None  # no service of that name: nothing to count it against
        return (named[0], edge, named[1], "none", "")

    def _served_key(
        self, ex: forward.Exchange, routes_table: table.RouteTable
    ) -> tuple[Any, ...] | None:
        caller = ex.client.caller
        if not isinstance(caller, peering.PeerCaller):
            return None
        backend = ex.backend
        if backend is not None:
            named: tuple[str, str] | None = (backend.project, backend.service)
        else:
            named = peering.served_name(routes_table, ex.hdrs)
        if named is None:
            return None
        return (core.SERVED, named[0], named[1], caller.node_name)  # _SERVED_KEY long

    # -- off the hot path: the shared files --------------------------------------------------

    def flush(self) -> None:
        """Move this process's pending counts into its shared file."""
        pending, self._pending = self._pending, {}
        for key, v in pending.items():
            self._write(key, v)

    def _child(self, children: dict[int | str, Any], slot: int | str, make: Any) -> Any:
        """The labelled child in ``slot``, made (in this Recorder's folder) on first use."""
        child = children.get(slot)
        if child is None:
            with _storage(self._values, self.directory):
                child = children[slot] = make()
        return child

    def _write(self, key: tuple[Any, ...], v: list[float]) -> None:
        if len(key) == _SERVED_KEY:
            families, labels = self._served, key[1:]
        else:
            edge = key[1]
            caller = f"{edge.caller_service}.{edge.caller_project}" if edge is not None else ""
            families, labels = self._route, (key[0], caller, key[2], key[3], key[4])
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = {}
        make: Any
        for i, code in enumerate(core.CODE_CLASSES):
            n = v[_CODES + i]
            if n:
                make = functools.partial(families.requests.labels, *labels, code)
                self._child(children, code, make).inc(n)
        observed = v[_BUCKETS:_DURATION]
        if any(observed):
            make = functools.partial(families.duration.labels, *labels)
            _add_observations(self._child(children, "duration", make), observed, v[_DURATION])
        for index, family in families.counters.items():
            n = v[index]
            if n:
                self._child(children, index, functools.partial(family.labels, *labels)).inc(n)
        if v[_WS_OPEN]:
            make = functools.partial(families.ws_open.labels, *labels)
            self._child(children, _WS_OPEN, make).inc(v[_WS_OPEN])

    def exposition(self) -> bytes:
        """Every process's counts in the Prometheus text format (this one's flushed first)."""
        self.flush()
        return exposition(self.directory)


def _bucket(bounds: tuple[float, ...], seconds: float) -> int:
    for i, bound in enumerate(bounds):
        if seconds <= bound:
            return i
    return len(bounds)


def _add_observations(hist: Any, counts: list[float], total_s: float) -> None:
    """Add a batch of observations (per-bucket counts and their sum) to a histogram child.

    prometheus-client observes one value at a time; a batch goes into the same values its
    ``observe`` increments (``_buckets``, per bucket, and ``_sum``), which the multiprocess
    collector reads back. tests/test_proxy_metrics.py checks the exposition against
    ``observe``'s, so a prometheus-client that stores them otherwise fails there.
    """
    for i, n in enumerate(counts):
        if n:
            hist._buckets[i].inc(n)
    hist._sum.inc(total_s)


def _named(ex: forward.Exchange, routes_table: table.RouteTable) -> tuple[str, str] | None:
    """(project, service) of a request the proxy answered itself (409, not running), from
    the route table (never from the request's text): None when no service has that name."""
    edge = ex.client.edge
    if edge is not None:
        route = routes_table.mesh_route(edge.caller_project, edge.target_service)
        if route is not None:
            return route.project, route.service
        backend = routes_table.for_edge(edge)
        return (backend.project, backend.service) if backend is not None else None
    text = ex.host.decode("latin-1")
    resolved = routes_table.resolve_host(text)
    if type(resolved) is table.Backend:
        return resolved.project, resolved.service
    found = routes_table.mesh_host(text) if routes_table.mesh else None
    if found is not None:
        return found[0].project, found[0].service
    return None


def is_metrics_request(ex: forward.Exchange, routes_table: table.RouteTable) -> bool:
    """``GET /metrics`` (or HEAD, with a query) of the agent's own host (devmesh.localhost),
    from a browser or a scraper, not through a dependency listener or the peer channel."""
    request = ex.request
    if request is None or ex.client.edge is not None or ex.client.mesh is not None:
        return False
    path = request.target.split(b"?", 1)[0]
    if path != PATH or request.method not in (b"GET", b"HEAD"):
        return False
    return type(routes_table.resolve_host(ex.host.decode("latin-1"))) is table.Reserved


def exposition(directory: Path) -> bytes:
    """All processes' counts in ``directory``, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return prometheus_client.generate_latest(registry)


def worker_died(directory: Path, pid: int) -> None:
    """A proxy process ended: its open-WebSocket gauge no longer counts (its counters do)."""
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(directory))


def read(directory: Path) -> core.Snapshot:
    """Every process's cumulative counts per route, as the agent rolls them up."""
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    out: core.Snapshot = {}
    for family in registry.collect():
        _read_family(family.name, family.samples, out)
    return out


def _route_key(name: str, labels: dict[str, str]) -> tuple[core.RouteKey, str] | None:
    for prefix, kind in ((ROUTE_PREFIX, core.ROUTE), (SERVED_PREFIX, core.SERVED)):
        if name.startswith(prefix):
            if kind == core.ROUTE:
                key = core.RouteKey(
                    kind,
                    labels.get("project", ""),
                    labels.get("caller", ""),
                    labels.get("service", ""),
                    labels.get("target", ""),
                    labels.get("node", ""),
                )
            else:
                key = core.RouteKey(
                    kind,
                    labels.get("project", ""),
                    "",
                    labels.get("service", ""),
                    "local",
                    labels.get("caller_node", ""),
                )
            return key, name[len(prefix) :]
    return None


_FIELDS = {
    "request_bytes": "bytes_in",
    "response_bytes": "bytes_out",
    "websocket_connections": "ws_total",
    "retries": "retries",
    "failovers": "failovers",
    "version_warnings": "version_warnings",
    "version_conflicts": "version_conflicts",
}
_BOUND_INDEX = {prometheus_client.utils.floatToGoString(b): i for i, b in enumerate(_BOUNDS)}


def _read_family(name: str, samples: Iterable[Any], out: core.Snapshot) -> None:
    cumulative: dict[core.RouteKey, list[float]] = {}
    for sample in samples:
        found = _route_key(name, sample.labels)
        if found is None:
            continue
        key, metric = found
        stats = out.setdefault(key, core.Stats())
        suffix = sample.name[len(name) :]
        if metric == "requests":
            if suffix == "_total":
                code = sample.labels.get("code", "none")
                stats.codes[code] = stats.codes.get(code, 0) + int(sample.value)
        elif metric == "request_duration_seconds":
            if suffix == "_bucket":
                le = sample.labels.get("le", "+Inf")
                index = _BOUND_INDEX.get(le, len(_BOUNDS))
                cumulative.setdefault(key, [0.0] * (len(_BOUNDS) + 1))[index] = sample.value
            elif suffix == "_sum":
                stats.duration_s = float(sample.value)
        elif metric == "websocket_connections_open":
            stats.ws_open = int(sample.value)
        elif suffix == "_total" and metric in _FIELDS:
            setattr(stats, _FIELDS[metric], int(sample.value))
    for key, running in cumulative.items():
        per = [int(running[0])]
        per += [int(running[i] - running[i - 1]) for i in range(1, len(running))]
        out[key].buckets = per

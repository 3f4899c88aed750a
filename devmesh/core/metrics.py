"""The arithmetic of the proxy's metrics: routes, counts, per-minute rollups, quantiles, rates.

Why pure: the same numbers reach people by three ways (``/metrics``, ``devmesh metrics``, the
graph and the dashboard), from counts gathered by several processes and kept per minute in
SQLite. Keeping the arithmetic here (what a route is, how two counts add and subtract, a
quantile from histogram buckets as Prometheus's ``histogram_quantile`` does, what the error
rate is) means every reader computes the same thing, and tests pin it without a socket or a
clock. Times are passed in, as Unix seconds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds of the latency histogram, in seconds (a last bucket, +Inf, follows)."""

CODE_CLASSES: tuple[str, ...] = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")
"""Status classes; ``none`` is an exchange that ended without an answer (a cut connection)."""

ROUTE = "route"
"""A call this proxy routed (local, to a peer, or to the fallback)."""
SERVED = "served"
"""A call a teammate's node made into this machine's shared service (the peer listener)."""

MINUTE_S = 60
DEFAULT_RETENTION_DAYS = 7.0


class RouteKey(NamedTuple):
    """Who called what, and where it went: the labels of every per-route metric.

    ``kind`` is ROUTE or SERVED. For ROUTE: ``caller`` is ``SERVICE.PROJECT`` of the calling
    service when the call came through its dependency listener (``NAME_URL``), "" for a
    browser or curl; ``target`` is ``local``, ``peer`` or ``fallback``; ``node`` the peer's
    node name (else ""). For SERVED: ``caller`` is "", ``node`` the calling node's name, and
    ``target`` is ``local``.
    """

    kind: str
    project: str
    caller: str
    service: str
    target: str
    node: str


def bucket_index(seconds: float) -> int:
    """The histogram bucket of a duration (``len(BUCKETS_S)`` for +Inf)."""
    return bisect.bisect_left(BUCKETS_S, seconds)


def code_class(status: int) -> str:
    """``2xx`` for 200...; ``none`` when no answer was sent (status 0)."""
    return CODE_CLASSES[status // 100 - 1] if 100 <= status < 600 else "none"


@dataclass(slots=True)
class Stats:
    """Counts of one route over some time: what a rollup row holds.

    ``buckets`` are per bucket (not cumulative), the last one +Inf; ``duration_s`` is the
    sum of the latencies. ``ws_open`` is a level (WebSocket connections open at the end of
    the period), every other field a count.
    """

    codes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    duration_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    ws_total: int = 0
    ws_open: int = 0
    retries: int = 0
    failovers: int = 0
    version_warnings: int = 0
    version_conflicts: int = 0

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def errors(self) -> int:
        """Answers of 5xx, and exchanges cut without an answer (what a caller sees fail)."""
        return self.codes.get("5xx", 0) + self.codes.get("none", 0)

    def empty(self) -> bool:
        return not (
            self.requests
            or self.bytes_in
            or self.bytes_out
            or self.ws_total
            or self.ws_open
            or self.retries
            or self.failovers
            or self.version_warnings
            or self.version_conflicts
        )

    def add(self, other: Stats) -> None:
        """Add ``other``'s counts to these (``ws_open`` takes the later level: ``other``'s)."""
        for code, n in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.duration_s += other.duration_s
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.ws_total += other.ws_total
        self.ws_open = other.ws_open
        self.retries += other.retries
        self.failovers += other.failovers
        self.version_warnings += other.version_warnings
        self.version_conflicts += other.version_conflicts

    def since(self, earlier: Stats) -> Stats:
        """The counts gathered after ``earlier`` was read (both are cumulative counts of the
        same processes); a count that went down means its processes started again, and the
        whole later count is new."""

        def d(now: float, then: float) -> float:
            return now - then if now >= then else now

        return Stats(
            codes={
                c: int(d(n, earlier.codes.get(c, 0)))
                for c, n in self.codes.items()
                if d(n, earlier.codes.get(c, 0))
            },
            buckets=[int(d(a, b)) for a, b in zip(self.buckets, earlier.buckets, strict=True)],
            duration_s=max(0.0, d(self.duration_s, earlier.duration_s)),
            bytes_in=int(d(self.bytes_in, earlier.bytes_in)),
            bytes_out=int(d(self.bytes_out, earlier.bytes_out)),
            ws_total=int(d(self.ws_total, earlier.ws_total)),
            ws_open=self.ws_open,
            retries=int(d(self.retries, earlier.retries)),
            failovers=int(d(self.failovers, earlier.failovers)),
            version_warnings=int(d(self.version_warnings, earlier.version_warnings)),
            version_conflicts=int(d(self.version_conflicts, earlier.version_conflicts)),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "codes": dict(self.codes),
            "buckets": list(self.buckets),
            "duration_s": self.duration_s,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ws_total": self.ws_total,
            "ws_open": self.ws_open,
            "retries": self.retries,
            "failovers": self.failovers,
            "version_warnings": self.version_warnings,
            "version_conflicts": self.version_conflicts,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> Stats:
        """The inverse of ``to_dict``; raises ValueError on a malformed record."""
        try:
            codes = raw.get("codes", {})
            buckets = list(raw.get("buckets") or [])  # type: ignore[call-overload]
            if not isinstance(codes, dict) or len(buckets) != len(BUCKETS_S) + 1:
                raise ValueError("malformed metrics record")
            out = cls(
                codes={str(k): int(v) for k, v in codes.items()},
                buckets=[int(b) for b in buckets],
                duration_s=float(raw.get("duration_s") or 0.0),  # type: ignore[arg-type]
            )
            for name in (
                "bytes_in",
                "bytes_out",
                "ws_total",
                "ws_open",
                "retries",
                "failovers",
                "version_warnings",
                "version_conflicts",
            ):
                setattr(out, name, int(raw.get(name) or 0))  # type: ignore[call-overload]
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed metrics record: {exc}") from None
        return out


Snapshot = dict[RouteKey, Stats]
"""Cumulative counts per route, as read from the proxy's processes at one moment."""


def since(now: Mapping[RouteKey, Stats], baseline: Mapping[RouteKey, Stats]) -> Snapshot:
    """What happened between two snapshots, per route; routes with nothing new are left out
    (except where WebSocket connections are still open)."""
    out: Snapshot = {}
    for key, stats in now.items():
        before = baseline.get(key)
        delta = stats.since(before) if before is not None else stats.since(Stats())
        if not delta.empty():
            out[key] = delta
    return out


def merge(parts: Iterable[Mapping[RouteKey, Stats]]) -> Snapshot:
    """Counts of several periods added per route (in time order, for ``ws_open``)."""
    out: Snapshot = {}
    for part in parts:
        for key, stats in part.items():
            acc = out.setdefault(key, Stats())
            acc.add(stats)
    return out


def minute_of(ts: float) -> int:
    """The start of the minute holding ``ts``, in Unix seconds: a rollup row's time."""
    return int(ts // MINUTE_S) * MINUTE_S


def retention_cutoff(now: float, retention_days: float) -> int:
    """Rollup rows of minutes before this are deleted."""
    return minute_of(now - retention_days * 86400)


def quantile(q: float, buckets: list[int]) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram, in seconds; None with no sample.

    As Prometheus's ``histogram_quantile``: find the bucket holding the rank and interpolate
    linearly inside it (from 0 for the first bucket); a rank in the +Inf bucket answers the
    highest finite bound.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(BUCKETS_S):
                return BUCKETS_S[-1]
            lower = BUCKETS_S[i - 1] if i else 0.0
            upper = BUCKETS_S[i]
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return BUCKETS_S[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSummary:
    """One route's golden numbers over a period: one row of ``devmesh metrics``."""

    key: RouteKey
    requests: int
    rps: float
    error_rate: float | None
    """Errors (5xx and cut exchanges) per request; None with no request."""
    p50_ms: float | None
    p99_ms: float | None
    bytes_in: int
    bytes_out: int
    codes: dict[str, int]
    ws_open: int
    ws_total: int
    retries: int
    failovers: int
    version_warnings: int
    version_conflicts: int

    def to_json(self) -> dict[str, object]:
        """The documented ``devmesh metrics --json`` record of a route (docs/cli.md)."""
        return {
            "kind": self.key.kind,
            "project": self.key.project,
            "service": self.key.service,
            "caller": self.key.caller or None,
            "target": self.key.target,
            "node": self.key.node or None,
            "requests": self.requests,
            "rps": self.rps,
            "error_rate": self.error_rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "codes": {c: self.codes.get(c, 0) for c in CODE_CLASSES},
            "websockets_open": self.ws_open,
            "websockets_total": self.ws_total,
            "retries": self.retries,
            "failovers": self.failovers,
            "version_warnings": self.version_warnings,
            "version_conflicts": self.version_conflicts,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(
    counts: Mapping[RouteKey, Stats], *, seconds: float, service: str | None = None
) -> list[RouteSummary]:
    """Each route's summary over a period of ``seconds``, busiest first (then by name).

    ``service`` keeps the routes to that service: ``NAME`` or ``NAME.PROJECT``.
    """
    period = max(seconds, 1.0)
    rows = []
    for key, s in counts.items():
        if service is not None and service not in (key.service, f"{key.service}.{key.project}"):
            continue
        n = s.requests
        rows.append(
            RouteSummary(
                key=key,
                requests=n,
                rps=round(n / period, 3),
                error_rate=round(s.errors / n, 4) if n else None,
                p50_ms=_ms(quantile(0.5, s.buckets)),
                p99_ms=_ms(quantile(0.99, s.buckets)),
                bytes_in=s.bytes_in,
                bytes_out=s.bytes_out,
                codes=dict(s.codes),
                ws_open=s.ws_open,
                ws_total=s.ws_total,
                retries=s.retries,
                failovers=s.failovers,
                version_warnings=s.version_warnings,
                version_conflicts=s.version_conflicts,
            )
        )
    rows.sort(key=lambda r: (-r.requests, -r.ws_total, r.key))
    return rows


def parse_since(text: str) -> float:
    """``90s``, ``5m``, ``1h``, ``7d`` (or a plain number of seconds) -> seconds.

    Raises ValueError in words when the text is none of these or not positive.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    factor = units.get(raw[-1:])
    number = raw[:-1] if factor else raw
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 5m, 1h or 7d")
    return value

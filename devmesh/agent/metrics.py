"""The agent's side of the metrics: roll the proxy's counts up per minute, keep and query them.

Why here: the proxy's processes count (``proxy.metrics``, into shared files the agent reads
whole, workers included); only the agent lives long enough to keep a history. Every
``WRITE_INTERVAL_S`` (and at a clean stop) it reads the counts, subtracts what it had
already written, and adds the difference to the rollup row of the current minute in SQLite
(``metricsdb``). So ``kill -9`` of the agent loses at most the counts since the last write
(ten seconds, never more than the current minute); a restarted agent starts its counts from
zero again (the shared files are emptied at its start) and keeps the history.

A query (``History.query``) adds the stored rows of the period to the counts not yet
written, so what ``devmesh metrics``, ``devmesh graph`` and the dashboard show is live to
the proxy's flush (a quarter of a second).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from devmesh.agent.metricsdb import MetricsDB
from devmesh.core import metrics as core
from devmesh.proxy import metrics as proxy_metrics

log = logging.getLogger("devmesh.agent.metrics")

WRITE_INTERVAL_S = 10.0
"""How often the counts go to SQLite; what a ``kill -9`` of the agent may lose at most."""
RETENTION_ENV = "DEVMESH_METRICS_RETENTION_DAYS"


def retention_days(environ: Mapping[str, str] | None = None) -> float:
    """``metrics.retention_days`` of the project that started the agent, which `devmesh up`
    passes as DEVMESH_METRICS_RETENTION_DAYS (default 7). Raises ValueError naming the
    variable when it is not a positive number."""
    env = os.environ if environ is None else environ
    raw = env.get(RETENTION_ENV)
    if not raw:
        return core.DEFAULT_RETENTION_DAYS
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not days > 0:
        raise ValueError(f"{RETENTION_ENV}={raw!r} is not a number of days > 0")
    return days


class History:
    """The per-minute history of one agent's proxy (see the module's words)."""

    def __init__(
        self,
        counts_dir: Path,
        db: MetricsDB,
        *,
        retention_days: float = core.DEFAULT_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
        read: Callable[[Path], core.Snapshot] = proxy_metrics.read,
        flush: Callable[[], None] | None = None,
    ) -> None:
        """``counts_dir``: the proxy's shared metrics folder; ``clock``: Unix seconds;
        ``read``: how the proxy's counts are read (``proxy.metrics.read``); ``flush``
        writes the agent's own proxy's buffered counts first (its ``Recorder.flush``: the
        history and the queries are exact for this process, the workers' lag a quarter
        second)."""
        self.counts_dir = counts_dir
        self.db = db
        self.retention_days = retention_days
        self.clock = clock
        self._read_files = read
        self._flush = flush
        self._baseline: core.Snapshot = {}
        self._written_at = clock()

    def _read(self, folder: Path) -> core.Snapshot:
        if self._flush is not None:
            self._flush()
        return self._read_files(folder)

    def write(self) -> None:
        """Add the counts since the last write to the SQLite rollups; drop expired rows.

        The counts go to the minute at the middle of the period they cover (writes are
        aligned to the interval, so a period rarely straddles two minutes).
        """
        now = self.clock()
        snap = self._read(self.counts_dir)
        delta = core.since(snap, self._baseline)
        self.db.add(core.minute_of((self._written_at + now) / 2), delta)
        self._baseline = snap
        self._written_at = now
        self.db.prune(core.retention_cutoff(now, self.retention_days))

    async def run(self, interval_s: float = WRITE_INTERVAL_S) -> None:
        """Write every ``interval_s`` (aligned to the clock) until cancelled; then once more
        (a clean stop loses nothing)."""
        try:
            while True:
                now = self.clock()
                await anyio.sleep(interval_s - now % interval_s)
                self.write()  # a few milliseconds; in the loop, so queries never see half
        finally:
            with anyio.CancelScope(shield=True):
                self.write()
                self.db.close()

    def counts(self, since_s: float, *, now: float | None = None) -> tuple[core.Snapshot, float]:
        """Counts per route over the last ``since_s`` seconds (whole minutes: the period
        starts at the minute holding ``now - since_s``), stored and not yet written; and
        the period's length in seconds."""
        at = self.clock() if now is None else now
        start = core.minute_of(at - since_s)
        stored: dict[int, dict[core.RouteKey, core.Stats]] = {}
        for minute, key, stats in self.db.read(start):
            stored.setdefault(minute, {})[key] = stats
        live = core.since(self._read(self.counts_dir), self._baseline)
        merged = core.merge([*(stored[m] for m in sorted(stored)), live])
        return merged, max(1.0, at - start)

    def query(
        self, since_s: float = 3600.0, *, service: str | None = None, now: float | None = None
    ) -> list[core.RouteSummary]:
        """The routes' golden numbers over the last ``since_s`` seconds, busiest first.

        ``query(since_s: float = 3600.0, *, service: str | None = None, now: float | None =
        None) -> list[core.RouteSummary]``: ``service`` is ``NAME`` or ``NAME.PROJECT``;
        ``now`` (Unix seconds) defaults to the clock. For the last 5 minutes per edge
        (``devmesh graph``, the dashboard): ``query(300)``, and match
        ``summary.key.kind == core.ROUTE`` rows on ``key.caller`` (``SERVICE.PROJECT`` of
        the calling service, "" for a browser), ``key.project``/``key.service`` (the called
        service) and ``key.target``/``key.node`` (local, a peer's node, the fallback);
        ``summary.rps`` and ``summary.error_rate`` are the edge's rates. Calls teammates'
        nodes made here are ``kind == core.SERVED`` rows, ``key.node`` the calling node.
        """
        counts, seconds = self.counts(since_s, now=now)
        return core.summarize(counts, seconds=seconds, service=service)

    def report(
        self, since_s: float = 3600.0, *, service: str | None = None, now: float | None = None
    ) -> dict[str, Any]:
        """``query`` as the documented JSON of ``GET /v1/metrics`` and
        ``devmesh metrics --json`` (docs/cli.md)."""
        at = self.clock() if now is None else now
        rows = self.query(since_s, service=service, now=at)
        start = core.minute_of(at - since_s)
        return {
            "since_s": since_s,
            "from": start,
            "to": at,
            "service": service,
            "retention_days": self.retention_days,
            "routes": [r.to_json() for r in rows],
        }


def disabled_report(since_s: float, service: str | None) -> dict[str, Any]:
    """What ``GET /v1/metrics`` answers when the agent runs with DEVMESH_METRICS=off."""
    return {
        "since_s": since_s,
        "from": None,
        "to": None,
        "service": service,
        "retention_days": None,
        "routes": [],
        "disabled": "metrics are off in this agent (DEVMESH_METRICS=off)",
    }

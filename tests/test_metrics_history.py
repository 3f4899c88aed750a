"""The agent's metrics history: per-minute rollups in SQLite, retention, a corrupt file.

The SQLite file is real; the proxy's counts are a function the test feeds (``read``), and
the clock is injected, so minutes and retention are exact without waiting.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from devmesh.agent import metrics as agent_metrics
from devmesh.agent.metricsdb import MetricsDB
from devmesh.core import metrics as core

KEY = core.RouteKey(core.ROUTE, "shop", "web.shop", "api", "local", "")
DAY = 86400.0


class Counts:
    """The proxy's cumulative counts, as the test sets them."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, _folder: Path) -> core.Snapshot:
        if not self.requests:
            return {}
        return {KEY: core.Stats(codes={"2xx": self.requests}, bytes_out=10 * self.requests)}


def history(
    tmp_path: Path, clock: list[float], counts: Counts, **kw: float
) -> agent_metrics.History:
    db = MetricsDB(tmp_path / "history.db", clock=lambda: clock[0])
    db.open()
    return agent_metrics.History(tmp_path / "counts", db, clock=lambda: clock[0], read=counts, **kw)


def write_at(h: agent_metrics.History, clock: list[float], at: float) -> None:
    """Write at ``at`` what came in just before it (writes go to the minute of the middle of
    the period they cover: a write just before makes that period one second long)."""
    clock[0] = at - 1
    counts = h._read_files
    h._read_files = lambda _f: h._baseline  # nothing new yet
    h.write()
    h._read_files = counts
    clock[0] = at
    h.write()


def stored(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT minute, requests FROM rollups ORDER BY minute").fetchall()


def test_writes_add_up_per_minute_and_a_reopened_file_keeps_them(tmp_path: Path) -> None:
    clock, counts = [1000.0 * 60], Counts()
    h = history(tmp_path, clock, counts)
    counts.requests = 5
    clock[0] += 10
    h.write()
    counts.requests = 8
    clock[0] += 10
    h.write()
    counts.requests = 11
    write_at(h, clock, 60075)  # the next minute
    assert stored(tmp_path / "history.db") == [(60000, 8), (60060, 3)]
    h.db.close()
    # A new agent: its proxy's counts start again from zero; the history stays.
    counts.requests = 2
    again = history(tmp_path, clock, counts)
    (row,) = again.query(3600)
    assert row.requests == 13  # 11 stored + 2 not yet written (live)
    assert row.bytes_out == 130
    assert [r.requests for r in again.query(10)] == [5]  # the current minute: 3 + 2 live
    assert again.report(3600, service="db")["routes"] == []


def test_retention_deletes_rows_older_than_the_setting(tmp_path: Path) -> None:
    clock, counts = [100 * DAY], Counts()
    h = history(tmp_path, clock, counts, retention_days=2)
    counts.requests = 1
    h.write()  # a row at day 100
    counts.requests = 2
    write_at(h, clock, 101 * DAY + 30)  # the day-100 row is 1 day old: kept
    assert len(stored(tmp_path / "history.db")) == 2
    counts.requests = 3
    write_at(h, clock, 102.5 * DAY + 30)  # the day-100 row is 2.5 days old: gone
    minutes = [m for m, _ in stored(tmp_path / "history.db")]
    assert minutes == [core.minute_of(101 * DAY), core.minute_of(102.5 * DAY)]


def test_a_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"this is not a database, whatever its name says\n" * 100)
    caplog.set_level(logging.WARNING, "devmesh.agent.metrics")
    clock, counts = [7200.0], Counts()
    h = history(tmp_path, clock, counts)
    (aside,) = h.db.moved_aside
    assert aside.name == "history.db.corrupt-7200"
    assert aside.read_bytes().startswith(b"this is not a database")
    assert "unreadable" in caplog.text and str(aside) in caplog.text
    counts.requests = 4
    h.write()
    assert stored(path) == [(7200, 4)]


def test_a_file_of_a_newer_schema_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    db_ = MetricsDB(path, clock=lambda: 1.0)
    db_.open()
    assert [p.name for p in db_.moved_aside] == ["history.db.corrupt-1"]
    db_.close()


def test_retention_days_from_the_environment() -> None:
    assert agent_metrics.retention_days({}) == core.DEFAULT_RETENTION_DAYS
    assert agent_metrics.retention_days({agent_metrics.RETENTION_ENV: "0.5"}) == 0.5
    for bad in ("0", "-1", "week"):
        with pytest.raises(ValueError, match=agent_metrics.RETENTION_ENV):
            agent_metrics.retention_days({agent_metrics.RETENTION_ENV: bad})

"""The metrics arithmetic (core.metrics): quantiles from buckets, deltas, rates, durations."""

from __future__ import annotations

import pytest

from devmesh.core import metrics as core

KEY = core.RouteKey(core.ROUTE, "shop", "web.shop", "api", "local", "")


def hist(**at: int) -> list[int]:
    """Buckets with ``at`` samples per bound name (``b0`` is the first bucket)."""
    counts = [0] * (len(core.BUCKETS_S) + 1)
    for name, n in at.items():
        counts[int(name[1:])] = n
    return counts


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    # 100 samples in (0.005, 0.01]: the median is half-way through that bucket.
    buckets = hist(b3=100)
    assert core.quantile(0.5, buckets) == pytest.approx(0.0075)
    assert core.quantile(0.99, buckets) == pytest.approx(0.005 + 0.005 * 0.99)
    # 90 fast, 10 slow: p50 among the fast, p99 in the slow bucket (0.5, 1].
    buckets = hist(b0=90, b9=10)
    assert core.quantile(0.5, buckets) == pytest.approx(0.001 * 50 / 90)
    assert core.quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9 / 10)
    assert core.quantile(0.5, hist()) is None
    # Beyond the last bound: the highest finite bound, as Prometheus answers.
    assert core.quantile(0.99, hist(b15=3)) == core.BUCKETS_S[-1]


def test_bucket_index_and_code_class() -> None:
    assert core.bucket_index(0.001) == 0
    assert core.bucket_index(0.0011) == 1
    assert core.bucket_index(1000) == len(core.BUCKETS_S)
    assert [core.code_class(s) for s in (101, 204, 304, 409, 502, 0)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "none",
    ]


def test_since_subtracts_and_a_restart_counts_everything_again() -> None:
    before = core.Stats(codes={"2xx": 5}, bytes_out=50, ws_open=1)
    now = core.Stats(codes={"2xx": 8, "5xx": 1}, bytes_out=80, ws_open=0)
    delta = now.since(before)
    assert delta.codes == {"2xx": 3, "5xx": 1}
    assert delta.bytes_out == 30
    assert delta.ws_open == 0  # a level, not a count
    restarted = core.Stats(codes={"2xx": 2}, bytes_out=20)
    assert restarted.since(before).codes == {"2xx": 2}
    assert core.since({KEY: now}, {KEY: now}) == {}


def test_summary_rates_errors_and_filter() -> None:
    other = KEY._replace(service="db", caller="")
    counts = {
        KEY: core.Stats(codes={"2xx": 90, "5xx": 6, "none": 4}, buckets=hist(b3=100)),
        other: core.Stats(codes={"2xx": 10}, buckets=hist(b0=10), bytes_in=5),
    }
    rows = core.summarize(counts, seconds=50)
    assert [r.key.service for r in rows] == ["api", "db"]  # busiest first
    api = rows[0]
    assert (api.requests, api.rps, api.error_rate) == (100, 2.0, 0.1)
    assert api.p50_ms == pytest.approx(7.5)
    assert api.to_json()["caller"] == "web.shop"
    assert rows[1].to_json()["caller"] is None
    assert [r.key.service for r in core.summarize(counts, seconds=50, service="db.shop")] == ["db"]
    assert core.summarize(counts, seconds=50, service="db.other") == []


def test_merge_adds_counts_and_keeps_the_latest_open_level() -> None:
    a = {KEY: core.Stats(codes={"2xx": 1}, ws_open=2, ws_total=2)}
    b = {KEY: core.Stats(codes={"2xx": 2}, ws_open=0)}
    merged = core.merge([a, b])[KEY]
    assert (merged.requests, merged.ws_open, merged.ws_total) == (3, 0, 2)


def test_round_trip_of_a_rollup_record_and_malformed_ones() -> None:
    s = core.Stats(codes={"4xx": 2}, buckets=hist(b2=2), duration_s=0.01, retries=1)
    assert core.Stats.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError):
        core.Stats.from_dict({"buckets": [1, 2]})
    with pytest.raises(ValueError):
        core.Stats.from_dict({"codes": [], "buckets": hist()})


def test_minutes_and_retention() -> None:
    assert core.minute_of(125.5) == 120
    assert core.retention_cutoff(10 * 86400 + 30, 7) == 3 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("7d", 604800), ("30", 30)]
)
def test_parse_since(text: str, seconds: float) -> None:
    assert core.parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-5m", "0", "1w", "abc", "nan", "inf"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        core.parse_since(text)

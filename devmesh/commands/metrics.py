"""`devmesh metrics`: the busiest routes through the proxy, with their golden numbers.

Why from the agent: the proxy's processes count, and the agent keeps the per-minute history
(SQLite, across its restarts) and adds the counts not yet written, so the answer is live.
Like `status`, it imports the control client only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh metrics                   # the last hour, busiest route first
  devmesh metrics --since 5m --service api
  devmesh metrics --json | jq '.routes[] | select(.error_rate > 0.01)'
"""
COLUMNS = ("SERVICE", "FROM", "TO", "REQS", "RPS", "ERR%", "P50", "P99", "IN", "OUT")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "metrics",
        help="show the busiest routes: requests, rate, errors, latency, bytes",
        description="Show every route the proxy served over a period, busiest first: the "
        "called service, its caller, where the calls went (local, a peer's node, the "
        "fallback), requests, requests per second, error rate (5xx and cut connections), "
        "p50 and p99 latency, and bytes in and out. Calls teammates' nodes made to this "
        "machine's shared services are listed with FROM 'node NAME'. The history is kept "
        "per minute for metrics.retention_days (7 by default).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--since",
        default="1h",
        metavar="DURATION",
        help="the period: 90s, 5m, 1h, 7d (default 1h; whole minutes)",
    )
    p.add_argument("--service", metavar="NAME", help="only calls to NAME (or NAME.PROJECT)")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md)")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    from devmesh.core import metrics as core

    try:
        core.parse_since(args.since)
    except ValueError as exc:
        raise _common.CommandError(f"--since: {exc}", _common.EXIT_USAGE) from None
    h = _common.home()
    query = {"since": args.since}
    if args.service:
        query["service"] = args.service
    try:
        data = _common.client(h, timeout_s=10).request("GET", "/v1/metrics", query=query)
    except _common.AgentUnreachable:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"The devmesh agent is not running (no answer on {h.socket}).")
        return _common.EXIT_OK
    if args.json:
        print(json.dumps(data, indent=2))
        return _common.EXIT_OK
    render(data, sys.stdout, since=args.since)
    return _common.EXIT_OK


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}ms" if value < 1000 else f"{value / 1000:.2f}s"


def _to(row: dict[str, Any]) -> str:
    if row.get("kind") == "served":
        return "here"
    if row.get("target") == "peer":
        return f"peer {row.get('node')}"
    return str(row.get("target"))


def _from(row: dict[str, Any]) -> str:
    if row.get("kind") == "served":
        return f"node {row.get('node')}"
    return str(row.get("caller") or "-")


def render(data: dict[str, Any], out: Any, *, since: str) -> None:
    if data.get("disabled"):
        print(str(data["disabled"]), file=out)
        return
    rows = data.get("routes") or []
    start = data.get("from")
    when = time.strftime("%H:%M", time.localtime(start)) if start else "?"
    what = f" to {data['service']}" if data.get("service") else ""
    if not rows:
        print(f"No calls{what} through the proxy in the last {since} (since {when}).", file=out)
        return
    print(f"Calls{what} through the proxy in the last {since} (since {when}):", file=out)
    table = [COLUMNS]
    for r in rows:
        rate = r.get("error_rate")
        table.append(
            (
                f"{r['service']}.{r['project']}",
                _from(r),
                _to(r),
                str(r["requests"]),
                f"{r['rps']:.2f}",
                "-" if rate is None else f"{rate * 100:.1f}",
                _ms(r.get("p50_ms")),
                _ms(r.get("p99_ms")),
                _bytes(int(r.get("bytes_in") or 0)),
                _bytes(int(r.get("bytes_out") or 0)),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    numeric = set(range(3, len(COLUMNS)))
    for row in table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip(), file=out)

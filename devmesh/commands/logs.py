"""`devmesh logs`: print (and follow) services' logs, or the proxy's access log.

The agent does the work: it knows when each line was written (see docs/cli.md, "Log
times"), merges several services' lines in time order and filters ``--since``; this command
parses the flags and prints. ``-f`` is ``--follow`` here, as in compose; the file is
``--file`` or the global ``devmesh -f FILE logs``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
import time
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh logs                   every service of ./devmesh.yaml's project, in time order
  devmesh logs -f --tail 20 api  follow api, starting with its last 20 lines
  devmesh logs -t --since 10m    the last ten minutes, each line with its time
  devmesh logs --since 2026-12-03T07:00:00 web worker
  devmesh logs --proxy           the proxy's access log
"""

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_since(text: str, now_s: float) -> float:
    """``--since`` as a unix time, accepting what ``docker logs --since`` does.

    A duration before ``now_s`` (``10m``, ``1h30m``, ``1.5h``, ``90s``), an RFC 3339 time
    (``2026-12-03T07:00:00Z``, with an offset, or without one meaning local time, or just a
    date) or a unix timestamp (``1764745200.5``). Raises ValueError naming what it expected.
    """
    value = text.strip()
    if value and _DURATION.sub("", value) == "" and _DURATION.match(value):
        total = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(value))
        return now_s - total
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"expected a duration (10m, 1h30m, 45s) or a time (2026-12-03T07:00:00, "
            f"RFC 3339, or a unix timestamp), got {text!r}"
        ) from None
    return moment.timestamp()  # a naive time is local time, as docker reads it


def _since_arg(text: str) -> float:
    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tail_arg(text: str) -> int | None:
    if text == "all":
        return None
    n = int(text) if text.isdigit() else -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of lines or 'all', got {text!r}")
    return n


def format_time(time_s: float | None) -> str:
    """RFC 3339 in UTC to the millisecond, as precise as the times are (docs/cli.md)."""
    if time_s is None:
        return "-" * 24
    # Floor to the millisecond in integers: fromtimestamp rounds to the microsecond, which can
    # carry X.1239996 into .124 and show a time later than the line's.
    whole_ms = math.floor(time_s * 1000)
    moment = datetime.datetime.fromtimestamp(whole_ms // 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{whole_ms % 1000:03d}Z"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "logs",
        help="show services' logs",
        description="Show the logs of a project's services (all projects when no devmesh.yaml "
        "is found and no -p is given). Several services' lines come out in the order they "
        "were written.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common.add_file_arg(p, "--file")  # here -f means --follow, as in compose
    _common.add_project_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "-n",
        "--tail",
        type=_tail_arg,
        default=None,
        metavar="N",
        help="the last N lines of each service, or 'all' (default: all)",
    )
    p.add_argument(
        "-t", "--timestamps", action="store_true", help="show when each line was written"
    )
    p.add_argument(
        "--since",
        type=_since_arg,
        default=None,
        metavar="WHEN",
        help="only lines written since WHEN: a duration (10m, 1h30m) or a time "
        "(2026-12-03T07:00:00, RFC 3339)",
    )
    p.add_argument("--proxy", action="store_true", help="the proxy's access log instead")
    p.add_argument("--json", action="store_true", help="with --proxy: JSON lines, one per request")
    p.add_argument("services", nargs="*", metavar="SERVICE")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def _project(args: argparse.Namespace) -> str | None:
    if args.project:
        return str(args.project)
    if args.file:
        return _common.project_name(args)
    from pathlib import Path

    from devmesh.config import loader

    try:
        loader.find_config(Path.cwd())
    except loader.ConfigNotFound:
        return None
    return _common.project_name(args)


def run(args: argparse.Namespace) -> int:
    project = None if args.proxy else _project(args)
    client = _common.client(timeout_s=30)
    if project is not None:
        applied = _common.applied_projects(client)
        if project not in applied:
            raise _common.unknown_project(project, applied)
    query = {"tail": "all" if args.tail is None else str(args.tail)}
    if project:
        query["project"] = project
    if args.services:
        query["services"] = ",".join(args.services)
    if args.follow:
        query["follow"] = "1"
    if args.since is not None:
        query["since"] = repr(args.since)
    if args.proxy:
        query["proxy"] = "1"
        if not args.json:
            query["format"] = "text"
    colour = _common.use_colour(sys.stdout)
    colours: dict[str, str] = {}
    multi = len(args.services) != 1 and not args.proxy
    for item in client.stream("GET", "/v1/logs", query=query):
        if item.get("ready"):
            continue
        line = item["line"]
        if args.timestamps:
            line = f"{format_time(item.get('time'))} {line}"
        if multi:
            name = item["service"]
            code = colours.setdefault(name, _common.colour_for(len(colours)))
            line = f"{_common.paint(name + ' |', code, colour)} {line}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return _common.EXIT_OK

"""`devmesh logs`: print (and follow) services' logs, or the proxy's access log."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh logs                  every service of ./devmesh.yaml's project
  devmesh logs -f --tail 20 api follow api, starting with its last 20 lines
  devmesh logs --proxy          the proxy's access log
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "logs",
        help="show services' logs",
        description="Show the logs of a project's services (all projects when no devmesh.yaml "
        "is found and no -p is given).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--file", metavar="FILE", help="devmesh.yaml to use (-f means --follow here)")
    _common.add_project_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "--tail", type=int, default=None, metavar="N", help="last N lines (default: all)"
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
    query = {"tail": str(args.tail if args.tail is not None else 1_000_000)}
    if project:
        query["project"] = project
    if args.services:
        query["services"] = ",".join(args.services)
    if args.follow:
        query["follow"] = "1"
    if args.proxy:
        query["proxy"] = "1"
    colour = _common.use_colour(sys.stdout)
    colours: dict[str, str] = {}
    multi = len(args.services) != 1 and not args.proxy
    for item in client.stream("GET", "/v1/logs", query=query):
        if item.get("ready"):
            continue
        line = item["line"]
        if args.proxy and not args.json:
            line = _access_text(line)
        if multi:
            name = item["service"]
            code = colours.setdefault(name, _common.colour_for(len(colours)))
            line = f"{_common.paint(name + ' |', code, colour)} {line}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return _common.EXIT_OK


def _access_text(line: str) -> str:
    """The agent keeps the access log as JSON lines; people read them as text."""
    import json

    from devmesh.proxy import accesslog

    try:
        return accesslog.format_text(accesslog.Entry(**json.loads(line)))
    except (ValueError, TypeError):
        return line

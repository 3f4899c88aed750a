"""`devmesh down`: stop a project's services (dependents first) and forget the project."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh down           stop every service of ./devmesh.yaml's project
  devmesh down api       stop only api
  devmesh down -p shop   stop project shop, wherever its file is
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "down",
        help="stop the project's services",
        description="Stop the project's services, dependents first. Other projects applied "
        "to the same agent are not touched.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common.add_file_arg(p)
    _common.add_project_arg(p)
    p.add_argument("services", nargs="*", metavar="SERVICE", help="only these services")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    project = _common.project_name(args)
    h = _common.home()
    client = _common.client(h, timeout_s=3600)
    if not _common.agent_running(client):
        print(f"The devmesh agent is not running: nothing to stop for {project}.", file=sys.stderr)
        return _common.EXIT_OK
    with _common.project_lock(h, project):
        result = client.request(
            "POST", "/v1/down", {"project": project, "services": args.services or None}
        )
    if not result.get("known"):
        print(f"Project {project} is not applied to this agent; nothing to stop.", file=sys.stderr)
        return _common.EXIT_OK
    stopped = result.get("stopped") or []
    what = ", ".join(stopped) if stopped else "nothing was running"
    print(f"Project {project}: stopped {what}.", file=sys.stderr)
    return _common.EXIT_OK

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
  devmesh down --volumes stop it and delete its databases' data
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
    p.add_argument(
        "-v",
        "--volumes",
        action="store_true",
        help="also delete the data of their databases (asks first on a terminal)",
    )
    p.add_argument("-y", "--yes", action="store_true", help="with --volumes: do not ask, delete")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    """Stop a project, or some of its services; exit 1 naming what does not exist.

    A project named with ``-p`` must be applied to a running agent; one read from a file exists
    by definition (stopping it when nothing runs is fine, as with compose). With no agent
    running nothing can be checked and nothing runs: exit 0, so cleanup scripts stay simple.
    Named services must belong to the project: its file when one was read, else what the
    agent knows of it.
    """
    file_services: list[str] | None = None
    if getattr(args, "project", None):
        project = str(args.project)
    else:
        proj = _common.load(args).project
        project, file_services = proj.name, list(proj.services)
    if file_services is not None and args.services:
        unknown = [s for s in args.services if s not in file_services]
        if unknown:
            raise _common.unknown_services(unknown, project, file_services)
    volumes = bool(getattr(args, "volumes", False))
    if volumes and not _confirmed(args, project):
        print("Nothing was stopped or deleted.", file=sys.stderr)
        return _common.EXIT_FAILED
    h = _common.home()
    client = _common.client(h, timeout_s=3600)
    if not _common.agent_running(client):  # nothing runs: stopping is done, whatever it names
        if volumes:
            _common.ensure_agent(h)  # the agent owns the data it deletes
        else:
            print(
                f"The devmesh agent is not running: nothing to stop for {project}.",
                file=sys.stderr,
            )
            return _common.EXIT_OK
    applied = _common.applied_projects(client)
    if project not in applied:
        if file_services is None and not volumes:
            raise _common.unknown_project(project, applied)
        if not volumes:
            print(
                f"Project {project} is not applied to this agent; nothing to stop.",
                file=sys.stderr,
            )
            return _common.EXIT_OK
    if file_services is None and args.services:
        unknown = [s for s in args.services if s not in applied[project]]
        if unknown:
            raise _common.unknown_services(unknown, project, applied[project])
    with _common.project_lock(h, project):
        result = client.request(
            "POST",
            "/v1/down",
            {"project": project, "services": args.services or None, "volumes": volumes},
        )
    stopped = result.get("stopped") or []
    what = ", ".join(stopped) if stopped else "nothing was running"
    print(f"Project {project}: stopped {what}.", file=sys.stderr)
    if volumes:
        print(f"Project {project}: deleted the databases' data.", file=sys.stderr)
    return _common.EXIT_OK


def _confirmed(args: argparse.Namespace, project: str) -> bool:
    """Whether to delete data: yes unless a person at a terminal says otherwise.

    As compose does, scripts (stdin not a terminal) are never asked; ``--yes`` skips it.
    """
    if args.yes or not sys.stdin.isatty():
        return True
    which = ", ".join(args.services) if args.services else "every service"
    try:
        answer = input(f"Delete the database data of {which} of project {project}? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")

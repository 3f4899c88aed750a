"""`devmesh run`: one service (with its dependencies) from the file, or an ad hoc command.

The ad hoc form registers a service that has no devmesh.yaml, e.g. a prototype you want
teammates to reach: ``devmesh run api --port 8001 --version 1.2.0 -- python -m api``. It
becomes a project of its own, named after the service, so ``devmesh down -p api`` stops it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from devmesh.commands import _common, up

EXAMPLE = """example:
  devmesh run web                       web from ./devmesh.yaml, with what it depends on
  devmesh run echo --port 8005 --version 0.1.0 -- python3 -m http.server 8005
  devmesh run echo -d -- python3 -m http.server ${PORT}
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run one service (from the file, or an ad hoc command after --)",
        description="Start the agent and one service with its dependencies. With a command "
        "after --, no file is needed: the command is registered as service NAME.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_up_args(p)
    p.add_argument(
        "--port", default=None, help="ad hoc: the port the command listens on (default auto)"
    )
    p.add_argument(
        "--version", dest="svc_version", default="0.0.0", help="ad hoc: its semver version"
    )
    p.add_argument("--share", action="store_true", help="ad hoc: make it routable to peers")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    # cli.main splits the command line at `--`; what follows is the ad hoc command.
    if args.rest is not None:
        command = args.rest
        name = args.services[0] if len(args.services) == 1 else ""
        if not command or not name:
            raise _common.CommandError(
                "usage: devmesh run NAME [--port P] [--version V] -- CMD [ARGS...]",
                _common.EXIT_USAGE,
            )
        return _adhoc(args, name, command)
    if len(args.services) != 1:
        raise _common.CommandError(
            "name exactly one service: devmesh run SERVICE", _common.EXIT_USAGE
        )
    return up.run(args)


def _adhoc(args: argparse.Namespace, name: str, command: list[str]) -> int:
    from devmesh.config import loader
    from devmesh.core import model

    port: Any = "auto"
    if args.port is not None:
        try:
            port = int(args.port)
        except ValueError:
            raise _common.CommandError(
                f"--port: expected a port number, got {args.port!r}", _common.EXIT_USAGE
            ) from None
    doc = {
        "version": 1,
        "project": name,
        "services": {
            name: {
                "version": args.svc_version,
                "command": command,
                "port": port,
                "share": args.share,
            }
        },
    }
    import json

    try:
        loaded = loader.load(os.path.join(os.getcwd(), "<command line>"), text=json.dumps(doc))
    except loader.ConfigError as exc:
        raise _common.CommandError(str(exc)) from exc
    proj = loaded.project
    return up.apply_and_follow(
        args,
        project=proj.name,
        document=model.to_document(proj),
        directory=proj.directory,
        source="<command line>",
        services=None,
        log_services=[proj.name],
        agent_env=_common.proxy_env(proj.proxy, proj.metrics),
    )

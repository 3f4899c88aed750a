"""`devmesh agent`: run the agent in the foreground (`devmesh up` starts one when none runs)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the devmesh agent in the foreground",
        description="Run this user's devmesh agent in the foreground until SIGTERM or Ctrl-C, "
        "which stop every service it runs. DEVMESH_HOME (default ~/.devmesh) holds its "
        "socket, state and logs.",
        epilog="example:\n  DEVMESH_HOME=/tmp/dm devmesh agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devmesh.agent import daemon
    from devmesh.agent.paths import Home

    return daemon.run(Home.from_env())

"""`devmesh graph`: who runs what where, and where each call goes, as text, DOT, Mermaid or JSON.

Why a command of its own next to `status`: `status` lists; the graph joins the same facts
(this machine's services, the teammates' shared ones, route selection's decision for every
dependency edge, the traffic of the last five minutes) into one picture that can be read in
a terminal, rendered by Graphviz or pasted into Markdown. The agent builds the document
(``GET /v1/graph``, core.graph); the renderings are core.graphrender's, pure. Like `status`
it shows every applied project unless ``-p``/``-f`` names one, and never starts the agent.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devmesh.commands import _common

FORMATS = ("text", "dot", "mermaid", "json")
EXAMPLE = """example:
  devmesh graph                              machines, services and calls, for a terminal
  devmesh graph --format dot | dot -Tsvg > mesh.svg
  devmesh graph --format mermaid >> README.md   (inside a ```mermaid block)
  devmesh -p shop graph --format json | jq '.edges[] | select(.mismatch)'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "graph",
        help="draw the services, where each call goes, and its traffic",
        description="Show the services of this machine and of the teammates' agents it "
        "sees, grouped by machine, every dependency of the local services with its range, "
        "the instance that serves it now (local, a peer, the fallback, or nowhere and why), "
        "version mismatches, and each call path's requests per second and error rate over "
        "the last 5 minutes. Every applied project unless -p/-f names one.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text (80 columns, default), dot (Graphviz), mermaid (Markdown), json "
        "(the contract in docs/cli.md)",
    )
    _common.add_project_arg(p)
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    h = _common.home()
    if getattr(args, "project_file", None) and not args.project:  # `devmesh -f FILE graph`
        args.project = _common.project_name(args)
    query = {"project": args.project} if args.project else None
    try:  # no agent: run_command says so as every command that needs one does (exit 3)
        doc = _common.client(h, timeout_s=10).request("GET", "/v1/graph", query=query)
    except _common.ApiError as exc:
        if exc.status == 404:  # an unknown project: named, with those that exist
            raise _common.CommandError(exc.message) from None
        raise
    if args.format == "json":
        print(json.dumps(doc, indent=2))
        return _common.EXIT_OK
    from devmesh.core import graphrender

    sys.stdout.write(graphrender.RENDERERS[args.format](doc))
    return _common.EXIT_OK

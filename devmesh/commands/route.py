"""`devmesh route SERVICE`: where a call to SERVICE would go now, and why.

Why a command of its own: "why did my call land on Ben's laptop?" is the question the mesh
raises most, and the answer depends on live state (health, down marks, what peers
announce) that only the agent holds. The agent replays route selection against its current
table without advancing any round-robin cursor (``GET /v1/route``), so asking changes
nothing; this command renders the decision and turns its outcome into an exit status a
script can test: 0 routed, 1 the call would get 409 or 502, 2 usage or an unknown name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh route api                  where a call from a browser or curl goes
  devmesh route api --caller web     where web's calls through API_URL go
  devmesh route api --branch feat/x  the same for a call with X-Devmesh-Branch: feat/x
  devmesh route api --json | jq .verdicts
"""

EXIT_ROUTED = 0
EXIT_REFUSED = 1
"""The call would be answered by devmesh itself: 409 (versions: reject) or 502 (no route)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "route",
        help="explain where a call to a service goes now, and why",
        description="Explain where a call to SERVICE would go now (this machine, a "
        "teammate's agent or the fallback), why every other candidate was skipped, and in "
        "which order the rest would be tried. Asks the agent; changes nothing.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("service", metavar="SERVICE", help="the service called")
    p.add_argument(
        "--caller",
        metavar="C",
        help="the calling service of the project (its depends_on range applies); "
        "default: no caller, as a browser or curl",
    )
    p.add_argument(
        "--branch",
        metavar="B",
        help="the branch the call names (X-Devmesh-Branch); default: the default namespace",
    )
    p.add_argument("--json", action="store_true", help="print the agent's JSON (docs/cli.md)")
    _common.add_project_arg(p)
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    if args.branch is not None:
        from devmesh.core import branches

        problem = branches.problem(args.branch)
        if problem is not None:
            raise _common.CommandError(f"--branch: {problem}", _common.EXIT_USAGE)
    try:
        project = _common.project_name(args)
    except _common.CommandError as exc:  # no devmesh.yaml here: say to use -p
        raise _common.CommandError(
            f"{exc}; or name an applied project with -p NAME", _common.EXIT_USAGE
        ) from None
    query = {"project": project, "service": args.service}
    if args.caller:
        query["caller"] = args.caller
    if args.branch is not None:
        query["branch"] = args.branch
    try:  # no agent: run_command says so as every command that needs one does (exit 3)
        data = _common.client(timeout_s=10).request("GET", "/v1/route", query=query)
    except _common.ApiError as exc:
        if exc.status in (400, 404):  # an invalid branch; an unknown project or service
            raise _common.CommandError(exc.message, _common.EXIT_USAGE) from None
        raise
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render(data, sys.stdout)
    return EXIT_ROUTED if data.get("outcome") == "route" else EXIT_REFUSED


def headline(data: dict[str, Any]) -> str:
    """``web → api: node-b api 2.3.0 (^2.1 ok)``: the caller, the service, the decision.

    A dependency that another project runs is named with it: ``web → shop-api/api: ...``.
    """
    caller = data.get("caller") or "(no caller)"
    branch = f" [branch {data['branch']}]" if data.get("branch") else ""
    head = f"{caller} → {called(data)}{branch}"
    outcome = data.get("outcome")
    if outcome == "reject":
        return f"{head}: rejected with {data.get('status') or 409}: {data.get('message')}"
    if outcome != "route":
        return f"{head}: no route, {data.get('status') or 502}: {data.get('message')}"
    for verdict in data.get("verdicts") or []:
        reason = str(verdict.get("reason") or "")
        if reason.startswith("chose "):
            return f"{head}: {reason.removeprefix('chose ')}"
    return f"{head}: {where(data)}"


def called(entry: dict[str, Any]) -> str:
    """The service called, ``PROJECT/SERVICE`` when another project than the caller's runs it."""
    service = str(entry.get("service"))
    owner = entry.get("target_project")
    return f"{owner}/{service}" if owner and owner != entry.get("project") else service


def where(entry: dict[str, Any]) -> str:
    """Where a decision sends calls, from its fields: ``node-b api 2.3.0``, ``fallback``."""
    target = entry.get("target")
    service = entry.get("service") or ""
    if target == "fallback":
        return "fallback" + (f" {entry['url']}" if entry.get("url") else "")
    if target not in ("local", "peer"):
        return "nowhere"
    who = "local" if target == "local" else entry.get("node") or "peer"
    text = f"{who} {service}" + (f" {entry['version']}" if entry.get("version") else "")
    return text + (f" (branch {entry['branch']})" if entry.get("branch") else "")


def render(data: dict[str, Any], out: Any) -> None:
    """The headline, then every candidate's verdict in the order considered."""
    print(headline(data), file=out)
    for verdict in data.get("verdicts") or []:
        print(f"  {verdict.get('reason')}", file=out)
    if data.get("outcome") == "route" and data.get("url"):
        print(f"  ({data.get('target')} at {data['url']})", file=out)
    if data.get("warning"):
        print(f"warning: {data['warning']}", file=out)

"""`devmesh plan`: what `devmesh up` would do, and why, without doing it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh plan
  devmesh plan --json web
  devmesh plan --no-deps web     web alone; what its dependencies' calls go to instead
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="show what `up` would start, restart or stop, and why",
        description="A dry run of `devmesh up`: the reconciler's actions with the reason for each.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common.add_file_arg(p)
    _common.add_project_name_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--no-deps",
        action="store_true",
        help="as `up --no-deps`: only the SERVICEs named, not their dependencies",
    )
    p.add_argument("services", nargs="*", metavar="SERVICE")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    loaded = _common.load(args)
    proj = loaded.project
    from devmesh.core import model

    if args.no_deps and not args.services:
        raise _common.CommandError(
            "--no-deps starts only the services named: name them (devmesh plan --no-deps web)",
            _common.EXIT_USAGE,
        )
    client = _common.client()
    if _common.agent_running(client):
        result = client.request(
            "POST",
            "/v1/apply",
            {
                "document": model.to_document(proj),
                "directory": proj.directory,
                "source": proj.source,
                "services": args.services or None,
                "no_deps": args.no_deps,
                "base_env": dict(os.environ),
                "dry_run": True,
            },
        )
    else:
        result = offline_plan(proj, args.services or None, no_deps=args.no_deps)
    remote = remote_notes(proj)
    result["remote"] = [{"service": n, "reason": why} for n, why in remote.items()]
    if args.json:
        print(json.dumps(result, indent=2))
        return _common.EXIT_OK
    note = "" if result.get("agent", True) else " (the agent is not running: nothing runs yet)"
    print(f"Project {result['project']}{note}:")
    if not result["actions"]:
        print("  nothing to do: everything is up to date")
    for a in result["actions"]:
        print(f"  {a['service']}: {a['action']} - {a['reason']}")
    for name, why in remote.items():
        print(f"  {name}: remote - {why}")
    for r in result.get("routed", []):
        print(f"  {r['service']}: {'leave' if r['running'] else 'route'} - {r['reason']}")
    for w in result.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    return _common.EXIT_OK


def remote_notes(proj: Any) -> dict[str, str]:
    """Each ``remote: true`` service, with where its calls go: `up` never starts it."""
    out = {}
    for name, svc in proj.services.items():
        if not svc.remote:
            continue
        elsewhere = "a teammate's shared instance" + (
            f", else its fallback {svc.fallback}"
            if svc.fallback
            else " (no fallback: 502 when none answers)"
        )
        database = "; its database is not provisioned" if svc.db is not None else ""
        out[name] = f"not run on this machine (remote: true): calls go to {elsewhere}{database}"
    return out


def offline_plan(proj: Any, services: list[str] | None, *, no_deps: bool = False) -> dict[str, Any]:
    """The plan against an empty machine, computed here: ports of `auto` services are unknown."""
    import time

    from devmesh.core import desired, plan

    unknown = [s for s in services or () if s not in proj.services]
    if unknown:
        raise _common.CommandError(
            f"no such service {', '.join(map(repr, unknown))} in project {proj.name} "
            f"(services: {', '.join(proj.services)})"
        )
    enabled = desired.enabled_closure(proj, services, no_deps=no_deps)
    ports = {n: s.port for n, s in proj.services.items() if s.port is not None}
    urls = {n: desired.dependency_urls(proj, s, ports) for n, s in proj.services.items()}
    wants = desired.wants_for(proj, enabled, ports, urls)
    p = plan.plan(wants, {}, time.time())
    return {
        "project": proj.name,
        "agent": False,
        "services": sorted(enabled),
        "actions": [
            {"service": a.key[1], "action": a.verb.value, "reason": a.reason} for a in p.actions
        ],
        "warnings": [],
        "routed": [
            {
                "service": r.service,
                "callers": list(r.callers),
                "running": r.running,
                "reason": r.words(proj),
            }
            for r in (desired.routed_instead(proj, services or [], enabled) if no_deps else [])
        ],
    }

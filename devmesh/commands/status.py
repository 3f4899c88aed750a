"""`devmesh status` (alias `ps`): the services this agent runs, as a table or JSON.

Kept lean on purpose: it imports the control client only, never the config loader, because
people run it in loops and prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devmesh.commands import _common, route

EXAMPLE = """example:
  devmesh status
  devmesh ps --json | jq '.services[] | select(.state != "running")'
"""
COLUMNS = (
    "PROJECT",
    "NAME",
    "VERSION",
    "STATE",
    "HEALTH",
    "PID",
    "PORT",
    "URL",
    "UPTIME",
    "RESTARTS",
)


def register(sub: Any) -> None:
    for name in ("status", "ps"):
        p = sub.add_parser(
            name,
            help="show services, their state and where they answer"
            + (" (alias of status)" if name == "ps" else ""),
            description="Show every service the agent runs or waits for, across projects.",
            epilog=EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md)")
        _common.add_project_arg(p)
        p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    h = _common.home()
    if getattr(args, "project_file", None) and not args.project:  # `devmesh -f FILE status`
        args.project = _common.project_name(args)
    query = {"project": args.project} if args.project else None
    try:
        data = _common.client(h, timeout_s=10).request("GET", "/v1/status", query=query)
    except _common.AgentUnreachable:
        if args.json:
            print(json.dumps({"services": [], "peers": [], "routes": [], "agent": None}))
        else:
            print(f"The devmesh agent is not running (no answer on {h.socket}).")
            print("`devmesh up` starts it.")
        return _common.EXIT_OK
    if args.project and args.project not in (data.get("agent") or {}).get("projects", []):
        raise _common.unknown_project(args.project, data["agent"]["projects"])
    if args.json:
        print(json.dumps(data, indent=2))
        return _common.EXIT_OK
    render(data, sys.stdout)
    return _common.EXIT_OK


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


PEER_COLUMNS = ("NODE", "PROJECT", "NAME", "VERSION", "BRANCH", "HEALTH", "PEER")


def render(data: dict[str, Any], out: Any) -> None:
    services = data.get("services") or []
    if not services:
        print("No services. `devmesh up` in a folder with a devmesh.yaml starts some.", file=out)
    else:
        _render_local(data, services, out)
    if data.get("mesh_off"):
        hint = " (`devmesh mesh join FILE` or `devmesh mesh init`)"
        joined = "not joined a team" not in data["mesh_off"]
        print(f"\nmesh off: {data['mesh_off']}" + ("" if joined else hint), file=out)
    _render_peers(data.get("peers") or [], out)


def _table(rows: list[tuple[str, ...]], out: Any) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    colour = _common.use_colour(out)
    for i, row in enumerate(rows):
        line = "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip()
        print(_common.paint(line, "1", colour) if i == 0 else line, file=out)


def _render_peers(peers: list[dict[str, Any]], out: Any) -> None:
    """The services teammates share, below the local ones and in the same terms."""
    if not peers:
        return
    rows: list[tuple[str, ...]] = [PEER_COLUMNS]
    for p in peers:
        where = f"{p['state']}, {p['address']}, seen {p['last_seen_s']:.1f}s ago"
        for s in p.get("services") or []:
            rows.append(
                (
                    p.get("display_name") or p["name"],
                    s["project"],
                    s["name"],
                    s.get("version") or "-",
                    s.get("branch") or "-",
                    s.get("health") or "-",
                    where,
                )
            )
        if not p.get("services"):
            name = p.get("display_name") or p["name"]
            rows.append((name, "-", "-", "-", "-", "-", f"{where}; shares nothing"))
    print("\nSHARED BY PEERS", file=out)
    _table(rows, out)


def _render_routes(routes: list[dict[str, Any]], out: Any) -> None:
    """Per project, each ``caller → service``, where its calls go now and why.

    ``web → api  node-b api 2.3.0  (^2.1 ok)`` (``web → shop-api/api  ...`` when another
    project runs the dependency); a decision that warns (a version outside
    the caller's range) is marked ``!`` and followed by the warning; one that would answer
    409 or 502 says so. The words come from route selection itself, as `devmesh route`
    prints them.
    """
    if not routes:
        return
    print("\nROUTES", file=out)
    by_project: dict[str, list[dict[str, Any]]] = {}
    for r in routes:
        by_project.setdefault(str(r.get("project")), []).append(r)
    for project, rows in by_project.items():
        print(f"{project}", file=out)
        edges = [f"{r.get('caller')} → {route.called(r)}" for r in rows]
        width = max(len(e) for e in edges)
        for edge, r in zip(edges, rows, strict=True):
            goes, why = _route_words(r)
            mark = "!" if r.get("warning") else " "
            line = f"{mark} {edge.ljust(width)}  {goes}" + (f"  {why}" if why else "")
            print(line.rstrip(), file=out)
            if r.get("warning"):
                print(f"    warning: {r['warning']}", file=out)


def _route_words(r: dict[str, Any]) -> tuple[str, str]:
    """(where calls go, why): the chosen candidate's words first, then the others' reasons.

    ``url`` of a status route is the caller's NAME_URL, not where calls go: the fallback's
    URL is read from the decision's own words instead.
    """
    reason = str(r.get("reason") or "")
    if r.get("warning"):  # printed on a line of its own
        reason = reason.removesuffix(f" (warning: {r['warning']})")
    goes = route.where({**r, "url": None})
    parts = reason.split("; ") if reason else []
    if r.get("target") == "fallback":
        named = next((p for p in parts if p.startswith("chose fallback ")), "")
        goes = "fallback " + named.removeprefix("chose fallback ") if named else goes
    lead = f"chose {goes}"
    chosen = next((p for p in parts if p == lead or p.startswith(lead + " ")), None)
    if chosen is None:
        return goes, f"({reason})" if reason else ""
    words = chosen.removeprefix(lead).strip()
    words = words[1:-1] if words.startswith("(") and words.endswith(")") else words
    others = "; ".join(p for p in parts if p is not chosen)
    why = "; ".join(w for w in (f"({words})" if words else "", others) if w)
    return goes, why


def _render_local(data: dict[str, Any], services: list[dict[str, Any]], out: Any) -> None:
    table: list[tuple[str, ...]] = [COLUMNS]
    for r in services:
        table.append(
            (
                r["project"],
                r["name"],
                r.get("version") or "-",
                r["state"],
                r.get("health") or "-",
                str(r["pid"]) if r.get("pid") else "-",
                str(r["port"]) if r.get("port") else "-",
                r.get("url") or "-",
                _uptime(r.get("uptime_s")),
                str(r.get("restarts", 0)),
            )
        )
    _table(table, out)
    _render_routes(data.get("routes") or [], out)
    notes = [
        r
        for r in services
        if r.get("reason") and r["state"] not in ("running", "external", "remote")
    ]
    for r in notes:
        print(f"\n{r['project']}/{r['name']}: {r['state']}: {r['reason']}", file=out)
        if r.get("last_exit") and r["last_exit"] not in r["reason"]:
            print(f"  last exit: {r['last_exit']}", file=out)
        for line in r.get("last_log") or []:
            print(f"  | {line}", file=out)

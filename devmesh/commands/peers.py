"""`devmesh peers`: the teammates' agents this agent sees, and what it refused and why.

Why a command of its own beside `status`: when a teammate's services do not show up, the
question is "does my agent see theirs, and if not, why": which discovery backend saw a
peer, whether it expired or was refused (and the reason), and how many datagrams were
dropped for each reason. Like `status`, it imports the control client only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh peers
  devmesh peers --json | jq '.peers[] | select(.state != "alive")'
"""
COLUMNS = ("NAME", "NODE", "ADDRESS", "STATE", "SEEN BY", "LAST SEEN", "SERVICES")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "peers",
        help="show the mesh: peers, their state, and dropped announcements",
        description="Show the peers this agent's mesh node sees (alive, expired, or refused "
        "and why), which discovery backend saw each, and the dropped datagrams per reason.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md)")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    h = _common.home()
    try:
        data = _common.client(h, timeout_s=10).request("GET", "/v1/peers")
    except _common.AgentUnreachable:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"The devmesh agent is not running (no answer on {h.socket}).")
        return _common.EXIT_OK
    if args.json:
        print(json.dumps(data, indent=2))
        return _common.EXIT_OK
    render(data, sys.stdout)
    return _common.EXIT_OK


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s ago" if seconds < 60 else f"{int(seconds // 60)}m ago"


def render(data: dict[str, Any], out: Any) -> None:
    if data.get("mesh_off"):
        print(f"mesh off: {data['mesh_off']}.", file=out)
        if "not joined a team" in data["mesh_off"]:
            print(
                f"Project {data.get('project')} has a mesh: section; join your team with "
                "`devmesh mesh join FILE` (a teammate's bundle) or start one with `devmesh mesh "
                "init`: the mesh starts at once, and no service restarts.",
                file=out,
            )
        return
    if not data.get("running"):
        print(
            "No mesh: no applied project has a mesh: section (see docs/mesh.md).",
            file=out,
        )
        return
    disc = data.get("discovery") or {}
    how = []
    if disc.get("broadcast"):
        how.append(f"broadcast on {', '.join(disc.get('interfaces') or [])}")
    if disc.get("seeds"):
        how.append(f"seeds {', '.join(disc['seeds'])}")
    if disc.get("mdns"):
        how.append("mdns")
    serf = data.get("serf")
    if isinstance(serf, dict):
        how.append(
            f"serf on {serf.get('bind')}, {serf.get('members')} members"
            + (f", joining {', '.join(serf['join'])}" if serf.get("join") else "")
        )
    elif disc.get("serf"):
        how.append("serf not running (no `serf` binary: install the `serf` package)")
    print(
        f"mesh {data.get('mesh')}: this node is {data.get('display_name') or data.get('name')} "
        f"({data.get('node')}), "
        f"set by project {data.get('project')}; peer channel on port "
        f"{(data.get('channel') or {}).get('port')}, discovery UDP port {disc.get('port')} "
        f"({'; '.join(how) or 'no backend'})",
        file=out,
    )
    peers = data.get("peers") or []
    if not peers:
        print("No peers seen yet.", file=out)
    else:
        table = [COLUMNS]
        for p in peers:
            state = p["state"] + (f" ({p['reason']})" if p.get("reason") else "")
            table.append(
                (
                    p.get("display_name") or p["name"],
                    p["node"][:12],
                    f"{p['address']}:{p['port']}",
                    state,
                    ",".join(p.get("backends") or []) or "-",
                    _ago(p.get("last_seen_s")),
                    str(len(p.get("services") or [])),
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        colour = _common.use_colour(out)
        for i, row in enumerate(table):
            line = "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip()
            print(_common.paint(line, "1", colour) if i == 0 else line, file=out)
    for name in data.get("shared_names") or []:
        print(
            f"warning: more than one live node is named {name}; each is shown as {name}#ID6 "
            "(the first 6 hex digits of its node id). Give each machine its own name: "
            "`devmesh mesh join FILE --node-name NAME` or mesh.node_name in devmesh.yaml",
            file=out,
        )
    drops = data.get("drops") or {}
    if drops:
        said = ", ".join(f"{reason} {count}" for reason, count in drops.items())
        print(f"\ndropped: {said}", file=out)
    for line in data.get("channel_refused") or []:
        print(f"refused on the peer channel: {line}", file=out)
    listener = data.get("listener") or {}
    for line in listener_lines(listener):
        print(line, file=out)


LISTENER_REFUSALS = (
    ("failed_handshakes", "failed TLS handshakes"),
    ("refused_over_address_cap", "refused over the handshakes per address"),
    ("refused_over_handshake_cap", "refused over the handshake budget"),
    ("refused_over_node_cap", "refused over the cap per node"),
    ("refused_over_cap", "refused over the cap"),
)


def listener_lines(listener: dict[str, Any]) -> list[str]:
    """The peer listener's counts in words, when it refused anything (else nothing)."""
    said = [f"{listener[key]} {words}" for key, words in LISTENER_REFUSALS if listener.get(key)]
    if not said:
        return []
    last = listener.get("last_failed_handshake")
    if listener.get("failed_handshakes") and last:
        said[0] += f" (last: {last})"
    head = (
        f"peer channel: {listener.get('open', 0)} open of {listener.get('max_connections')}, "
        f"{listener.get('handshaking', 0)} handshaking"
    )
    return [f"{head}; " + "; ".join(said)]

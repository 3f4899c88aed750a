"""``python -m devmesh.mesh``: the team identity commands and a standalone mesh node.

Why a runner of its own: tests and the benchmark start real nodes in network namespaces
before the agent embeds the same parts. ``run`` prints ``ready PORT`` on stdout once the
channel listens and the first hello is sent, writes its status file, rewrites it on
SIGUSR1, and says goodbye on SIGTERM or SIGINT.

    python -m devmesh.mesh init --home H --mesh team [--node-name N]
    python -m devmesh.mesh export --home H FILE|-
    python -m devmesh.mesh join --home H FILE [--node-name N]
    python -m devmesh.mesh run --home H --interfaces lo --status-file S [...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from devmesh.core import catalog as catalogs
from devmesh.mesh import discovery, node
from devmesh.mesh import identity as ids


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devmesh.mesh")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a team (CA and secret) in HOME")
    init.add_argument("--home", type=Path, required=True)
    init.add_argument("--mesh", required=True)
    init.add_argument("--node-name")
    export = sub.add_parser("export", help="write the team bundle (mode 0600) or - for stdout")
    export.add_argument("--home", type=Path, required=True)
    export.add_argument("file")
    join = sub.add_parser("join", help="install a team bundle in HOME")
    join.add_argument("--home", type=Path, required=True)
    join.add_argument("file")
    join.add_argument("--node-name")
    run = sub.add_parser("run", help="run discovery and the catalog channel")
    run.add_argument("--home", type=Path, required=True)
    run.add_argument("--node-name")
    run.add_argument("--interfaces", default="lo", help="auto or comma-separated names")
    run.add_argument("--no-broadcast", action="store_true")
    run.add_argument("--discovery-port", type=int, default=discovery.DEFAULT_PORT)
    run.add_argument("--seed", action="append", default=[], help="HOST:PORT (repeatable)")
    run.add_argument("--mdns", action="store_true")
    run.add_argument("--mdns-address", action="append", default=[])
    run.add_argument("--advertise")
    run.add_argument("--channel-host", default="0.0.0.0")
    run.add_argument("--channel-port", type=int, default=7701)
    run.add_argument("--interval", type=float, default=2.0, help="seconds between heartbeats")
    run.add_argument("--allow", action="append", default=[], help="name or CIDR (repeatable)")
    run.add_argument("--services", type=Path, help="JSON list of shared services")
    run.add_argument("--status-file", type=Path)
    run.add_argument("--verbose", action="store_true")
    return p


def _services(path: Path | None) -> tuple[catalogs.SharedService, ...]:
    if path is None:
        return ()
    entries = json.loads(path.read_text())
    return tuple(catalogs.SharedService(**e) for e in entries)


async def _run(args: argparse.Namespace) -> int:
    settings = node.NodeSettings(
        home=args.home,
        node_name=args.node_name,
        interfaces=tuple(i for i in args.interfaces.split(",") if i),
        broadcast=not args.no_broadcast,
        discovery_port=args.discovery_port,
        seeds=tuple(args.seed),
        mdns=args.mdns,
        mdns_addresses=tuple(args.mdns_address),
        advertise=args.advertise,
        channel_host=args.channel_host,
        channel_port=args.channel_port,
        interval_s=args.interval,
        allow=tuple(args.allow) or ("*",),
        status_file=args.status_file,
    )

    def log(line: str) -> None:
        if args.verbose:
            print(line, file=sys.stderr, flush=True)

    mesh_node = node.Node(settings, services=_services(args.services), log=log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: mesh_node.write_status(force=True))
    await mesh_node.start()
    print(f"ready {mesh_node.channel_port}", flush=True)
    try:
        await stop.wait()
    finally:
        await mesh_node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            ident = ids.init(args.home, args.mesh, node_name=args.node_name)
            print(f"team {ident.team.mesh} created; node {ident.node_name} ({ident.node_id})")
        elif args.command == "export":
            if args.file == "-":
                sys.stdout.buffer.write(ids.encode_bundle(ids.load(args.home).team))
            else:
                ids.export_bundle(args.home, Path(args.file))
        elif args.command == "join":
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
            ident = ids.join(args.home, data, node_name=args.node_name, where=args.file)
            print(f"joined team {ident.team.mesh}; node {ident.node_name} ({ident.node_id})")
        else:
            return asyncio.run(_run(args))
    except (ids.IdentityError, discovery.DiscoveryError, OSError) as exc:
        print(f"devmesh mesh: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

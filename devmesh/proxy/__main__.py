"""Run the proxy without an agent: ``python -m devmesh.proxy --routes routes.json``.

Why it exists: tests and the benchmark need the real proxy in its own process, fed a route
table, with no agent, supervisor or mesh around it. The routes file is JSON::

    {"backends": [{"project": "shop", "service": "api", "port": 8080}],
     "edges": [{"caller_project": "shop", "caller_service": "web",
                "target_service": "api", "port": null}]}

and is read again whenever its modification time changes. Once listening, one JSON line is
printed on stdout: {"http_port": P, "https_port": Q, "edges": [[edge..., port], ...]}.

The event loop is uvloop's when uvloop is importable (an optional extra, never required),
and glibc keeps freed heap around (see ``runtime``); ``--no-uvloop`` measures without uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from devmesh.proxy import accesslog, ca, runtime, settings, table
from devmesh.proxy import server as server_mod


def load_routes(path: Path) -> tuple[table.RouteTable, dict[table.Edge, int | None]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    backends = tuple(table.Backend(**b) for b in doc.get("backends", ()))
    agent = table.Backend(**doc["agent"]) if doc.get("agent") else None
    edges = {
        table.Edge(
            caller_project=e["caller_project"],
            caller_service=e["caller_service"],
            target_service=e["target_service"],
        ): e.get("port")
        for e in doc.get("edges", ())
    }
    return table.RouteTable(backends, agent), edges


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devmesh.proxy", description=__doc__)
    p.add_argument("--routes", type=Path, required=True, help="JSON route table (see above)")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0: any free port)")
    p.add_argument("--https-port", type=int, default=None, help="HTTPS port (omit: no HTTPS)")
    p.add_argument("--home", type=Path, default=None, help="DEVMESH_HOME holding the CA")
    p.add_argument("--access-log", type=Path, default=None, help="access log file")
    p.add_argument("--json", action="store_true", help="access log as JSON lines")
    p.add_argument("--no-ipv6", action="store_true", help="do not also listen on ::1")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--max-body", type=int, default=None, help="request body limit, bytes")
    p.add_argument("--max-header", type=int, default=64 * 1024, help="request head limit, bytes")
    p.add_argument("--upstream-ca", default=None, help="verify https services against this CA")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the ports through SO_REUSEPORT (edges: first only)",
    )
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use asyncio's own event loop even when uvloop is installed",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-edges", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    config = settings.Settings(
        port=args.port,
        https_port=args.https_port,
        ipv6=not args.no_ipv6,
        connect_timeout_s=args.connect_timeout,
        idle_timeout_s=args.idle_timeout,
        max_body_bytes=args.max_body,
        max_header_bytes=args.max_header,
        upstream_verify_tls=args.upstream_ca is not None,
        reuse_port=args.reuse_port or args.workers > 1,
        upstream_ca_file=args.upstream_ca,
    )
    home = args.home or Path(os.environ.get("DEVMESH_HOME", Path.home() / ".devmesh"))
    routes, edges = load_routes(args.routes)
    current = [routes]
    proxy = server_mod.ProxyServer(
        config,
        lambda: current[0],
        ca.LocalCA(home) if args.https_port is not None else None,
        accesslog.AccessLog(args.access_log, json_lines=args.json),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    ports = await proxy.set_edges({} if args.no_edges else edges)
    workers = [spawn_worker(args, proxy) for _ in range(args.workers - 1)]
    report = {
        "http_port": proxy.http_port,
        "https_port": proxy.https_port,
        "pid": os.getpid(),
        "edges": [
            [e.caller_project, e.caller_service, e.target_service, p] for e, p in ports.items()
        ],
    }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    mtime = args.routes.stat().st_mtime_ns
    try:
        while not stop.is_set():
            with __import__("contextlib").suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), server_mod.FLUSH_INTERVAL_S)
            proxy.access_log.flush()
            now = args.routes.stat().st_mtime_ns
            if now != mtime:
                mtime = now
                routes, edges = load_routes(args.routes)
                current[0] = routes
                await proxy.set_edges({} if args.no_edges else edges)
    finally:
        proxy.close()
        proxy.access_log.close()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait()


def spawn_worker(args: argparse.Namespace, proxy: server_mod.ProxyServer) -> subprocess.Popen:
    """Another process on the same ports; it reads the same routes file by itself."""
    argv = [
        sys.executable,
        "-m",
        "devmesh.proxy",
        *sys.argv[1:],
        "--reuse-port",
        "--no-edges",
        "--workers",
        "1",
        "--port",
        str(proxy.http_port),
    ]
    if proxy.https_port is not None:
        argv += ["--https-port", str(proxy.https_port)]
    worker = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert worker.stdout is not None
    worker.stdout.readline()  # listening
    worker.stdout.close()
    return worker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime.keep_freed_heap()
    factory = runtime.loop_factory(allow_uvloop=not args.no_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the proxy without an agent: ``python -m devmesh.proxy --routes routes.json``.

Why it exists: tests and the benchmark need the real proxy in its own process, fed a route
table, with no agent, supervisor or mesh around it; and the agent's proxy worker processes
are this same program in worker mode. The routes file is ``routesfile``'s JSON::

    {"backends": [{"project": "shop", "service": "api", "port": 8080}],
     "edges": [{"caller_project": "shop", "caller_service": "web",
                "target_service": "api", "port": null}]}

and is read again whenever it changes (its mtime, inode or size; polled every quarter
second); a file that does not parse is reported on stderr and the previous table kept. Once
listening, one JSON line is printed on stdout: {"http_port": P, "https_port": Q, "pid": N,
"edges": [[project, caller, target, port], ...]}.

``--workers N`` runs N-1 worker processes beside this one on the same ports (SO_REUSEPORT,
see ``workers``): this process binds every port first, then writes the table with the bound
edge ports to a private file the workers follow, and prints its line once they all listen.

Worker mode (``--worker-of PID``, not for people): the process dies with PID (the kernel's
parent-death signal), joins exactly ``--port``/``--https-port`` and the edge ports named in the
file, skipping an edge whose port it cannot join rather than taking another one.

The event loop is uvloop's when uvloop is importable (an optional extra, never required),
and glibc keeps freed heap around (see ``runtime``); ``--no-uvloop`` measures without uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import anyio

from devmesh.proxy import accesslog, ca, metrics, routesfile, runtime, settings, table, workers
from devmesh.proxy import server as server_mod

log = logging.getLogger("devmesh.proxy")
WORKERS_READY_TIMEOUT_S = 30.0


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
    p.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds for a client's request head"
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=75.0,
        help="seconds a client's idle keep-alive connection stays open",
    )
    p.add_argument("--max-body", type=int, default=None, help="request body limit, bytes")
    p.add_argument("--max-header", type=int, default=64 * 1024, help="request head limit, bytes")
    p.add_argument("--upstream-ca", default=None, help="verify https services against this CA")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the ports through SO_REUSEPORT, this one included",
    )
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use asyncio's own event loop even when uvloop is installed",
    )
    p.add_argument(
        "--metrics-dir",
        type=Path,
        default=None,
        help="folder of the metrics shared by the processes (default: a private temporary one)",
    )
    p.add_argument(
        "--no-metrics",
        action="store_true",
        help="count nothing, /metrics answers 404 (to measure what metrics cost)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-edges", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--upstream-verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(workers.WORKER_FLAG, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_of is not None and (args.port == 0 or args.https_port == 0):
        p.error(f"{workers.WORKER_FLAG} joins its owner's ports: --port/--https-port cannot be 0")
    if args.workers < 1:
        p.error("--workers counts this process too: at least 1")
    return args


def _settings(args: argparse.Namespace) -> settings.Settings:
    worker = args.worker_of is not None
    return settings.Settings(
        port=args.port,
        https_port=args.https_port,
        ipv6=not args.no_ipv6,
        connect_timeout_s=args.connect_timeout,
        idle_timeout_s=args.idle_timeout,
        header_timeout_s=args.header_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
        max_body_bytes=args.max_body,
        max_header_bytes=args.max_header,
        upstream_verify_tls=args.upstream_verify or args.upstream_ca is not None,
        reuse_port=not worker and (args.reuse_port or args.workers > 1),
        join_ports=worker,
        upstream_ca_file=args.upstream_ca,
    )


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (or, for a worker, until its owner is gone); exit status."""
    worker = args.worker_of is not None
    home = args.home or Path(os.environ.get("DEVMESH_HOME", Path.home() / ".devmesh"))
    stamp = routesfile.stamp(args.routes)  # before reading: a change meanwhile is seen later
    try:
        routes, edges = routesfile.read(args.routes)
    except (OSError, routesfile.RoutesFileError) as exc:
        print(f"devmesh proxy: cannot read the routes: {exc}", file=sys.stderr)
        return 1
    current = [routes]
    config = _settings(args)
    metrics_dir: Path | None = args.metrics_dir
    own_metrics: Path | None = None
    if metrics_dir is None and not args.no_metrics and not worker:
        metrics_dir = own_metrics = Path(tempfile.mkdtemp(prefix="devmesh-proxy-metrics-"))
    if metrics_dir is not None and not worker:
        metrics.prepare(metrics_dir)
    proxy = server_mod.ProxyServer(
        config,
        lambda: current[0],
        ca.LocalCA(home) if args.https_port is not None else None,
        accesslog.AccessLog(args.access_log, json_lines=args.json),
        recorder=None if args.no_metrics else _recorder(metrics_dir),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await proxy.start()
    except OSError as exc:
        what = "join the ports of its owner" if worker else "listen"
        print(f"devmesh proxy: cannot {what}: {exc}", file=sys.stderr)
        proxy.close()
        proxy.access_log.close()
        if own_metrics is not None:
            shutil.rmtree(own_metrics, ignore_errors=True)
        return 1

    async def apply_edges(wanted: dict[table.Edge, int | None]) -> dict[table.Edge, int]:
        if worker:
            return await workers.join_edges(proxy, wanted, host=config.host)
        return await proxy.set_edges({} if args.no_edges else wanted)

    shared_dir: Path | None = None
    pool_task: asyncio.Task[None] | None = None
    try:
        ports = await apply_edges(edges)
        if not worker and args.workers > 1:
            shared_dir = Path(tempfile.mkdtemp(prefix="devmesh-proxy-workers-"))
            shared = shared_dir / "routes.json"
            routesfile.write(shared, current[0], ports)
            argv = _worker_argv(args, config, proxy, shared, home, metrics_dir=metrics_dir)
            on_exit = None
            if metrics_dir is not None:
                folder = metrics_dir
                on_exit = lambda pid: metrics.worker_died(folder, pid)  # noqa: E731
            pool = workers.WorkerSet(argv, args.workers - 1, on_exit=on_exit)
            pool_task = asyncio.create_task(pool.run())
            with anyio.fail_after(WORKERS_READY_TIMEOUT_S):
                await pool.wait_ready()
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
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), server_mod.FLUSH_INTERVAL_S)
            proxy.flush()
            if worker and os.getppid() != args.worker_of:
                break  # the owner is gone (where there is no parent-death signal)
            now = routesfile.stamp(args.routes)
            if now == stamp:
                continue
            stamp = now
            try:
                routes, edges = routesfile.read(args.routes)
            except (OSError, routesfile.RoutesFileError) as exc:
                log.warning("keeping the previous routes: %s", exc)
                continue
            current[0] = routes
            ports = await apply_edges(edges)
            if shared_dir is not None:
                routesfile.write(shared_dir / "routes.json", routes, ports)
    finally:
        proxy.close()
        proxy.access_log.close()
        if pool_task is not None:
            pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
        if shared_dir is not None:
            shutil.rmtree(shared_dir, ignore_errors=True)
        if own_metrics is not None:
            shutil.rmtree(own_metrics, ignore_errors=True)
    return 0


def _recorder(directory: Path | None) -> metrics.Recorder | None:
    return metrics.Recorder(directory) if directory is not None else None


def _worker_argv(
    args: argparse.Namespace,
    config: settings.Settings,
    proxy: server_mod.ProxyServer,
    shared: Path,
    home: Path,
    *,
    metrics_dir: Path | None,
) -> list[str]:
    assert proxy.http_port is not None
    return workers.worker_argv(
        parent=os.getpid(),
        routes=shared,
        config=config,
        http_port=proxy.http_port,
        https_port=proxy.https_port,
        home=home,
        access_log=args.access_log,
        json_lines=args.json,
        allow_uvloop=not args.no_uvloop,
        metrics_dir=metrics_dir,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_of is not None:
        if not workers.die_with_parent(args.worker_of):
            print(f"devmesh proxy worker: owner pid {args.worker_of} is gone", file=sys.stderr)
            return 1
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s %(levelname)s proxy worker {os.getpid()}: %(message)s",
            stream=sys.stderr,
        )
    runtime.keep_freed_heap()
    factory = runtime.loop_factory(allow_uvloop=not args.no_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

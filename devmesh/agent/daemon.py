"""`devmesh agent`: one agent per DEVMESH_HOME, in the foreground, until SIGTERM or SIGINT.

Why a lock file and not only a pid file: a pid file survives ``kill -9`` and then lies; an
flock is released by the kernel when the process dies, so "is an agent running?" has an
answer that cannot go stale. The pid file is kept for humans and error messages.

On SIGTERM/SIGINT (or POST /v1/shutdown) the agent stops every service it runs, dependents
first, and exits 0: nothing it started outlives it. After ``kill -9`` the services keep
running and the next agent adopts them from the state file; its proxy worker processes do
not (the kernel signals them when the agent dies, see ``proxy.workers``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import anyio
import anyio.abc

from devmesh.agent import dashboardhost, logfeed
from devmesh.agent import metrics as agent_metrics
from devmesh.agent.api import build_router
from devmesh.agent.engine import Engine
from devmesh.agent.http_server import serve_unix
from devmesh.agent.metricsdb import MetricsDB
from devmesh.agent.paths import Home
from devmesh.core import model
from devmesh.proxy import accesslog, ca, metrics, runtime, server, settings, workers
from devmesh.supervisor import ports, process

log = logging.getLogger("devmesh.agent")


class AgentAlreadyRunning(Exception):
    def __init__(self, home: Path, pid: str) -> None:
        self.home, self.pid = home, pid
        super().__init__(f"another devmesh agent (pid {pid or '?'}) already runs for {home}")


def _lock(home: Home) -> int:
    fd = os.open(home.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = home.pid_file.read_text().strip()
        except OSError:
            pid = ""
        raise AgentAlreadyRunning(home.root, pid) from None
    return fd


def run(home: Home) -> int:
    """Run the agent in this process; returns the exit status."""
    home.ensure()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        lock_fd = _lock(home)
    except AgentAlreadyRunning as exc:
        print(f"devmesh agent: {exc}", file=sys.stderr)
        return 1
    try:
        home.pid_file.write_text(f"{os.getpid()}\n")
        # Orphaned grandchildren of services come to us, not to a pid 1 that may not reap.
        process.set_child_subreaper(True)
        failures: list[BaseException] = []
        runtime.keep_freed_heap()  # else bulk transfers through the proxy thrash malloc
        try:
            anyio.run(_main, home, backend_options={"use_uvloop": runtime.uvloop_available()})
        except* ProxyStartError as group:
            failures.extend(group.exceptions)
        for failure in failures:
            print(f"devmesh agent: {failure}", file=sys.stderr)
        if failures:
            return 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            home.pid_file.unlink()
        os.close(lock_fd)
    return 0


class ProxyStartError(Exception):
    """The agent cannot run its proxy; it exits 1 with this message, naming the cause."""


def _port_busy(port: int, owner: ports.PortOwner | None) -> ProxyStartError:
    who = f" by pid {owner.pid} ({owner.name})" if owner and owner.pid else ""
    return ProxyStartError(
        f"cannot start the proxy: port {port} on 127.0.0.1 is already in use{who}; "
        "set proxy.port / proxy.https_port in devmesh.yaml or DEVMESH_PROXY_PORT / "
        "DEVMESH_HTTPS_PORT"
    )


STALE_WORKER_WAIT_S = 5.0
"""How long a starting agent waits for a proxy worker of a dead agent to free its port."""


def proxy_workers(environ: Mapping[str, str] | None = None, *, cpus: int | None = None) -> int:
    """How many proxy worker processes share the proxy's ports with the agent.

    DEVMESH_PROXY_WORKERS when set; else one per core beyond the first, at most three (with
    the agent, four processes: past that the services and the clients need the cores more
    than the proxy does). One Python process serves ~5k small requests/s on one core.
    ``cpus`` defaults to this machine's count. Raises ValueError naming the variable when
    it is not a whole number >= 0.
    """
    env = os.environ if environ is None else environ
    raw = env.get("DEVMESH_PROXY_WORKERS")
    if not raw:
        return max(0, min(cpus or os.cpu_count() or 1, 4) - 1)
    try:
        count = int(raw)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"DEVMESH_PROXY_WORKERS={raw!r} is not a whole number >= 0")
    return count


def proxy_settings(environ: Mapping[str, str] | None = None) -> settings.Settings:
    """The proxy's settings from the environment the agent was started with.

    DEVMESH_PROXY_PORT, DEVMESH_HTTPS_PORT ("off" disables HTTPS),
    DEVMESH_PROXY_CONNECT_TIMEOUT_S, DEVMESH_PROXY_IDLE_TIMEOUT_S,
    DEVMESH_PROXY_HEADER_TIMEOUT_S, DEVMESH_PROXY_KEEPALIVE_TIMEOUT_S, DEVMESH_PROXY_MAX_BODY_MB,
    DEVMESH_PROXY_WORKERS (see proxy_workers; with workers the listeners are bound shared).
    `devmesh up` sets the first seven from the project's `proxy:` when it starts the agent.
    Raises ValueError naming the variable when one is not a number.
    """
    env = os.environ if environ is None else environ
    defaults = model.ProxySettings()

    def number(name: str, default: float | None) -> float | None:
        raw = env.get(name)
        if not raw:
            return default
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None

    https_raw = env.get("DEVMESH_HTTPS_PORT")
    max_mb = number("DEVMESH_PROXY_MAX_BODY_MB", defaults.max_body_mb)
    return settings.Settings(
        port=int(number("DEVMESH_PROXY_PORT", defaults.port) or 0),
        https_port=None
        if https_raw == "off"
        else int(number("DEVMESH_HTTPS_PORT", defaults.https_port) or 0),
        connect_timeout_s=number("DEVMESH_PROXY_CONNECT_TIMEOUT_S", defaults.connect_timeout_s)
        or 5.0,
        idle_timeout_s=number("DEVMESH_PROXY_IDLE_TIMEOUT_S", defaults.idle_timeout_s) or 60.0,
        header_timeout_s=number("DEVMESH_PROXY_HEADER_TIMEOUT_S", defaults.header_timeout_s)
        or 10.0,
        keepalive_timeout_s=number(
            "DEVMESH_PROXY_KEEPALIVE_TIMEOUT_S", defaults.keepalive_timeout_s
        )
        or 75.0,
        max_body_bytes=None if max_mb is None else int(max_mb * 2**20),
        reuse_port=proxy_workers(env) > 0,
    )


async def _start_proxy(tg: anyio.abc.TaskGroup, home: Home, engine: Engine) -> server.ProxyServer:
    try:
        config = proxy_settings()
    except ValueError as exc:
        raise ProxyStartError(f"cannot start the proxy: {exc}") from exc
    try:
        retention = agent_metrics.retention_days()
    except ValueError as exc:
        raise ProxyStartError(f"cannot start the proxy's metrics: {exc}") from exc
    for port in (config.port, config.https_port):
        if port:
            owner = await _port_owner(port)
            if owner is not None:
                raise _port_busy(port, owner)
    recorder = None
    if not metrics.off():
        metrics.prepare(home.metrics_counts)  # the previous agent's counts are in the history
        recorder = metrics.Recorder(home.metrics_counts)
        db = MetricsDB(home.metrics_db)
        db.open()
        engine.metrics = agent_metrics.History(
            home.metrics_counts, db, retention_days=retention, flush=recorder.flush
        )
    else:
        log.info("metrics are off (DEVMESH_METRICS=off): nothing is counted")
    proxy = server.ProxyServer(
        config,
        lambda: engine.routes,
        ca.LocalCA(home.root),
        accesslog.AccessLog(home.proxy_log, json_lines=True),
        recorder=recorder,
    )
    try:
        await tg.start(proxy.serve)
    except OSError as exc:
        raise _port_busy(config.port, None) from exc
    log.info("proxy on http://127.0.0.1:%s https://127.0.0.1:%s", proxy.http_port, proxy.https_port)
    return proxy


async def _port_owner(port: int) -> ports.PortOwner | None:
    """Who holds ``port`` on 127.0.0.1, None when it is free.

    A proxy worker left by an agent that was killed is already exiting (the kernel sent it
    SIGTERM when its agent died) and frees the port within milliseconds: wait for it rather
    than fail a `devmesh up` that follows a `kill -9` of the agent at once. While it exits
    its socket outlives its file descriptors for a moment, so the port is busy with no
    visible owner: after such a worker, that counts as still waiting too.
    """
    owner = ports.check_free(port)
    waited_for: int | None = None
    with anyio.move_on_after(STALE_WORKER_WAIT_S):
        while owner is not None:
            if owner.pid and workers.orphaned_worker(owner.pid):
                if owner.pid != waited_for:
                    log.info(
                        "waiting for pid %d, a proxy worker of a dead agent, to exit", owner.pid
                    )
                    waited_for = owner.pid
            elif owner.pid or waited_for is None:
                break  # a live holder, or one we have no reason to expect to go away
            await anyio.sleep(0.05)
            owner = ports.check_free(port)
    return owner


WORKERS_READY_TIMEOUT_S = 30.0
"""How long the agent waits for its proxy workers to listen before it answers anyway (a
worker that cannot start is restarted with backoff, and ``status`` shows it not ready)."""


async def _start_workers(
    tg: anyio.abc.TaskGroup, home: Home, engine: Engine, proxy: server.ProxyServer
) -> None:
    """Start the proxy's worker processes on its ports and wait until every one listens, so
    that the proxy counts as ready (for ``up -d``, which waits for the agent's socket, and
    ``status``) only once each of its processes accepts: connections opened right after
    ``up -d`` are shared among all of them by the kernel, not all taken by the agent.

    They follow the route file the engine rewrites after each round; it is written once here
    first, so a worker never reads a previous agent's table.
    """
    count = proxy_workers()
    if not count or proxy.http_port is None:
        return
    engine.route_file = home.proxy_routes
    engine.publish_route_file()
    argv = workers.worker_argv(
        parent=os.getpid(),
        routes=home.proxy_routes,
        config=proxy_settings(),  # as the agent's proxy got them (checked by _start_proxy)
        http_port=proxy.http_port,
        https_port=proxy.https_port,
        home=home.root,
        access_log=home.proxy_log,
        json_lines=True,
        allow_uvloop=runtime.uvloop_available(),
        metrics_dir=home.metrics_counts if engine.metrics is not None else None,
    )
    counts = home.metrics_counts
    on_exit = (lambda pid: metrics.worker_died(counts, pid)) if engine.metrics else None
    worker_set = workers.WorkerSet(argv, count, on_exit=on_exit)
    await tg.start(worker_set.run)
    engine.proxy_workers = worker_set
    with anyio.move_on_after(WORKERS_READY_TIMEOUT_S):
        await worker_set.wait_ready()
    ready = worker_set.ready_count()
    if ready < count:
        log.warning("proxy: %d of %d worker process(es) listening after %.0f s", ready, count,
                    WORKERS_READY_TIMEOUT_S)  # fmt: skip
    log.info("proxy: %d worker process(es) share its ports (DEVMESH_PROXY_WORKERS)", count)


async def _main(home: Home) -> None:
    engine = Engine(home)
    warning = engine.load_state()
    if warning:
        log.warning("%s", warning)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        engine.proxy = await _start_proxy(tg, home, engine)
        await _start_workers(tg, home, engine, engine.proxy)
        if engine.metrics is not None:
            tg.start_soon(engine.metrics.run)
        await dashboardhost.start(tg, engine)  # before the first round: it publishes the route
        await tg.start(engine.run)
        await engine.mesh.restore(engine.mesh_view())
        tg.start_soon(logfeed.stamp_forever, engine.service_logs)
        router = build_router(engine, stop.set)
        dashboardhost.register(router, engine)
        await tg.start(serve_unix, home.socket, router)
        tg.start_soon(_signals, stop)
        log.info("devmesh agent %d listening on %s", os.getpid(), home.socket)
        await stop.wait()
        log.info("shutting down: stopping all services")
        await engine.shutdown()
        await engine.mesh.stop()  # a goodbye, so peers drop this node at once
        tg.cancel_scope.cancel()
    if engine.route_file is not None:
        with contextlib.suppress(FileNotFoundError):
            engine.route_file.unlink()  # its workers are gone; nobody follows it now
    log.info("agent stopped")


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()
            return

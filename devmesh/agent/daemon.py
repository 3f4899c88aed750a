"""`devmesh agent`: one agent per DEVMESH_HOME, in the foreground, until SIGTERM or SIGINT.

Why a lock file and not only a pid file: a pid file survives ``kill -9`` and then lies; an
flock is released by the kernel when the process dies, so "is an agent running?" has an
answer that cannot go stale. The pid file is kept for humans and error messages.

On SIGTERM/SIGINT (or POST /v1/shutdown) the agent stops every service it runs, dependents
first, and exits 0: nothing it started outlives it. After ``kill -9`` the services keep
running and the next agent adopts them from the state file.
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

from devmesh.agent.api import build_router
from devmesh.agent.engine import Engine
from devmesh.agent.http_server import serve_unix
from devmesh.agent.paths import Home
from devmesh.core import model
from devmesh.proxy import accesslog, ca, runtime, server, settings
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
        for exc in failures:
            print(f"devmesh agent: {exc}", file=sys.stderr)
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


def proxy_settings(environ: Mapping[str, str] | None = None) -> settings.Settings:
    """The proxy's settings from the environment the agent was started with.

    DEVMESH_PROXY_PORT, DEVMESH_HTTPS_PORT ("off" disables HTTPS),
    DEVMESH_PROXY_CONNECT_TIMEOUT_S, DEVMESH_PROXY_IDLE_TIMEOUT_S, DEVMESH_PROXY_MAX_BODY_MB.
    `devmesh up` sets them from the project's `proxy:` when it starts the agent.
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
        max_body_bytes=None if max_mb is None else int(max_mb * 2**20),
    )


async def _start_proxy(tg: anyio.abc.TaskGroup, home: Home, engine: Engine) -> server.ProxyServer:
    try:
        config = proxy_settings()
    except ValueError as exc:
        raise ProxyStartError(f"cannot start the proxy: {exc}") from exc
    for port in (config.port, config.https_port):
        if port:
            owner = ports.check_free(port)
            if owner is not None:
                raise _port_busy(port, owner)
    proxy = server.ProxyServer(
        config,
        lambda: engine.routes,
        ca.LocalCA(home.root),
        accesslog.AccessLog(home.proxy_log, json_lines=True),
    )
    try:
        await tg.start(proxy.serve)
    except OSError as exc:
        raise _port_busy(config.port, None) from exc
    log.info("proxy on http://127.0.0.1:%s https://127.0.0.1:%s", proxy.http_port, proxy.https_port)
    return proxy


async def _main(home: Home) -> None:
    engine = Engine(home)
    warning = engine.load_state()
    if warning:
        log.warning("%s", warning)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        engine.proxy = await _start_proxy(tg, home, engine)
        await tg.start(engine.run)
        await tg.start(serve_unix, home.socket, build_router(engine, stop.set))
        tg.start_soon(_signals, stop)
        log.info("devmesh agent %d listening on %s", os.getpid(), home.socket)
        await stop.wait()
        log.info("shutting down: stopping all services")
        await engine.shutdown()
        tg.cancel_scope.cancel()
    log.info("agent stopped")


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()
            return

"""Proxy worker processes: more CPU cores for the proxy, each worker on the same ports.

Why processes: one Python process running the proxy saturates one core at about 5k small
requests per second (h11 and the interpreter, see docs/proxy.md "Performance"); threads would
share one interpreter lock. So the process that owns the proxy (the agent, or the standalone
``python -m devmesh.proxy --workers N``) binds its listeners with SO_REUSEPORT after proving
each port free (``listeners``), and starts N copies of ``python -m devmesh.proxy --worker-of
PID`` that join exactly those ports; the kernel then spreads new connections across them all.
Each worker reads the route table and the edge ports from a file the owner rewrites after
every change (``routesfile``) and polls for changes.

Two sides live here:

- the owner's ``WorkerSet`` spawns the workers, restarts one that dies (with a capped,
  logged backoff), and on cancellation terminates them and waits (SIGKILL after a grace);
- the worker's ``die_with_parent`` and ``join_edges``.

Workers never outlive their owner: each asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``) and then checks that its parent is still the owner, which closes the
race with an owner that died before the request was made. The death signal is tied to the
*thread* that forked the worker, so ``WorkerSet`` spawns from the event loop's thread, never
from a worker thread.

What it does not guarantee: that a worker is listening when ``WorkerSet.run`` has started
(the owner waits for that with ``wait_ready``: the agent and the standalone proxy do before
they say they are up, so the proxy counts as ready only once every one of its processes
accepts), nor that a worker sees a route change at the same moment
as the owner (it polls every quarter second).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from devmesh.proxy import server as server_mod
from devmesh.proxy import settings, table

log = logging.getLogger("devmesh.proxy.workers")

WORKER_FLAG = "--worker-of"
RESTART_FIRST_S = 0.5
"""Delay before restarting a worker that died; doubled per quick death in a row."""
RESTART_MAX_S = 30.0
"""Cap on that delay: a worker that cannot start is retried twice a minute, forever."""
STABLE_AFTER_S = 10.0
"""A worker that ran this long before dying starts a fresh backoff."""
STOP_GRACE_S = 5.0
"""Seconds a worker gets to close after SIGTERM before SIGKILL."""
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ---------------------------------------------------------------------------------------------
# owner side


def worker_argv(
    *,
    parent: int,
    routes: Path,
    config: settings.Settings,
    http_port: int,
    https_port: int | None,
    home: Path,
    access_log: Path | None,
    json_lines: bool,
    allow_uvloop: bool = True,
    metrics_dir: Path | None = None,
) -> list[str]:
    """The command line of a worker joining ``http_port`` (and ``https_port``) of ``parent``.

    The listening ports are the owner's bound ones, never 0. ``host``, ``read_size`` and
    ``pool_idle_per_upstream`` are not passed: workers use the defaults, as the owners do.
    """
    argv = [
        sys.executable,
        "-m",
        "devmesh.proxy",
        WORKER_FLAG,
        str(parent),
        "--routes",
        str(routes),
        "--port",
        str(http_port),
        "--home",
        str(home),
        "--connect-timeout",
        repr(config.connect_timeout_s),
        "--idle-timeout",
        repr(config.idle_timeout_s),
        "--header-timeout",
        repr(config.header_timeout_s),
        "--keepalive-timeout",
        repr(config.keepalive_timeout_s),
        "--max-header",
        str(config.max_header_bytes),
    ]
    if https_port is not None:
        argv += ["--https-port", str(https_port)]
    if access_log is not None:
        argv += ["--access-log", str(access_log)]
    if json_lines:
        argv.append("--json")
    if not config.ipv6:
        argv.append("--no-ipv6")
    if config.max_body_bytes is not None:
        argv += ["--max-body", str(config.max_body_bytes)]
    if config.upstream_verify_tls:
        argv.append("--upstream-verify")
        if config.upstream_ca_file:
            argv += ["--upstream-ca", config.upstream_ca_file]
    if not allow_uvloop:
        argv.append("--no-uvloop")
    argv += ["--metrics-dir", str(metrics_dir)] if metrics_dir is not None else ["--no-metrics"]
    return argv


@dataclass(slots=True, eq=False)
class _Worker:
    popen: subprocess.Popen[bytes]
    started_at: float
    ready: anyio.Event = field(default_factory=anyio.Event)
    report: dict[str, Any] | None = None
    """The worker's one JSON line (ports, pid, edges) once it is listening."""


class WorkerSet:
    """``count`` worker processes kept running while ``run`` runs."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        *,
        stderr: int | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """``argv`` from ``worker_argv``; ``stderr`` is where the workers' own messages go
        (default: the owner's stderr, which for the agent is its log file); ``on_exit(pid)``
        is called after a worker ended (its metrics' live gauges are dropped there)."""
        self.argv = list(argv)
        self._on_exit = on_exit
        self.count = count
        self.restarts = 0
        """Workers started again after one died."""
        self._stderr = stderr
        self._slots: list[_Worker | None] = [None] * count
        self._changed: anyio.Event | None = None

    def pids(self) -> list[int]:
        """The live workers' pids (a worker being restarted is missing)."""
        return [w.popen.pid for w in self._slots if w is not None and w.popen.returncode is None]

    def ready_count(self) -> int:
        """Workers listening now (a worker being restarted is not)."""
        return sum(
            1
            for w in self._slots
            if w is not None and w.ready.is_set() and w.popen.returncode is None
        )

    async def wait_ready(self) -> None:
        """Until every slot has a worker that reported it is listening; for tests and the
        standalone proxy (wrap it in a timeout: a worker that cannot start never reports)."""
        while not all(w is not None and w.ready.is_set() for w in self._slots):
            await self._event().wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Spawn the workers and keep them running until cancelled; then stop every one.

        ``task_status.started()`` fires once all are spawned, before any is listening.
        """
        try:
            async with anyio.create_task_group() as tg:
                for index in range(self.count):
                    self._spawn(index)
                task_status.started()
                for index in range(self.count):
                    tg.start_soon(self._keep, index)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()

    def _spawn(self, index: int) -> _Worker:
        # Synchronous on purpose: PR_SET_PDEATHSIG follows the thread that forks, and this is
        # the event loop's thread, which lives as long as the owner.
        popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C at the owner's terminal is the owner's to handle
        )
        worker = _Worker(popen, time.monotonic())
        self._slots[index] = worker
        self._notify()
        return worker

    async def _keep(self, index: int) -> None:
        quick_deaths = 0
        while True:
            worker = self._slots[index]
            if worker is None or worker.popen.returncode is not None:
                worker = self._spawn(index)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_report, worker)
                status = await _wait(worker.popen)
                tg.cancel_scope.cancel()
            if self._on_exit is not None:
                self._on_exit(worker.popen.pid)
            ran_s = time.monotonic() - worker.started_at
            quick_deaths = 1 if ran_s >= STABLE_AFTER_S else quick_deaths + 1
            delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (quick_deaths - 1))
            log.warning(
                "proxy worker pid %d %s after %.1f s; starting another in %.1f s",
                worker.popen.pid,
                _describe(status),
                ran_s,
                delay,
            )
            self._slots[index] = None
            self._notify()
            await anyio.sleep(delay)
            self.restarts += 1
            self._spawn(index)

    async def _read_report(self, worker: _Worker) -> None:
        """Read the worker's one line (it is listening), then close the pipe: it writes no more."""
        stdout = worker.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        os.set_blocking(fd, False)
        data = b""
        try:
            while b"\n" not in data:
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                data += chunk
        finally:
            stdout.close()
        with contextlib.suppress(ValueError):
            worker.report = json.loads(data.split(b"\n", 1)[0])
        log.info("proxy worker pid %d is listening", worker.popen.pid)
        worker.ready.set()
        self._notify()

    async def _stop_all(self) -> None:
        live = [w.popen for w in self._slots if w is not None and w.popen.returncode is None]
        for popen in live:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_GRACE_S):
            for popen in live:
                await _wait(popen)
        for popen in live:
            if popen.poll() is None:
                log.warning("proxy worker pid %d ignored SIGTERM; killing it", popen.pid)
                popen.kill()
                popen.wait()
            if popen.stdout is not None:
                popen.stdout.close()

    def _event(self) -> anyio.Event:
        """Set at the next change of any slot (created here: anyio events need a loop)."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


async def _wait(popen: subprocess.Popen[bytes]) -> int:
    """Wait for a child without a thread: its pidfd becomes readable when it exits."""
    if popen.poll() is not None:
        return popen.returncode
    try:
        fd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while popen.poll() is None:
            await anyio.sleep(0.1)
        return popen.returncode
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    return popen.wait()


def _describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
        return f"was killed by signal {-status}"
    return f"exited with status {status}"


def orphaned_worker(pid: int) -> bool:
    """True when ``pid`` is a proxy worker whose owner is gone (it is on its way out: the
    kernel sent it SIGTERM). A new agent waits for such a worker to free the ports."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    try:
        owner = int(argv[argv.index(WORKER_FLAG.encode()) + 1])
    except (ValueError, IndexError):
        return False
    return owner != ppid


# ---------------------------------------------------------------------------------------------
# worker side


def die_with_parent(parent: int) -> bool:
    """Ask for SIGTERM when the parent dies; False when ``parent`` is not our parent any more.

    Asking first and checking after leaves no gap: if the owner died before the request, the
    check sees it; if after, the kernel sends the signal. Off Linux only the check is done
    (the worker also polls it in its loop).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() == parent


def can_join(host: str, port: int) -> bool:
    """Whether a worker could bind host:port shared, tested without listening on it.

    A socket that is bound but not listening receives no connections, so the test steals
    nothing; it fails when the port is held by a listener that does not share it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def join_edges(
    proxy: server_mod.ProxyServer,
    wanted: Mapping[table.Edge, int | None],
    *,
    host: str = "127.0.0.1",
) -> dict[table.Edge, int]:
    """Listen on each edge's exact port (the owner's), or not at all; edge -> port listening.

    ``ProxyServer.set_edges`` falls back to an ephemeral port when the preferred one cannot be
    bound, which is right for the owner (it then hands out the new URL) and wrong for a worker
    (nobody would ever call that port). So a port that cannot be joined is skipped with a
    message, and an edge that still landed elsewhere (a lost race) is closed again. Edges
    without a port, or whose port moved, are (re)bound on the new one; skipped edges are
    tried again on the next call. ``host`` is the proxy's ``Settings.host``.
    """
    exact = {edge: port for edge, port in wanted.items() if port}
    current = proxy.edge_ports()
    keep = {edge: port for edge, port in current.items() if exact.get(edge) == port}
    if len(keep) != len(current):
        await proxy.set_edges(keep)
    joinable = {}
    for edge, port in exact.items():
        if edge in keep or can_join(host, port):
            joinable[edge] = port
        else:
            log.warning("edge %s: cannot join port %d; not serving it here", edge.label, port)
    bound = await proxy.set_edges(joinable)
    wrong = [edge for edge, port in bound.items() if port != joinable[edge]]
    if wrong:
        for edge in wrong:
            log.warning(
                "edge %s: port %d was taken meanwhile; not serving it here",
                edge.label,
                joinable[edge],
            )
        await proxy.set_edges({e: p for e, p in joinable.items() if e not in wrong})
    return proxy.edge_ports()

"""Spawn, wait for, stop and adopt the processes that run services.

Strategy
--------
*Identity.* A pid alone is not an identity: pids are reused. A process is named by
``(pid, start_time)``, where ``start_time`` is psutil's ``create_time()`` (``procinfo``).
Whatever the agent persists (``Proc``) can therefore be checked after an agent restart:
``adopt`` returns ``None`` when the pid now belongs to someone else.

*Ownership.* Each service is spawned as the leader of a new session (``setsid``), so every
process it forks, even one that moves to another process group, carries its session id.
``stop`` signals the leader's process group *and* every live process of the session (found
through psutil), so a child that called ``setpgid(0, 0)`` still gets the signal. Processes that call
``setsid`` themselves (daemons) escape: that is the contract, documented in the package.
A session id cannot be recycled while any member of the session lives (the kernel keeps the
pid allocated), so "members of session S" is unambiguous for as long as it matters.

*Reaping exactly once.* Our own children are registered in ``_children`` under
``(pid, start_time)`` with the ``subprocess.Popen`` that made them. Reaping is a synchronous,
idempotent step (``_reap``): it calls ``waitpid`` only while no exit has been recorded, and
stores the ``Exit`` in the record. Since the event loop runs one task at a time, two tasks
cannot both reap: whichever runs ``_reap`` first records the status, the other reads it.
On Linux each ``wait`` opens its *own* pidfd (asyncio allows one reader per fd, so waiters
must not share one) and opens it only after checking, with no ``await`` in between, that
the child is not reaped yet; the pid therefore still names our zombie or live child, never
a recycled pid.
Where there are no pidfds (not Linux), ``wait`` polls instead.
``stop`` polls with a non-blocking ``_reap``. So ``wait`` and ``stop`` may run concurrently in
any order and both see the same ``Exit``. No background task is needed, which keeps the module
usable from any task group the agent chooses.

*Adopted processes* (not our children, typically left running by a previous agent) cannot be
reaped by us and their status is unknowable; ``wait`` returns when their pidfd becomes readable
(the process exited) with ``Exit(None, None)``.

*Platforms.* Process inspection goes through psutil (``procinfo``) and POSIX calls. The
Linux-only parts are marked where they are: ``set_child_subreaper`` (``prctl``) and the
pidfd wait, which has a polling fallback.

What it does not guarantee: a child that nobody waits for or stops stays a zombie until then;
the agent is expected to ``wait`` on everything it spawns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal as signals
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from devmesh.supervisor import SupervisorError, procinfo

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_POLL_S = 0.02
_KILL_SWEEP_S = 5.0
"""After SIGKILL, how long to keep sweeping the session for stragglers (forks in flight)."""
_MAX_REAPED = 1024
"""Reaped records kept so that a late ``wait`` still gets the status."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    """The complete environment of the child; its PATH resolves argv[0]."""
    log_path: Path
    """stdout and stderr are appended here (created, with its folder, when missing)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Proc:
    pid: int
    sid: int
    start_time: float
    """psutil's create_time(); tells this process from a later one with the same pid."""
    started_at: float
    """Wall clock (time.time()) at spawn, or the start time read by adopt."""


@dataclass(frozen=True, slots=True)
class Exit:
    code: int | None
    signal: int | None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signals.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"was killed by {name}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (status unknown: adopted process)"


UNKNOWN = Exit(None, None)


class SpawnError(SupervisorError):
    """The service could not be started; ``kind`` tells the agent whether retrying can help."""

    def __init__(self, kind: str, argv0: str, path: str, cwd: str, reason: str) -> None:
        self.kind = kind
        self.argv0 = argv0
        self.path = path
        self.cwd = cwd
        super().__init__(f"cannot start {argv0!r}: {reason} (PATH={path}, cwd={cwd})")


class UnknownSignalError(SupervisorError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown signal {name!r}: expected a name such as SIGTERM or SIGINT")


@dataclass(slots=True)
class _Child:
    popen: subprocess.Popen[bytes] | None
    exit: Exit | None = None


_children: dict[tuple[int, float], _Child] = {}


# ---------------------------------------------------------------------------------------------
# sessions


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process whose session id is ``sid``, sorted."""
    return procinfo.session_pids(sid)


def kill_session(sid: int) -> None:
    """SIGKILL every live member of session ``sid`` (what a dead service left behind)."""
    for pid in session_pids(sid):
        _kill(pid, signals.SIGKILL)


def set_child_subreaper(enabled: bool = True) -> None:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER) instead of leaving them to init.

    Linux-only (``prctl``); raises OSError elsewhere. Why: when a service's leader dies
    first, its children are re-parented to pid 1, which in a container may never reap them.
    As a subreaper, the agent receives them, and ``stop`` reaps the dead members of the
    session it stops. Process-wide; off by default.
    """
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "PR_SET_CHILD_SUBREAPER exists on Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")


# ---------------------------------------------------------------------------------------------
# spawn / adopt


def resolve(argv0: str, cwd: str, path: str) -> str:
    """Find the executable as execvp would in the child, so failures are clear before forking.

    Raises SpawnError (kind not_found or not_executable) naming argv0, PATH and cwd.
    """
    base = Path(cwd).absolute()
    if "/" in argv0:
        candidates = [base / argv0]
    else:
        candidates = [base / (d or ".") / argv0 for d in path.split(":")]
    not_executable = None
    for candidate in candidates:
        # os.path's checks answer False for a directory this user cannot search (root's
        # PATH kept by `runuser`), where pathlib's raise PermissionError: such an entry is
        # skipped, as execvp and shutil.which skip it.
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
        if os.path.exists(candidate) and not_executable is None:
            not_executable = candidate
    if not_executable is not None:
        raise SpawnError(
            "not_executable", argv0, path, cwd, f"{not_executable} is not an executable file"
        )
    where = "no such file" if "/" in argv0 else "not found on PATH"
    raise SpawnError("not_found", argv0, path, cwd, where)


def spawn(launch: Launch) -> Proc:
    """Start ``launch`` as a new session leader.

    Raises SpawnError: kind ``cwd_missing``, ``not_found``, ``not_executable`` (checked before
    forking), or ``other`` (the log cannot be opened, exec failed, no argv).
    """
    path = launch.env.get("PATH", os.defpath)
    argv0 = launch.argv[0] if launch.argv else ""
    if not launch.argv:
        raise SpawnError("other", argv0, path, launch.cwd, "empty command")
    if not os.path.isdir(launch.cwd):
        raise SpawnError("cwd_missing", argv0, path, launch.cwd, "working directory is missing")
    executable = resolve(argv0, launch.cwd, path)
    try:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(
            launch.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
        )
    except OSError as exc:
        raise SpawnError(
            "other", argv0, path, launch.cwd, f"cannot open log {launch.log_path}: {exc.strerror}"
        ) from exc
    try:
        popen = subprocess.Popen(
            list(launch.argv),
            executable=executable,
            cwd=launch.cwd,
            env=dict(launch.env),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        kind = {
            errno.ENOENT: "not_found",
            errno.EACCES: "not_executable",
            errno.ENOEXEC: "not_executable",
        }.get(exc.errno or 0, "other")
        raise SpawnError(kind, argv0, path, launch.cwd, f"exec failed: {exc.strerror}") from exc
    finally:
        os.close(log_fd)
    got = procinfo.info(popen.pid)
    assert got is not None, "an unreaped child can always be inspected"
    proc = Proc(pid=popen.pid, sid=popen.pid, start_time=got.start_time, started_at=time.time())
    _children[(proc.pid, proc.start_time)] = _Child(popen)
    return proc


def adopt(pid: int, start_time: float) -> Proc | None:
    """Re-attach to a process recorded earlier; None when it is gone, a zombie or another one."""
    got = procinfo.info(pid)
    if got is None or got.zombie or not procinfo.same_start(got.start_time, start_time):
        return None
    child = _children.get((pid, start_time))
    if child is not None and child.exit is not None:
        return None
    return Proc(pid=pid, sid=got.session, start_time=start_time, started_at=got.start_time)


def alive(proc: Proc) -> bool:
    """True while the process runs (a zombie or a recycled pid is not alive)."""
    got = procinfo.info(proc.pid)
    return (
        got is not None and not got.zombie and procinfo.same_start(got.start_time, proc.start_time)
    )


# ---------------------------------------------------------------------------------------------
# wait / stop


def _reap(child: _Child, *, block: bool) -> Exit | None:
    """Collect the child's status once; later calls return the recorded Exit."""
    if child.exit is None and child.popen is not None:
        code = child.popen.wait() if block else child.popen.poll()
        if code is not None:
            child.exit = Exit(None, -code) if code < 0 else Exit(code, None)
            child.popen = None
            _forget_old()
    return child.exit


def _forget_old() -> None:
    reaped = [key for key, child in _children.items() if child.exit is not None]
    for key in reaped[: max(0, len(reaped) - _MAX_REAPED)]:
        del _children[key]


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux-only); -1 where pidfds do not exist, None if it is gone."""
    if not hasattr(os, "pidfd_open"):
        return -1
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


async def wait(proc: Proc) -> Exit:
    """Wait until the process exits; cancellable.

    For our own children the exit status is collected (reaping the zombie); for adopted
    processes it is unknown and ``Exit(None, None)`` is returned.
    """
    child = _children.get((proc.pid, proc.start_time))
    if child is not None and child.exit is not None:
        return child.exit
    # No await since the check above: the pid still names our unreaped child (or, if adopted,
    # it is verified against its start time right after opening the pidfd).
    fd = _pidfd(proc.pid)
    if fd is None:
        return UNKNOWN
    if fd == -1:  # no pidfds on this platform: poll
        while (child is not None and _reap(child, block=False) is None) or (
            child is None and alive(proc)
        ):
            await anyio.sleep(_POLL_S)
        return child.exit if child is not None and child.exit is not None else UNKNOWN
    try:
        if child is None and not alive(proc):
            return UNKNOWN
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    if child is None:
        return UNKNOWN
    result = _reap(child, block=True)
    assert result is not None
    return result


def _signal_number(name: str) -> int:
    key = name.upper()
    if not key.startswith("SIG"):
        key = "SIG" + key
    try:
        return int(signals.Signals[key])
    except KeyError:
        raise UnknownSignalError(name) from None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_session(proc: Proc, sig: int) -> None:
    """Signal each member once: the leader's group in one call, then those that left it."""
    try:
        os.killpg(proc.sid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid, got in procinfo.members(proc.sid).items():
        if not got.zombie and got.pgrp != proc.sid:
            _kill(pid, sig)


def _reap_orphans(sid: int) -> None:
    """Reap dead session members that were re-parented to us (when we are a subreaper)."""
    me = os.getpid()
    registered = {pid for (pid, _), child in _children.items() if child.exit is None}
    for pid, got in procinfo.members(sid).items():
        if got.zombie and got.ppid == me and pid not in registered:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _gone(proc: Proc, child: _Child | None) -> bool:
    if child is not None:
        _reap(child, block=False)
        leader_gone = child.exit is not None
    else:
        leader_gone = not alive(proc)
    if not leader_gone or session_pids(proc.sid):
        return False
    # Every member is dead and re-parenting is over: collect the zombies that became ours.
    _reap_orphans(proc.sid)
    return True


async def stop(proc: Proc, *, signal: str = "SIGTERM", grace_s: float = 10) -> Exit | None:
    """Stop the whole session: ``signal`` to all of it, SIGKILL to what is left after ``grace_s``.

    Returns the leader's Exit when it is our child (reaped here or by a concurrent ``wait``),
    None for an adopted leader. If cancelled, the session is SIGKILLed before re-raising, so a
    cancelled stop never leaves the service half-running.

    Raises UnknownSignalError for a signal name that does not exist (before sending anything).
    """
    sig = _signal_number(signal)
    child = _children.get((proc.pid, proc.start_time))
    if child is not None and child.exit is None:
        _reap(child, block=False)
    if not _gone(proc, child):
        try:
            _signal_session(proc, sig)
            with anyio.move_on_after(grace_s):
                while not _gone(proc, child):
                    await anyio.sleep(_POLL_S)
        except BaseException:
            with anyio.CancelScope(shield=True):
                _signal_session(proc, signals.SIGKILL)
                if child is not None:
                    _reap(child, block=True)
            raise
        deadline = time.monotonic() + _KILL_SWEEP_S
        while not _gone(proc, child) and time.monotonic() < deadline:
            _signal_session(proc, signals.SIGKILL)
            await anyio.sleep(_POLL_S)
    if child is None:
        return None
    return _reap(child, block=False)

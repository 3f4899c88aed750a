"""The few facts about processes the supervisor needs, through psutil.

Why it exists: stopping a service means finding every member of its session, and adopting a
process after an agent restart means telling it from a later process that got the same pid.
psutil answers both portably (it reads ``/proc`` on Linux and the kernel's own interfaces
elsewhere), so no module here parses ``/proc`` by hand; the session and process group come
from ``os.getsid``/``os.getpgid`` (POSIX). Reads are racy by nature: a process may vanish
between listing and reading it, which is reported as "no such process" (None), never as an
error.

Identity: a process is named by its pid and psutil's ``create_time()`` (seconds since the
epoch, derived from the kernel's start time). That value moves with the system clock (it is
boot time plus ticks since boot), so two readings are compared with ``SAME_START_S`` of
tolerance: a pid recycled within that second of the original's start is the one case it
cannot tell apart, and pids wrap far more slowly than that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

SAME_START_S = 1.0
"""Start times closer than this (seconds) name the same process (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class Info:
    """What the supervisor uses of one process."""

    zombie: bool
    ppid: int
    pgrp: int
    session: int
    start_time: float
    """psutil's create_time(): seconds since the epoch."""


def same_start(a: float, b: float) -> bool:
    return abs(a - b) < SAME_START_S


def info(pid: int) -> Info | None:
    """The process's facts, or None when there is no such process (any more) or it is hidden."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            zombie = p.status() == psutil.STATUS_ZOMBIE
            ppid = p.ppid()
            start = p.create_time()
        return Info(
            zombie=zombie,
            ppid=ppid,
            pgrp=os.getpgid(pid),
            session=os.getsid(pid),
            start_time=start,
        )
    except (psutil.Error, ProcessLookupError, PermissionError):
        return None


def members(sid: int) -> dict[int, Info]:
    """Every process of session ``sid``, zombies included, by pid."""
    found: dict[int, Info] = {}
    for pid in psutil.pids():
        try:
            if os.getsid(pid) != sid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        got = info(pid)
        if got is not None and got.session == sid:
            found[pid] = got
    return found


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process whose session id is ``sid``, sorted."""
    return sorted(pid for pid, got in members(sid).items() if not got.zombie)

"""Reading /proc: the few facts about processes the supervisor needs.

Why it exists: ``/proc/PID/stat`` is the one place that gives, atomically per process, the
state, parent, process group, session and start time; parsing it once, correctly (the command
name may contain spaces and parentheses), keeps the process driver readable. Reads are racy by
nature: a process may vanish between listing ``/proc`` and reading its stat, which is reported
as "no such process" (None), never as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat the supervisor uses (numbers as in proc(5))."""

    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int


def stat(pid: int) -> Stat | None:
    """The process's stat line, or None when there is no such process (any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: fields resume after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return Stat(
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        start_ticks=int(rest[19]),
    )


def boot_time() -> float:
    """Wall-clock seconds at boot; start_ticks / SC_CLK_TCK after it is a start time."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def members(sid: int) -> dict[int, Stat]:
    """Every process of session ``sid``, zombies included, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = stat(int(entry.name))
        if st is not None and st.session == sid:
            found[int(entry.name)] = st
    return found


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process whose session id is ``sid``, sorted."""
    return sorted(pid for pid, st in members(sid).items() if st.state != "Z")

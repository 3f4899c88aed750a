"""Ports: pick a free one, and say who holds a busy one.

Why it exists: "port 8001 is in use" is a dead end; "port 8001 is held by pid 4242 (node)"
tells the developer which terminal to close. The holder is found the way ``ss -p`` does it:
the socket's inode from ``/proc/net/tcp`` and ``/proc/net/tcp6``, then the process whose
``/proc/PID/fd`` links to ``socket:[INODE]``.

What it does not guarantee: a port reported free may be taken a moment later by someone
else (the agent must still handle the bind failure), and the holder is only visible when it
runs as our user (or we are root) and in our network namespace; otherwise ``PortOwner(None,
None)`` still says "busy". ``pick_free`` binds only to the host it is given (loopback by
default), never to a wildcard address.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class PortOwner:
    pid: int | None
    name: str | None
    """The holder's command name (/proc/PID/comm)."""

    def describe(self) -> str:
        if self.pid is None:
            return "held by a process we cannot see"
        return f"held by pid {self.pid} ({self.name})"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pick_free(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (the kernel's choice for port 0)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_free(port: int, host: str = "127.0.0.1") -> PortOwner | None:
    """None when ``port`` can be bound on ``host``; else who holds it.

    SO_REUSEADDR is set as servers do, so a port left in TIME_WAIT counts as free.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
        else:
            return None
    return owner(port)


def _socket_inodes(port: int) -> list[int]:
    """Inodes of TCP sockets bound to ``port``; listeners first."""
    listening: list[int] = []
    other: list[int] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) != port or inode == 0:
                continue
            (listening if state == _LISTEN else other).append(inode)
    return listening + other


def owner(port: int) -> PortOwner:
    """Who holds a TCP socket bound to ``port``; ``PortOwner(None, None)`` when not visible."""
    inodes = _socket_inodes(port)
    if not inodes:
        return PortOwner(None, None)
    wanted = {f"socket:[{inode}]": rank for rank, inode in enumerate(inodes)}
    best: tuple[int, int] | None = None
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            fds = list((proc_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                rank = wanted.get(str(fd.readlink()))
            except OSError:
                continue
            if rank is not None and (best is None or (rank, int(proc_dir.name)) < best):
                best = (rank, int(proc_dir.name))
    if best is None:
        return PortOwner(None, None)
    pid = best[1]
    try:
        name: str | None = (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        name = None
    return PortOwner(pid, name)

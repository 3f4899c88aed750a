"""Ports: pick a free one, and say who holds a busy one.

Why it exists: "port 8001 is in use" is a dead end; "port 8001 is held by pid 4242 (node)"
tells the developer which terminal to close. The holder is found through psutil's
``net_connections`` (the socket table joined with each process's open sockets, as ``ss -p``
does), so nothing here parses ``/proc``.

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

import psutil


@dataclass(frozen=True, slots=True)
class PortOwner:
    pid: int | None
    name: str | None
    """The holder's process name (psutil's ``name()``)."""

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


def owner(port: int) -> PortOwner:
    """Who holds a TCP socket bound to ``port``; ``PortOwner(None, None)`` when not visible.

    A listener is preferred over a connection that merely uses the port, and among equals
    the lowest pid (the parent of forked workers that share a listener).
    """
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return PortOwner(None, None)
    best: tuple[int, int] | None = None
    for c in conns:
        if not c.laddr or c.laddr.port != port or c.pid is None:
            continue
        rank = (0 if c.status == psutil.CONN_LISTEN else 1, c.pid)
        if best is None or rank < best:
            best = rank
    if best is None:
        return PortOwner(None, None)
    pid = best[1]
    try:
        name: str | None = psutil.Process(pid).name()
    except psutil.Error:
        name = None
    return PortOwner(pid, name)

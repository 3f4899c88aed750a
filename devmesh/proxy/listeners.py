"""Listening sockets for the proxy, alone or shared with worker processes.

Why a module: with worker processes every listener is bound with SO_REUSEPORT, and the
kernel then spreads new connections across every socket on the port whose owner has the
same user id. That is what the workers want, and also a trap: a second devmesh agent (another
DEVMESH_HOME) on the same port would bind without an error and silently take half the
traffic. So the first process on a port (the agent, or a standalone proxy) proves the port is
free with an ordinary bind first, and only the workers, which are told that their agent holds
the port, join without that check.
"""

from __future__ import annotations

import contextlib
import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def probe_free(host: str, port: int) -> int:
    """Bind host:port without SO_REUSEPORT and let go; the port (a free one for port 0).

    Raises OSError (EADDRINUSE) when anything listens there, shared or not. SO_REUSEADDR only
    lets the probe ignore connections in TIME_WAIT, as the real bind does.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((host, port))
        return int(probe.getsockname()[1])


def bind(host: str, port: int, *, shared: bool = False, join: bool = False) -> socket.socket:
    """A listening TCP socket on host:port.

    ``shared``: SO_REUSEPORT, so workers can join; the port is first proven free (a port of
    0 is resolved to a free port by that probe). ``join``: the caller is a worker whose agent
    already holds the port; bind shared with no probe.
    """
    if shared and not join:
        port = probe_free(host, port)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if shared or join:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return sock

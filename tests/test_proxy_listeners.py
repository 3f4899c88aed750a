"""Shared listeners: workers may join a port their agent holds; nobody else may, silently."""

from __future__ import annotations

import socket

import pytest

from devmesh.proxy import listeners


def test_shared_bind_refuses_a_port_another_process_shares() -> None:
    # A foreign SO_REUSEPORT listener (say, a second agent on the same port) must not be
    # joined silently: the kernel would split the connections between the two.
    foreign = listeners.bind("127.0.0.1", 0, shared=True)
    try:
        port = foreign.getsockname()[1]
        with pytest.raises(OSError) as exc:
            listeners.bind("127.0.0.1", port, shared=True)
        assert exc.value.errno == 98
    finally:
        foreign.close()


def test_worker_joins_the_port_and_both_accept() -> None:
    first = listeners.bind("127.0.0.1", 0, shared=True)
    port = first.getsockname()[1]
    second = listeners.bind("127.0.0.1", port, shared=False, join=True)
    try:
        assert second.getsockname()[1] == port
        accepted = 0
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        for sock in (first, second):
            sock.setblocking(True)
            sock.settimeout(0.2)
            while True:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    break
                conn.close()
                accepted += 1
        assert accepted == 32
        for c in clients:
            c.close()
    finally:
        first.close()
        second.close()


def test_plain_listener_blocks_shared_and_joining_binds() -> None:
    plain = listeners.bind("127.0.0.1", 0)
    port = plain.getsockname()[1]
    try:
        for kwargs in ({"shared": True}, {"join": True}):
            with pytest.raises(OSError):
                listeners.bind("127.0.0.1", port, **kwargs)
    finally:
        plain.close()

"""Ports on loopback: free ports, and naming the process that holds a busy one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.supervisor import ports

HOLDER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def _holder(tmp_path: Path, host: str) -> tuple[subprocess.Popen[str], int]:
    """A listener in another process, started through a symlink so its comm is known."""
    exe = tmp_path / "devmesh-holder"
    exe.symlink_to(sys.executable)
    child = subprocess.Popen(
        [str(exe), "-c", HOLDER, host], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = child.stdout.readline()  # type: ignore[union-attr]
    if not line:
        child.wait(timeout=10)
        pytest.skip(f"cannot listen on {host}")
    return child, int(line)


def _close(child: subprocess.Popen[str]) -> None:
    child.stdin.close()  # type: ignore[union-attr]
    child.stdout.close()  # type: ignore[union-attr]
    child.wait(timeout=10)


def test_pick_free_gives_a_bindable_loopback_port():
    port = ports.pick_free()
    assert 0 < port < 65536
    assert ports.check_free(port) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_check_free_names_the_listener_in_another_process(tmp_path, host):
    child, port = _holder(tmp_path, host)
    try:
        owner = ports.check_free(port, host)
        assert owner == ports.PortOwner(child.pid, "devmesh-holder")
        assert owner.describe() == f"held by pid {child.pid} (devmesh-holder)"
    finally:
        _close(child)
    assert ports.check_free(port, host) is None


def test_check_free_names_our_own_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        owner = ports.check_free(port)
        assert owner is not None
        assert owner.pid == os.getpid()
        assert owner.name == Path("/proc/self/comm").read_text().strip()


def test_a_closed_server_with_lingering_connections_leaves_the_port_free():
    """As after a dev server restart: its old connections linger (FIN_WAIT/TIME_WAIT)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as real servers do
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end lingers
        client.close()
    assert ports.check_free(port) is None


def test_unknown_owner_describes_itself():
    assert ports.PortOwner(None, None).describe() == "held by a process we cannot see"

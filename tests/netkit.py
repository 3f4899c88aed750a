"""Test harness for the mesh: "machines" as network namespaces, and mesh nodes as processes.

Why namespaces: broadcast, partitions and a dying peer need several hosts, and network
namespaces give real ones (own interfaces, routes, firewall) without touching the
machine's network. Layout of a ``Net`` of N hosts::

    switch namespace  dmt-PID-K-sw : bridge br0, one veth end per host (v0, v1, ...)
    host namespace    dmt-PID-K-hI : eth0 = 10.250.7.(I+1)/24 (broadcast 10.250.7.255), lo

Nothing is added to the root namespace: both ends of every veth are created inside the
switch namespace and one is moved into its host namespace. Every namespace is deleted on
``close`` (also when the test failed), which kills whatever still runs in them; ``sweep``
deletes the namespaces of test runs whose process is gone (a crashed run).

Network safety: the subnet 10.250.7.0/24 exists only inside these namespaces; processes
started with ``Net.run`` see no other interface than ``lo`` and their ``eth0``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SUBNET = "10.250.7"
PREFIX = "dmt-"
_counter = itertools.count()


def have_netns() -> bool:
    """Whether this process may create network namespaces (root, ip and nft or iptables)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


NETNS = pytest.mark.needs_root("network namespaces (root and iproute2)", check=have_netns)
"""The mark of a test that makes namespaces: skipped unless root, a failure under
DEVMESH_REQUIRE_ROOT=1 (see conftest.py)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def sweep() -> list[str]:
    """Delete namespaces left by test runs whose process no longer exists."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class Net:
    """N hosts on one bridge; use as a context manager (or call ``close``)."""

    def __init__(self, hosts: int) -> None:
        sweep()
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.procs: list[subprocess.Popen[str]] = []
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            _ip("netns", "add", host)
            self._made.append(host)
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            )
            _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"{self.address(i)}/24", "brd", "+", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "link", "set", "lo", "up")

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    # -- processes and faults --------------------------------------------------------------

    def run(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a process inside host ``i`` (killed by ``close``)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], text=True, **kw)
        self.procs.append(proc)
        return proc

    def exec(self, i: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.hosts[i], *argv], capture_output=True,
                              text=True, check=True, timeout=30)  # fmt: skip

    def pids(self, i: int) -> list[int]:
        """Every process whose network namespace is host ``i``'s, whoever started it."""
        out = _ip("netns", "pids", self.hosts[i], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_all(self, i: int) -> list[int]:
        """SIGKILL every process in host ``i`` (the machine loses power); the pids killed.

        By namespace rather than by environment or session: a service may clear its
        environment (nginx does) or start its own session, and still dies with the machine.
        """
        pids = self.pids(i)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def link(self, i: int, up: bool) -> None:
        """Take host ``i``'s cable out of the switch (or plug it back)."""
        _ip("-n", self.switch, "link", "set", f"v{i}", "up" if up else "down")

    def drop_broadcast(self, i: int) -> None:
        """Drop every broadcast datagram into and out of host ``i`` (nftables, else iptables)."""
        bcast = f"{SUBNET}.255"
        if shutil.which("nft"):
            rules = (
                "table inet devmesh_test {\n"
                f" chain in {{ type filter hook input priority 0; ip daddr {bcast} drop; }}\n"
                f" chain out {{ type filter hook output priority 0; ip daddr {bcast} drop; }}\n"
                "}\n"
            )
            subprocess.run(["ip", "netns", "exec", self.hosts[i], "nft", "-f", "-"], input=rules,
                           text=True, check=True, timeout=30, capture_output=True)  # fmt: skip
        else:
            for chain in ("INPUT", "OUTPUT"):
                self.exec(i, ["iptables", "-A", chain, "-d", bcast, "-j", "DROP"])


# -- mesh nodes as processes -----------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.02)  # polling an observable state, not synchronising on time
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


MESH = [sys.executable, "-m", "devmesh.mesh"]


def init_team(home: Path, name: str, mesh: str = "team") -> None:
    subprocess.run([*MESH, "init", "--home", str(home), "--mesh", mesh, "--node-name", name],
                   check=True, capture_output=True, timeout=60)  # fmt: skip


def join_team(home: Path, bundle_of: Path, name: str) -> None:
    bundle = home.parent / f"{home.name}.bundle"
    subprocess.run([*MESH, "export", "--home", str(bundle_of), str(bundle)], check=True, timeout=60)
    subprocess.run([*MESH, "join", "--home", str(home), str(bundle), "--node-name", name],
                   check=True, capture_output=True, timeout=60)  # fmt: skip


class NodeProc:
    """A ``python -m devmesh.mesh run`` process and its status file."""

    def __init__(self, home: Path, args: list[str], *, net: Net | None = None, host: int = 0,
                 services: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.home = home
        self.status_file = home / "status.json"
        argv = [*MESH, "run", "--home", str(home), "--status-file", str(self.status_file), *args]
        if services is not None:
            (home / "services.json").write_text(json.dumps(services))
            argv += ["--services", str(home / "services.json")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if net is not None:
            self.proc = net.run(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        else:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"node {home.name} did not start: {line!r} {err}")
        self.port = int(line.split()[1])

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def peer(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.status().get("peers", []) if p["name"] == name), None)

    def alive_peers(self) -> set[str]:
        return {p["name"] for p in self.status().get("peers", []) if p["state"] == "alive"}

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Signal the node, wait for it, and return what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        err = ""
        if self.proc.stderr and not self.proc.stderr.closed:
            err = self.proc.stderr.read()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return err


# -- clients inside a namespace, from the test process ---------------------------------------
#
# A namespace's loopback (its agent's proxy and edge listeners, its services) is reachable only
# from inside it. Rather than one subprocess per request, a socket is made inside: a short-lived
# thread enters the namespace (setns(2) changes the calling thread only), connects, and exits;
# the connected socket stays in that namespace and any thread may use it. Real clients then run
# over it: http.client (keep-alive, streaming) and websockets (``sock=``).

CLONE_NEWNET = 0x40000000


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def ns_socket(netns: str, host: str, port: int, timeout_s: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` made inside namespace ``netns``."""
    import ctypes
    import threading

    out: dict[str, Any] = {}

    def inside() -> None:
        try:
            with open(f"/run/netns/{netns}") as f:
                if _libc().setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            sock = socket.create_connection((host, port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out["sock"] = sock
        except BaseException as exc:  # handed to the caller's thread
            out["exc"] = exc

    t = threading.Thread(target=inside, name=f"setns-{netns}")
    t.start()
    t.join()
    if "exc" in out:
        raise out["exc"]
    return out["sock"]


class NsHTTP:
    """An ``http.client`` connection whose socket lives in a namespace (keep-alive, reconnects).

    ``host_header`` is what the request names (``api.localhost:PORT``); ``host``/``port`` is
    where the socket goes inside ``netns``.
    """

    def __init__(self, netns: str, host: str, port: int, timeout_s: float = 10.0) -> None:
        import http.client

        self.netns, self.host, self.port, self.timeout_s = netns, host, port, timeout_s
        outer = self

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = ns_socket(outer.netns, outer.host, outer.port, outer.timeout_s)

        self.conn = _Conn(host, port, timeout=timeout_s)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        stream: bool = False,
    ) -> Any:
        """Send one request; the ``http.client.HTTPResponse`` (read already unless ``stream``)."""
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            resp = self.conn.getresponse()
        except BaseException:
            self.conn.close()
            raise
        if not stream:
            resp.body = resp.read()  # type: ignore[attr-defined]
            if resp.will_close:
                self.conn.close()
        return resp

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        resp = self.request("GET", path, headers=headers)
        try:
            return resp.status, json.loads(resp.body)
        except ValueError:
            return resp.status, resp.body.decode(errors="replace")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> NsHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Gossip discovery on HashiCorp Serf: the backend for remote and large teams.

Why Serf: broadcast does not cross a VPN, and seeds are not transitive (a node answers only
whoever announced itself to it), so a remote team would have to list every laptop in every
file. Serf (SWIM gossip, the membership layer under Consul and Nomad) finds every member
from one known address, detects failures in seconds, and costs each member about the same
however large the team. We run the machine's own ``serf`` binary rather than a gossip
protocol of our own.

How:

- The node runs ``serf agent`` as a child it supervises: restarted with backoff
  (``core.backoff``) when it dies, its output in ``DEVMESH_HOME/logs/serf.log``, stopped
  with the node (SIGINT: Serf leaves the cluster gracefully, so the others drop us at
  once), and never orphaned: it runs in its own session (a Ctrl-C at the terminal is the
  agent's to handle) and asks the kernel for SIGINT when the node dies
  (``PR_SET_PDEATHSIG``). Its configuration (gossip key, RPC token) is a 0600 file under
  ``DEVMESH_HOME/serf``, never on a command line another user can read in ``ps``.
- Member name = node id; tags = ``core.serftags`` (name, channel address and port, catalog
  revision, boot time, signed with a key derived from the mesh secret). Gossip is encrypted
  with a key derived from the mesh secret under its own label (``-encrypt``), so another
  team's Serf cluster on the network can neither join ours nor read it.
- Membership is read by polling ``serf members -format json`` over Serf's RPC (loopback,
  with a per-run token) every ``poll_s``, and at once when ``serf monitor`` (one
  long-lived process) shows a membership event. Why polling and not ``serf monitor`` or event
  handlers: a poll reads Serf's whole state, so a missed or reordered event, or a restart
  of the Serf child, can never leave the registry out of step; event handlers would start a
  process per event and need a second channel back into the node. The cost is one short
  process per interval (about 8 ms of CPU), flat in the size of the team.
- An alive member is reported as a sighting every poll (the registry keeps it alive); a
  member that Serf marks failed or left, or forgets, is reported once as gone. Tags that do
  not verify are reported once per change, so the drop counters count forged members, not
  polls.
- A change of the tags (catalog revision) is pushed with ``serf tags -set``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devmesh.core import backoff, serftags, wire
from devmesh.mesh.discovery import DiscoveryError, MakeDatagram, Report, Sighting, parse_seed

DEFAULT_PORT = 7946
PACKAGE_HINT = (
    "install the `serf` package (Debian/Ubuntu: apt install serf; macOS: brew install serf)"
)
RESTART_BASE_S = 0.5
STABLE_AFTER_S = 10.0
"""A Serf child that ran this long before dying starts a fresh backoff."""
STOP_GRACE_S = 5.0
"""Seconds Serf gets to leave the cluster after SIGINT before SIGKILL."""
CLI_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h

MakeTags = Callable[[str], dict[str, str]]
"""The signed tags naming the given address as the peer-channel address."""


def find_binary() -> str | None:
    """The ``serf`` binary on PATH, or None."""
    return shutil.which("serf")


def parse_join(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` of a member's Serf port; raises DiscoveryError."""
    try:
        return parse_seed(text)  # the same form as a seed
    except DiscoveryError:
        raise DiscoveryError(f"serf join {text!r}", "expected HOST:PORT") from None


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(slots=True)
class _Member:
    tags: dict[str, str]
    address: str
    alive: bool


class SerfBackend:
    """Run ``serf agent`` for this node and report its members as sightings."""

    name = "serf"

    def __init__(
        self,
        *,
        binary: str,
        home: Path,
        node_id: str,
        bind: str,
        port: int,
        join: list[str],
        keys: wire.MeshKeys,
        make_tags: MakeTags,
        poll_s: float = 2.0,
        log: Callable[[str], None] = lambda _line: None,
        rng: random.Random | None = None,
    ) -> None:
        self.binary = binary
        self.dir = home / "serf"
        self.log_path = home / "logs" / "serf.log"
        self.node_id = node_id
        self.bind = bind
        self.port = port
        # One committed file lists the same join address for the whole team: its owner
        # leaves itself out.
        self.join = [j for j in join if parse_join(j) != (bind, port)]
        self.keys = keys
        self.make_tags = make_tags
        self.poll_s = poll_s
        self.log = log
        self.rng = rng or random.Random()
        self.rpc_addr = ""
        self._token = secrets.token_urlsafe(24)
        self._tags: dict[str, str] = {}
        """The tags this node wants Serf to carry."""
        self._pushed: dict[str, str] = {}
        """The tags Serf carries (written in its config, or set by ``serf tags``)."""
        self._members: dict[str, _Member] = {}
        self._bad: dict[str, dict[str, str]] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._report: Report | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._wake = asyncio.Event()
        self._pushing = asyncio.Lock()
        self.sent = 0
        """Tag updates pushed to Serf."""
        self.restarts = 0
        self.polls = 0
        self.cluster = 0
        """Alive members as Serf lists them, this node included, signed tags or not."""
        """Member lists read from Serf."""
        self.errors = 0
        """Failed ``serf members``/``serf tags`` calls (Serf down or restarting)."""

    # -- the Serf child --------------------------------------------------------------------

    def _config(self) -> dict[str, object]:
        known = [m.address for m in self._members.values() if m.alive]
        join = list(dict.fromkeys([*self.join, *known]))
        return {
            "node_name": self.node_id,
            "bind": f"{self.bind}:{self.port}",
            "advertise": f"{self.bind}:{self.port}",
            "rpc_addr": self.rpc_addr,
            "rpc_auth": self._token,
            "encrypt_key": serftags.gossip_key(self.keys),
            "tags": self._pushed,
            "retry_join": join,
            "retry_interval": "1s",
            "log_level": "warn",  # membership events reach the node's log through the monitor
        }

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._pushed = dict(self._tags)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config = self.dir / "agent.json"
        tmp = self.dir / f".agent.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._config(), f)
        os.replace(tmp, config)
        with self.log_path.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                self.binary,
                "agent",
                f"-config-file={config}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    async def _keep(self) -> None:
        """Keep the Serf child running: restart with backoff when it exits."""
        failures = 0
        while True:
            started = time.monotonic()
            proc = self._proc
            if proc is None:
                try:
                    proc = self._proc = await self._spawn()
                except OSError as exc:
                    self.log(f"mesh: serf: cannot start {self.binary}: {exc}")
                    proc = None
            if proc is not None:
                code = await proc.wait()
                if self._closing:
                    return
                self._proc = None
                self.log(f"mesh: serf agent exited with {code} (log: {self.log_path})")
            if time.monotonic() - started > STABLE_AFTER_S:
                failures = 0
            failures += 1
            self.restarts += 1
            await asyncio.sleep(
                backoff.delay(failures, base_s=RESTART_BASE_S, jitter=self.rng.random())
            )

    async def _cli(self, *args: str) -> bytes | None:
        """Run one ``serf`` CLI command against our agent; None when it failed."""
        env = {**os.environ, "SERF_RPC_AUTH": self._token}
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary,
                *args,
                f"-rpc-addr={self.rpc_addr}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            self.errors += 1
            return None
        try:
            async with asyncio.timeout(CLI_TIMEOUT_S):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            self.errors += 1
            return None
        if proc.returncode != 0:
            self.errors += 1
            return None
        return out

    # -- membership ------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await self._push()
            out = await self._cli("members", "-format=json")
            if out is not None:
                self._apply(out)
                self.polls += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    def _apply(self, out: bytes) -> None:
        try:
            members = json.loads(out).get("members") or []
        except (ValueError, AttributeError):
            self.errors += 1
            return
        seen: set[str] = set()
        cluster = 1
        for m in members:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                continue
            name: str = m["name"]
            if name == self.node_id:
                continue
            raw = m.get("tags")
            tags = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            address = str(m.get("addr", "")).rpartition(":")[0].strip("[]")
            alive = m.get("status") == "alive"
            cluster += alive
            seen.add(name)
            self._member(name, tags, address, alive)
        for name in [n for n in self._members if n not in seen]:
            old = self._members[name]
            self._member(name, old.tags, old.address, alive=False)
            self._members.pop(name, None)
        for name in [n for n in self._bad if n not in seen]:
            self._bad.pop(name)
        self.cluster = cluster

    def _member(self, name: str, tags: dict[str, str], address: str, alive: bool) -> None:
        old = self._members.get(name)
        if not alive and (old is None or not old.alive):
            return  # failed or left before we knew it alive: nothing to take back
        if alive:
            check = serftags.decode(name, tags, keys=self.keys, alive=True, now_ms=0)
            if isinstance(check, wire.Drop):
                if self._bad.get(name) == tags:
                    return  # already reported (and counted) once
                self._bad[name] = tags
            else:
                self._bad.pop(name, None)
                self._members[name] = _Member(tags=tags, address=address, alive=True)
        else:
            self._members[name] = _Member(tags=tags, address=address, alive=False)
        if self._report is not None:
            self._report(
                Sighting(backend=self.name, source=address, member=name, tags=tags, alive=alive)
            )

    async def _watch(self) -> None:
        """Poll at once when Serf reports a membership event (``serf monitor``).

        Only a trigger: the member list is still read whole by the poll, so a line missed
        while Serf restarts costs at most one poll interval, never a wrong registry.
        """
        env = {**os.environ, "SERF_RPC_AUTH": self._token}
        while True:
            proc = None
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    "monitor",
                    "-log-level=info",
                    f"-rpc-addr={self.rpc_addr}",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
                assert proc.stdout is not None
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    if "serf: EventMember" in line:
                        self.log("mesh: serf: " + line.split("serf: ", 1)[1].strip()[:200])
                        self._wake.set()
            except OSError:
                self.errors += 1
            finally:
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            await asyncio.sleep(self.poll_s)  # Serf is (re)starting: try again soon

    # -- the backend interface -------------------------------------------------------------

    async def start(self, report: Report) -> None:
        self._report = report
        self.rpc_addr = f"127.0.0.1:{_free_loopback_port()}"
        self._tags = self.make_tags(self.bind)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep()),
            loop.create_task(self._poll()),
            loop.create_task(self._watch()),
        ]
        self.log(
            f"mesh: serf agent on {self.bind}:{self.port}"
            + (f", joining {', '.join(self.join)}" if self.join else "")
        )

    async def announce(self, make: MakeDatagram) -> None:
        """Push the tags when they changed (new catalog revision); ``make`` is unused."""
        self._tags = self.make_tags(self.bind)
        await self._push()

    async def _push(self) -> None:
        """Bring Serf's tags up to date; a failure (Serf starting) is retried every poll, so
        peers never hold a stale revision (they would fetch the catalog again and again)."""
        async with self._pushing:  # the poll loop and an announce may both try
            tags = self._tags
            if tags == self._pushed or self._proc is None or self._closing:
                return  # nothing to do, or the next start carries them in its config
            args = ["tags"]
            for k, v in tags.items():
                args.append(f"-set={k}={v}")
            if await self._cli(*args) is not None:
                self._pushed = dict(tags)
                self.sent += 1
                self._wake.set()

    async def close(self) -> None:
        """Leave the cluster (SIGINT), then kill after a grace; never leaves a child."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def status(self) -> dict[str, object]:
        proc = self._proc
        return {
            "pid": proc.pid if proc is not None and proc.returncode is None else None,
            "bind": f"{self.bind}:{self.port}",
            "join": list(self.join),
            "members": sum(1 for m in self._members.values() if m.alive) + 1,
            "cluster": self.cluster,
            "restarts": self.restarts,
            "polls": self.polls,
            "errors": self.errors,
            "log": str(self.log_path),
        }


def bind_address(interfaces: list[str], join: list[str]) -> str:
    """The IPv4 address Serf binds and advertises (and the tags name for the peer channel).

    Named interfaces: the first one's address (a point-to-point VPN interface such as
    ``tailscale0`` is fine here, unlike for broadcast). ``auto``: the address the kernel
    would use towards the first join address, else the first up, non-loopback interface's.
    Never 0.0.0.0: Serf listens on exactly the address discovery was pinned to.
    Raises DiscoveryError naming the interface.
    """
    import ipaddress

    import netifaces

    from devmesh.mesh import discovery

    if interfaces and interfaces != ["auto"]:
        name = interfaces[0]
        if name not in netifaces.interfaces():
            raise DiscoveryError(f"serf: interface {name}", "no such interface")
        addrs = netifaces.ifaddresses(name).get(netifaces.AF_INET, [])
        if not addrs:
            raise DiscoveryError(f"serf: interface {name}", "has no IPv4 address")
        return str(addrs[0]["addr"])
    for entry in join:
        host, port = parse_join(entry)
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            continue
        address = discovery.source_address_for(str(infos[0][4][0]), port)
        if address:
            return address
    for name in netifaces.interfaces():
        for addr in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            if not ipaddress.ip_address(addr["addr"]).is_loopback:
                return str(addr["addr"])
    raise DiscoveryError("serf", "no IPv4 address to bind (name one in mesh.discovery.interfaces)")

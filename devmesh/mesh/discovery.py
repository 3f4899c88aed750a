"""Discovery backends behind one interface: UDP broadcast and static seeds (mDNS: ``mdns``).

Why one interface: the registry only wants sightings (bytes or a TXT record, the source
address, the backend's name) and the node only wants to say "announce this now". Which
backend saw a peer is recorded for display and nothing else, so adding a backend (mDNS,
later an existing registry such as Consul) touches neither the registry nor routing.

Broadcast and seeds share one UDP socket bound to the discovery port (with SO_REUSEPORT,
so several nodes on one machine can all receive broadcasts on ``lo``). Received datagrams
are told apart by their destination (IP_PKTINFO): a broadcast arriving on a selected
interface belongs to the broadcast backend; a unicast datagram to the seeds backend.
Broadcasts arriving on an interface that was not selected are ignored. Where IP_PKTINFO
is not available (it is Linux's), datagrams are told apart by their source instead: from a
selected interface's network, broadcast; from elsewhere, seeds.

- ``lo`` sends to 127.255.255.255: every node on this machine hears it, nothing leaves it.
- ``auto`` means every up, broadcast-capable, non-loopback IPv4 interface (netifaces).
- Seeds are ``HOST:PORT`` of a peer's discovery port, heartbeated by unicast. A node that
  receives a valid unicast announcement answers its sender by unicast from then on
  (``learn``), so one side listing the other is enough.

What a sighting may announce is the registry's to judge (``core.peers.address_drop``): a
broadcast must name the address it came from, and nothing heard over a network may name a
loopback address; seeds (NAT, ``advertise``) and sightings on ``lo`` are exempt. So the
``source`` of a ``Sighting`` is the datagram's own source address, never a claim.

Network safety: nothing here picks an interface by itself except ``auto``; tests pin
``lo`` or interfaces inside their own network namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Protocol

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
"""Linux value; Python does not export the constant."""
DEFAULT_PORT = 7702
LOOPBACK_BROADCAST = "127.255.255.255"
MAX_LEARNED = 64
_RECV_BYTES = 2048


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sighting:
    """Something a backend received: a datagram or a TXT record, where from, which backend."""

    backend: str
    source: str
    """Source IP address (the sender's port, for unicast, is in ``source_port``)."""
    data: bytes | None = None
    txt: Mapping[object, object] | None = None
    source_port: int = 0
    member: str = ""
    """A Serf member's name (its node id), with its ``tags`` and whether Serf says it is alive."""
    tags: Mapping[str, str] | None = None
    alive: bool = True


Report = Callable[[Sighting], None]
MakeDatagram = Callable[[str], bytes]
"""Build a signed announcement that names the given address as the peer-channel address."""


class Backend(Protocol):
    """A way of announcing this node and of seeing others."""

    name: str

    async def start(self, report: Report) -> None:
        """Begin reporting sightings."""
        ...

    async def announce(self, make: MakeDatagram) -> None:
        """Announce this node now (hello, heartbeat or goodbye: ``make`` decides)."""
        ...

    async def close(self) -> None: ...


class DiscoveryError(Exception):
    """Discovery cannot start as configured; names the interface, seed or port."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


# -- interfaces ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Interface:
    name: str
    index: int
    address: str
    broadcast: str
    network: str
    """The interface's IPv4 network (CIDR), for systems without IP_PKTINFO."""


def _ipv4(name: str) -> list[dict[str, str]]:
    import netifaces

    try:
        return list(netifaces.ifaddresses(name).get(netifaces.AF_INET, []))
    except ValueError:
        return []


def _is_up(name: str) -> bool:
    import psutil

    stats = psutil.net_if_stats().get(name)
    return bool(stats and stats.isup)


def resolve_interfaces(names: list[str]) -> list[Interface]:
    """Turn ``[auto]`` or a list of names into interfaces with an IPv4 address and broadcast.

    Raises DiscoveryError for a named interface that does not exist, is down, or has no IPv4
    address (a typo must not silently disable discovery).
    """
    import netifaces

    out: list[Interface] = []
    if names == ["auto"]:
        candidates = [n for n in netifaces.interfaces() if _is_up(n)]
        for name in candidates:
            for addr in _ipv4(name):
                if addr.get("broadcast") and not ipaddress.ip_address(addr["addr"]).is_loopback:
                    out.append(_iface(name, addr, addr["broadcast"]))
        return out
    for name in names:
        if name not in netifaces.interfaces():
            raise DiscoveryError(f"interface {name}", "no such interface")
        if not _is_up(name):
            raise DiscoveryError(f"interface {name}", "is down")
        addrs = _ipv4(name)
        if not addrs:
            raise DiscoveryError(f"interface {name}", "has no IPv4 address")
        addr = addrs[0]
        if ipaddress.ip_address(addr["addr"]).is_loopback:
            out.append(_iface(name, addr, LOOPBACK_BROADCAST))
        elif addr.get("broadcast"):
            out.append(_iface(name, addr, addr["broadcast"]))
        else:
            raise DiscoveryError(
                f"interface {name}", "cannot broadcast (point-to-point?): use seeds"
            )
    return out


def _iface(name: str, addr: dict[str, str], broadcast: str) -> Interface:
    mask = addr.get("netmask") or "255.255.255.255"
    network = ipaddress.ip_network(f"{addr['addr']}/{mask}", strict=False)
    return Interface(
        name=name,
        index=socket.if_nametoindex(name),
        address=addr["addr"],
        broadcast=broadcast,
        network=str(network),
    )


def parse_seed(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises DiscoveryError."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DiscoveryError(f"seed {text!r}", "expected HOST:PORT")
    return host, int(port)


# -- the shared UDP socket -------------------------------------------------------------------


class UdpSocket:
    """One non-blocking UDP socket on the discovery port, dispatching by destination."""

    def __init__(self, port: int = DEFAULT_PORT, bind_host: str = "") -> None:
        self.port = port
        self.bind_host = bind_host
        self.sock: socket.socket | None = None
        self.on_broadcast: Callable[[bytes, tuple[str, int], int], None] | None = None
        self.on_unicast: Callable[[bytes, tuple[str, int]], None] | None = None
        self.errors = 0
        self.broadcast_addresses: set[str] = set()
        """Destinations that make a datagram a broadcast (set by the broadcast backend)."""
        self.broadcast_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        """Sources that make a datagram a broadcast where IP_PKTINFO is missing."""
        self.pktinfo = sys.platform.startswith("linux")

    def open(self) -> None:
        if self.sock is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if self.pktinfo:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((self.bind_host, self.port))
        except OSError as exc:
            sock.close()
            raise DiscoveryError(f"UDP port {self.port}", f"cannot bind: {exc.strerror}") from None
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def send(self, data: bytes, address: tuple[str, int]) -> bool:
        """Send one datagram; a failure (no route, link down) is counted, not raised."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto(data, address)
            return True
        except OSError:
            self.errors += 1
            return False

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # bounded per wake-up so one flood cannot stall the loop
            try:
                data, anc, _flags, src = self.sock.recvmsg(_RECV_BYTES, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.errors += 1
                return
            ifindex, dst = 0, ""
            for level, kind, payload in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= 12:
                    ifindex = struct.unpack("=i", payload[:4])[0]
                    dst = socket.inet_ntoa(payload[8:12])
            if not self.pktinfo:
                ifindex = -1  # unknown: classified by source below
                src_ip = ipaddress.ip_address(src[0])
                is_broadcast = any(src_ip in net for net in self.broadcast_networks)
            else:
                is_broadcast = dst in self.broadcast_addresses or dst == "255.255.255.255"
            if is_broadcast:
                if self.on_broadcast:
                    self.on_broadcast(data, src, ifindex)
            elif self.on_unicast:
                self.on_unicast(data, src)


def source_address_for(host: str, port: int) -> str | None:
    """The local address the kernel would use towards ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return str(s.getsockname()[0])
        except OSError:
            return None


# -- backends --------------------------------------------------------------------------------


class BroadcastBackend:
    """Announce by broadcast on each selected interface; hear broadcasts on them only."""

    name = "broadcast"

    def __init__(
        self, udp: UdpSocket, interfaces: list[Interface], names: list[str] | None = None
    ) -> None:
        self.udp = udp
        self.names = names
        """The configured names (``auto`` or a list): ``refresh`` resolves them again."""
        self.interfaces: list[Interface] = []
        self._indexes: set[int] = set()
        self._use(interfaces)
        self.sent = 0

    def _use(self, interfaces: list[Interface]) -> None:
        self.interfaces = interfaces
        self._indexes = {i.index for i in interfaces}
        self.udp.broadcast_addresses = {i.broadcast for i in interfaces}
        self.udp.broadcast_networks = [ipaddress.ip_network(i.network) for i in interfaces]

    def refresh(self) -> bool:
        """Resolve the interfaces again (DHCP renewal, VPN up, Wi-Fi change); True when an
        address changed, so the node says hello at once. A failure keeps the last list."""
        if self.names is None:
            return False
        try:
            fresh = resolve_interfaces(self.names)
        except (DiscoveryError, OSError, ValueError):
            return False
        if fresh == self.interfaces:
            return False
        self._use(fresh)
        return True

    async def start(self, report: Report) -> None:
        def on_broadcast(data: bytes, src: tuple[str, int], ifindex: int) -> None:
            if ifindex in self._indexes or ifindex == -1:
                report(Sighting(backend=self.name, source=src[0], source_port=src[1], data=data))

        self.udp.on_broadcast = on_broadcast
        self.udp.open()

    async def announce(self, make: MakeDatagram) -> None:
        for iface in self.interfaces:
            if self.udp.send(make(iface.address), (iface.broadcast, self.udp.port)):
                self.sent += 1

    async def close(self) -> None:
        self.udp.on_broadcast = None


class SeedBackend:
    """Heartbeat static seeds by unicast, and answer whoever announced itself by unicast."""

    name = "seeds"

    def __init__(self, udp: UdpSocket, seeds: list[str], advertise: str | None = None) -> None:
        self.udp = udp
        self.seeds = [parse_seed(s) for s in seeds]
        self.advertise = advertise
        self._learned: dict[tuple[str, int], None] = {}
        self.sent = 0

    def learn(self, source: str, port: int) -> None:
        """A valid announcement came by unicast from there: answer it from now on."""
        key = (source, port)
        if key not in self._learned and key not in self.seeds:
            self._learned[key] = None
            while len(self._learned) > MAX_LEARNED:
                self._learned.pop(next(iter(self._learned)))

    def forget(self, source: str, port: int) -> None:
        self._learned.pop((source, port), None)

    async def start(self, report: Report) -> None:
        def on_unicast(data: bytes, src: tuple[str, int]) -> None:
            report(Sighting(backend=self.name, source=src[0], source_port=src[1], data=data))

        self.udp.on_unicast = on_unicast
        self.udp.open()

    async def announce(self, make: MakeDatagram) -> None:
        loop = asyncio.get_running_loop()
        for host, port in [*self.seeds, *self._learned]:
            try:
                infos = await loop.getaddrinfo(
                    host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
            except OSError:
                self.udp.errors += 1
                continue
            target = infos[0][4][0]
            address = self.advertise or source_address_for(str(target), port)
            if address and self.udp.send(make(address), (str(target), port)):
                self.sent += 1

    async def close(self) -> None:
        self.udp.on_unicast = None

"""One mesh node: discovery backends, the peer registry and the catalog channel, wired.

Why it runs standalone as well as inside the agent: the mesh must be testable as real
processes in network namespaces (``python -m devmesh.mesh run``), where the node serves its
own catalog channel (``channel.CatalogServer``). Hosted by the agent
(``NodeSettings.serve_channel`` False) it opens no listener: the agent's proxy serves the
peer channel, and asks this node who may call (``authorize``) and what to answer at the
catalog path (``catalog_bytes``), so refusals and served catalogs are counted here either way.
Nothing here decides anything: ``core.wire`` checks datagrams, ``core.peers`` keeps the
peers and says when to fetch, ``core.catalog`` checks catalogs. This module owns time
(wall clock, jittered heartbeat from an injected random source) and I/O.

Announcing: a hello at once on start, a heartbeat every ``interval_s`` times a jitter in
[0.8, 1.2) (so a room of nodes does not fall into lock-step), a hello at once when the
shared services change or a new peer appears (so it learns about us without waiting an
interval), and a goodbye on a clean stop.

Status: a JSON document (node, peers, drop counters, what was sent) written atomically to
``status_file`` whenever it changes, at least once per interval, and on SIGUSR1 by the
runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

from devmesh.core import catalog as catalogs
from devmesh.core import peers, serftags, wire
from devmesh.mesh import channel, discovery
from devmesh.mesh import identity as ids

JITTER = (0.8, 1.2)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeSettings:
    """How one node discovers and serves (the ``mesh:`` config, flattened)."""

    home: Path
    node_name: str | None = None
    interfaces: tuple[str, ...] = ("lo",)
    """``mesh.discovery.interfaces``: ``auto`` or names."""
    broadcast: bool = True
    discovery_port: int = discovery.DEFAULT_PORT
    seeds: tuple[str, ...] = ()
    """``mesh.discovery.peers``: HOST:PORT of peers' discovery ports."""
    mdns: bool = False
    mdns_addresses: tuple[str, ...] = ()
    """Addresses zeroconf is pinned to; default: those of the interfaces."""
    serf: bool = False
    """``mesh.discovery.serf`` is set: run a Serf agent (``mesh.serf``)."""
    serf_port: int = 7946
    serf_join: tuple[str, ...] = ()
    """HOST:PORT of members' Serf ports; one is enough to find everyone."""
    advertise: str | None = None
    """Peer-channel address announced to seeds; default: the route's source address."""
    channel_host: str = "0.0.0.0"
    channel_port: int = 7701
    """0 picks a free port (several nodes on one machine)."""
    interval_s: float = 2.0
    allow: tuple[str, ...] = ("*",)
    status_file: Path | None = None
    fetch_timeout_s: float = 5.0
    serve_channel: bool = True
    """Open the node's own catalog channel on ``channel_host:channel_port``. False when the
    host serves the peer channel itself (the agent's proxy): it then sets ``channel_port``
    to the port it bound before calling ``start``."""


class Node:
    """Run discovery and the catalog channel for one identity until ``stop``."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        services: tuple[catalogs.SharedService, ...] = (),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = lambda _line: None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        """Called when what peers share may have changed (a catalog fetched, a peer that
        expired, left or came back, a peer's channel refused): the host rebuilds what it
        routes by."""
        self.identity = ids.load(settings.home, node_name=settings.node_name)
        self.keys = wire.derive_keys(self.identity.team.mesh, self.identity.team.secret.reveal())
        self.registry = peers.Registry(
            peers.Settings(
                keys=self.keys,
                self_id=self.identity.node_id,
                interval_s=settings.interval_s,
                allow=settings.allow,
            )
        )
        self.rng = rng or random.Random()
        self.clock = clock
        self.log = log
        self.catalog = catalogs.Catalog(node_id=self.identity.node_id, services=services)
        self._catalog_bytes = catalogs.encode(self.catalog)
        self.boot_ms = int(clock() * 1000)
        self.seq = 0
        self.kind = wire.Kind.HELLO
        self.channel_port = 0
        self.udp = discovery.UdpSocket(settings.discovery_port)
        self.backends: list[discovery.Backend] = []
        self.seeds: discovery.SeedBackend | None = None
        self.broadcast: discovery.BroadcastBackend | None = None
        self.server = (
            channel.CatalogServer(
                self.identity,
                catalog=lambda: self._catalog_bytes,
                allowed=self._allowed,
                on_refused=self._on_refused,
            )
            if settings.serve_channel
            else None
        )
        self._served = 0
        self.channel_refused: list[str] = []
        self._wake_announce = asyncio.Event()
        self._wake_house = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_written = ""
        self._stopping = False

    # -- wiring ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the channel and the backends, then announce at once.

        Raises discovery.DiscoveryError or OSError naming the interface or port at fault;
        nothing is left open when it does.
        """
        s = self.settings
        try:
            if self.server is not None:
                self.channel_port = await self.server.start(s.channel_host, s.channel_port)
            interfaces = discovery.resolve_interfaces(list(s.interfaces)) if s.broadcast else []
            if s.broadcast:
                self.broadcast = discovery.BroadcastBackend(
                    self.udp, interfaces, list(s.interfaces)
                )
                self.backends.append(self.broadcast)
            if s.seeds or s.broadcast:
                self.seeds = discovery.SeedBackend(self.udp, list(s.seeds), s.advertise)
                self.backends.append(self.seeds)
            if s.mdns:
                from devmesh.mesh import mdns

                addresses = list(s.mdns_addresses) or [
                    i.address for i in discovery.resolve_interfaces(list(s.interfaces))
                ]
                self.backends.append(
                    mdns.MdnsBackend(
                        addresses=addresses,
                        instance=f"{self.identity.node_name}-{self.identity.node_id[:8]}",
                        port=self.channel_port,
                        make_txt=self._make_txt,
                    )
                )
            if s.serf:
                self._add_serf()
            for backend in self.backends:
                await backend.start(self._on_sighting)
        except BaseException:
            await self._close_all()
            raise
        self._spawn(self._announcer())
        self._spawn(self._housekeeper())

    def _add_serf(self) -> None:
        from devmesh.mesh import serf

        s = self.settings
        binary = serf.find_binary()
        if binary is None:
            self.log(
                f"mesh: serf: no `serf` binary on PATH: {serf.PACKAGE_HINT}; other backends go on"
            )
            return
        self.backends.append(
            serf.SerfBackend(
                binary=binary,
                home=s.home,
                node_id=self.identity.node_id,
                bind=serf.bind_address(list(s.interfaces), list(s.serf_join)),
                port=s.serf_port,
                join=list(s.serf_join),
                keys=self.keys,
                make_tags=lambda address: serftags.encode(self._announcement(address), self.keys),
                poll_s=s.interval_s,
                log=self.log,
                rng=self.rng,
            )
        )

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Say goodbye on every backend, then close everything (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.kind = wire.Kind.GOODBYE
        await self._announce_all()
        await self._close_all()

    async def _close_all(self) -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await backend.close()
        self.udp.close()
        if self.server is not None:
            await self.server.close()

    def set_services(self, services: tuple[catalogs.SharedService, ...]) -> None:
        """The shared services changed: new revision, announced at once."""
        self.catalog = catalogs.Catalog(node_id=self.identity.node_id, services=services)
        self._catalog_bytes = catalogs.encode(self.catalog)
        self.kind = wire.Kind.HELLO
        self._wake_announce.set()

    # -- announcing ------------------------------------------------------------------------

    def _announcement(self, address: str) -> wire.Announcement:
        self.seq += 1
        return wire.Announcement(
            kind=self.kind,
            node_id=self.identity.node_id,
            node_name=self.identity.node_name,
            address=address,
            port=self.channel_port,
            revision=self.catalog.revision,
            sent_ms=int(self.clock() * 1000),
            boot_ms=self.boot_ms,
            seq=self.seq,
        )

    def _make_datagram(self, address: str) -> bytes:
        return wire.encode(self._announcement(address), self.keys)

    def _make_txt(self, address: str) -> dict[str, str]:
        return wire.encode_txt(self._announcement(address), self.keys)

    async def _announce_all(self) -> None:
        for backend in self.backends:
            try:
                await backend.announce(self._make_datagram)
            except Exception as exc:  # one backend failing must not silence the others
                self.log(f"mesh: {backend.name}: announce failed: {exc}")

    async def _announcer(self) -> None:
        while True:
            if self.broadcast is not None and self.broadcast.refresh():
                self.log("mesh: interface addresses changed: hello")
                self.kind = wire.Kind.HELLO
            await self._announce_all()
            self.kind = wire.Kind.HEARTBEAT
            delay = self.settings.interval_s * self.rng.uniform(*JITTER)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake_announce.wait()
                    self.kind = wire.Kind.HELLO
            self._wake_announce.clear()

    # -- receiving -------------------------------------------------------------------------

    def _on_sighting(self, sighting: discovery.Sighting) -> None:
        now = self.clock()
        if sighting.data is not None:
            seen = self.registry.receive(
                sighting.data, source=sighting.source, backend=sighting.backend, now_s=now
            )
        elif sighting.txt is not None:
            seen = self.registry.receive_txt(
                sighting.txt, source=sighting.source, backend=sighting.backend, now_s=now
            )
        elif sighting.tags is not None:
            seen = self.registry.receive_member(
                sighting.member,
                sighting.tags,
                alive=sighting.alive,
                source=sighting.source,
                backend=sighting.backend,
                now_s=now,
            )
        else:
            return
        if seen.drop is not None:
            self.log(
                f"mesh: dropped from {sighting.source} ({sighting.backend}): "
                f"{seen.drop.reason.value} {seen.drop.detail}"
            )
            return
        if self.seeds is not None and sighting.backend == "seeds" and seen.node_id:
            if seen.gone:
                self.seeds.forget(sighting.source, sighting.source_port)
            elif seen.node_id != self.identity.node_id:
                self.seeds.learn(sighting.source, sighting.source_port)
        if seen.new:
            self.log(f"mesh: peer {seen.node_id} seen by {sighting.backend}")
            self._wake_announce.set()
        if seen.new or seen.gone:
            # A peer came back with the catalog held for it, or left. (A peer refused by
            # mesh.allow is refused from its first sighting: it never had routes to remove.)
            self.on_change()
        peer = self.registry.get(seen.node_id) if seen.node_id else None
        if seen.new or seen.gone or seen.refused or (peer is not None and peer.needs_catalog):
            # A plain heartbeat changes nothing the housekeeper acts on: let it sleep.
            self._wake_house.set()

    # -- the peer channel, when the host serves it -----------------------------------------

    def authorize(self, cert: dict[str, object] | None, address: str) -> channel.PeerIdentity | str:
        """Who calls on the peer channel, or why they are refused (counted as a refusal).

        ``cert`` is the caller's verified certificate (``getpeercert()``): the TLS layer
        already checked it chains to the team CA; here its node id and name are read and
        ``mesh.allow`` is applied, as the node's own channel does.
        """
        peer = channel.peer_identity(cert, self.identity.team.mesh, address)
        if peer is None:
            why = "no node certificate of this mesh"
            self._on_refused(address, why)
            return why
        refusal = self._allowed(peer)
        if refusal:
            self._on_refused(peer.node_name, "refused by mesh.allow")
            return refusal
        return peer

    def catalog_bytes(self) -> bytes:
        """The body of ``GET /mesh/v1/catalog`` (counted as served)."""
        self._served += 1
        return self._catalog_bytes

    @property
    def served(self) -> int:
        """Catalogs served to peers, by the node's own channel or its host's."""
        return self.server.served if self.server is not None else self._served

    def _allowed(self, peer: channel.PeerIdentity) -> str | None:
        return peers.allowed(self.settings.allow, peer.node_name, (peer.address,))

    def _on_refused(self, where: str, why: str) -> None:
        self.channel_refused.append(f"{where}: {why}"[:300])
        del self.channel_refused[:-20]
        self.registry.drops["channel-refused"] += 1
        self.log(f"mesh: channel refused {where}: {why}")

    # -- housekeeping ----------------------------------------------------------------------

    async def _housekeeper(self) -> None:
        """Expire, fetch and write the status; sleeps until the next expiry is due (or an
        interval at most, or a sighting wakes it), so an idle node wakes rarely."""
        while True:
            now = self.clock()
            expired = self.registry.tick(now)
            for node_id in expired:
                self.log(f"mesh: peer {node_id} expired")
            if expired:
                self.on_change()
            for peer in self.registry.due_fetches(now):
                self._spawn(self._fetch(peer))
            self.write_status()
            deadline = self.registry.next_deadline_s()
            period = self.settings.interval_s
            if deadline is not None:
                period = min(period, max(0.01, deadline - self.clock() + 0.01))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake_house.wait()
            self._wake_house.clear()

    async def _fetch(self, peer: peers.Peer) -> None:
        try:
            fetched = await channel.fetch_catalog(
                self.identity,
                node_id=peer.node_id,
                node_name=peer.name,
                address=peer.address,
                port=peer.port,
                timeout_s=self.settings.fetch_timeout_s,
            )
        except channel.ChannelError as exc:
            self.log(f"mesh: catalog of {peer.name}: {exc.problem}")
            if exc.refused:
                self.registry.refuse(peer.node_id, exc.problem)
                self.on_change()
            else:
                self.registry.fetch_failed(peer.node_id, self.clock())
        else:
            self.registry.fetched(peer.node_id, fetched, self.clock())
            self.on_change()
        self._wake_house.set()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "node": self.identity.node_id,
            "name": self.identity.node_name,
            "mesh": self.identity.team.mesh,
            "pid": os.getpid(),
            "revision": self.catalog.revision,
            "channel": {"port": self.channel_port, "served": self.served},
            "sent": {b.name: getattr(b, "sent", 0) for b in self.backends},
            "udp_errors": self.udp.errors,
            **{b.name: b.status() for b in self.backends if b.name == "serf"},  # type: ignore[attr-defined]
            "channel_refused": list(self.channel_refused),
            **self.registry.status(now),
        }

    def write_status(self, force: bool = False) -> None:
        """Write the status file atomically when it changed (ignoring ages) or when forced."""
        path = self.settings.status_file
        if path is None:
            return
        doc = self.status()
        key = json.dumps(
            {**doc, "peers": [{**p, "last_seen_s": 0} for p in doc["peers"]]},  # type: ignore[attr-defined]
            sort_keys=True,
        )
        if key == self._status_written and not force:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path)
        self._status_written = key

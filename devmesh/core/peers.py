"""The peer registry: which teammates' nodes are alive, what they share, and what was dropped.

Why pure: liveness is a function of sightings and time, and its edge cases (a goodbye, a
third missed heartbeat, a replayed hello after a goodbye, a peer outside ``mesh.allow``)
are easiest to get right as table tests with an injected clock. Backends feed raw
sightings (bytes or a TXT record, the source address, the backend's name); the registry
decodes them with ``core.wire`` so every backend gets the same checks and the same
counters, and it does not care which backend saw a peer.

States: ALIVE until ``3 * interval_s`` pass without a valid announcement, then EXPIRED
(kept, with its catalog, so status can show it and a returning peer needs no refetch
when its revision did not change). A goodbye removes the peer at once. A peer outside
``mesh.allow`` is REFUSED, with the reason, and never fetched; a peer whose channel fails
its TLS checks is REFUSED by the driver through ``refuse``.

The registry also decides when a catalog must be fetched: when a live peer announces a
revision other than the one held, with one fetch in flight per peer and a retry after
``interval_s`` when a fetch failed.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections import Counter
from collections.abc import Mapping

from devmesh.core import catalog as catalogs
from devmesh.core import serftags, wire

MISSED_HEARTBEATS = 3
MAX_PEERS = 1024
"""Bound on tracked nodes: only authenticated members can add one, but still bounded."""


class PeerState(enum.Enum):
    ALIVE = "alive"
    EXPIRED = "expired"
    REFUSED = "refused"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What the registry needs from the mesh config."""

    keys: wire.MeshKeys = dataclasses.field(repr=False)
    self_id: str
    """This node's id: its own looped-back broadcasts are ignored, not counted."""
    interval_s: float = 2.0
    """Seconds between two heartbeats of a peer; three missed ones expire it."""
    window_ms: int = wire.DEFAULT_WINDOW_MS
    allow: tuple[str, ...] = ("*",)
    """``mesh.allow``: ``*``, node names, or CIDRs. Empty or ``*`` allows every member."""

    @property
    def ttl_s(self) -> float:
        return MISSED_HEARTBEATS * self.interval_s


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """One node of the mesh as this node sees it."""

    node_id: str
    name: str
    address: str
    """Announced peer-channel address (the one a fetch connects to)."""
    port: int
    source: str
    """Source address of the latest sighting."""
    backends: frozenset[str]
    """Every backend that has seen it (broadcast, seeds, mdns)."""
    state: PeerState
    reason: str = ""
    """Why it is refused (or expired): shown by status."""
    last_seen_s: float
    revision: str
    """Catalog revision the peer announced last."""
    catalog: catalogs.Catalog | None = None
    catalog_revision: str | None = None
    """Revision of the catalog held (None: none fetched yet)."""
    fetching: bool = False
    retry_at_s: float = 0.0

    @property
    def needs_catalog(self) -> bool:
        return self.state is PeerState.ALIVE and self.catalog_revision != self.revision


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    """What one sighting changed: drives logs and catalog fetches in the driver."""

    node_id: str | None = None
    drop: wire.Drop | None = None
    new: bool = False
    """A node not held before, or one that came back from EXPIRED."""
    gone: bool = False
    refused: bool = False


SOURCE_CHECKED = frozenset({"broadcast"})
"""Backends whose sighting's source is the datagram's own source address, so that the
announced address must be it. Seeds are not checked: a seed may sit behind NAT or announce
its ``advertise`` address (the operator named it); nor mDNS, whose source is the record's own
A record."""


def address_drop(address: str, source: str, backend: str) -> wire.Drop | None:
    """Why an authentic announcement's peer-channel ``address`` is not to be dialled, or None.

    A member could otherwise make every teammate's agent open a TLS connection (about once
    a second, as a failed catalog fetch is retried) to any address and port it names: a
    third machine, or each teammate's own loopback. From a loopback source (nodes on one
    machine, discovery pinned to ``lo``) anything goes: nothing leaves the machine.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    except ValueError:
        return wire.Drop(reason=wire.DropReason.MALFORMED, detail=f"address {address!r}")
    try:
        src = ipaddress.ip_address(source.split("%", maxsplit=1)[0])
    except ValueError:
        return None  # a backend that knows no source (an mDNS record without an address)
    if src.is_loopback:
        return None
    if ip.is_loopback:
        return wire.Drop(
            reason=wire.DropReason.LOOPBACK_ADDRESS,
            detail=f"announces {address} from {source}",
        )
    if backend in SOURCE_CHECKED and ip != src:
        return wire.Drop(
            reason=wire.DropReason.ADDRESS_NOT_SOURCE,
            detail=f"announces {address} from {source}",
        )
    return None


def allowed(allow: tuple[str, ...], name: str, addresses: tuple[str, ...]) -> str | None:
    """None when allowed, else why not. Names match the node name; a CIDR must contain
    every address the peer is known by (announced and source), so a spoofed source cannot
    borrow an allowed network."""
    if not allow or "*" in allow:
        return None
    nets = []
    for entry in allow:
        if entry == name:
            return None
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    parsed = []
    for a in addresses:
        try:
            parsed.append(ipaddress.ip_address(a.split("%")[0]))
        except ValueError:
            return f"address {a!r} is not an IP address"
    if nets and all(any(ip in net for net in nets) for ip in parsed):
        return None
    return f"{name} ({', '.join(dict.fromkeys(addresses))}) is not in mesh.allow"


class Registry:
    """Peers keyed by node id, with drop counters; every method takes the time it runs at."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._peers: dict[str, Peer] = {}
        self._high_water: dict[str, tuple[int, int]] = {}
        self.drops: Counter[str] = Counter()
        """Dropped sightings per ``wire.DropReason`` value."""
        self.accepted: Counter[str] = Counter()
        """Accepted announcements per backend name."""

    # -- sightings -------------------------------------------------------------------------

    def receive(self, data: bytes, *, source: str, backend: str, now_s: float) -> Seen:
        """A datagram from a backend."""
        msg = wire.decode(
            data,
            keys=self.settings.keys,
            now_ms=int(now_s * 1000),
            high_water=self._high_water,
            window_ms=self.settings.window_ms,
        )
        return self._apply(msg, source=source, backend=backend, now_s=now_s)

    def receive_txt(
        self, record: Mapping[object, object], *, source: str, backend: str, now_s: float
    ) -> Seen:
        """A DNS-SD TXT record from a backend."""
        msg = wire.decode_txt(
            record,
            keys=self.settings.keys,
            now_ms=int(now_s * 1000),
            high_water=self._high_water,
            window_ms=self.settings.window_ms,
        )
        return self._apply(msg, source=source, backend=backend, now_s=now_s)

    def receive_member(
        self,
        name: str,
        tags: Mapping[str, str],
        *,
        alive: bool,
        source: str,
        backend: str,
        now_s: float,
    ) -> Seen:
        """A Serf member (``core.serftags``): alive refreshes it, failed or left removes it."""
        msg = serftags.decode(
            name, tags, keys=self.settings.keys, alive=alive, now_ms=int(now_s * 1000)
        )
        return self._apply(msg, source=source, backend=backend, now_s=now_s)

    def _drop(self, drop: wire.Drop, node_id: str | None = None) -> Seen:
        self.drops[drop.reason.value] += 1
        return Seen(node_id=node_id, drop=drop)

    def _apply(
        self, msg: wire.Announcement | wire.Drop, *, source: str, backend: str, now_s: float
    ) -> Seen:
        if isinstance(msg, wire.Drop):
            return self._drop(msg)
        if msg.node_id == self.settings.self_id:
            return Seen(node_id=msg.node_id)
        if msg.kind is not wire.Kind.GOODBYE and (
            bad := address_drop(msg.address, source, backend)
        ):
            return self._drop(bad, msg.node_id)
        if msg.node_id not in self._high_water and len(self._high_water) >= MAX_PEERS:
            self._forget_oldest()
        # Never lowered: a Serf sighting (counter 0) must not reopen the datagram window.
        self._high_water[msg.node_id] = max(msg.order, self._high_water.get(msg.node_id, (0, 0)))
        old = self._peers.get(msg.node_id)
        if msg.kind is wire.Kind.GOODBYE:
            self._peers.pop(msg.node_id, None)
            return Seen(node_id=msg.node_id, gone=old is not None)
        self.accepted[backend] += 1
        why = allowed(self.settings.allow, msg.node_name, (msg.address, source))
        state = PeerState.REFUSED if why else PeerState.ALIVE
        peer = Peer(
            node_id=msg.node_id,
            name=msg.node_name,
            address=msg.address,
            port=msg.port,
            source=source,
            backends=(old.backends if old else frozenset()) | {backend},
            state=state,
            reason=why or "",
            last_seen_s=now_s,
            revision=msg.revision,
            catalog=old.catalog if old else None,
            catalog_revision=old.catalog_revision if old else None,
            fetching=old.fetching if old else False,
            retry_at_s=old.retry_at_s if old else 0.0,
        )
        # A channel refusal sticks until the peer changes address or port.
        if (
            old is not None
            and old.state is PeerState.REFUSED
            and old.reason.startswith("tls")
            and (old.address, old.port) == (msg.address, msg.port)
        ):
            peer = dataclasses.replace(peer, state=PeerState.REFUSED, reason=old.reason)
        self._peers[msg.node_id] = peer
        if peer.state is PeerState.REFUSED:
            self.drops[wire.DropReason.REFUSED.value] += 1
            return Seen(node_id=msg.node_id, refused=True)
        new = old is None or old.state is not PeerState.ALIVE
        return Seen(node_id=msg.node_id, new=new)

    def _forget_oldest(self) -> None:
        """Make room: first a node that said goodbye, else the one heard from longest ago."""
        gone = [n for n in self._high_water if n not in self._peers]
        oldest = gone[0] if gone else min(self._peers, key=lambda n: self._peers[n].last_seen_s)
        self._high_water.pop(oldest, None)
        self._peers.pop(oldest, None)

    # -- time ------------------------------------------------------------------------------

    def tick(self, now_s: float) -> list[str]:
        """Expire peers silent for three intervals; returns the node ids that just expired."""
        expired = []
        for node_id, peer in self._peers.items():
            if peer.state is PeerState.ALIVE and now_s - peer.last_seen_s > self.settings.ttl_s:
                self._peers[node_id] = dataclasses.replace(
                    peer,
                    state=PeerState.EXPIRED,
                    reason=f"no announcement for {MISSED_HEARTBEATS} intervals",
                )
                expired.append(node_id)
        return expired

    def next_deadline_s(self) -> float | None:
        """When the driver must look again: the earliest expiry or pending fetch retry."""
        times = [
            p.last_seen_s + self.settings.ttl_s
            for p in self._peers.values()
            if p.state is PeerState.ALIVE
        ]
        times += [p.retry_at_s for p in self._peers.values() if p.needs_catalog and not p.fetching]
        return min(times) if times else None

    # -- catalogs --------------------------------------------------------------------------

    def due_fetches(self, now_s: float) -> list[Peer]:
        """Peers whose catalog must be fetched now; each is marked in flight."""
        due = []
        for node_id, peer in self._peers.items():
            if peer.needs_catalog and not peer.fetching and now_s >= peer.retry_at_s:
                self._peers[node_id] = dataclasses.replace(peer, fetching=True)
                due.append(self._peers[node_id])
        return due

    def fetched(self, node_id: str, fetched: catalogs.Catalog, now_s: float) -> None:
        """A catalog arrived and passed ``catalog.decode``.

        When its digest is not the revision announced meanwhile (the peer changed while the
        fetch was in flight, or its revision is not its digest), it is held and fetched
        again, but not before a quarter interval (1 s at most): a buggy peer cannot make
        us loop.
        """
        peer = self._peers.get(node_id)
        if peer is not None:
            again = fetched.revision != peer.revision
            self._peers[node_id] = dataclasses.replace(
                peer,
                catalog=fetched,
                catalog_revision=fetched.revision,
                fetching=False,
                retry_at_s=now_s + min(1.0, self.settings.interval_s / 4) if again else 0.0,
            )

    def fetch_failed(self, node_id: str, now_s: float) -> None:
        """A fetch failed for a transient reason: retry after one interval."""
        peer = self._peers.get(node_id)
        if peer is not None:
            self._peers[node_id] = dataclasses.replace(
                peer, fetching=False, retry_at_s=now_s + self.settings.interval_s
            )

    def refuse(self, node_id: str, reason: str) -> None:
        """The peer channel refused this peer (certificate of another CA, wrong identity)."""
        peer = self._peers.get(node_id)
        if peer is not None:
            self._peers[node_id] = dataclasses.replace(
                peer, state=PeerState.REFUSED, reason=f"tls: {reason}", fetching=False
            )
            self.drops[wire.DropReason.REFUSED.value] += 1

    # -- views -----------------------------------------------------------------------------

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def peers(self) -> list[Peer]:
        """Every held peer, by name then id (stable for display)."""
        return sorted(self._peers.values(), key=lambda p: (p.name, p.node_id))

    def status(self, now_s: float) -> dict[str, object]:
        """The JSON-ready view ``devmesh peers`` and ``status --json`` show."""
        return {
            "peers": [
                {
                    "node": p.node_id,
                    "name": p.name,
                    "address": p.address,
                    "port": p.port,
                    "state": p.state.value,
                    "reason": p.reason,
                    "backends": sorted(p.backends),
                    "last_seen_s": round(max(0.0, now_s - p.last_seen_s), 3),
                    "revision": p.revision,
                    "services": [
                        {
                            "name": s.name,
                            "project": s.project,
                            "version": s.version,
                            "branch": s.branch,
                            "health": s.health,
                        }
                        for s in (p.catalog.services if p.catalog else ())
                    ],
                }
                for p in self.peers()
            ],
            "drops": dict(sorted(self.drops.items())),
            "accepted": dict(sorted(self.accepted.items())),
        }

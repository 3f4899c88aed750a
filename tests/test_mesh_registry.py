"""The peer registry (core.peers): sightings and time in, peers and counters out; clock injected."""

from __future__ import annotations

import dataclasses

import pytest

from devmesh.core import catalog, peers, wire

KEYS = wire.derive_keys("team", b"s" * 32)
SELF = "00" * 16
B = "bb" * 16
C = "cc" * 16
T0 = 1_700_000_000.0


def datagram(node: str = B, *, at: float = T0, seq: int = 1, keys: wire.MeshKeys = KEYS,
             kind: wire.Kind = wire.Kind.HEARTBEAT, name: str = "laptop-b",
             address: str = "10.250.7.2", revision: str = "r1", boot: int = 1) -> bytes:  # fmt: skip
    msg = wire.Announcement(kind=kind, node_id=node, node_name=name, address=address, port=7701,
                            revision=revision, sent_ms=int(at * 1000), boot_ms=boot, seq=seq)  # fmt: skip
    return wire.encode(msg, keys)


def registry(**settings: object) -> peers.Registry:
    return peers.Registry(peers.Settings(keys=KEYS, self_id=SELF, interval_s=2.0, **settings))  # type: ignore[arg-type]


def receive(reg: peers.Registry, data: bytes, at: float = T0, source: str = "10.250.7.2",
            backend: str = "broadcast") -> peers.Seen:  # fmt: skip
    return reg.receive(data, source=source, backend=backend, now_s=at)


def test_a_heartbeat_makes_an_alive_peer_that_needs_its_catalog() -> None:
    reg = registry()
    seen = receive(reg, datagram())
    assert seen.new and seen.node_id == B
    peer = reg.get(B)
    assert peer is not None
    assert (peer.state, peer.name, peer.address, peer.port, peer.revision) == (
        peers.PeerState.ALIVE, "laptop-b", "10.250.7.2", 7701, "r1")  # fmt: skip
    assert peer.backends == {"broadcast"}
    assert peer.needs_catalog
    assert reg.accepted == {"broadcast": 1}


def test_backends_accumulate_and_do_not_change_the_peer() -> None:
    reg = registry()
    receive(reg, datagram(seq=1), backend="broadcast")
    seen = receive(reg, datagram(seq=2), backend="mdns")
    assert not seen.new
    peer = reg.get(B)
    assert peer is not None and peer.backends == {"broadcast", "mdns"}


# Expiry: alive until 3 intervals (interval 2 s -> TTL 6 s) pass without an announcement.
@pytest.mark.parametrize(
    ("silence_s", "state"),
    [(0.0, "alive"), (5.9, "alive"), (6.0, "alive"), (6.01, "expired"), (60.0, "expired")],
)
def test_expiry_after_three_missed_heartbeats(silence_s: float, state: str) -> None:
    reg = registry()
    receive(reg, datagram())
    expired = reg.tick(T0 + silence_s)
    peer = reg.get(B)
    assert peer is not None and peer.state.value == state
    assert expired == ([B] if state == "expired" else [])


def test_an_expired_peer_comes_back_as_new_and_keeps_its_catalog() -> None:
    reg = registry()
    receive(reg, datagram(revision=_rev()))
    [_due] = reg.due_fetches(T0)
    reg.fetched(B, _catalog(), T0)
    reg.tick(T0 + 7)
    seen = receive(reg, datagram(at=T0 + 8, seq=2, revision=_rev()), at=T0 + 8)
    assert seen.new
    peer = reg.get(B)
    assert peer is not None and peer.state is peers.PeerState.ALIVE and not peer.needs_catalog
    assert reg.next_deadline_s() == T0 + 8 + 6


def test_goodbye_removes_at_once_and_a_replayed_hello_stays_out() -> None:
    reg = registry()
    hello = datagram(seq=1, kind=wire.Kind.HELLO)
    receive(reg, hello)
    seen = receive(reg, datagram(seq=2, kind=wire.Kind.GOODBYE))
    assert seen.gone and reg.get(B) is None
    again = receive(reg, hello)
    assert again.drop is not None and again.drop.reason is wire.DropReason.REPLAYED
    assert reg.get(B) is None
    assert reg.drops == {"replayed": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"garbage", "malformed"),
        (datagram(keys=wire.derive_keys("team", b"x" * 32)), "bad-signature"),
        (datagram(keys=wire.derive_keys("other", b"s" * 32)), "wrong-mesh"),
        (datagram(at=T0 - 3600), "stale"),
        (b"x" * 1300, "oversized"),
    ],
)
def test_drops_are_counted_per_reason_and_add_no_peer(data: bytes, reason: str) -> None:
    reg = registry()
    seen = receive(reg, data)
    assert seen.drop is not None and seen.drop.reason.value == reason
    assert reg.peers() == []
    assert reg.drops == {reason: 1}
    assert reg.status(T0)["drops"] == {reason: 1}


def test_own_broadcasts_are_ignored_silently() -> None:
    reg = registry()
    seen = receive(reg, datagram(node=SELF))
    assert seen.node_id == SELF and not seen.new and seen.drop is None
    assert reg.peers() == [] and not reg.drops


@pytest.mark.parametrize(
    ("allow", "name", "address", "source", "refused"),
    [
        (("*",), "laptop-b", "10.250.7.2", "10.250.7.2", False),
        ((), "laptop-b", "10.250.7.2", "10.250.7.2", False),
        (("laptop-b",), "laptop-b", "192.0.2.1", "192.0.2.1", False),
        (("laptop-c",), "laptop-b", "10.250.7.2", "10.250.7.2", True),
        (("10.250.7.0/24",), "laptop-b", "10.250.7.2", "10.250.7.2", False),
        (("10.250.7.0/24",), "laptop-b", "10.250.8.2", "10.250.8.2", True),
        # The announced address is allowed but the datagram came from elsewhere (by a seed:
        # a broadcast would be dropped for that alone, see below).
        (("10.250.7.0/24",), "laptop-b", "10.250.7.2", "192.0.2.9", True),
        (("10.250.7.0/24", "100.64.0.0/10"), "laptop-b", "100.101.1.2", "100.101.1.2", False),
        (("fd00::/8",), "laptop-b", "fd00::2", "fd00::2", False),
        (("not-a-cidr/99",), "laptop-b", "10.250.7.2", "10.250.7.2", True),
    ],
)
def test_mesh_allow_by_name_or_cidr(allow, name, address, source, refused) -> None:
    reg = registry(allow=allow)
    seen = receive(reg, datagram(name=name, address=address), source=source, backend="seeds")
    peer = reg.get(B)
    assert peer is not None
    assert seen.refused is refused
    assert (peer.state is peers.PeerState.REFUSED) is refused
    if refused:
        assert "mesh.allow" in peer.reason and name in peer.reason
        assert reg.drops == {"refused": 1}
        assert reg.due_fetches(T0) == []
    else:
        assert peer.reason == ""


@pytest.mark.parametrize(
    ("backend", "address", "source", "dropped"),
    [
        ("broadcast", "10.250.7.2", "10.250.7.2", None),
        # A member names another machine, or its own loopback, for teammates to dial.
        ("broadcast", "10.250.7.9", "10.250.7.2", "address-not-source"),
        ("broadcast", "127.0.0.1", "10.250.7.2", "loopback-address"),
        ("seeds", "127.0.0.1", "10.250.7.2", "loopback-address"),
        ("mdns", "::1", "10.250.7.2", "loopback-address"),
        # Seeds may announce another address (NAT, ``advertise``): the operator named them.
        ("seeds", "10.250.7.9", "10.250.7.2", None),
        # On one machine (discovery pinned to ``lo``) nothing leaves it: anything goes.
        ("broadcast", "127.0.0.2", "127.0.0.1", None),
        ("broadcast", "10.250.7.2", "127.0.0.1", None),
    ],
)
def test_an_announced_address_other_than_the_source_or_loopback_is_dropped(
    backend: str, address: str, source: str, dropped: str | None
) -> None:
    reg = registry()
    seen = receive(reg, datagram(address=address), source=source, backend=backend)
    if dropped is None:
        assert seen.drop is None and reg.get(B) is not None
        assert reg.drops == {}
    else:
        assert seen.drop is not None and seen.drop.reason.value == dropped
        assert address in seen.drop.detail and source in seen.drop.detail
        assert reg.get(B) is None and reg.due_fetches(T0) == []
        assert reg.drops == {dropped: 1}


def _catalog(node: str = B, version: str = "2.3.1") -> catalog.Catalog:
    return catalog.Catalog(
        node_id=node,
        services=(
            catalog.SharedService(name="api", project="shop", version=version, health="healthy"),
        ),
    )


def _rev(version: str = "2.3.1") -> str:
    return _catalog(version=version).revision


def test_catalog_fetch_is_decided_by_revision() -> None:
    reg = registry()
    receive(reg, datagram(revision=_rev()))
    [due] = reg.due_fetches(T0)
    assert due.node_id == B and due.fetching
    assert reg.due_fetches(T0) == []  # one fetch in flight per peer
    reg.fetched(B, _catalog(), T0)
    peer = reg.get(B)
    assert peer is not None and not peer.needs_catalog and peer.catalog == _catalog()
    receive(reg, datagram(seq=2, revision=_rev()))
    assert reg.due_fetches(T0) == []  # same revision: nothing to fetch
    receive(reg, datagram(seq=3, revision=_rev("2.4.0")))
    assert [p.node_id for p in reg.due_fetches(T0)] == [B]
    services = reg.status(T0)["peers"][0]["services"]  # type: ignore[index]
    assert services == [
        {"name": "api", "project": "shop", "version": "2.3.1", "branch": None, "health": "healthy"}
    ]


def test_a_revision_announced_during_a_fetch_is_fetched_again() -> None:
    reg = registry()
    receive(reg, datagram(revision=_rev()))
    reg.due_fetches(T0)
    receive(reg, datagram(seq=2, revision=_rev("2.4.0")))  # changed while in flight
    reg.fetched(B, _catalog(), T0 + 0.1)  # the old one arrives
    peer = reg.get(B)
    assert peer is not None and peer.catalog == _catalog() and peer.needs_catalog
    assert reg.due_fetches(T0 + 0.2) == []  # a quarter interval first: no loop on a bad peer
    assert reg.next_deadline_s() == T0 + 0.6  # the driver wakes for the retry
    assert [p.node_id for p in reg.due_fetches(T0 + 0.6)] == [B]
    reg.fetched(B, _catalog(version="2.4.0"), T0 + 0.7)
    assert not reg.get(B).needs_catalog  # type: ignore[union-attr]


def test_a_failed_fetch_is_retried_after_one_interval() -> None:
    reg = registry()
    receive(reg, datagram(revision=_rev()))
    reg.due_fetches(T0)
    reg.fetch_failed(B, T0)
    assert reg.due_fetches(T0 + 1.9) == []
    assert [p.node_id for p in reg.due_fetches(T0 + 2.0)] == [B]


def test_a_channel_refusal_sticks_until_the_peer_moves() -> None:
    reg = registry()
    receive(reg, datagram(revision="r1"))
    reg.due_fetches(T0)
    reg.refuse(B, "certificate not of the team CA")
    peer = reg.get(B)
    assert peer is not None and peer.state is peers.PeerState.REFUSED
    assert peer.reason == "tls: certificate not of the team CA"
    seen = receive(reg, datagram(seq=2))
    assert seen.refused and reg.due_fetches(T0) == []
    assert reg.drops["refused"] == 2
    moved = receive(reg, datagram(seq=3, address="10.250.7.9"), source="10.250.7.9")
    assert moved.new
    assert reg.get(B).state is peers.PeerState.ALIVE  # type: ignore[union-attr]


def test_status_view_is_json_ready_and_sorted() -> None:
    reg = registry()
    receive(reg, datagram(node=C, name="zeta"), at=T0)
    receive(reg, datagram(node=B, name="alpha"), at=T0 + 1, backend="seeds")
    doc = reg.status(T0 + 1.5)
    assert [p["name"] for p in doc["peers"]] == ["alpha", "zeta"]  # type: ignore[index]
    first = doc["peers"][0]  # type: ignore[index]
    assert (
        first["last_seen_s"] == 0.5 and first["backends"] == ["seeds"] and first["state"] == "alive"
    )
    assert doc["accepted"] == {"broadcast": 1, "seeds": 1}


def test_tracked_nodes_are_bounded() -> None:
    reg = registry()
    for i in range(peers.MAX_PEERS + 5):
        receive(reg, datagram(node=f"{i:032x}", at=T0 + i), at=T0 + i)
    assert len(reg.peers()) == peers.MAX_PEERS
    assert reg.get(f"{0:032x}") is None  # the one heard from longest ago made room
    assert reg.get(f"{peers.MAX_PEERS + 4:032x}") is not None


def test_settings_ttl_follows_interval() -> None:
    s = peers.Settings(keys=KEYS, self_id=SELF, interval_s=0.5)
    assert s.ttl_s == 1.5
    assert dataclasses.replace(s, interval_s=2).ttl_s == 6
    assert "key" not in repr(s)

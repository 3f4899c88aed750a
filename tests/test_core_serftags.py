"""Signed Serf tags: a member's tags pass only when signed with this mesh's tag key."""

from __future__ import annotations

import base64

import pytest
from test_core_wire import announcement as wire_announcement

from devmesh.core import peers, serftags, wire

KEYS = wire.derive_keys("team", b"s" * 32)
OTHER_SECRET = wire.derive_keys("team", b"t" * 32)
OTHER_MESH = wire.derive_keys("other", b"s" * 32)
NOW_MS = 1_700_000_000_000
NODE = "ab" * 16
R = wire.DropReason


def announcement(**changes: object) -> wire.Announcement:
    return wire_announcement(**{"seq": 0, **changes})


def decode(tags: dict[str, str], name: str = NODE, alive: bool = True) -> object:
    return serftags.decode(name, tags, keys=KEYS, alive=alive, now_ms=NOW_MS)


def reason(result: object) -> wire.DropReason | None:
    return result.reason if isinstance(result, wire.Drop) else None


def test_round_trip_alive_and_gone() -> None:
    tags = serftags.encode(announcement(sent_ms=1, seq=9), KEYS)
    assert decode(tags) == announcement()
    assert decode(tags, alive=False) == announcement(kind=wire.Kind.GOODBYE)
    assert sum(len(k) + len(v) for k, v in tags.items()) < serftags.MAX_TAG_BYTES


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.pop("s"), R.UNSIGNED),
        (lambda t: t.update(s=""), R.UNSIGNED),
        (lambda t: t.update(a="10.250.7.66"), R.BAD_SIGNATURE),
        (lambda t: t.update(p="7702"), R.BAD_SIGNATURE),
        (lambda t: t.update(r="0000"), R.BAD_SIGNATURE),
        (lambda t: t.update(s=t["s"][:-2] + "AA"), R.BAD_SIGNATURE),
        (lambda t: t.update(s="!!!"), R.MALFORMED),
        (lambda t: t.update(extra="1"), R.MALFORMED),
        (lambda t: t.pop("m"), R.MALFORMED),
        (lambda t: t.update(v="2"), R.WRONG_VERSION),
        (lambda t: t.update(m=OTHER_MESH.mesh_tag.hex()), R.WRONG_MESH),
        (lambda t: t.update(x="y" * 600), R.OVERSIZED),
    ],
)
def test_tampered_tags_are_dropped(change: object, expected: wire.DropReason) -> None:
    tags = serftags.encode(announcement(), KEYS)
    change(tags)  # type: ignore[operator]
    assert reason(decode(tags)) is expected


def test_another_secret_or_member_name_fails_the_signature() -> None:
    assert reason(decode(serftags.encode(announcement(), OTHER_SECRET))) is R.BAD_SIGNATURE
    # the member name (node id) is signed: the tags cannot be worn by another member
    assert reason(decode(serftags.encode(announcement(), KEYS), name="cd" * 16)) is (
        R.BAD_SIGNATURE
    )


def test_keys_have_their_own_labels() -> None:
    keys = {KEYS.datagram_key, KEYS.txt_key, KEYS.serf_tag_key, KEYS.serf_gossip_key}
    assert len(keys) == 4
    gossip = base64.b64decode(serftags.gossip_key(KEYS))
    assert len(gossip) == 32
    assert serftags.gossip_key(KEYS) != serftags.gossip_key(OTHER_SECRET)
    assert serftags.gossip_key(KEYS) != serftags.gossip_key(OTHER_MESH)


def test_registry_counts_forged_members_and_removes_failed_ones() -> None:
    registry = peers.Registry(peers.Settings(keys=KEYS, self_id="ef" * 16))
    good = serftags.encode(announcement(), KEYS)
    forged = serftags.encode(announcement(node_id="cd" * 16), OTHER_SECRET)
    now = NOW_MS / 1000
    seen = registry.receive_member(
        NODE, good, alive=True, source="10.0.0.2", backend="serf", now_s=now
    )
    assert seen.new and registry.get(NODE) is not None
    assert registry.get(NODE).backends == frozenset({"serf"})  # type: ignore[union-attr]
    bad = registry.receive_member(
        "cd" * 16, forged, alive=True, source="10.0.0.3", backend="serf", now_s=now
    )
    assert bad.drop is not None and registry.drops[R.BAD_SIGNATURE.value] == 1
    assert registry.get("cd" * 16) is None
    gone = registry.receive_member(
        NODE, good, alive=False, source="10.0.0.2", backend="serf", now_s=now + 1
    )
    assert gone.gone and registry.get(NODE) is None


def test_serf_sighting_does_not_lower_the_datagram_counter() -> None:
    """A datagram seen before a Serf sighting stays a replay afterwards."""
    registry = peers.Registry(peers.Settings(keys=KEYS, self_id="ef" * 16))
    now = NOW_MS / 1000
    datagram = wire.encode(announcement(seq=5), KEYS)
    src = announcement().address  # a broadcast must come from the address it names
    assert registry.receive(datagram, source=src, backend="broadcast", now_s=now).new
    tags = serftags.encode(announcement(), KEYS)
    registry.receive_member(NODE, tags, alive=True, source=src, backend="serf", now_s=now)
    again = registry.receive(datagram, source=src, backend="broadcast", now_s=now)
    assert again.drop is not None and again.drop.reason is R.REPLAYED

"""The discovery wire codec: every hostile input is dropped with the right reason, never raised."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmesh.core import wire

KEYS = wire.derive_keys("team", b"s" * 32)
OTHER_SECRET = wire.derive_keys("team", b"t" * 32)
OTHER_MESH = wire.derive_keys("other", b"s" * 32)
NOW_MS = 1_700_000_000_000
R = wire.DropReason


def announcement(**changes: object) -> wire.Announcement:
    base = wire.Announcement(
        kind=wire.Kind.HEARTBEAT,
        node_id="ab" * 16,
        node_name="laptop-b",
        address="10.250.7.2",
        port=7701,
        revision="65430df56b7f13ea",
        sent_ms=NOW_MS,
        boot_ms=NOW_MS - 5000,
        seq=7,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def decode(data: bytes, high_water: dict[str, tuple[int, int]] | None = None, **kw: object):
    return wire.decode(data, keys=KEYS, now_ms=NOW_MS, high_water=high_water or {}, **kw)  # type: ignore[arg-type]


def reason(result: object) -> wire.DropReason | None:
    return result.reason if isinstance(result, wire.Drop) else None


def test_round_trip() -> None:
    msg = announcement()
    assert decode(wire.encode(msg, KEYS)) == msg
    txt = wire.encode_txt(msg, KEYS)
    as_bytes = {k.encode(): v.encode() for k, v in txt.items()}
    assert wire.decode_txt(as_bytes, keys=KEYS, now_ms=NOW_MS, high_water={}) == msg


def resign(data: bytes, body: bytes, keys: wire.MeshKeys = KEYS) -> bytes:
    import hashlib
    import hmac

    head = data[: wire.HEADER_BYTES]
    return head + body + hmac.new(keys.datagram_key, head + body, hashlib.sha256).digest()


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (lambda d: d + b"x" * (wire.MAX_DATAGRAM_BYTES + 1 - len(d)), R.OVERSIZED),
        (lambda d: b"", R.MALFORMED),
        (lambda d: d[:10], R.MALFORMED),
        (lambda d: b"XXXX" + d[4:], R.MALFORMED),
        (lambda d: d[:4] + b"\x02" + d[5:], R.WRONG_VERSION),
        (lambda d: wire.encode(announcement(), OTHER_MESH), R.WRONG_MESH),
        (lambda d: d[: wire.HEADER_BYTES - 1] + b"\x00" + d[wire.HEADER_BYTES : -32], R.UNSIGNED),
        (lambda d: d[: wire.HEADER_BYTES - 1] + b"\x10" + d[wire.HEADER_BYTES :], R.MALFORMED),
        (lambda d: wire.encode(announcement(), OTHER_SECRET), R.BAD_SIGNATURE),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), R.BAD_SIGNATURE),
        (lambda d: d.replace(b"laptop-b", b"laptop-c"), R.BAD_SIGNATURE),
        (lambda d: resign(d, b"[1,2]"), R.MALFORMED),
        (lambda d: resign(d, b"{not json"), R.MALFORMED),
        (lambda d: resign(d, b"[" * 550 + b"]" * 550), R.MALFORMED),
        (lambda d: resign(d, b"\xff\xfe"), R.MALFORMED),
        (lambda d: wire.encode(announcement(sent_ms=NOW_MS - 60_000), KEYS), R.STALE),
        (lambda d: wire.encode(announcement(sent_ms=NOW_MS + 60_000), KEYS), R.STALE),
    ],
    ids=[
        "oversized", "empty", "truncated-header", "magic", "version", "mesh", "unsigned",
        "tag-length", "other-secret", "flipped-tag", "edited-body", "body-not-object",
        "body-not-json", "deep-json", "body-not-utf8", "stale-past", "stale-future",
    ],
)  # fmt: skip
def test_each_bad_datagram_has_its_reason(mangle, expected) -> None:
    assert reason(decode(mangle(wire.encode(announcement(), KEYS)))) is expected


def fields_signed(**changes: object) -> bytes:
    """A validly signed datagram whose body has the given field values (bypassing encode)."""
    body = {"k": "heartbeat", "id": "ab" * 16, "n": "b", "a": "10.0.0.2", "p": 1, "r": "",
            "t": NOW_MS, "b": 1, "c": 1}  # fmt: skip
    body.update(changes)
    head = wire.MAGIC + bytes([wire.VERSION]) + KEYS.mesh_tag + bytes([32])
    return resign(head, json.dumps(body).encode())


@pytest.mark.parametrize(
    "changes",
    [
        {"k": "bogus"}, {"id": "AB" * 16}, {"id": "ab"}, {"n": "Not A Label"}, {"n": "x" * 64},
        {"a": "example.com"}, {"a": "1" * 100}, {"p": 0}, {"p": 65536}, {"p": True},
        {"p": "7701"}, {"r": "UPPER"}, {"t": -1}, {"c": 2**60}, {"extra": 1}, {"k": None},
    ],
)  # fmt: skip
def test_authentic_but_invalid_fields_are_malformed(changes) -> None:
    assert reason(decode(fields_signed(**changes))) is R.MALFORMED
    assert isinstance(decode(fields_signed()), wire.Announcement)


def test_replay_uses_the_per_node_high_water_mark() -> None:
    data = wire.encode(announcement(seq=7), KEYS)
    node = "ab" * 16
    assert isinstance(decode(data, {node: (NOW_MS - 5000, 6)}), wire.Announcement)
    assert reason(decode(data, {node: (NOW_MS - 5000, 7)})) is R.REPLAYED
    assert reason(decode(data, {node: (NOW_MS - 5000, 9)})) is R.REPLAYED
    # A restarted node (later boot time, counter from 0 again) outranks its previous life.
    restarted = wire.encode(announcement(boot_ms=NOW_MS - 10, seq=1), KEYS)
    assert isinstance(decode(restarted, {node: (NOW_MS - 5000, 900)}), wire.Announcement)
    # Another node's mark does not matter.
    assert isinstance(decode(data, {"cd" * 16: (NOW_MS, 100)}), wire.Announcement)


def test_window_is_configurable() -> None:
    data = wire.encode(announcement(sent_ms=NOW_MS - 5000), KEYS)
    assert reason(decode(data, window_ms=1000)) is R.STALE
    assert isinstance(decode(data, window_ms=10_000), wire.Announcement)


def test_keys_depend_on_secret_and_mesh_and_never_show() -> None:
    assert KEYS.datagram_key != OTHER_SECRET.datagram_key != OTHER_MESH.datagram_key
    assert KEYS.datagram_key != KEYS.txt_key
    assert KEYS.datagram_key.hex() not in repr(KEYS)
    with pytest.raises(ValueError, match="secret"):
        wire.derive_keys("team", b"")


def test_largest_announcement_stays_under_the_limit() -> None:
    big = announcement(
        node_name="n" * 63,
        address="ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        revision="z" * 64,
        sent_ms=2**53 - 1,
        boot_ms=2**53 - 1,
        seq=2**53 - 1,
    )
    assert len(wire.encode(big, KEYS)) < wire.MAX_DATAGRAM_BYTES
    txt = wire.encode_txt(big, KEYS)
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < wire.MAX_DATAGRAM_BYTES
    with pytest.raises(ValueError, match="node name"):
        wire.encode(announcement(node_name="UPPER"), KEYS)


# -- TXT records ----------------------------------------------------------------------------


def txt(**changes: str | None) -> dict[bytes, bytes | None]:
    record: dict[str, str | None] = dict(wire.encode_txt(announcement(), KEYS))
    record.update(changes)
    return {k.encode(): (v.encode() if v is not None else None) for k, v in record.items() if k}


def decode_txt(record: object, high_water: dict[str, tuple[int, int]] | None = None):
    return wire.decode_txt(record, keys=KEYS, now_ms=NOW_MS, high_water=high_water or {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (txt(pad="x" * 250, pad2="y" * 250, pad3="z" * 250, pad4="w" * 250, pad5="q" * 250), R.OVERSIZED),
        ({f"k{i}".encode(): b"v" for i in range(40)}, R.OVERSIZED),
        ({}, R.MALFORMED),
        (txt(v="2"), R.WRONG_VERSION),
        (txt(m=OTHER_MESH.mesh_tag.hex()), R.WRONG_MESH),
        (txt(s=""), R.UNSIGNED),
        (txt(s="not-base64-!!"), R.MALFORMED),
        (txt(n="laptop-x"), R.BAD_SIGNATURE),
        (txt(p="7702"), R.BAD_SIGNATURE),
        (txt(s=None), R.MALFORMED),
        ({b"v": b"1", b"m": b"\xff\xfe"}, R.MALFORMED),
        ({1: 2}, R.MALFORMED),
        (txt(extra="1"), R.MALFORMED),
    ],
    ids=[
        "oversized", "too-many-keys", "empty", "version", "mesh", "unsigned", "bad-base64",
        "edited-name", "edited-port", "none-value", "not-ascii", "not-strings", "extra-key",
    ],
)  # fmt: skip
def test_each_bad_txt_record_has_its_reason(record, expected) -> None:
    assert reason(decode_txt(record)) is expected


def test_txt_other_secret_and_replay_and_cross_form() -> None:
    other = {
        k.encode(): v.encode() for k, v in wire.encode_txt(announcement(), OTHER_SECRET).items()
    }
    assert reason(decode_txt(other)) is R.BAD_SIGNATURE
    assert reason(decode_txt(txt(), {"ab" * 16: (NOW_MS - 5000, 7)})) is R.REPLAYED
    stale = {
        k.encode(): v.encode() for k, v in wire.encode_txt(announcement(sent_ms=1), KEYS).items()
    }
    assert reason(decode_txt(stale)) is R.STALE
    # A TXT signature is not a datagram signature: the keys differ.
    sig = wire.encode_txt(announcement(), KEYS)["s"]
    assert sig not in wire.encode(announcement(), KEYS).hex()


# -- fuzzing --------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1500))
def test_random_bytes_are_dropped(data: bytes) -> None:
    result = decode(data)
    assert isinstance(result, wire.Drop)
    assert result.reason in {
        R.MALFORMED,
        R.OVERSIZED,
        R.WRONG_VERSION,
        R.WRONG_MESH,
        R.UNSIGNED,
        R.BAD_SIGNATURE,
    }


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_random_bodies_behind_a_valid_header_are_dropped(body: bytes) -> None:
    head = wire.MAGIC + bytes([wire.VERSION]) + KEYS.mesh_tag + bytes([32])
    result = decode(head + body)
    assert isinstance(result, wire.Drop)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_truncations_and_bit_flips_are_dropped(data: st.DataObject) -> None:
    good = wire.encode(announcement(), KEYS)
    cut = data.draw(st.integers(0, len(good) - 1))
    assert isinstance(decode(good[:cut]), wire.Drop)
    bit = data.draw(st.integers(0, len(good) * 8 - 1))
    flipped = bytearray(good)
    flipped[bit // 8] ^= 1 << (bit % 8)
    result = decode(bytes(flipped))
    assert isinstance(result, wire.Drop)
    assert result.reason in {
        R.MALFORMED,
        R.WRONG_VERSION,
        R.WRONG_MESH,
        R.UNSIGNED,
        R.BAD_SIGNATURE,
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200))
def test_forged_signatures_are_rejected(tag: bytes, body: bytes) -> None:
    head = wire.MAGIC + bytes([wire.VERSION]) + KEYS.mesh_tag + bytes([32])
    real_body = wire.encode(announcement(), KEYS)[wire.HEADER_BYTES : -32]
    for candidate in (head + real_body + tag, head + body + tag):
        assert reason(decode(candidate)) is R.BAD_SIGNATURE


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True),
    seq=st.integers(0, 2**53 - 1),
    port=st.integers(1, 65535),
    address=st.ip_addresses().map(str),
    revision=st.from_regex(r"[0-9a-z]{0,64}", fullmatch=True),
)
def test_valid_announcements_round_trip_once(name, seq, port, address, revision) -> None:
    msg = announcement(node_name=name, seq=seq, port=port, address=address, revision=revision)
    data = wire.encode(msg, KEYS)
    assert len(data) < wire.MAX_DATAGRAM_BYTES
    assert decode(data) == msg
    assert reason(decode(data, {msg.node_id: msg.order})) is R.REPLAYED


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.binary(max_size=20), st.text(max_size=20)),
        st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300)),
        max_size=40,
    )
)
def test_random_txt_records_are_dropped(record) -> None:
    assert isinstance(decode_txt(record), wire.Drop)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_txt_value_edits_are_dropped(data: st.DataObject) -> None:
    record = dict(wire.encode_txt(announcement(), KEYS))
    key = data.draw(st.sampled_from(sorted(record)))
    value = data.draw(st.text(max_size=40))
    if value == record[key]:
        return
    record[key] = value
    assert isinstance(decode_txt(record), wire.Drop)

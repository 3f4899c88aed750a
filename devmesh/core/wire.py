"""The discovery wire codec: signed announcements as UDP datagrams and as DNS-SD TXT records.

Why a pure codec: whether a datagram from the network is trusted is the one decision in
discovery that an attacker controls the input of, so it lives here, over bytes and plain
data, with the clock (``now_ms``) and the replay state (``high_water``) passed in. It never
raises on input bytes: ``decode`` returns either an ``Announcement`` or a ``Drop`` whose
``reason`` comes from a closed enum, so the caller counts it and moves on.

Datagram layout (version 1)::

    b"DMSH" | version (1 byte) | mesh tag (8 bytes) | tag length (1 byte) | body | tag

- the mesh tag is the first 8 bytes of SHA-256 over the mesh name: a datagram of another
  mesh is told apart (``WRONG_MESH``) without trying its signature;
- the body is compact JSON of a fixed key set (node id, node name, address, peer-channel
  port, catalog revision, send time, boot time, sequence number). Services are not in it,
  only the catalog revision, so a datagram stays a few hundred bytes however many services
  a node runs; ``MAX_DATAGRAM_BYTES`` (1200, under any MTU on the way) is enforced both ways;
- the tag is HMAC-SHA256 over everything before it, with a key derived by HKDF-SHA256 from
  the mesh secret and the mesh name. A tag length of 0 means unsigned (``UNSIGNED``).

Replay protection: a datagram is accepted only when its send time is within ``window_ms``
of ``now_ms`` (``STALE``) and its ``(boot_ms, seq)`` pair is above the highest one seen from
that node (``REPLAYED``). The boot time makes a restarted node's counter, which starts
again at 0, rank above its previous life without any state on disk.

The TXT record carries the same fields as ``key=value`` strings plus ``s`` (the tag, over a
canonical line form, with a different derived key so neither form can be replayed as the
other), and passes the same checks.

Not guaranteed: confidentiality (announcements are readable by anyone on the link; they
name a host and a port, nothing secret) and protection against a member of the mesh, who
holds the secret by design.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Mapping

MAGIC = b"DMSH"
VERSION = 1
MESH_TAG_BYTES = 8
SIGNATURE_BYTES = 32
HEADER_BYTES = len(MAGIC) + 1 + MESH_TAG_BYTES + 1
MAX_DATAGRAM_BYTES = 1200
"""Upper bound for an encoded datagram or TXT record: far under any path MTU."""
MAX_TXT_ENTRIES = 32
DEFAULT_WINDOW_MS = 30_000
"""How far a sender's clock may be from ours, and so how long a captured datagram lives."""

_NODE_ID = re.compile(r"[0-9a-f]{32}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_REVISION = re.compile(r"[0-9a-z]{0,64}")
_MAX_INT = 2**53
_MAX_ADDRESS_CHARS = 45


class Kind(enum.Enum):
    """What an announcement says about its sender."""

    HELLO = "hello"
    """Sent at once on start and whenever the node's revision or address changes."""
    HEARTBEAT = "heartbeat"
    """Sent every interval: I am still here."""
    GOODBYE = "goodbye"
    """Sent on a clean stop: forget me now rather than after three missed heartbeats."""


class DropReason(enum.Enum):
    """Why an input was not trusted; a closed set so that every drop is counted somewhere."""

    MALFORMED = "malformed"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    REPLAYED = "replayed"
    STALE = "stale"
    OVERSIZED = "oversized"
    WRONG_VERSION = "wrong-version"
    WRONG_MESH = "wrong-mesh"
    REFUSED = "refused"
    """Authentic, but the sender is outside ``mesh.allow`` (counted by the peer registry)."""
    ADDRESS_NOT_SOURCE = "address-not-source"
    """Authentic, but a broadcast names a peer-channel address other than the one it came
    from (counted by the peer registry; seeds and ``lo`` aside)."""
    LOOPBACK_ADDRESS = "loopback-address"
    """Authentic, but it came over a network and names a loopback address: every agent that
    heard it would dial its own machine (counted by the peer registry)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Drop:
    """An input that was dropped, with the reason and a short detail for logs."""

    reason: DropReason
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """One node's signed statement of where its peer channel is and which catalog it has."""

    kind: Kind
    node_id: str
    """32 lowercase hex digits, persistent for the node (its identity in the mesh)."""
    node_name: str
    """A DNS label (hostname by default); names may collide, ids do not."""
    address: str
    """IP address of the sender's peer channel."""
    port: int
    """TCP port of the sender's peer channel."""
    revision: str
    """Catalog revision: when it differs from the one held, fetch the catalog again."""
    sent_ms: int
    """Sender's wall clock at sending, milliseconds since the epoch."""
    boot_ms: int
    """Sender's wall clock when it started: ranks a restarted node's counter above the old."""
    seq: int
    """Per-boot counter, incremented for every announcement the node sends."""

    @property
    def order(self) -> tuple[int, int]:
        """The replay key: strictly increasing over everything one node sends."""
        return (self.boot_ms, self.seq)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MeshKeys:
    """Keys derived from the mesh secret; the secret itself never leaves the identity."""

    mesh: str
    datagram_key: bytes = dataclasses.field(repr=False)
    txt_key: bytes = dataclasses.field(repr=False)
    serf_tag_key: bytes = dataclasses.field(repr=False)
    """Signs a node's Serf tags (``core.serftags``)."""
    serf_gossip_key: bytes = dataclasses.field(repr=False)
    """Serf's own gossip encryption key (``serf agent -encrypt``): another team's cluster
    cannot join or read ours."""

    @property
    def mesh_tag(self) -> bytes:
        return mesh_tag(self.mesh)


def mesh_tag(mesh: str) -> bytes:
    """Eight bytes that name a mesh on the wire without revealing anything secret."""
    return hashlib.sha256(b"devmesh mesh\x00" + mesh.encode()).digest()[:MESH_TAG_BYTES]


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) with stdlib hmac: one block is all we need."""
    prk = hmac.new(b"devmesh discovery salt v1", secret, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def derive_keys(mesh: str, secret: bytes) -> MeshKeys:
    """Derive the signing keys of one mesh; different names or secrets give unrelated keys."""
    if not secret:
        raise ValueError("mesh secret: empty, expected at least 16 random bytes")
    label = mesh.encode()
    return MeshKeys(
        mesh=mesh,
        datagram_key=_hkdf(secret, b"devmesh datagram v1\x00" + label),
        txt_key=_hkdf(secret, b"devmesh txt v1\x00" + label),
        serf_tag_key=_hkdf(secret, b"devmesh serf tags v1\x00" + label),
        serf_gossip_key=_hkdf(secret, b"devmesh serf gossip v1\x00" + label),
    )


def _body(msg: Announcement) -> dict[str, str | int]:
    return {
        "k": msg.kind.value,
        "id": msg.node_id,
        "n": msg.node_name,
        "a": msg.address,
        "p": msg.port,
        "r": msg.revision,
        "t": msg.sent_ms,
        "b": msg.boot_ms,
        "c": msg.seq,
    }


_FIELDS = ("k", "id", "n", "a", "p", "r", "t", "b", "c")


def check_fields(msg: Announcement) -> str | None:
    """What is wrong with an announcement's fields, or None; shared by both directions."""
    if not _NODE_ID.fullmatch(msg.node_id):
        return "node id: expected 32 lowercase hex digits"
    if not _LABEL.fullmatch(msg.node_name):
        return "node name: expected a DNS label (a-z, 0-9, '-', at most 63)"
    if len(msg.address) > _MAX_ADDRESS_CHARS:
        return "address: too long"
    try:
        ipaddress.ip_address(msg.address)
    except ValueError:
        return "address: not an IP address"
    if not 1 <= msg.port <= 65535:
        return "port: expected 1..65535"
    if not _REVISION.fullmatch(msg.revision):
        return "revision: expected at most 64 of 0-9a-z"
    for label, value in (("sent", msg.sent_ms), ("boot", msg.boot_ms), ("seq", msg.seq)):
        if not 0 <= value < _MAX_INT:
            return f"{label}: out of range"
    return None


def _from_fields(fields: Mapping[str, object]) -> Announcement | str:
    """Build an announcement from parsed fields, or say what is wrong (never raises)."""
    if set(fields) != set(_FIELDS):
        return "fields: expected exactly " + ",".join(_FIELDS)
    strings = ("k", "id", "n", "a", "r")
    ints = ("p", "t", "b", "c")
    if not all(isinstance(fields[k], str) for k in strings):
        return "fields: k, id, n, a, r must be strings"
    if not all(type(fields[k]) is int for k in ints):
        return "fields: p, t, b, c must be integers"
    try:
        kind = Kind(fields["k"])
    except ValueError:
        return "kind: unknown"
    text = {k: str(fields[k]) for k in strings}
    number: dict[str, int] = {}
    for k in ints:
        value = fields[k]
        if isinstance(value, int):
            number[k] = value
    msg = Announcement(
        kind=kind,
        node_id=text["id"],
        node_name=text["n"],
        address=text["a"],
        port=number["p"],
        revision=text["r"],
        sent_ms=number["t"],
        boot_ms=number["b"],
        seq=number["c"],
    )
    problem = check_fields(msg)
    return problem if problem else msg


def _fresh(
    msg: Announcement, now_ms: int, window_ms: int, high_water: Mapping[str, tuple[int, int]]
) -> Announcement | Drop:
    if abs(now_ms - msg.sent_ms) > window_ms:
        return Drop(reason=DropReason.STALE, detail=f"sent {now_ms - msg.sent_ms} ms ago")
    last = high_water.get(msg.node_id)
    if last is not None and msg.order <= last:
        return Drop(reason=DropReason.REPLAYED, detail=f"counter {msg.order} <= {last}")
    return msg


# -- datagrams -----------------------------------------------------------------------------


def encode(msg: Announcement, keys: MeshKeys) -> bytes:
    """Sign and encode an announcement.

    Raises ValueError when a field is invalid (a bug of the caller, not network input).
    """
    problem = check_fields(msg)
    if problem:
        raise ValueError(f"announcement {problem}")
    body = json.dumps(_body(msg), separators=(",", ":"), ensure_ascii=True).encode()
    head = MAGIC + bytes([VERSION]) + keys.mesh_tag + bytes([SIGNATURE_BYTES])
    tag = hmac.new(keys.datagram_key, head + body, hashlib.sha256).digest()
    data = head + body + tag
    if len(data) > MAX_DATAGRAM_BYTES:  # pragma: no cover - fields are bounded far below
        raise ValueError(f"announcement encodes to {len(data)} bytes, over the limit")
    return data


def decode(
    data: bytes,
    *,
    keys: MeshKeys,
    now_ms: int,
    high_water: Mapping[str, tuple[int, int]],
    window_ms: int = DEFAULT_WINDOW_MS,
) -> Announcement | Drop:
    """Check and decode one datagram; never raises on any ``data``.

    The checks run cheapest and least trusting first: size, framing, version, mesh, then the
    signature (constant-time compare), and only then the body and its freshness, so
    unauthenticated bytes never reach the JSON parser.
    """
    if len(data) > MAX_DATAGRAM_BYTES:
        return Drop(reason=DropReason.OVERSIZED, detail=f"{len(data)} bytes")
    if len(data) < HEADER_BYTES or not data.startswith(MAGIC):
        return Drop(reason=DropReason.MALFORMED, detail="no devmesh header")
    if data[len(MAGIC)] != VERSION:
        return Drop(reason=DropReason.WRONG_VERSION, detail=f"version {data[len(MAGIC)]}")
    tag_at = len(MAGIC) + 1
    if data[tag_at : tag_at + MESH_TAG_BYTES] != keys.mesh_tag:
        return Drop(reason=DropReason.WRONG_MESH, detail="mesh tag differs")
    tag_len = data[HEADER_BYTES - 1]
    if tag_len == 0:
        return Drop(reason=DropReason.UNSIGNED, detail="no signature")
    if tag_len != SIGNATURE_BYTES or len(data) < HEADER_BYTES + SIGNATURE_BYTES:
        return Drop(reason=DropReason.MALFORMED, detail="bad signature length")
    signed, tag = data[:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
    expected = hmac.new(keys.datagram_key, signed, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        return Drop(reason=DropReason.BAD_SIGNATURE, detail="HMAC mismatch")
    try:
        fields = json.loads(signed[HEADER_BYTES:].decode("utf-8"))
    except (ValueError, RecursionError):
        return Drop(reason=DropReason.MALFORMED, detail="body is not JSON")
    if not isinstance(fields, dict):
        return Drop(reason=DropReason.MALFORMED, detail="body is not an object")
    msg = _from_fields(fields)
    if isinstance(msg, str):
        return Drop(reason=DropReason.MALFORMED, detail=msg)
    return _fresh(msg, now_ms, window_ms, high_water)


# -- DNS-SD TXT records --------------------------------------------------------------------


def _txt_canonical(pairs: Mapping[str, str]) -> bytes:
    return b"devmesh txt v1\n" + b"\n".join(f"{k}={pairs[k]}".encode() for k in _FIELDS)


def encode_txt(msg: Announcement, keys: MeshKeys) -> dict[str, str]:
    """The signed TXT record of an announcement, as DNS-SD key/value strings.

    Raises ValueError when a field is invalid (a bug of the caller).
    """
    problem = check_fields(msg)
    if problem:
        raise ValueError(f"announcement {problem}")
    pairs = {k: str(v) for k, v in _body(msg).items()}
    tag = hmac.new(keys.txt_key, _txt_canonical(pairs), hashlib.sha256).digest()
    return {
        "v": str(VERSION),
        "m": keys.mesh_tag.hex(),
        **pairs,
        "s": base64.urlsafe_b64encode(tag).decode().rstrip("="),
    }


def _txt_text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def decode_txt(
    record: Mapping[object, object],
    *,
    keys: MeshKeys,
    now_ms: int,
    high_water: Mapping[str, tuple[int, int]],
    window_ms: int = DEFAULT_WINDOW_MS,
) -> Announcement | Drop:
    """Check and decode a TXT record (keys and values as bytes or str); never raises."""
    if len(record) > MAX_TXT_ENTRIES:
        return Drop(reason=DropReason.OVERSIZED, detail=f"{len(record)} entries")
    size = 0
    for k, v in record.items():
        if not isinstance(k, str | bytes) or not isinstance(v, str | bytes | None):
            return Drop(reason=DropReason.MALFORMED, detail="entries are not strings")
        size += len(k) + len(v or b"") + 2
    if size > MAX_DATAGRAM_BYTES:
        return Drop(reason=DropReason.OVERSIZED, detail=f"{len(record)} entries, {size} bytes")
    pairs: dict[str, str] = {}
    for k, v in record.items():
        key, value = _txt_text(k), _txt_text(v)
        if key is None or value is None or len(key) + len(value) > 254:
            return Drop(reason=DropReason.MALFORMED, detail="entry is not short ASCII")
        pairs[key] = value  # zeroconf gives None for a key without "="; _txt_text refuses it
    if "v" not in pairs or "m" not in pairs:
        return Drop(reason=DropReason.MALFORMED, detail="no devmesh version or mesh")
    if pairs["v"] != str(VERSION):
        return Drop(reason=DropReason.WRONG_VERSION, detail=f"version {pairs['v'][:8]!r}")
    if pairs["m"] != keys.mesh_tag.hex():
        return Drop(reason=DropReason.WRONG_MESH, detail="mesh tag differs")
    if not pairs.get("s"):
        return Drop(reason=DropReason.UNSIGNED, detail="no signature")
    if set(pairs) != {"v", "m", "s", *_FIELDS}:
        return Drop(reason=DropReason.MALFORMED, detail="unexpected or missing keys")
    try:
        padded = pairs["s"] + "=" * (-len(pairs["s"]) % 4)
        tag = base64.b64decode(padded, altchars=b"-_", validate=True)
    except ValueError:
        return Drop(reason=DropReason.MALFORMED, detail="signature is not base64")
    expected = hmac.new(keys.txt_key, _txt_canonical(pairs), hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        return Drop(reason=DropReason.BAD_SIGNATURE, detail="HMAC mismatch")
    fields: dict[str, object] = dict(pairs)
    for k in ("p", "t", "b", "c"):
        if not re.fullmatch(r"0|[1-9][0-9]{0,15}", pairs[k]):
            return Drop(reason=DropReason.MALFORMED, detail=f"{k}: not a number")
        fields[k] = int(pairs[k])
    msg = _from_fields({k: fields[k] for k in _FIELDS})
    if isinstance(msg, str):
        return Drop(reason=DropReason.MALFORMED, detail=msg)
    return _fresh(msg, now_ms, window_ms, high_water)

"""Signed Serf tags: how a node says where its peer channel is through HashiCorp Serf.

Why tags, and why signed: Serf's gossip carries each member's name and a small map of
string tags to every other member; the node id is the member name and the tags carry the
rest of an announcement (name, peer-channel address and port, catalog revision, boot time).
Serf's gossip is encrypted with a key derived from the mesh secret, but tags are still
signed, as datagrams are: the encryption keeps other teams out, the signature makes a member
that joined with the key but set tags by hand (or a bug in a tag update) visible as a drop
instead of a route to the wrong place.

Signed with ``MeshKeys.serf_tag_key`` (HKDF of the mesh secret with its own label, so a tag
signature can never be replayed as a datagram or TXT record) over a canonical line form
that includes the member name. No send time and no counter: liveness is Serf's (a member is
alive until Serf's failure detection says otherwise), so the decoded announcement is a
heartbeat stamped ``now_ms`` for an alive member and a goodbye for a failed or left one.

Pure: no I/O; the clock is passed in; never raises on tags from the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping

from devmesh.core import wire

VERSION = "1"
FIELDS = ("n", "a", "p", "r", "b")
"""Node name, peer-channel address and port, catalog revision, boot time (ms)."""
KEYS = frozenset({"v", "m", "s", *FIELDS})
MAX_TAG_BYTES = 512
"""Serf's own limit on a member's encoded tags; a larger set is refused up front."""


def gossip_key(keys: wire.MeshKeys) -> str:
    """The value of ``serf agent -encrypt``: base64 of a 32-byte key (AES-256)."""
    return base64.b64encode(keys.serf_gossip_key[:32]).decode()


def _canonical(name: str, tags: Mapping[str, str]) -> bytes:
    return b"devmesh serf v1\n" + "\n".join([name, *(f"{k}={tags[k]}" for k in FIELDS)]).encode()


def encode(msg: wire.Announcement, keys: wire.MeshKeys) -> dict[str, str]:
    """The signed tags of an announcement (kind, send time and counter are not carried).

    Raises ValueError when a field is invalid (a bug of the caller, not network input).
    """
    problem = wire.check_fields(msg)
    if problem:
        raise ValueError(f"announcement {problem}")
    tags = {
        "n": msg.node_name,
        "a": msg.address,
        "p": str(msg.port),
        "r": msg.revision,
        "b": str(msg.boot_ms),
    }
    sig = hmac.new(keys.serf_tag_key, _canonical(msg.node_id, tags), hashlib.sha256).digest()
    return {
        "v": VERSION,
        "m": keys.mesh_tag.hex(),
        **tags,
        "s": base64.urlsafe_b64encode(sig).decode().rstrip("="),
    }


def decode(
    name: str, tags: Mapping[str, str], *, keys: wire.MeshKeys, alive: bool, now_ms: int
) -> wire.Announcement | wire.Drop:
    """Check one member's name and tags; a heartbeat when alive, else a goodbye.

    Never raises. The signature is checked before any field is parsed.
    """
    Drop, Reason = wire.Drop, wire.DropReason
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        return Drop(reason=Reason.MALFORMED, detail="serf tags are not strings")
    if sum(len(k) + len(v) for k, v in tags.items()) > MAX_TAG_BYTES:
        return Drop(reason=Reason.OVERSIZED, detail=f"serf tags of {name[:40]!r}")
    if "v" not in tags or "m" not in tags:
        return Drop(reason=Reason.MALFORMED, detail=f"serf member {name[:40]!r}: no devmesh tags")
    if tags["v"] != VERSION:
        return Drop(reason=Reason.WRONG_VERSION, detail=f"serf tags version {tags['v'][:8]!r}")
    if tags["m"] != keys.mesh_tag.hex():
        return Drop(reason=Reason.WRONG_MESH, detail="serf tags of another mesh")
    if not tags.get("s"):
        return Drop(reason=Reason.UNSIGNED, detail=f"serf member {name[:40]!r}: no signature")
    if set(tags) != KEYS:
        return Drop(reason=Reason.MALFORMED, detail="serf tags: unexpected or missing keys")
    try:
        padded = tags["s"] + "=" * (-len(tags["s"]) % 4)
        sig = base64.b64decode(padded, altchars=b"-_", validate=True)
    except ValueError:
        return Drop(reason=Reason.MALFORMED, detail="serf tag signature is not base64")
    expected = hmac.new(keys.serf_tag_key, _canonical(name, tags), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, expected):
        return Drop(reason=Reason.BAD_SIGNATURE, detail=f"serf member {name[:40]!r}: HMAC mismatch")
    for k in ("p", "b"):
        if not re.fullmatch(r"0|[1-9][0-9]{0,15}", tags[k]):
            return Drop(reason=Reason.MALFORMED, detail=f"serf tag {k}: not a number")
    msg = wire.Announcement(
        kind=wire.Kind.HEARTBEAT if alive else wire.Kind.GOODBYE,
        node_id=name,
        node_name=tags["n"],
        address=tags["a"],
        port=int(tags["p"]),
        revision=tags["r"],
        sent_ms=now_ms,
        boot_ms=int(tags["b"]),
        seq=0,
    )
    problem = wire.check_fields(msg)
    return Drop(reason=Reason.MALFORMED, detail=problem) if problem else msg

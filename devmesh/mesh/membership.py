"""Joining a team on this machine: what `devmesh mesh init|join|export|show` do to the files.

Why here and not in the agent: the team identity is a handful of files in
``DEVMESH_HOME/mesh``, and a developer's natural first steps on a new machine are `mesh join`
then `up`. Going through the agent would start one on the default proxy ports before the
project's `proxy:` could choose them (and fail when port 7700 is taken by anything else), so
these operations work on the files directly, from the CLI, with no agent. A running agent is
told afterwards (``POST /v1/mesh/reload``); its proxy notices a new team CA at the next
handshake by itself (``proxy.ca``).

Every check (the bundle file, the names, an identity already there) happens before anything
is written, so a refused request changes nothing; when writing fails half-way the previous
identity comes back (or, on a node that had none, the new files go). Writers hold an
exclusive ``flock`` on ``DEVMESH_HOME/locks/mesh.lock``; the agent takes it shared before it
reads the identity (``settled``), so it never reads half of one.

The secret is never printed or logged: descriptions name the mesh, the node, the CA
fingerprint and the files only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devmesh.mesh import identity

NO_IDENTITY = (
    "this node has no team identity yet: run `devmesh mesh init` (a new team) "
    "or `devmesh mesh join FILE` (a teammate's bundle)"
)


def _lock_path(home: Path) -> Path:
    return home / "locks" / "mesh.lock"


@contextlib.contextmanager
def _locked(home: Path, mode: int) -> Iterator[None]:
    path = _lock_path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def writing(home: Path) -> contextlib.AbstractContextManager[None]:
    """Hold while changing the identity: one writer at a time, no reader meanwhile."""
    return _locked(home, fcntl.LOCK_EX)


def settled(home: Path) -> None:
    """Wait until no `mesh init|join` is writing the identity (blocking; run in a thread)."""
    if (home / "locks").is_dir():
        with _locked(home, fcntl.LOCK_SH):
            pass


def current(home: Path) -> identity.Identity | None:
    """Who this node is now (None without a readable identity)."""
    try:
        return identity.load(home) if identity.exists(home) else None
    except identity.IdentityError:
        return None


def init(home: Path, mesh: str, node_name: str | None, force: bool) -> dict[str, Any]:
    """Create a new team; ``{"identity": description, "set_aside": path or None}``."""
    identity.check_label("mesh name", mesh)
    if node_name is not None:
        identity.check_label("node name", node_name)
    with writing(home):
        fresh = not identity.exists(home)
        aside = _make_room(home, force, "devmesh mesh init --force")
        with _restored_on_failure(home, aside, fresh):
            ident = identity.init(home, mesh, node_name=node_name)
    return {"identity": describe(home, ident), "set_aside": _str(aside)}


def join(home: Path, path: Path, node_name: str | None, force: bool) -> dict[str, Any]:
    """Install a teammate's bundle; ``{"identity": description, "set_aside": path or None}``."""
    data = identity.read_bundle_file(path)
    team = identity.decode_bundle(data, str(path))  # every check before anything is written
    if node_name is not None:
        identity.check_label("node name", node_name)
    with writing(home):
        aside = None
        fresh = not identity.exists(home)
        if not fresh and not _same_team(home, team):
            aside = _make_room(home, force, f"devmesh mesh join --force {path}")
        with _restored_on_failure(home, aside, fresh):
            ident = identity.join(home, data, node_name=node_name, where=str(path))
    return {"identity": describe(home, ident), "set_aside": _str(aside)}


def bundle(home: Path) -> bytes:
    """The team bundle for `mesh export` (the only way the secret leaves DEVMESH_HOME)."""
    with writing(home):
        if not identity.exists(home):
            raise identity.IdentityError(str(identity.mesh_dir(home)), NO_IDENTITY)
        return identity.encode_bundle(identity.load(home).team)


@contextlib.contextmanager
def _restored_on_failure(home: Path, aside: Path | None, fresh: bool) -> Iterator[None]:
    """No half-written identity: when writing the new one fails, the old one comes back (or,
    on a node that had none, the new one's files go)."""
    try:
        yield
    except BaseException:
        if aside is not None:
            identity.restore_aside(home, aside)
        elif fresh:
            identity.remove_team_files(home)
        raise


def _make_room(home: Path, force: bool, command: str) -> Path | None:
    """Set the current identity aside when ``force``; refuse when there is one otherwise."""
    if not identity.exists(home):
        return None
    if not force:
        try:
            now = describe(home)
        except identity.IdentityError:
            now = None
        what = f"mesh {now['mesh']}, CA {now['ca_fingerprint'][:23]}..." if now else "unreadable"
        raise identity.IdentityError(
            str(identity.mesh_dir(home)),
            f"this node already has a team identity ({what}); `{command}` keeps it aside in "
            f"{identity.mesh_dir(home)}/previous-*/ and replaces it",
        )
    return identity.set_aside(home)


def _same_team(home: Path, team: identity.Team) -> bool:
    try:
        now = identity.load(home).team
    except identity.IdentityError:
        return False
    return now.ca_cert_pem == team.ca_cert_pem and now.secret == team.secret


def describe(home: Path, ident: identity.Identity | None = None) -> dict[str, Any] | None:
    """What `mesh show` prints: names, fingerprint and files; never the secret."""
    if ident is None:
        if not identity.exists(home):
            return None
        ident = identity.load(home)
    d = identity.mesh_dir(home)
    return {
        "mesh": ident.team.mesh,
        "node_id": ident.node_id,
        "node_name": ident.node_name,
        "node_dns_name": ident.node_dns_name,
        "ca_fingerprint": identity.fingerprint(ident.team.ca_cert_pem),
        "files": {
            "dir": str(d),
            "ca": str(ident.ca_path),
            "ca_key": str(d / "team-ca-key.pem"),
            "secret": str(d / "secret"),
            "node_cert": str(ident.node_cert_path),
            "node_key": str(ident.node_key_path),
        },
    }


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def show(home: Path) -> dict[str, Any] | None:
    """``describe`` under the lock (loading may renew the node certificate: a write)."""
    with writing(home):
        return describe(home)

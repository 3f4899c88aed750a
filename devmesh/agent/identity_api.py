"""The control API of the team identity: what `devmesh mesh init|join|export|show` call.

Why in the agent: the agent owns DEVMESH_HOME, so one process writes the identity, the same
way every time, and the HTTPS proxy it runs picks the new team CA up at its next handshake
(see ``devmesh.proxy.ca``) without a restart. Writes are serialised by one lock, and every
check (the bundle file, the mesh name, an identity already there) happens before anything
is written, so a refused request changes nothing.

Endpoints (JSON):
  GET  /v1/mesh/identity     {"identity": {mesh, node_id, node_name, ca_fingerprint, files}}
                             or {"identity": null}; never the secret
  POST /v1/mesh/init         {mesh, node_name?, force?}  -> {"identity": ..., "set_aside": P}
  POST /v1/mesh/join         {path, node_name?, force?}  -> {"identity": ..., "set_aside": P}
  GET  /v1/mesh/bundle       {"bundle": TEXT} for `mesh export` (the only way the secret
                             leaves DEVMESH_HOME)

A running mesh node follows the identity: when ``init`` or ``join`` changes the team or the
node's name, ``on_change`` (the agent's ``MeshHost.reload_identity``) makes the node say
goodbye and start again with the new certificate and secret, and the answer carries its
outcome as ``"mesh": {"restarted": bool, "error": str | None}``.

The secret is never logged: log lines name the mesh, the node and the CA fingerprint only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio

from devmesh.agent.http_server import ApiError, Request, Response, Router
from devmesh.mesh import identity

log = logging.getLogger("devmesh.agent.identity")


OnChange = Callable[[], Awaitable[dict[str, Any]]]


def register(router: Router, home: Path, on_change: OnChange | None = None) -> None:
    """Add the identity endpoints to the control API's router for the agent of ``home``.

    ``on_change`` runs after an ``init`` or ``join`` that changed who this node is,
    under the same lock, so two joins cannot interleave their node restarts.
    """
    lock = anyio.Lock()

    async def change(func: Callable[[], dict[str, Any]]) -> Response:
        async with lock:
            before = await anyio.to_thread.run_sync(_current, home)
            response = await _answer(home, func)
            after = await anyio.to_thread.run_sync(_current, home)
            if on_change is not None and after != before:
                response.body["mesh"] = await on_change()
            return response

    async def run(func: Callable[[], dict[str, Any]]) -> Response:
        async with lock:
            return await _answer(home, func)

    @router.route("GET", "/v1/mesh/identity")
    async def show(req: Request) -> Response:
        return await run(lambda: {"identity": _describe(home)})

    @router.route("POST", "/v1/mesh/init")
    async def init(req: Request) -> Response:
        body = _object(req.json())
        mesh = _text(body, "mesh")
        node_name = _optional_text(body, "node_name")
        force = body.get("force") is True
        if mesh is None:
            raise ApiError(400, "mesh init: 'mesh' (the mesh name) is required")
        return await change(lambda: _init(home, mesh, node_name, force))

    @router.route("POST", "/v1/mesh/join")
    async def join(req: Request) -> Response:
        body = _object(req.json())
        path = _text(body, "path")
        node_name = _optional_text(body, "node_name")
        force = body.get("force") is True
        if path is None or not Path(path).is_absolute():
            raise ApiError(400, "mesh join: 'path' must be the bundle file's absolute path")
        return await change(lambda: _join(home, Path(path), node_name, force))

    @router.route("GET", "/v1/mesh/bundle")
    async def bundle(req: Request) -> Response:
        def export() -> dict[str, Any]:
            if not identity.exists(home):
                raise identity.IdentityError(str(identity.mesh_dir(home)), _NO_IDENTITY)
            ident = identity.load(home)
            log.info("team bundle of mesh %s handed out for export", ident.team.mesh)
            return {"bundle": identity.encode_bundle(ident.team).decode("ascii")}

        return await run(export)


async def _answer(home: Path, func: Callable[[], dict[str, Any]]) -> Response:
    try:
        return Response(200, await anyio.to_thread.run_sync(func))
    except identity.IdentityError as exc:
        raise ApiError(400, str(exc)) from None
    except OSError as exc:
        where = exc.filename or identity.mesh_dir(home)
        raise ApiError(500, f"{where}: {exc.strerror or exc}") from None


def _current(home: Path) -> identity.Identity | None:
    """Who this node is (team CA, secret, node id and name), to tell whether a request
    changed it: a rejoin of the same team under the same name re-issues the node
    certificate for the same names, and leaves the running node alone."""
    try:
        return identity.load(home) if identity.exists(home) else None
    except identity.IdentityError:
        return None


_NO_IDENTITY = (
    "this node has no team identity yet: run `devmesh mesh init` (a new team) "
    "or `devmesh mesh join FILE` (a teammate's bundle)"
)


def _init(home: Path, mesh: str, node_name: str | None, force: bool) -> dict[str, Any]:
    identity.check_label("mesh name", mesh)
    if node_name is not None:
        identity.check_label("node name", node_name)
    fresh = not identity.exists(home)
    aside = _make_room(home, force, "devmesh mesh init --force")
    with _restored_on_failure(home, aside, fresh):
        ident = identity.init(home, mesh, node_name=node_name)
    _log_installed("created", ident, aside)
    return {"identity": _describe(home, ident), "set_aside": _str(aside)}


def _join(home: Path, path: Path, node_name: str | None, force: bool) -> dict[str, Any]:
    data = identity.read_bundle_file(path)
    team = identity.decode_bundle(data, str(path))  # every check before anything is written
    if node_name is not None:
        identity.check_label("node name", node_name)
    aside = None
    fresh = not identity.exists(home)
    if not fresh and not _same_team(home, team):
        aside = _make_room(home, force, f"devmesh mesh join --force {path}")
    with _restored_on_failure(home, aside, fresh):
        ident = identity.join(home, data, node_name=node_name, where=str(path))
    _log_installed("joined", ident, aside)
    return {"identity": _describe(home, ident), "set_aside": _str(aside)}


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
        current = _describe(home)
        what = (
            f"mesh {current['mesh']}, CA {current['ca_fingerprint'][:23]}..."
            if current
            else "unreadable"
        )
        raise identity.IdentityError(
            str(identity.mesh_dir(home)),
            f"this node already has a team identity ({what}); `{command}` keeps it aside in "
            f"{identity.mesh_dir(home)}/previous-*/ and replaces it",
        )
    return identity.set_aside(home)


def _same_team(home: Path, team: identity.Team) -> bool:
    try:
        current = identity.load(home).team
    except identity.IdentityError:
        return False
    return current.ca_cert_pem == team.ca_cert_pem and current.secret == team.secret


def _describe(home: Path, ident: identity.Identity | None = None) -> dict[str, Any] | None:
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


def _log_installed(verb: str, ident: identity.Identity, aside: Path | None) -> None:
    log.info(
        "team identity %s: mesh %s, node %s (%s), team CA %s; HTTPS leaves are signed by it "
        "from the next connection",
        verb,
        ident.team.mesh,
        ident.node_name,
        ident.node_id,
        identity.fingerprint(ident.team.ca_cert_pem),
    )
    if aside is not None:
        log.info("the previous team identity is kept in %s", aside)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object")
    return value


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{key!r} must be a string")
    return value


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    return _text(body, key) or None

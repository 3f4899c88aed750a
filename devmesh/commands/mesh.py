"""`devmesh mesh init|export|join|show`: the team identity of this node.

A team shares one bundle: a team CA and a mesh secret. One person runs `mesh init` and
`mesh export FILE`; each teammate runs `mesh join FILE`. From then on the HTTPS proxy signs
every `*.localhost` certificate with the team CA, so a browser that trusts it once (`devmesh
ca install`) trusts every teammate's services, and the agents recognise each other on the
peer channel. The CA is name-constrained: it can only vouch for localhost names, loopback
addresses and the mesh's node names, never for a real site, even if the bundle leaks.

Why through the agent: the agent owns DEVMESH_HOME, writes the identity the same way every
time, and its proxy picks the new CA up without a restart. These commands start it when none
runs, as `up` does. The only file written here is `mesh export`'s, with mode 0600.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from devmesh.commands import _common


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mesh",
        help="the team identity: a name-constrained team CA and the mesh secret",
        description=__doc__,
        epilog="Example: devmesh mesh init shop && devmesh mesh export shop.bundle\n"
        "         devmesh mesh join shop.bundle      # on a teammate's machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="mesh_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "init",
        help="create a new team (team CA + mesh secret) for this node",
        description="Create a new team: a name-constrained team CA and a random mesh "
        "secret, installed in DEVMESH_HOME/mesh with this node's certificate. Refuses when "
        "this node already has a team identity, unless --force, which keeps the old one in "
        "DEVMESH_HOME/mesh/previous-STAMP/.",
    )
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="mesh name, a DNS label (default: mesh.name of the devmesh.yaml found here)",
    )
    _common.add_file_arg(p)  # the files to take mesh.name from
    _node_name_arg(p)
    p.add_argument("--force", action="store_true", help="replace an existing team identity")
    p.set_defaults(func=lambda a: _common.run_command(cmd_init, a), usage_parser=p)
    p = sub.add_parser(
        "export",
        help="write the team bundle to FILE (mode 0600; '-' for standard output)",
        description="Write the team bundle (the team CA with its key, and the mesh secret) "
        "to FILE with mode 0600, or to standard output with '-'. Hand it over as you would an "
        "SSH key. Never overwrites FILE unless --force.",
    )
    p.add_argument("file", metavar="FILE", help="where to write the bundle; '-' is stdout")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=lambda a: _common.run_command(cmd_export, a), usage_parser=p)
    p = sub.add_parser(
        "join",
        help="install a teammate's bundle FILE on this node",
        description="Install a teammate's bundle: checks it (a devmesh bundle, readable, "
        "mode 600, a name-constrained CA whose key matches), then gives this node its own "
        "certificate signed by the team CA. The node id stays. When this node belongs to "
        "another team, refuses unless --force, which keeps the old identity aside.",
    )
    p.add_argument("file", metavar="FILE", help="the bundle written by `devmesh mesh export`")
    _node_name_arg(p)
    p.add_argument("--force", action="store_true", help="replace another team's identity")
    p.set_defaults(func=lambda a: _common.run_command(cmd_join, a), usage_parser=p)
    p = sub.add_parser(
        "show",
        help="print the mesh name, node id and name, CA fingerprint and files",
        description="Print this node's team identity: mesh name, node id, node name, the "
        "team CA's SHA-256 fingerprint and where the files are. Never the secret. Exit "
        'status 1 when the node has no team identity ({"identity": null} with --json).',
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _common.run_command(cmd_show, a), usage_parser=p)


def _node_name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node-name",
        metavar="NAME",
        help="this node's name, a DNS label (default: kept, else the hostname)",
    )


def _agent() -> _common.Client:
    return _common.ensure_agent(_common.home())


def cmd_init(args: argparse.Namespace) -> int:
    name = args.name or _mesh_name_from_config(args.file)
    body = {"mesh": name, "node_name": args.node_name, "force": args.force}
    result = _agent().request("POST", "/v1/mesh/init", body)
    ident = result["identity"]
    _said_aside(result)
    print(f"Created the team {ident['mesh']}; this node is {_node(ident)}.")
    print(f"Team CA SHA-256 fingerprint: {ident['ca_fingerprint']}")
    print("HTTPS *.localhost certificates are now signed by the team CA: trust it once with")
    print("`devmesh ca install`. Share the team with `devmesh mesh export FILE`.")
    return _common.EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser().absolute()
    body = {"path": str(path), "node_name": args.node_name, "force": args.force}
    result = _agent().request("POST", "/v1/mesh/join", body)
    ident = result["identity"]
    _said_aside(result)
    print(f"Joined the team {ident['mesh']}; this node is {_node(ident)}.")
    print(f"Team CA SHA-256 fingerprint: {ident['ca_fingerprint']} (compare it with the sender's)")
    print("HTTPS *.localhost certificates are now signed by the team CA: trust it once with")
    print("`devmesh ca install`.")
    return _common.EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    if args.file != "-":
        target = Path(args.file).expanduser()
        if (target.exists() or target.is_symlink()) and not args.force:
            raise _common.CommandError(f"{target} exists; not overwriting it (--force replaces it)")
    bundle = str(_agent().request("GET", "/v1/mesh/bundle")["bundle"])
    if args.file == "-":
        sys.stdout.write(bundle)
        sys.stdout.flush()
        return _common.EXIT_OK
    _write_bundle(target, bundle.encode("ascii"), replace=args.force)
    print(f"wrote the team bundle to {target} (mode 600); it holds the team CA key and the")
    print("mesh secret: hand it over as you would an SSH key, then delete it.")
    return _common.EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    ident = _agent().request("GET", "/v1/mesh/identity")["identity"]
    if args.json:
        print(json.dumps({"identity": ident}, indent=2))
        return _common.EXIT_OK if ident else _common.EXIT_FAILED
    if not ident:
        raise _common.CommandError(
            "this node has no team identity yet: run `devmesh mesh init` (a new team) or "
            "`devmesh mesh join FILE` (a teammate's bundle)"
        )
    files = ident["files"]
    rows = [
        ("mesh", ident["mesh"]),
        ("node name", ident["node_name"]),
        ("node id", ident["node_id"]),
        ("node DNS name", ident["node_dns_name"]),
        ("CA SHA-256", ident["ca_fingerprint"]),
        ("team CA", files["ca"]),
        ("team CA key", files["ca_key"]),
        ("mesh secret", files["secret"]),
        ("node cert", files["node_cert"]),
        ("node key", files["node_key"]),
    ]
    for label, value in rows:
        print(f"{label:<14}{value}")
    return _common.EXIT_OK


def _node(ident: dict[str, Any]) -> str:
    return f"{ident['node_name']} (id {ident['node_id']})"


def _said_aside(result: dict[str, Any]) -> None:
    if result.get("set_aside"):
        print(f"The previous team identity is kept in {result['set_aside']}.")
    mesh = result.get("mesh") or {}  # the running mesh node, restarted with the new identity
    if mesh.get("restarted"):
        print("The running mesh node left with the old identity and rejoined with this one.")
    elif mesh.get("error"):
        print(f"warning: the mesh is stopped: {mesh['error']}", file=sys.stderr)


def _mesh_name_from_config(files: list[str] | None) -> str:
    """``mesh.name`` of ``file`` (or the devmesh.yaml found here or above); else a clear error."""
    from devmesh.config import loader

    hint = "name the mesh: `devmesh mesh init NAME` (a DNS label, e.g. shop)"
    try:
        loaded = loader.load_files(loader.config_files(files))
    except loader.ConfigNotFound:
        raise _common.CommandError(f"no devmesh.yaml here to take mesh.name from; {hint}") from None
    except loader.ConfigError as exc:
        raise _common.CommandError(f"{exc}\n(or {hint})") from None
    mesh = loaded.project.mesh
    if mesh is None or not mesh.name:
        raise _common.CommandError(f"{loaded.project.source} sets no mesh.name; {hint}")
    return str(mesh.name)


def _write_bundle(target: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``target`` with mode 0600 from the first byte; never overwrite
    unless ``replace`` (a hard link refuses an existing name atomically)."""
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _common.CommandError(f"{target}: cannot write there: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if replace:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise _common.CommandError(
                    f"{target} exists; not overwriting it (--force replaces it)"
                ) from None
    except OSError as exc:
        raise _common.CommandError(f"{target}: cannot write it: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

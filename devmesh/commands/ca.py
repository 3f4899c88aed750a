"""`devmesh ca path|export|install`: the CA that signs the HTTPS listener's certificates.

Why a CLI of its own: a browser or a test client must trust the CA before
``https://NAME.localhost`` works, and that is a one-time, per-machine step. Once this node
has a team identity (`devmesh mesh init|join`) the CA is the team CA, so trusting it once
trusts every teammate's services; before, it is this machine's CA (created on first use in
``$DEVMESH_HOME/ca``, default ``~/.devmesh/ca``). Both are name-constrained to localhost
names and loopback. These commands read (or create) the CA's files in DEVMESH_HOME directly
and never start the agent, so the first `up` starts it with the project's `proxy:` ports;
a running agent's proxy uses the same files (the creation is locked, so the two never make
two CAs). Installing it into trust stores happens here, as the user, in ``_trust``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from devmesh.commands import _common


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ca",
        help="the CA behind https://NAME.localhost (the team CA once there is one)",
        description=__doc__,
        epilog='Example: curl --cacert "$(devmesh ca path)" https://api.localhost:7743/',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    p = sub.add_parser("path", help="print the CA certificate's file path")
    p.set_defaults(func=lambda a: _common.run_command(cmd_path, a), usage_parser=p)
    p = sub.add_parser("export", help="print the CA certificate (PEM), or write it to --out")
    p.add_argument("--out", type=Path, help="file to write instead of standard output")
    p.set_defaults(func=lambda a: _common.run_command(cmd_export, a), usage_parser=p)
    p = sub.add_parser(
        "install",
        help="trust the CA in the system store and the NSS databases (Chromium, Firefox)",
        description="Trust the CA in the system store and in the NSS databases browsers "
        "read: ~/.pki/nssdb (created when missing: Chromium reads only it) and each Firefox "
        "profile. Says where the CA went, and the exact command for each store it could not "
        "write.",
    )
    p.add_argument(
        "--system-dir",
        type=Path,
        default=None,
        help="system anchor directory (default: detected, e.g. /usr/local/share/ca-certificates)",
    )
    p.add_argument(
        "--update-command",
        default=None,
        help="command refreshing the system store (default: the one matching the "
        "directory, e.g. update-ca-certificates; '' for none)",
    )
    p.add_argument("--no-system", action="store_true", help="leave the system store alone")
    p.add_argument(
        "--nss-home",
        type=Path,
        default=None,
        help="home directory searched for NSS databases (default: $HOME)",
    )
    p.add_argument("--certutil", default=None, help="certutil program (default: from PATH)")
    p.set_defaults(func=lambda a: _common.run_command(cmd_install, a), usage_parser=p)


def _ca() -> dict[str, Any]:
    """The certificate's path and PEM: the team CA once there is one, else this machine's
    (created on first use, as the agent's proxy would create it)."""
    import logging

    from devmesh.proxy import ca

    # The CA says when it replaced an unconstrained CA of an earlier version, and where the
    # old files went: that is for the user running this command.
    said = logging.StreamHandler(sys.stderr)
    said.setFormatter(logging.Formatter("devmesh ca: %(message)s"))
    log = logging.getLogger(ca.log.name)
    said.setLevel(logging.WARNING)
    log.addHandler(said)
    log.propagate = False
    h = _common.home()
    h.ensure()
    try:
        local = ca.LocalCA(h.root)
        path = local.cert_path()
        pem = path.read_bytes()
    except ca.errors.CAError as exc:
        raise _common.CommandError(str(exc)) from None
    except OSError as exc:
        raise _common.CommandError(f"{exc.filename or h.root}: {exc.strerror or exc}") from None
    finally:
        log.removeHandler(said)
        log.propagate = True
    return {"path": str(path), "pem": pem.decode()}


def cmd_path(args: argparse.Namespace) -> int:
    print(_ca()["path"])
    return _common.EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    pem = str(_ca()["pem"])
    if args.out is None:
        sys.stdout.write(pem)
    else:
        args.out.write_text(pem)
        print(f"wrote {args.out}", file=sys.stderr)
    return _common.EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    from devmesh.commands import _trust

    cert = Path(_ca()["path"])
    system: tuple[Path, str | None] | None = None
    if not args.no_system:
        if args.system_dir is not None:
            system = (args.system_dir, args.update_command or None)
        else:
            found = _trust.default_system_store()
            if found is not None:
                command = found[1] if args.update_command is None else args.update_command
                system = (found[0], command or None)
    certutil = args.certutil or shutil.which("certutil")
    steps = _trust.install(
        cert,
        system=system,
        home=args.nss_home or _trust.home_dir(),
        certutil=certutil,
    )
    if args.no_system:
        steps = [s for s in steps if s.store != "system store"]
    for step in steps:
        mark = "ok  " if step.done else "TODO"
        print(f"{mark} {step.store}: {step.detail}")
    done = [s.store for s in steps if s.done]
    todo = [s.store for s in steps if not s.done]
    if todo:
        where = f"trusted in {len(done)} store(s), " if done else "trusted nowhere yet; "
        raise _common.CommandError(
            f"the CA is {where}not in: {'; '.join(todo)}; the TODO lines above say how"
        )
    print(f"The CA {cert} is trusted in {len(done)} store(s); restart browsers to pick it up.")
    return _common.EXIT_OK

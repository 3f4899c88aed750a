"""`devmesh ca path|export|install`: the local CA that signs the HTTPS listener's certificates.

Why a CLI of its own: a browser or a test client must trust the CA before
``https://NAME.localhost`` works, and that is a one-time, per-machine step. The CA is created
on first use in ``$DEVMESH_HOME/ca`` (default ``~/.devmesh/ca``), so these commands work
without a running agent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def devmesh_home() -> Path:
    return Path(os.environ.get("DEVMESH_HOME") or Path.home() / ".devmesh")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "ca",
        help="the local CA behind https://NAME.localhost",
        description=__doc__,
        epilog='Example: curl --cacert "$(devmesh ca path)" https://api.localhost:7743/',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    p = sub.add_parser("path", help="print the CA certificate's file path")
    p.set_defaults(func=cmd_path)
    p = sub.add_parser("export", help="print the CA certificate (PEM), or write it to --out")
    p.add_argument("--out", type=Path, help="file to write instead of standard output")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("install", help="trust the CA in the system store and NSS databases")
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
    p.set_defaults(func=cmd_install)


def _ca():  # noqa: ANN202 - the type lives in a module imported lazily
    from devmesh.proxy import ca

    return ca.LocalCA(devmesh_home())


def cmd_path(args: argparse.Namespace) -> int:
    print(_ca().cert_path())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    pem = _ca().cert_pem()
    if args.out is None:
        sys.stdout.write(pem.decode())
    else:
        args.out.write_bytes(pem)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from devmesh.proxy import trust

    cert = _ca().cert_path()
    system: tuple[Path, str | None] | None = None
    if not args.no_system:
        if args.system_dir is not None:
            system = (args.system_dir, args.update_command or None)
        else:
            found = trust.default_system_store()
            if found is not None:
                command = found[1] if args.update_command is None else args.update_command
                system = (found[0], command or None)
    certutil = args.certutil or shutil.which("certutil")
    steps = trust.install(
        cert,
        system=None if args.no_system else system,
        home=args.nss_home or trust.home_dir(),
        certutil=certutil,
    )
    if args.no_system:
        steps = [s for s in steps if s.store != "system store"]
    for step in steps:
        mark = "ok  " if step.done else "TODO"
        print(f"{mark} {step.store}: {step.detail}")
    return 0 if steps and all(s.done for s in steps) else 1

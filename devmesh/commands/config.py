"""`devmesh config`: the merged, interpolated, checked file, as `docker compose config`.

Why: with override files and ``${VAR}``, what devmesh runs is no longer the text of one
file. This prints it: every file merged in order, every variable filled, secrets masked
(config/show.py says exactly what), in YAML (or JSON) that reads back as the same project.
Exit codes as `validate`: 0 valid (warnings on stderr), 1 invalid (every problem on stderr
as FILE:LINE:COL, naming the file each value came from) or no file found, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devmesh.commands import _common

EXAMPLE = """\
examples:
  devmesh config                        # devmesh.yaml + devmesh.override.yaml, merged
  devmesh config -f devmesh.yaml -f ci.yaml
  devmesh config --services             # the service names, one a line
  devmesh config --show-secrets > resolved.yaml
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the merged, interpolated devmesh.yaml (secrets masked)",
        description=(
            "Print the configuration devmesh runs: the files merged in order (devmesh.yaml and "
            "devmesh.override.yaml beside it, or every -f), ${VAR} filled from the environment "
            "and .env, checked as `validate` checks it. The text of secret-looking variables "
            "(names containing PASSWORD, PASSWD, SECRET, TOKEN, KEY or CREDENTIAL) and URL "
            "passwords are shown as *** unless --show-secrets."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common.add_file_arg(p)
    p.add_argument(
        "--show-secrets", action="store_true", help="print secrets as they are, not as ***"
    )
    p.add_argument(
        "--format",
        choices=("yaml", "json"),
        default="yaml",
        help="output format (default yaml)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--services", action="store_true", help="print the service names only")
    what.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing; only check (the exit code)"
    )
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    from devmesh.config import loader, report, show

    try:
        loaded = loader.load_files(loader.config_files(args.file))
    except loader.ConfigNotFound as exc:
        raise _common.CommandError(str(exc)) from exc
    except loader.ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(report.invalid(exc.files or (exc.file,), exc.problems), file=sys.stderr)
        return _common.EXIT_FAILED
    if loaded.warnings:
        print(report.render(loaded.warnings), file=sys.stderr)
    if args.quiet:
        return _common.EXIT_OK
    if args.services:
        for name in loaded.project.services:
            print(name)
        return _common.EXIT_OK
    doc = show.document(loaded.merged, loaded.masked, show_secrets=args.show_secrets)
    if args.format == "json":
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return _common.EXIT_OK
    import yaml

    sys.stdout.write(
        yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False)
    )
    return _common.EXIT_OK

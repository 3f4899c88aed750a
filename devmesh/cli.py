"""Command line: argument parsing and dispatch only.

Why so thin: `devmesh status` must answer in well under a quarter second, so start-up
imports nothing heavy. Each command lives in ``devmesh.commands.NAME`` and exposes
``register(subparsers)``; those modules import only the standard library at top level and
load their real dependencies inside the handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Command modules, in the order `devmesh --help` lists them.
COMMANDS: tuple[str, ...] = (
    "up",
    "down",
    "run",
    "status",
    "route",
    "graph",
    "peers",
    "metrics",
    "logs",
    "dashboard",
    "plan",
    "validate",
    "config",
    "db",
    "agent",
    "ca",
    "mesh",
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devmesh",
        description="Share local services across developers' machines.",
        epilog="Run `devmesh COMMAND --help` for a command's options and an example.",
    )
    from devmesh import __version__

    parser.add_argument("--version", action="version", version=f"devmesh {__version__}")
    # Compose's global flags. Their own dests: a subparser's defaults would overwrite a value
    # the top-level parser stored under the same name.
    parser.add_argument(
        "-f",
        "--file",
        dest="global_file",
        action="append",
        metavar="FILE",
        help="devmesh.yaml to use for the command ('-' reads stdin); repeat to merge several",
    )
    parser.add_argument(
        "-p",
        "--project",
        dest="global_project",
        metavar="NAME",
        help="act on this applied project by name",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"devmesh.commands.{name}").register(sub)
    for command in sub.choices.values():
        # The parser whose usage goes with an error; a nested one (`ca install`) sets its own,
        # and the innermost default wins.
        command.set_defaults(usage_parser=command)
    return parser


def _apply_global_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Hand ``devmesh -f FILE`` / ``-p NAME`` to the command; its own flags win."""
    if args.global_file is not None:
        if hasattr(args, "file"):
            args.file = args.file or args.global_file
        elif hasattr(args, "project"):
            args.project_file = args.global_file  # the project is the file's (see _common)
        else:
            parser.error(f"-f/--file: `devmesh {args.command}` reads no devmesh.yaml")
    if args.global_project is not None:
        if not hasattr(args, "project"):
            parser.error(f"-p/--project: `devmesh {args.command}` acts on no project")
        args.project = args.project or args.global_project


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    rest = None
    if "--" in words:  # `devmesh run NAME -- CMD ARGS`: the command is not ours to parse
        cut = words.index("--")
        words, rest = words[:cut], words[cut + 1 :]
    args, extra = parser.parse_known_args(words)
    command: argparse.ArgumentParser = getattr(args, "usage_parser", parser)
    if extra:  # argparse reports these with the top-level usage; the command's is the help
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if rest is not None and getattr(args, "command", None) != "run":
        parser.error("'--' is only used by `devmesh run NAME -- CMD`")
    args.rest = rest
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _apply_global_flags(command, args)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

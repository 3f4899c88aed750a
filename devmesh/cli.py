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
    "logs",
    "plan",
    "validate",
    "agent",
    "ca",
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"devmesh.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    rest = None
    if "--" in words:  # `devmesh run NAME -- CMD ARGS`: the command is not ours to parse
        cut = words.index("--")
        words, rest = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if rest is not None and getattr(args, "command", None) != "run":
        parser.error("'--' is only used by `devmesh run NAME -- CMD`")
    args.rest = rest
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

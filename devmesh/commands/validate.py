"""`devmesh validate`: check a devmesh.yaml without an agent, for editors, hooks and CI.

Exit codes scripts can trust: 0 valid (warnings allowed), 1 invalid or no file found,
2 usage error (argparse). Problems go to stderr as FILE:LINE:COL lines, the summary of a
valid file to stdout; with --json everything is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """\
examples:
  devmesh validate                      # the devmesh.yaml of this folder or a parent
  devmesh validate -f services/devmesh.yaml
  devmesh validate -f devmesh.yaml -f ci.yaml     # two files merged, as `up` reads them
  cat devmesh.yaml | devmesh validate -f - --json
  devmesh validate a/devmesh.yaml b/devmesh.yml   # several files, as pre-commit passes them
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a devmesh.yaml and print every problem",
        description=(
            "Check a devmesh.yaml against the schema and the rules between services "
            "(dependencies, versions, ports), printing every problem as FILE:LINE:COL."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-f",
        "--file",
        action="append",
        metavar="FILE",
        help="the file to check; - reads stdin; repeat to check several merged in order, as "
        "other commands read them. Default: devmesh.yaml (or .yml) in this folder or the "
        "nearest parent, with devmesh.override.yaml beside it merged on top",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="more files to check, each on its own and without its override file (for "
        "pre-commit); exit 1 if any is invalid",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (a list of results when several files are given)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devmesh.config import loader, report

    # Each target is one load: the -f files merged, then each positional file on its own.
    targets: list[list[Path | str]] = [
        *([loader.config_files(args.file)] if args.file else []),
        *[[file] for file in args.files],
    ]
    if not targets:
        try:
            targets = [loader.config_files(None)]
        except loader.ConfigNotFound as exc:
            if args.json:
                problem = report.Problem("", 0, 0, "", str(exc))
                print(
                    report.to_json(
                        valid=False,
                        file="",
                        files=[],
                        problems=[problem],
                        project=None,
                        services=[],
                    )
                )
            else:
                print(f"devmesh validate: {exc}", file=sys.stderr)
            return 1
    documents: list[str] = []
    failed = False
    for target in targets:
        try:
            loaded = loader.load_files(target)
        except loader.ConfigError as exc:
            failed = True
            if args.json:
                documents.append(
                    report.to_json(
                        valid=False,
                        file=exc.file,
                        files=list(exc.files),
                        problems=exc.problems,
                        project=exc.project,
                        services=list(exc.services),
                    )
                )
                continue
            print(str(exc), file=sys.stderr)
            print(report.invalid(exc.files or (exc.file,), exc.problems), file=sys.stderr)
            continue
        services = list(loaded.project.services)
        if args.json:
            documents.append(
                report.to_json(
                    valid=True,
                    file=loaded.file,
                    files=list(loaded.files),
                    problems=loaded.warnings,
                    project=loaded.project.name,
                    services=services,
                )
            )
            continue
        if loaded.warnings:
            print(report.render(loaded.warnings), file=sys.stderr)
        print(report.summary(report.files_shown(loaded.files), loaded.project.name, services))
    if args.json:
        print(documents[0] if len(documents) == 1 else "[\n" + ",\n".join(documents) + "\n]")
    return 1 if failed else 0

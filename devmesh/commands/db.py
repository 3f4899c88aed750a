"""`devmesh db`: the services' databases: status, URL, shell, sync, snapshots.

Every subcommand asks the agent, which owns the databases (the CLI may not import the
drivers): a sync or a snapshot runs there, next to the provider that made the database.
Exit codes: 0 done, 1 a failure naming its cause, 2 a usage error, 3 no agent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from devmesh.commands import _common

EXAMPLE = """examples:
  devmesh db status                 every database of ./devmesh.yaml's project (outside
                                    a project folder: of every applied project)
  psql "$(devmesh db url api)"      the full URL, for scripts
  devmesh db shell api              psql (or sqlite3) on api's database
  devmesh db sync api               copy the staging subset of api's db.sync block
  devmesh db snapshot api before-migration
  devmesh db restore api before-migration
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the services' databases: status, url, shell, sync, snapshots",
        description="Inspect and manage the databases devmesh provisions for services.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="db_command", metavar="SUBCOMMAND")

    def add(name: str, help_text: str, func: Any, *, service: bool = True) -> Any:
        q = verbs.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
        )
        _common.add_file_arg(q)
        _common.add_project_arg(q)
        if service:
            q.add_argument("service", metavar="SERVICE", help="a service with a db: block")
        q.set_defaults(func=lambda a: _common.run_command(func, _named(a, name)))
        return q

    st = add(
        "status", "show each database: engine, provider, state, size, URL", _status, service=False
    )
    st.add_argument("--json", action="store_true", help="print JSON")
    add("url", "print the database's full URL (password included)", _url)
    add("shell", "open psql or sqlite3 on the database", _shell)
    add("sync", "copy the db.sync subset of staging into the database", _sync)
    snap = add("snapshot", "take a snapshot of the database", _snapshot)
    snap.add_argument("name", nargs="?", metavar="NAME", help="default: the UTC time")
    rest = add("restore", "make the database a copy of a snapshot again", _restore)
    rest.add_argument("name", metavar="NAME", help="the snapshot")
    snaps = add("snapshots", "list the database's snapshots", _snapshots)
    snaps.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _usage(p))


def _named(args: argparse.Namespace, verb: str) -> argparse.Namespace:
    """Messages say which subcommand failed: ``devmesh db sync: ...``."""
    args.command = f"db {verb}"
    return args


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_usage(sys.stderr)
    print(
        "devmesh db: missing SUBCOMMAND (status, url, shell, sync, snapshot, restore, snapshots)",
        file=sys.stderr,
    )
    return _common.EXIT_USAGE


def _client() -> Any:
    return _common.client(_common.home(), timeout_s=3600)


def _status_project(args: argparse.Namespace) -> str | None:
    """The project `db status` shows, or None for every applied one.

    None when nothing names a project (no ``-f``, no ``-p``) and no devmesh.yaml is in
    this folder or a parent: run from anywhere, it lists what `devmesh status` would.
    """
    if args.project or args.file or getattr(args, "project_file", None):
        return _common.project_name(args)
    from devmesh.config import loader

    try:
        loader.find_config(Path.cwd())
    except loader.ConfigNotFound:
        return None
    return str(_common.load_file(None).project.name)


def _status(args: argparse.Namespace) -> int:
    project = _status_project(args)
    query = {"project": project} if project is not None else None
    data = _client().request("GET", "/v1/db/status", query=query)
    rows = data.get("databases") or []
    if args.json:
        print(json.dumps(data, indent=2))
        return _common.EXIT_OK
    if not rows:
        if project is None:
            print("No applied project has a service with a database.")
        else:
            print(f"Project {project} has no service with a database.")
        return _common.EXIT_OK
    every = project is None
    head = ("SERVICE", "ENGINE", "PROVIDER", "STATE", "SIZE", "URL", "LAST SYNC", "SNAPSHOTS")
    table = [(("PROJECT",) if every else ()) + head]
    for r in rows:
        sync = r.get("last_sync") or {}
        table.append(
            ((r["project"],) if every else ())
            + (
                r["service"],
                r["engine"],
                r.get("provider") or "-",
                r["state"],
                _size(r.get("size_bytes")),
                r.get("url") or "-",
                f"{sync['at']} ({sync['rows']} rows)" if sync else "never",
                "-" if r.get("snapshots") is None else str(r["snapshots"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r.get("error"):
            where = f"{r['project']}/{r['service']}" if every else r["service"]
            print(f"{where}: {r['error']}", file=sys.stderr)
    return _common.EXIT_OK


def _query(args: argparse.Namespace) -> dict[str, str]:
    return {"project": _common.project_name(args), "service": args.service}


def _url(args: argparse.Namespace) -> int:
    data = _client().request("GET", "/v1/db/url", query=_query(args))
    print(data["url"])
    return _common.EXIT_OK


def _shell(args: argparse.Namespace) -> int:
    data = _client().request("GET", "/v1/db/shell", query=_query(args))
    argv = [str(a) for a in data["argv"]]
    env = {**os.environ, **{str(k): str(v) for k, v in data["env"].items()}}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return _common.EXIT_FAILED  # not reached: exec replaces this process


def _sync(args: argparse.Namespace) -> int:
    body = _query(args)
    bar = _Bar(sys.stderr) if sys.stderr.isatty() else None
    final: dict[str, Any] = {}
    for item in _client().stream("POST", "/v1/db/sync", body):
        if "progress" in item and bar is not None:
            bar.update(item["progress"])
        elif item.get("done"):
            final = item
    if bar is not None:
        bar.close()
    if not final.get("ok"):
        raise _common.CommandError(
            f"sync of {args.service}'s database failed: {final.get('error', 'no answer')}"
        )
    result = final["result"]
    for t in result.get("per_table", []):
        print(f"  {t['table']}: {t['rows']} rows, {_size(t['bytes'])}", file=sys.stderr)
    snap = f"; snapshot {result['snapshot']} taken before" if result.get("snapshot") else ""
    print(
        f"Synced {args.service}'s database: {result['rows']} rows in {result['tables']} "
        f"tables, {result['elapsed_s']:.2f} s{snap}.",
        file=sys.stderr,
    )
    return _common.EXIT_OK


def _snapshot(args: argparse.Namespace) -> int:
    body = {**_query(args), "name": args.name or ""}
    info = _client().request("POST", "/v1/db/snapshot", body)
    print(f"Snapshot {info['name']} of {args.service}'s database ({_size(info['size_bytes'])}).")
    return _common.EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    body = {**_query(args), "name": args.name}
    _client().request("POST", "/v1/db/restore", body)
    print(f"Restored {args.service}'s database from snapshot {args.name}.")
    return _common.EXIT_OK


def _snapshots(args: argparse.Namespace) -> int:
    data = _client().request("GET", "/v1/db/snapshots", query=_query(args))
    if args.json:
        print(json.dumps(data, indent=2))
        return _common.EXIT_OK
    for s in data["snapshots"]:
        print(f"{s['name']}  {s['created_at']}  {_size(s['size_bytes'])}")
    return _common.EXIT_OK


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _Bar:
    """One line per table on a terminal: rows (of those expected) and bytes so far."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.table: str | None = None

    def update(self, p: dict[str, Any]) -> None:
        if p["table"] != self.table and self.table is not None:
            self.out.write("\n")
        self.table = p["table"]
        total = p.get("rows_total")
        width = 24
        done = min(1.0, p["rows"] / total) if total else (1.0 if p["done"] else 0.0)
        filled = int(done * width)
        of = f"/{total}" if total is not None else ""
        self.out.write(
            f"\r{p['table'][:28]:<28} [{'#' * filled}{'.' * (width - filled)}] "
            f"{p['rows']}{of} rows  {_size(p['bytes'])}\x1b[K"
        )
        self.out.flush()

    def close(self) -> None:
        if self.table is not None:
            self.out.write("\n")
            self.out.flush()

"""Checks of the ``db:`` blocks that the JSON Schema cannot express.

Why apart from ``checks``: some need the folder of devmesh.yaml (an ``init`` file must
exist), and all of them are about one feature, so a reader finds the rules for databases in
one place. Like ``checks`` they look only at parts of the right shape; the schema has
reported the rest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from devmesh.config import checks, report
from devmesh.config import marks as marks_mod

_NAME = re.compile(r"^[a-z_][a-z0-9_\-]{0,47}$")
"""As the database drivers accept them (lowercased, ``-`` becomes ``_``)."""


def check(doc: Any, marks: marks_mod.Marks, file: str, directory: Path) -> list[report.Problem]:
    """Every problem of the services' ``db:`` blocks, placed at the key that causes it."""
    out = checks._Out(marks, file)
    owners: dict[tuple[str, str], str] = {}
    for name, service in checks.services_of(doc).items():
        db = service.get("db")
        if not isinstance(db, dict):
            continue
        at = ("services", name, "db")
        engine = db.get("engine")
        version = db.get("version")
        if version is not None and not re.fullmatch(r"\d{1,3}", str(version)):
            out.add(
                (*at, "version"), f"version {version!r} is not a PostgreSQL major version (like 16)"
            )
        if engine == "sqlite":
            for key in ("sync", "snapshots", "image", "version", "provider"):
                if key in db:
                    ignored = key in ("version", "provider")
                    out.add(
                        (*at, key),
                        f"{key} applies to PostgreSQL only; this database is sqlite"
                        + (" (ignored)" if ignored else ""),
                        at_key=True,
                        severity=report.WARNING if ignored else report.ERROR,
                    )
        given = db.get("name")
        raw = given if isinstance(given, str) else name
        database = raw.lower().replace("-", "_")
        if not _NAME.match(database):
            where = (*at, "name") if "name" in db else ("services", name)
            out.add(
                where,
                f"database name {database!r} must be 1-48 characters of a-z, 0-9, '_' or '-', "
                "starting with a letter or '_'" + ("" if "name" in db else "; set db.name"),
                at_key="name" not in db,
            )
        kind = str(engine)
        if (kind, database) in owners:
            first = owners[(kind, database)]
            out.add(
                (*at, "name") if "name" in db else at,
                f"database {database!r} is also the database of service {first!r}: both "
                "share it (and its role); set a different db.name to give each its own",
                at_key="name" not in db,
                severity=report.WARNING,
            )
        else:
            owners[(kind, database)] = name
        init = db.get("init")
        files = [init] if isinstance(init, str) else init if isinstance(init, list) else []
        for i, rel in enumerate(files):
            if not isinstance(rel, str):
                continue
            full = directory / rel
            if not full.is_file():
                out.add((*at, "init", i), f"init file {rel!r} not found (looked for {full})")
    return out.problems

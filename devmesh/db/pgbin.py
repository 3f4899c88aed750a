"""Find the machine's PostgreSQL server binaries, by major version.

Why: devmesh embeds no PostgreSQL; it drives the one the machine has, as a developer would.
Debian/Ubuntu install each major version side by side under ``/usr/lib/postgresql/N/bin``
(package ``postgresql-N``); other systems put one version wherever ``pg_config --bindir``
says. Both are searched; a requested major version picks its own directory, otherwise the
newest wins.

What it does not guarantee: that the binaries run (a broken install fails later, in
``initdb``, with its own message).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devmesh.db.errors import NoPostgresBinariesError

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
DEBIAN_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True, slots=True, kw_only=True)
class PgBin:
    """One installation's binary directory and its major version."""

    bindir: Path
    major: int

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def _major_of(bindir: Path) -> int | None:
    """Major version from ``postgres --version`` ("postgres (PostgreSQL) 15.18 (Debian ...)")."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except OSError:
        return None
    found = re.search(r"\b(\d+)(?:\.\d+)?", out.split(")", 1)[-1])
    return int(found.group(1)) if found else None


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / t, os.X_OK) for t in SERVER_TOOLS)


def candidates(extra_bindirs: list[Path] | None = None) -> tuple[list[PgBin], list[str]]:
    """Every installation found, newest first, and the places looked in (for errors)."""
    dirs: list[Path] = list(extra_bindirs or [])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            out = ""
        if out:
            dirs.append(Path(out))
    if DEBIAN_ROOT.is_dir():
        dirs.extend(sorted(p / "bin" for p in DEBIAN_ROOT.iterdir()))
    looked = list(dict.fromkeys(str(d) for d in dirs)) or [
        "pg_config (not on PATH)",
        str(DEBIAN_ROOT),
    ]
    found: dict[Path, PgBin] = {}
    for d in dirs:
        real = d.resolve()
        if real in found or not _has_server(real):
            continue
        major = _major_of(real)
        if major is not None:
            found[real] = PgBin(bindir=real, major=major)
    return sorted(found.values(), key=lambda b: -b.major), looked


def find(version: int | None = None, extra_bindirs: list[Path] | None = None) -> PgBin:
    """The installation for ``version`` (a major number), or the newest when None.

    Raises ``NoPostgresBinariesError`` naming the package to install.
    """
    found, looked = candidates(extra_bindirs)
    for b in found:
        if version is None or b.major == version:
            return b
    raise NoPostgresBinariesError(version, looked, [b.major for b in found])


def client_for(server_major: int, extra_bindirs: list[Path] | None = None) -> PgBin:
    """An installation whose ``pg_dump`` can read a server of ``server_major``.

    pg_dump refuses servers newer than itself, so the oldest installation at least as new
    as the server is chosen (its output then restores into the same version locally).
    """
    found, looked = candidates(extra_bindirs)
    fitting = sorted((b for b in found if b.major >= server_major), key=lambda b: b.major)
    if fitting:
        return fitting[0]
    raise NoPostgresBinariesError(server_major, looked, [b.major for b in found])

"""Installing the CA certificate into the trust stores a developer's tools read.

Why it lives with the commands, not with the proxy: trusting a certificate is an act of the
user on their own machine (their HOME, their browsers, sudo for the system store), not
something the proxy or the agent does; the agent only hands out the certificate (``GET
/v1/ca``). Every location and program is a parameter, so the tests point them at temporary
directories and never modify the real stores. When a store cannot be written (no root, no
``certutil``), the step is not fatal: it says the exact command that would do it.

Stores handled:

- System: Debian/Ubuntu (``/usr/local/share/ca-certificates`` + ``update-ca-certificates``),
  Fedora/RHEL (``/etc/pki/ca-trust/source/anchors`` + ``update-ca-trust``).
- NSS (Chromium, Firefox): ``~/.pki/nssdb`` and every Firefox profile holding ``cert9.db``,
  including the snap location, through ``certutil`` from libnss3-tools. Chromium on Linux
  reads only ``~/.pki/nssdb``, never the system store, so that database is created (empty
  password, as Chromium itself would) when it does not exist yet.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NICKNAME = "devmesh local CA"
CERT_FILE_NAME = "devmesh-local-ca.crt"
SYSTEM_STORES: tuple[tuple[str, str], ...] = (
    ("/usr/local/share/ca-certificates", "update-ca-certificates"),
    ("/etc/pki/ca-trust/source/anchors", "update-ca-trust"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    store: str
    """Human name of the store and its location."""
    done: bool
    detail: str
    """What was done, or the precise command that would do it."""


def default_system_store() -> tuple[Path, str] | None:
    for directory, command in SYSTEM_STORES:
        if Path(directory).is_dir():
            return Path(directory), command
    return None


def shared_nss_database(home: Path) -> Path:
    """The NSS database Chromium (and Firefox, for some builds) read on Linux."""
    return home / ".pki" / "nssdb"


def nss_databases(home: Path) -> list[Path]:
    """NSS databases under home: the shared one and Firefox profiles (sql format only)."""
    found: list[Path] = []
    shared = shared_nss_database(home)
    if (shared / "cert9.db").exists():
        found.append(shared)
    for base in (home / ".mozilla" / "firefox", home / "snap/firefox/common/.mozilla/firefox"):
        if base.is_dir():
            found.extend(sorted(p.parent for p in base.glob("*/cert9.db")))
    return found


def install_system(cert: Path, directory: Path, update_command: str | None) -> Step:
    target = directory / CERT_FILE_NAME
    name = f"system store {directory}"
    manual = f"sudo cp {cert} {target}" + (f" && sudo {update_command}" if update_command else "")
    try:
        shutil.copyfile(cert, target)
    except OSError as exc:
        return Step(store=name, done=False, detail=f"{exc.strerror}; run: {manual}")
    if update_command:
        try:
            proc = subprocess.run(
                [update_command], capture_output=True, text=True, timeout=120, check=False
            )
        except OSError as exc:
            return Step(
                store=name,
                done=False,
                detail=f"copied, but {update_command}: {exc.strerror}; run: {manual}",
            )
        if proc.returncode != 0:
            return Step(
                store=name,
                done=False,
                detail=f"copied, but {update_command} failed: {proc.stderr.strip()}",
            )
    return Step(store=name, done=True, detail=f"installed as {target}")


def _certutil(certutil: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [certutil, *args], capture_output=True, text=True, timeout=60, check=False
    )


def install_nss(cert: Path, database: Path, certutil: str | None, *, create: bool) -> Step:
    """Add cert to one NSS database; ``create`` makes the database first (it does not exist)."""
    add = ["-A", "-d", f"sql:{database}", "-t", "C,,", "-n", NICKNAME, "-i", str(cert)]
    new = ["-N", "--empty-password", "-d", f"sql:{database}"]
    manual = shlex.join(["certutil", *add])
    if create:
        manual = (
            f"mkdir -p {shlex.quote(str(database))} && {shlex.join(['certutil', *new])} && "
            + manual
        )
    name = f"NSS store {database}"
    if certutil is None:
        return Step(
            store=name,
            done=False,
            detail=f"certutil not found (Debian package libnss3-tools); run: {manual}",
        )
    if create:
        try:
            database.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            return Step(store=name, done=False, detail=f"{exc.strerror}; run: {manual}")
        proc = _certutil(certutil, new)
        if proc.returncode != 0:
            return Step(
                store=name,
                done=False,
                detail=f"certutil -N failed: {proc.stderr.strip()}; run: {manual}",
            )
    # NSS refuses a second certificate under one nickname: the CA installed now (the team
    # CA, or a name-constrained machine CA) replaces the devmesh CA installed before.
    drop = ["-D", "-d", f"sql:{database}", "-n", NICKNAME]
    for _ in range(8) if not create else ():
        if _certutil(certutil, drop).returncode != 0:
            break
    proc = _certutil(certutil, add)
    if proc.returncode != 0:
        return Step(
            store=name,
            done=False,
            detail=f"certutil failed: {proc.stderr.strip()}; run: {manual}",
        )
    made = "created it and " if create else ""
    return Step(store=name, done=True, detail=f"{made}added as {NICKNAME!r}")


def install(
    cert: Path,
    *,
    system: tuple[Path, str | None] | None,
    home: Path,
    certutil: str | None,
) -> list[Step]:
    """Install cert in the system store (when given) and every NSS database under home."""
    steps = []
    if system is not None:
        steps.append(install_system(cert, system[0], system[1]))
    else:
        steps.append(
            Step(
                store="system store",
                done=False,
                detail="no known system store on this machine; import "
                f"{cert} into your OS's trust settings by hand",
            )
        )
    databases = nss_databases(home)
    shared = shared_nss_database(home)
    if shared not in databases:  # Chromium reads it and nothing else: make it
        steps.append(install_nss(cert, shared, certutil, create=True))
    steps.extend(install_nss(cert, db, certutil, create=False) for db in databases)
    return steps


def home_dir() -> Path:
    return Path(os.environ.get("HOME") or Path.home())

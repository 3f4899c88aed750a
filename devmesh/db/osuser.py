"""Which system user runs PostgreSQL, and running commands as that user.

Why: ``initdb`` and ``postgres`` refuse to run as root (a server bug must not own the
machine), and CI machines and containers run devmesh as root. So, as root, the cluster runs
as the ``postgres`` system user when the machine has one (Debian's packages make it), else
as a system user devmesh creates once, ``devmesh-pg`` (``useradd --system``, no login
shell, no home). Not as root, the cluster simply runs as the current user.

What it does not guarantee: that the chosen user can reach the cluster's directory; the
caller checks that (``can_traverse``) and places the data elsewhere when it cannot.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devmesh.db.errors import ClusterUserError

PREFERRED = "postgres"
CREATED = "devmesh-pg"


@dataclass(frozen=True, slots=True, kw_only=True)
class OsUser:
    name: str
    uid: int
    gid: int

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def current() -> OsUser:
    entry = pwd.getpwuid(os.geteuid())
    return OsUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _lookup(name: str) -> OsUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return OsUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def cluster_user(preferred: str | None = None) -> OsUser:
    """The user the cluster runs as: ourselves, or (as root) postgres / devmesh-pg.

    ``preferred`` (a name recorded when the cluster was made) wins when it still exists,
    so an adopted cluster keeps its owner. Raises ``ClusterUserError`` when, as root, no
    user exists and ``useradd`` is missing or fails.
    """
    if os.geteuid() != 0:
        return current()
    for name in (preferred, PREFERRED, CREATED):
        if name and name != "root" and (user := _lookup(name)):
            return user
    useradd = shutil.which("useradd")
    if not useradd:
        raise ClusterUserError(
            "running as root, PostgreSQL needs an unprivileged user: there is no 'postgres' "
            f"user and no `useradd` to create {CREATED!r}; create one, or run devmesh as a user"
        )
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", CREATED],
        capture_output=True,
        text=True,
        check=False,
    )
    user = _lookup(CREATED)
    if user is None:
        raise ClusterUserError(
            f"running as root, could not create the system user {CREATED!r} for PostgreSQL: "
            f"useradd said {done.stderr.strip() or done.returncode}"
        )
    return user


def can_traverse(user: OsUser, path: Path) -> bool:
    """Whether ``user`` can reach ``path``: search permission on every existing ancestor.

    Checks mode bits only (owner, group, other); ACLs are not read, so a "no" may be wrong
    on a machine that grants access by ACL (the data then lives in the fallback place).
    """
    if user.is_self or user.uid == 0:
        return True
    groups = {user.gid, *_groups_of(user.name)}
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


def _groups_of(name: str) -> list[int]:
    import grp

    return [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]


def chown_tree(path: Path, user: OsUser) -> None:
    """Give ``path`` and everything under it to ``user`` (no-op when it is us)."""
    if user.is_self:
        return
    os.chown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)


def run(
    user: OsUser, argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (dropping root when needed), capturing its output."""
    kwargs: dict[str, object] = {}
    if not user.is_self:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(  # type: ignore[call-overload]
        argv,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd="/",
        env=base | (env or {}),
        stdin=subprocess.DEVNULL,
        **kwargs,
    )

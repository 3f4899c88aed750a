"""One native PostgreSQL cluster: made with the machine's initdb, started, adopted, stopped.

Why a module of its own: the cluster is the part with real-world hazards (two postmasters on
one data directory, a crashed owner, a port taken, root) while the provider above it only
deals in roles and databases. Its strategy:

- **State on disk.** ``ROOT/cluster.json`` (mode 0600, ours) records the version, binaries,
  port, system user, where the data and the socket live, and the generated passwords. The
  port is picked once and kept, so service URLs survive restarts.
- **Adoption, never duplication.** A cluster is running when ``DATA/postmaster.pid`` names a
  live ``postgres`` process whose working directory is that data directory (postgres chdirs
  there): a restarted caller adopts it. A stale pid file (crash, reboot) is removed before a
  start. PostgreSQL's own lock file refuses a second postmaster too; the check here keeps us
  from even trying. Every mutation holds ``ROOT/.lock`` (flock) against a concurrent caller.
- **Root.** As root the server runs as ``osuser.cluster_user()``. That user must reach the
  data directory; when an ancestor of ``ROOT`` is closed to it (``/root`` is 0700, so is
  pytest's temp dir), the data and socket live in ``FALLBACK/<hash of ROOT>`` instead
  (``/var/lib/devmesh/postgres`` by default), recorded in cluster.json so they are found and
  dropped again. Unix socket paths are limited to 107 bytes: a long ``ROOT`` moves the
  socket the same way (or, not as root, to a private dir in the system temp dir).
- **Authentication.** scram-sha-256 for TCP and the socket alike; a generated superuser
  password (``devmesh``) is kept in cluster.json. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from devmesh.db import osuser, pgbin
from devmesh.db.errors import ClusterError, PortTakenError

META = "cluster.json"
SUPERUSER = "devmesh"
DEFAULT_FALLBACK = Path("/var/lib/devmesh/postgres")
_SOCKET_MAX = 100
"""Longest socket directory + ``/.s.PGSQL.NNNNN`` we accept (the kernel limit is 107)."""
FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterMeta:
    """What cluster.json records. ``roles`` maps a database/role name to its password."""

    format: int = FORMAT
    major: int
    bindir: str
    port: int
    os_user: str
    data_dir: str
    socket_dir: str
    log_file: str
    superuser_password: str
    roles: dict[str, str] = field(default_factory=dict)
    oids: dict[str, int] = field(default_factory=dict)
    """Database name -> its oid (``base/OID`` on disk): a stopped cluster's size."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_holder(port: int) -> str | None:
    """None when 127.0.0.1:``port`` can be bound; else who holds it, in words."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            pass
        else:
            return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN
            if conn.laddr and conn.laddr.port == port and listening and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"held by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"held by pid {conn.pid}"
    except psutil.Error:
        pass
    return "held by a process we cannot see"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class Cluster:
    """The native cluster kept under ``root`` (``DEVMESH_HOME/db/PROJECT/postgres``)."""

    def __init__(
        self,
        root: Path,
        *,
        fallback_base: Path = DEFAULT_FALLBACK,
        start_timeout_s: float = 60.0,
        extra_bindirs: list[Path] | None = None,
    ) -> None:
        self.root = root.absolute()
        self.fallback_base = fallback_base
        self.start_timeout_s = start_timeout_s
        self.extra_bindirs = extra_bindirs

    # -- state on disk ------------------------------------------------------------------

    def meta(self) -> ClusterMeta | None:
        """cluster.json, or None when no cluster was made here."""
        try:
            raw = json.loads((self.root / META).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{self.root / META}: unreadable cluster record: {exc}") from exc
        if raw.get("format") != FORMAT:
            raise ClusterError(f"{self.root / META}: unknown format {raw.get('format')!r}")
        return ClusterMeta(**raw)

    def save(self, meta: ClusterMeta) -> None:
        """Write cluster.json atomically (temp file, fsync, rename), private to us."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".cluster.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(meta), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.root / META)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``ROOT/.lock`` so two callers never init, start or stop at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- placement ----------------------------------------------------------------------

    def _fallback(self) -> Path:
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return self.fallback_base / digest

    def _place(self, user: osuser.OsUser) -> tuple[Path, Path]:
        """Where the data directory and the socket directory go for ``user``."""
        base = self.root
        if not osuser.can_traverse(user, self.root):
            base = self._fallback()
        sock = base / "run"
        if len(str(sock)) + len("/.s.PGSQL.65535") > _SOCKET_MAX:
            if os.geteuid() == 0:
                sock = self._fallback() / "run"
            else:
                digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
                sock = Path(tempfile.gettempdir()) / f"devmesh-{os.geteuid()}-{digest}"
        return base / "data", sock

    def _make_dir(self, path: Path, user: osuser.OsUser) -> None:
        """Create ``path`` mode 0700 for ``user``; refuse one someone else already owns."""
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir(mode=0o711)
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
        if st.st_uid != user.uid:
            if user.is_self or st.st_uid != os.geteuid():
                raise ClusterError(f"{path} belongs to uid {st.st_uid}, not to {user.name}")
            os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o700)

    # -- lifecycle ----------------------------------------------------------------------

    def create(self, version: int | None) -> ClusterMeta:
        """initdb a new cluster (caller holds the lock and checked there is none).

        Nothing is left behind on failure: the directories made here are removed.
        """
        binaries = pgbin.find(version, self.extra_bindirs)
        user = osuser.cluster_user()
        data, sock = self._place(user)
        if data.exists() and any(data.iterdir()):
            raise ClusterError(
                f"{data} already holds files but {self.root / META} is missing; move it "
                f"away or delete it to make a new cluster"
            )
        password = secrets.token_urlsafe(24)
        made: list[Path] = [p for p in (data.parent, sock) if not p.exists()]
        try:
            if data.parent != self.root:  # the fallback place: all of it is the server's
                self._make_dir(data.parent, user)
            self._make_dir(data, user)
            self._make_dir(sock, user)
            log_dir = data.parent / "log"
            self._make_dir(log_dir, user)
            fd, pwfile = tempfile.mkstemp(dir=data.parent, prefix=".pw.")
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if not user.is_self:
                os.chown(pwfile, user.uid, user.gid)
            try:
                done = osuser.run(
                    user,
                    [
                        binaries.tool("initdb"),
                        "-D",
                        str(data),
                        "-U",
                        SUPERUSER,
                        f"--pwfile={pwfile}",
                        "--auth-local=scram-sha-256",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-instructions",
                    ],
                    timeout_s=300,
                )
            finally:
                os.unlink(pwfile)
            if done.returncode != 0:
                raise ClusterError(
                    f"initdb of {data} as {user.name} failed ({done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-2000:]}"
                )
            port = _free_port()
            with open(data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# devmesh: loopback only, its own socket, a kept port\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {port}\n"
                    f"unix_socket_directories = '{sock}'\n"
                    "# a developer's database: a crash may lose the last commits, never data\n"
                    "synchronous_commit = off\n"
                )
            meta = ClusterMeta(
                major=binaries.major,
                bindir=str(binaries.bindir),
                port=port,
                os_user=user.name,
                data_dir=str(data),
                socket_dir=str(sock),
                log_file=str(log_dir / "server.log"),
                superuser_password=password,
            )
            self.save(meta)
            return meta
        except BaseException:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            raise

    def running_pid(self, meta: ClusterMeta) -> int | None:
        """The postmaster's pid when one serves this data directory, else None."""
        data = Path(meta.data_dir)
        try:
            first = (data / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if Path(proc.cwd()).resolve() == data.resolve() and "postgres" in proc.name():
                return pid
        except psutil.Error:
            pass
        return None

    def start(self, meta: ClusterMeta) -> None:
        """Start the server unless it runs (caller holds the lock). Raises on failure."""
        if self.running_pid(meta) is not None:
            return
        data = Path(meta.data_dir)
        self._await_orphans(data)
        with contextlib.suppress(FileNotFoundError):
            (data / "postmaster.pid").unlink()  # stale: its process is gone (checked above)
        holder = _port_holder(meta.port)
        if holder:
            raise PortTakenError(f"PostgreSQL cluster {data}", meta.port, holder)
        user = osuser.cluster_user(meta.os_user)
        sock = Path(meta.socket_dir)
        if not sock.exists():  # a temp dir cleaned by the system, or a reboot
            self._make_dir(sock, user)
        done = osuser.run(
            user,
            [
                str(Path(meta.bindir) / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                meta.log_file,
                "-w",
                "-t",
                str(int(self.start_timeout_s)),
            ],
            timeout_s=self.start_timeout_s + 10,
        )
        if done.returncode != 0 or self.running_pid(meta) is None:
            raise ClusterError(
                f"PostgreSQL cluster {data} did not start (pg_ctl {done.returncode}: "
                f"{done.stdout.strip()} {done.stderr.strip()}); server log:\n"
                f"{_tail(Path(meta.log_file))}"
            )

    def _await_orphans(self, data: Path) -> None:
        """Wait for the backends of a killed postmaster to exit (they notice its death
        within moments); while they hold its shared memory, a new postmaster refuses to
        start. Those still there after the timeout are killed: their postmaster is gone."""
        real = data.resolve()
        orphans = []
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error):
                if "postgres" in (proc.info["name"] or "") and Path(proc.cwd()) == real:
                    orphans.append(proc)
        _, alive = psutil.wait_procs(orphans, timeout=min(10.0, self.start_timeout_s))
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)

    def stop(self, meta: ClusterMeta) -> None:
        """Stop the server (fast shutdown: sessions end, data kept) when it runs."""
        if self.running_pid(meta) is None:
            return
        user = osuser.cluster_user(meta.os_user)
        done = osuser.run(
            user,
            [str(Path(meta.bindir) / "pg_ctl"), "stop", "-D", meta.data_dir, "-m", "fast", "-w"],
            timeout_s=self.start_timeout_s + 10,
        )
        if done.returncode != 0 and self.running_pid(meta) is not None:
            raise ClusterError(
                f"PostgreSQL cluster {meta.data_dir} did not stop: {done.stderr.strip()}"
            )

    def destroy(self) -> None:
        """Stop the server and delete every file of the cluster (``down --volumes``)."""
        meta = self.meta()
        if meta is not None:
            self.stop(meta)
            for p in (Path(meta.data_dir).parent, Path(meta.socket_dir)):
                if p != self.root:
                    shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- connections --------------------------------------------------------------------

    def admin(self, meta: ClusterMeta, dbname: str = "postgres") -> psycopg.Connection[TupleRow]:
        """A superuser connection over the Unix socket, autocommit."""
        return psycopg.connect(self.admin_conninfo(meta, dbname), autocommit=True)

    def admin_conninfo(self, meta: ClusterMeta, dbname: str) -> str:
        """libpq conninfo of a superuser session over the Unix socket."""
        return make_conninfo(
            "",
            host=meta.socket_dir,
            port=meta.port,
            user=SUPERUSER,
            password=meta.superuser_password,
            dbname=dbname,
            connect_timeout=10,
        )

    def with_role(self, meta: ClusterMeta, name: str, password: str) -> ClusterMeta:
        return dataclasses.replace(meta, roles={**meta.roles, name: password})

    def without_role(self, meta: ClusterMeta, name: str) -> ClusterMeta:
        return dataclasses.replace(
            meta,
            roles={k: v for k, v in meta.roles.items() if k != name},
            oids={k: v for k, v in meta.oids.items() if k != name},
        )

    def note_oid(
        self, meta: ClusterMeta, conn: psycopg.Connection[TupleRow], db: str
    ) -> ClusterMeta:
        """Record ``db``'s current oid (it changes when a snapshot is restored)."""
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,)).fetchone()
        if row is None or meta.oids.get(db) == int(row[0]):
            return meta
        meta = dataclasses.replace(meta, oids={**meta.oids, db: int(row[0])})
        self.save(meta)
        return meta

    def size_on_disk(self, meta: ClusterMeta, db: str) -> int | None:
        """Bytes under ``base/OID`` of ``db``, read while the server is stopped."""
        oid = meta.oids.get(db)
        if oid is None:
            return None
        total = 0
        for root, _, files in os.walk(Path(meta.data_dir) / "base" / str(oid)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

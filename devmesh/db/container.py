"""The docker provider: a PostgreSQL container per service database, through the Docker SDK.

Why containers besides the native cluster: a team may pin the exact server build (an image
tag), or a machine may have Docker but no PostgreSQL packages. Each service database is one
container from a configurable image that follows the official ``postgres`` image's contract
(``POSTGRES_USER``/``POSTGRES_PASSWORD``/``POSTGRES_DB`` on first start, data in
``/var/lib/postgresql/data``, ``pg_isready`` on the PATH):

- **Found again by labels**, never by remembering ids: ``devmesh.project``,
  ``devmesh.service`` and ``devmesh.role=db`` on the container and its named volume. The
  generated password lives in the container's own environment, so a restarted agent needs no
  state of its own to adopt it.
- **Data in a named volume** (``devmesh-PROJECT-SERVICE-pgdata``): removing the container
  keeps it; ``drop`` removes both.
- **A loopback port mapping** (``127.0.0.1:PORT -> 5432``), the port picked once at creation
  and kept by Docker across restarts, so the URL stays the same.
- **Ready** when ``pg_isready -h 127.0.0.1`` succeeds inside the container (TCP, so the
  image's temporary set-up server, which listens on its socket only, does not count) and a
  login with the service's password works from here. The container also carries the same
  check as its Docker health check, for ``docker ps``.

- **Snapshots as template copies** inside the container's server, exactly as for the native
  cluster (``devmesh.db.snapshots``): the image's ``POSTGRES_USER`` is a superuser, and the
  copies are made from the ``postgres`` maintenance database, so no session of ours holds
  the service's database open while it is copied or swapped. They live in the same data
  volume, so ``drop`` deletes them with the data.

What it does not guarantee: images are not pulled from a registry unless asked
(``pull=True``); a missing image is an error naming it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from devmesh.db import snapshots, wiring
from devmesh.db.errors import DatabaseNotFoundError, PermanentDbError, TemporaryDbError
from devmesh.db.snapshots import SnapshotInfo
from devmesh.db.spec import ConnInfo, DbSpec, DbState, DbStatus, Engine

LABEL = "devmesh"
DEFAULT_IMAGE = "postgres:{version}"
DATA = "/var/lib/postgresql/data"


class DockerUnavailableError(PermanentDbError):
    """No Docker engine answers (not installed, not running, or no permission)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(
            f"no Docker engine answers at {where}: {reason}. Install and start one "
            f"(Debian: `apt-get install docker.io` then start `dockerd`), or use the native "
            f"provider"
        )


class ImageMissingError(PermanentDbError):
    def __init__(self, image: str, reason: str) -> None:
        super().__init__(
            f"Docker image {image!r} is not on this machine and was not pulled ({reason}); "
            f"`docker pull {image}`, or set the database's image to one you have"
        )


def _engine_address() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def connect(timeout_s: float = 5.0) -> Any:
    """A Docker client that answered a ping; ``DockerUnavailableError`` otherwise."""
    import docker
    import docker.errors

    address = _engine_address()
    if address.startswith("unix://"):
        # Probe the socket ourselves: docker-py leaks the socket of a failed connect.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout_s)
            try:
                probe.connect(address.removeprefix("unix://"))
            except OSError as exc:
                raise DockerUnavailableError(address, exc.strerror or str(exc)) from None
    client = None
    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        if client is not None:
            client.close()
        raise DockerUnavailableError(_engine_address(), str(exc).splitlines()[0]) from None
    return client


def engine_answers(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers (the ``auto`` provider's choice)."""
    try:
        connect(timeout_s).close()
    except DockerUnavailableError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DockerPostgres:
    """``spec.Provider`` with one container per service database."""

    name = "docker"

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        client: Any = None,
        ready_timeout_s: float = 120.0,
        pull: bool = False,
    ) -> None:
        self.image_template = image
        self._client = client
        self.ready_timeout_s = ready_timeout_s
        self.pull = pull

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect()
        return self._client

    def close(self) -> None:
        """Close the engine connection (made lazily; a new one is made when needed)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- naming -------------------------------------------------------------------------

    def image(self, spec: DbSpec) -> str:
        return self.image_template.format(version=spec.version or "latest")

    @staticmethod
    def labels(spec: DbSpec) -> dict[str, str]:
        return {
            f"{LABEL}.project": spec.project,
            f"{LABEL}.service": spec.service,
            f"{LABEL}.role": "db",
        }

    @staticmethod
    def container_name(spec: DbSpec) -> str:
        return f"devmesh-{spec.project}-{spec.service}-db"

    @staticmethod
    def volume_name(spec: DbSpec) -> str:
        return f"devmesh-{spec.project}-{spec.service}-pgdata"

    def find(self, spec: DbSpec) -> Any | None:
        """The service's container (running or not), found by its labels."""
        filters = {"label": [f"{k}={v}" for k, v in self.labels(spec).items()]}
        found = self.client.containers.list(all=True, filters=filters)
        return found[0] if found else None

    # -- Provider -----------------------------------------------------------------------

    def ensure(self, spec: DbSpec) -> ConnInfo:
        """Create (or adopt) the container and its volume, start it, wait until ready."""
        import docker.errors

        container = self.find(spec)
        if container is None:
            image = self._image(spec)
            db = spec.database
            password = self._volume_password(spec)
            try:
                container = self.client.containers.create(
                    image,
                    name=self.container_name(spec),
                    labels=self.labels(spec),
                    environment={
                        "POSTGRES_USER": db,
                        "POSTGRES_PASSWORD": password,
                        "POSTGRES_DB": db,
                    },
                    volumes={self.volume_name(spec): {"bind": DATA, "mode": "rw"}},
                    ports={"5432/tcp": ("127.0.0.1", _free_port())},
                    healthcheck={
                        "test": ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", db, "-d", db],
                        "interval": 1_000_000_000,
                        "timeout": 5_000_000_000,
                        "retries": 60,
                    },
                    detach=True,
                )
            except docker.errors.APIError as exc:
                raise PermanentDbError(
                    f"could not create the database container for service "
                    f"{spec.service!r}: {exc.explanation or exc}"
                ) from None
        self._start(container)
        info = self._conninfo(spec, container)
        self._wait_ready(spec, container, info)
        return info

    def start(self, spec: DbSpec) -> None:
        container = self._existing(spec)
        self._start(container)
        self._wait_ready(spec, container, self._conninfo(spec, container))

    def stop(self, spec: DbSpec) -> None:
        container = self.find(spec)
        if container is not None and container.status != "exited":
            container.stop(timeout=30)

    def status(self, spec: DbSpec) -> DbStatus:
        container = self.find(spec)
        if container is None:
            return DbStatus(
                service=spec.service,
                engine=Engine.POSTGRES,
                provider=self.name,
                state=DbState.ABSENT,
                size_bytes=None,
                url="",
            )
        container.reload()
        info = self._conninfo(spec, container)
        size = None
        state = DbState.STOPPED
        if container.status == "running":
            state = DbState.RUNNING
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(wiring.url(info), connect_timeout=5) as conn,
            ):
                row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                size = int(row[0]) if row else None
        return DbStatus(
            service=spec.service,
            engine=Engine.POSTGRES,
            provider=self.name,
            state=state,
            size_bytes=size,
            url=wiring.display_url(info),
        )

    def conninfo(self, spec: DbSpec) -> ConnInfo:
        return self._conninfo(spec, self._existing(spec))

    def drop(self, spec: DbSpec) -> None:
        """Remove the container and its volume (the data)."""
        import docker.errors

        container = self.find(spec)
        if container is not None:
            container.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            self.client.volumes.get(self.volume_name(spec)).remove(force=True)

    def admin_conninfo(self, spec: DbSpec) -> str:
        """The target of a sync: the image's POSTGRES_USER is the container's superuser."""
        return wiring.url(self.conninfo(spec))

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self, spec: DbSpec, name: str | None = None) -> SnapshotInfo:
        """Copy the service's database inside its server; ``name`` defaults to the UTC time."""
        now = datetime.now(UTC)
        name = name or now.strftime("%Y%m%d-%H%M%S-%f")
        with self._admin(spec) as (conn, database):
            return snapshots.take(conn, database, name, now.isoformat())

    def restore(self, spec: DbSpec, name: str) -> None:
        """Make the service's database a copy of snapshot ``name`` (owner: the service's role)."""
        info = self.conninfo(spec)
        with self._admin(spec) as (conn, database):
            snapshots.restore(conn, database, info.user, name)

    def snapshots(self, spec: DbSpec) -> list[SnapshotInfo]:
        with self._admin(spec) as (conn, database):
            return snapshots.listing(conn, database)

    def prune_snapshots(self, spec: DbSpec, keep: int) -> list[str]:
        """Keep the newest ``keep`` snapshots; returns the names deleted."""
        with self._admin(spec) as (conn, database):
            return snapshots.prune(conn, database, keep)

    @contextlib.contextmanager
    def _admin(self, spec: DbSpec) -> Iterator[tuple[psycopg.Connection[TupleRow], str]]:
        """(superuser connection to ``postgres``, autocommit; the service's database name)."""
        container = self._existing(spec)
        container.reload()
        if container.status != "running":
            raise DatabaseNotFoundError(
                f"the database container of service {spec.service!r} is {container.status}, "
                f"not running; `devmesh up` starts it"
            )
        info = self._conninfo(spec, container)
        admin = wiring.url(
            ConnInfo(
                engine=Engine.POSTGRES,
                host=info.host,
                port=info.port,
                user=info.user,
                password=info.password,
                database="postgres",
            )
        )
        try:
            conn = psycopg.connect(admin, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise TemporaryDbError(
                f"database container of service {spec.service!r}: cannot connect as its "
                f"superuser: {wiring.scrub(str(exc).strip(), [info.password])}"
            ) from None
        with conn:
            yield conn, info.database

    # -- helpers ------------------------------------------------------------------------

    def _image(self, spec: DbSpec) -> str:
        import docker.errors

        image = self.image(spec)
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            if not self.pull:
                raise ImageMissingError(image, "pulling is off") from None
            try:
                self.client.images.pull(image)
            except docker.errors.APIError as exc:
                raise ImageMissingError(image, str(exc.explanation or exc)) from None
        return image

    def _volume_password(self, spec: DbSpec) -> str:
        """The password the data volume was initialised with; a new volume gets a new one.

        Kept as a label of the volume, so a container removed by hand (``docker rm``) is
        recreated around its old data with the password that data expects.
        """
        import docker.errors

        try:
            volume = self.client.volumes.get(self.volume_name(spec))
        except docker.errors.NotFound:
            password = secrets.token_urlsafe(24)
            labels = {**self.labels(spec), f"{LABEL}.password": password}
            self.client.volumes.create(name=self.volume_name(spec), labels=labels)
            return password
        stored = (volume.attrs.get("Labels") or {}).get(f"{LABEL}.password")
        if not stored:
            raise PermanentDbError(
                f"volume {volume.name!r} exists but was not made by devmesh (no password "
                f"label); remove it (`docker volume rm {volume.name}`) or rename the service"
            )
        return str(stored)

    def _existing(self, spec: DbSpec) -> Any:
        container = self.find(spec)
        if container is None:
            raise DatabaseNotFoundError(
                f"no database container for service {spec.service!r} of project "
                f"{spec.project!r} (not created yet, or dropped)"
            )
        return container

    @staticmethod
    def _start(container: Any) -> None:
        container.reload()
        if container.status != "running":
            container.start()
            container.reload()

    def _conninfo(self, spec: DbSpec, container: Any) -> ConnInfo:
        env: dict[str, str] = {}
        for item in container.attrs["Config"]["Env"]:
            key, _, value = str(item).partition("=")
            env[key] = value
        bindings = container.attrs["HostConfig"]["PortBindings"]["5432/tcp"]
        return ConnInfo(
            engine=Engine.POSTGRES,
            host="127.0.0.1",
            port=int(bindings[0]["HostPort"]),
            user=env["POSTGRES_USER"],
            password=env["POSTGRES_PASSWORD"],
            database=env.get("POSTGRES_DB", env["POSTGRES_USER"]),
        )

    def _wait_ready(self, spec: DbSpec, container: Any, info: ConnInfo) -> None:
        """Until pg_isready (TCP, inside) passes and a login from here works."""
        deadline = time.monotonic() + self.ready_timeout_s
        last = "not checked yet"
        while time.monotonic() < deadline:
            container.reload()
            if container.status not in ("running", "created", "restarting"):
                logs = container.logs(tail=15).decode(errors="replace")
                raise PermanentDbError(
                    f"database container of service {spec.service!r} exited "
                    f"({container.status}); its last lines:\n{logs}"
                )
            code, out = container.exec_run(
                ["pg_isready", "-h", "127.0.0.1", "-U", info.user, "-d", info.database]
            )
            if code == 0:
                try:
                    with psycopg.connect(wiring.url(info), connect_timeout=5):
                        return
                except psycopg.OperationalError as exc:
                    last = str(exc).strip()
            else:
                last = out.decode(errors="replace").strip()
            time.sleep(0.2)  # polling an outside process; no event to wait on
        raise TemporaryDbError(
            f"database container of service {spec.service!r} not ready after "
            f"{self.ready_timeout_s:g} s: {wiring.redact_url(last)}"
        )

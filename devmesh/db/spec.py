"""What a service asks of its database, and what a provider answers.

Why plain types: the agent builds a ``DbSpec`` from the config model and hands it to
whichever provider serves the engine; providers answer with ``ConnInfo`` and ``DbStatus``.
Nothing here does I/O, so the agent can compare, store and show these values freely.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_NAME = re.compile(r"^[a-z_][a-z0-9_\-]{0,47}$")
"""Database and role names: lowercase, short enough that snapshot names stay under
PostgreSQL's 63-byte identifier limit (``NAME__snap__SNAPSHOT``)."""


class Engine(enum.Enum):
    POSTGRES = "postgres"
    SQLITE = "sqlite"


class DbState(enum.Enum):
    ABSENT = "absent"
    """Never created, or dropped."""
    STOPPED = "stopped"
    """Its data exists; the server is not running."""
    RUNNING = "running"
    """Accepting connections (for SQLite: the file exists)."""


def check_name(name: str, what: str = "database name") -> str:
    """``name`` when it is a valid database/role name, else ``ValueError`` saying why."""
    if not _NAME.match(name):
        raise ValueError(
            f"{what} {name!r} must be 1-48 characters of a-z, 0-9, '_' or '-', "
            f"starting with a letter or '_'"
        )
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class DbSpec:
    """One service's database, as the config asks for it."""

    project: str
    service: str
    engine: Engine = Engine.POSTGRES
    name: str = ""
    """Database name (also the role's name); empty means the service's name."""
    version: int | None = None
    """Wanted PostgreSQL major version; None takes the newest the machine has."""

    @property
    def database(self) -> str:
        return check_name((self.name or self.service).lower().replace("-", "_"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnInfo:
    """How a service reaches its database. ``path`` is set for SQLite only."""

    engine: Engine
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = ""
    database: str = ""
    path: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DbStatus:
    service: str
    engine: Engine
    provider: str
    state: DbState
    size_bytes: int | None
    """On-disk size of the service's database; None when unknown (absent)."""
    url: str
    """With the password hidden: safe to print."""


class Provider(Protocol):
    """What every engine's provider does for one service's database.

    Every method is idempotent: ``ensure`` on something that exists adopts it, ``stop`` of
    something stopped and ``drop`` of something absent do nothing. Errors are ``DbError``s.
    """

    name: str

    def ensure(self, spec: DbSpec) -> ConnInfo:
        """Create (or adopt) the database and whatever serves it, started and ready."""
        ...

    def start(self, spec: DbSpec) -> None:
        """Start what serves the database (its data must exist: ``ensure`` first)."""
        ...

    def stop(self, spec: DbSpec) -> None:
        """Stop what serves the database, keeping its data."""
        ...

    def status(self, spec: DbSpec) -> DbStatus: ...

    def conninfo(self, spec: DbSpec) -> ConnInfo:
        """The service's connection values (raises ``DatabaseNotFoundError`` when absent)."""
        ...

    def drop(self, spec: DbSpec) -> None:
        """Delete the database and its data (``down --volumes``)."""
        ...

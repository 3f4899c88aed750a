"""The database drivers' errors: each names the condition, the place, and what to do.

Why: a database that will not come up is usually the machine's fault (no binaries, a port
taken, a home the server's user cannot reach), and the developer can fix it only when the
message says which. Messages are built in ``__init__`` so tests, the CLI and the agent's
log read the same words. ``Permanent`` errors will fail again on retry until the developer
acts; ``Temporary`` ones (a server still starting) may pass on a later attempt, as kopf's
``PermanentError``/``TemporaryError`` split tells a reconciler whether to back off or give up.

Passwords never appear in a message: URLs are rendered through ``wiring.redact_url`` first.
"""

from __future__ import annotations


class DbError(Exception):
    """Base of every database driver error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermanentDbError(DbError):
    """Retrying will not help until the developer changes the machine or the config."""


class TemporaryDbError(DbError):
    """May pass on a later attempt (a server still starting, a lock held a moment)."""


class NoPostgresBinariesError(PermanentDbError):
    """No ``initdb``/``pg_ctl`` of the wanted major version on this machine."""

    def __init__(self, wanted: int | None, looked_in: list[str], found: list[int]) -> None:
        version = f"PostgreSQL {wanted}" if wanted else "PostgreSQL"
        pkg = f"postgresql-{wanted}" if wanted else "postgresql"
        have = f" (found only {', '.join(map(str, found))})" if found else ""
        super().__init__(
            f"no {version} server binaries (initdb, pg_ctl, postgres) on this machine{have}; "
            f"looked in {', '.join(looked_in) or 'nothing'}. Install them, e.g. "
            f"`apt-get install {pkg}` on Debian/Ubuntu, or use the docker provider"
        )


class PortTakenError(PermanentDbError):
    """The cluster's port (kept so URLs stay stable) is held by another process."""

    def __init__(self, where: str, port: int, holder: str) -> None:
        super().__init__(
            f"{where}: port 127.0.0.1:{port} (kept for this cluster) is {holder}; stop that "
            f"process, or drop the cluster's databases so a new port is chosen"
        )


class ClusterUserError(PermanentDbError):
    """Running as root, and no unprivileged user can run PostgreSQL here."""


class ClusterError(PermanentDbError):
    """initdb, pg_ctl or the server failed; the message carries the tail of its log."""


class DatabaseNotFoundError(PermanentDbError):
    """The service's database was never created (``ensure`` first) or was dropped."""


class SnapshotError(PermanentDbError):
    """A snapshot name is invalid, unknown, or the copy failed."""


class SyncError(PermanentDbError):
    """Staging subset sync failed; the local database is unchanged."""


class SyncSourceError(SyncError):
    """The sync source cannot be reached, refused the login, or is not PostgreSQL we read."""


class SyncInputError(SyncError):
    """The ``sync:`` block names something the source does not have, or a bad ``where``."""

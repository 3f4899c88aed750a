"""The values a service finds in its environment, and URLs safe to print.

Why: services read ``DATABASE_URL`` (most frameworks) or libpq's ``PG*`` variables (psql,
pg_dump, many drivers without a URL); giving both means no service needs a wrapper. Every
URL shown to a human goes through ``redact_url``, so a password never reaches a terminal,
a log or an error message.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from devmesh.db.spec import ConnInfo, Engine

HIDDEN = "***"


def url(info: ConnInfo) -> str:
    """The full URL, password included (for the service and for ``devmesh db url``)."""
    if info.engine is Engine.SQLITE:
        assert info.path is not None
        # sqlite:/// then the absolute path, so four slashes: what SQLAlchemy and
        # dj-database-url read as an absolute path (three would be relative to the cwd)
        return f"sqlite:///{info.path.resolve().as_posix()}"
    user = quote(info.user, safe="")
    password = quote(info.password, safe="")
    auth = f"{user}:{password}@" if password else f"{user}@"
    return f"postgresql://{auth}{info.host}:{info.port}/{quote(info.database, safe='')}"


def display_url(info: ConnInfo) -> str:
    """The URL with the password replaced by ``***``."""
    return redact_url(url(info))


def environment(info: ConnInfo) -> dict[str, str]:
    """``DATABASE_URL`` for every engine, plus libpq's variables for PostgreSQL."""
    env = {"DATABASE_URL": url(info)}
    if info.engine is Engine.POSTGRES:
        env |= {
            "PGHOST": info.host,
            "PGPORT": str(info.port),
            "PGUSER": info.user,
            "PGPASSWORD": info.password,
            "PGDATABASE": info.database,
        }
    return env


_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(
    r"([a-z][a-z0-9+.\-]*://[^:/@\s]*:)(\S*?)(@)(?=[^@\s]*(?:\s|$))", re.IGNORECASE
)
"""``scheme://user:PASSWORD@``, the password up to the token's last ``@`` (an unquoted
``@`` in a password must not leak its tail)."""


def redact_url(text: str) -> str:
    """``text`` with every password hidden: a URL's ``user:PASSWORD@`` or a ``password=``.

    Works on a bare URL, on libpq key/value strings and on messages that quote either.
    """
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + HIDDEN + m.group(3), text)
    return _PASSWORD_KV.sub(lambda m: m.group(1) + HIDDEN, text)


def scrub(message: str, secrets: list[str]) -> str:
    """``message`` with each of ``secrets`` (and its URL-quoted form) replaced by ``***``.

    For errors that echo input (a server message quoting a connection string).
    """
    for secret in secrets:
        if secret:
            message = message.replace(secret, HIDDEN).replace(quote(secret, safe=""), HIDDEN)
    return redact_url(message)

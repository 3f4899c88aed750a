"""Who may read the dashboard and who may act through it: the token, the cookie, CSRF, Origin.

Why a token at all: every user of the machine reaches loopback, so "it listens on 127.0.0.1"
protects nothing (Jupyter's reason). The agent keeps one random token in DEVMESH_HOME (mode
0600, so only its user can read it); `devmesh dashboard` prints the URL with it, the page
trades it for an ``HttpOnly; SameSite=Strict`` cookie and redirects to ``/`` so it leaves the
address bar and the history.

Why SameSite is not enough for actions: every ``*.localhost`` origin is the same *site* as
``devmesh.localhost`` (``localhost`` is not a public suffix), so a page of any local service
gets the cookie sent along. A state-changing request therefore also needs an ``Origin`` that
is the dashboard's own and a per-page CSRF token: a random nonce with its HMAC under a key
derived from the token. It is checked without server state, so a page keeps working across
an agent restart (same token file) while a page of another origin can never read one (the
HTML carrying it is not readable cross-origin). The WebSocket feed checks ``Origin`` too, as
browsers send it on every WebSocket and no CORS protects a WebSocket's reads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

TOKEN_BYTES = 32
COOKIE_PREFIX = "devmesh-token-"
CSRF_HEADER = "x-devmesh-csrf"


def load_or_create_token(path: Path) -> str:
    """The token kept in ``path`` (created with mode 0600 when missing or empty).

    Created with O_EXCL under a temporary name and renamed into place, so two agents
    starting at once cannot leave a half-written token, and the file is never readable by
    others, not even for a moment. A file with looser permissions is tightened.
    """
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    tmp.rename(path)
    return token


def same(given: str | None, token: str) -> bool:
    """Constant-time comparison; None or empty never matches."""
    return bool(given) and hmac.compare_digest(str(given).encode(), token.encode())


def cookie_name(host_header: str | None) -> str:
    """The cookie's name for the port the browser used.

    Cookies ignore ports: two agents of one user (two DEVMESH_HOMEs) both answer at
    ``devmesh.localhost``, on different ports, and must not overwrite each other's token.
    """
    port = ""
    if host_header and not host_header.endswith("]") and ":" in host_header:
        port = host_header.rsplit(":", 1)[1]
    return COOKIE_PREFIX + (port if port.isdigit() else "default")


def cookies(header: str | None) -> dict[str, str]:
    """The ``Cookie`` header as a dict (the first value of a repeated name wins)."""
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def set_cookie(host_header: str | None, token: str, *, secure: bool) -> str:
    """The ``Set-Cookie`` value that logs a browser in (session cookie, whole site path)."""
    attrs = ["HttpOnly", "SameSite=Strict", "Path=/"]
    if secure:
        attrs.append("Secure")
    return f"{cookie_name(host_header)}={token}; " + "; ".join(attrs)


def request_token(headers: Mapping[str, str]) -> str | None:
    """The token a request presents: its cookie, or ``Authorization: Bearer`` (scripts)."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return cookies(headers.get("cookie")).get(cookie_name(headers.get("host")))


def _csrf_key(token: str) -> bytes:
    return hashlib.sha256(b"devmesh-dashboard-csrf\0" + token.encode()).digest()


def _mac(token: str, nonce: str) -> str:
    digest = hmac.new(_csrf_key(token), nonce.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def mint_csrf(token: str) -> str:
    """A fresh per-page CSRF token: ``NONCE.MAC``."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_mac(token, nonce)}"


def check_csrf(given: str | None, token: str) -> bool:
    """Whether ``given`` was minted by ``mint_csrf`` under this agent's token."""
    nonce, sep, mac = (given or "").partition(".")
    return bool(nonce and sep and mac) and hmac.compare_digest(mac, _mac(token, nonce))


def origin(scheme: str, host: str, port: int | None) -> str:
    """An origin as a browser serialises it: no port when it is the scheme's default."""
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def origin_allowed(given: str | None, allowed: Iterable[str]) -> bool:
    """Whether an ``Origin`` header is exactly one of the dashboard's own origins."""
    return given is not None and given.strip().lower() in {a.lower() for a in allowed}

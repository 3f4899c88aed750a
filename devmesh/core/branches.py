"""Which branch namespace a request asks for, read from its headers and host. Never raises.

Why it is pure: the proxy calls this on every request with whatever bytes a client sent, and
the rules (header precedence, W3C baggage syntax, the host form that collides with the project
form) are cheaper to pin down over strings than through sockets.

Where a branch can be named, strongest first:

1. ``X-Devmesh-Branch: NAME``: set explicitly by an app, or by the proxy on calls that leave a
   service started under a branch. Several such headers must agree.
2. A W3C ``baggage`` entry ``devmesh-branch=NAME``: how tracing-aware apps propagate context
   through calls devmesh does not see (queues, other proxies). Parsed per the W3C Baggage
   spec: comma-separated list-members, optional whitespace, properties after ``;``, values
   percent-encoded UTF-8; a malformed member is skipped, as the spec allows, and never
   invalidates the others. Several ``baggage`` headers are one list, in order; the first
   ``devmesh-branch`` member wins.
3. The host, for browsers, which cannot add headers:

   - ``SERVICE.BRANCH.PROJECT.localhost`` always names a branch.
   - ``SERVICE.X.localhost`` is the project form (``NAME.PROJECT.localhost``) when X is the
     name of a project the agent knows, and a branch otherwise. A project therefore always
     wins over a branch of the same name; such a branch stays reachable through the
     four-label form or the header.
   - Host names are case-insensitive and cannot carry ``/``, so only lower-case branch
     names made of letters, digits, ``-``, ``.`` and ``_`` can be named by host.

A name that is present but not a valid branch name is an error (``Branch.error``), not a
silent fall back to the default namespace: the proxy answers 400 naming it, because routing
such a request to the default instance would hide the mistake.

Branch names are a git-ref-safe subset: ASCII letters, digits, ``.``, ``_``, ``-`` and
``/``, 1 to 128 characters, no empty, ``.``-led or ``.lock``-ended path component, no ``..``,
not led by ``-``, not ending in ``/`` or ``.``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Collection, Iterable

from devmesh.core import hostroute

HEADER = "x-devmesh-branch"
BAGGAGE_HEADER = "baggage"
BAGGAGE_KEY = "devmesh-branch"
MAX_BRANCH_CHARS = 128
MAX_BAGGAGE_CHARS = 8192
"""W3C Baggage: a platform must propagate at least 8192 bytes; past that we stop reading."""

_BRANCH_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_HOST_BRANCH = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9_])?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 7230 token: the syntax of a baggage key."""
_BAGGAGE_OCTETS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
"""W3C baggage-octet: printable US-ASCII except DQUOTE, comma, semicolon and backslash."""


class Source(enum.Enum):
    """Where the branch came from; NONE is the default namespace."""

    HEADER = "header"
    BAGGAGE = "baggage"
    HOST = "host"
    NONE = "none"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Branch:
    """The namespace a request asks for."""

    name: str | None
    """The branch; None is the default namespace (instances with no branch)."""
    source: Source
    error: str | None = None
    """Set when a branch was named but is invalid; ``name`` is then None."""


DEFAULT = Branch(name=None, source=Source.NONE)


def problem(name: str) -> str | None:
    """Why ``name`` is not a valid branch name, or None when it is."""
    shown = name[:40] + ("..." if len(name) > 40 else "")
    if not name:
        return "a branch name cannot be empty"
    if len(name) > MAX_BRANCH_CHARS:
        return f"branch name {shown!r} is longer than {MAX_BRANCH_CHARS} characters"
    if not _BRANCH_CHARS.fullmatch(name):
        return f"branch name {shown!r} may only hold ASCII letters, digits, '.', '_', '-' and '/'"
    if name.startswith("-"):
        return f"branch name {shown!r} cannot start with '-'"
    if name.endswith((".", "/")):
        return f"branch name {shown!r} cannot end with '.' or '/'"
    if ".." in name:
        return f"branch name {shown!r} cannot contain '..'"
    for part in name.split("/"):
        if not part:
            return f"branch name {shown!r} has an empty path component"
        if part.startswith("."):
            return f"branch name {shown!r} has a component starting with '.'"
        if part.endswith(".lock"):
            return f"branch name {shown!r} has a component ending with '.lock'"
    return None


def is_valid(name: str) -> bool:
    return problem(name) is None


def _text(value: str | bytes) -> str:
    """Header bytes as text; latin-1 maps every byte, so nothing can fail to decode."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _percent_decode(value: str) -> str | None:
    """W3C baggage values are percent-encoded UTF-8; None when the encoding is broken."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "%":
            pair = value[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out.extend(ch.encode("ascii", "ignore"))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def baggage_entries(values: Iterable[str | bytes]) -> list[tuple[str, str]]:
    """Every well-formed ``(key, decoded value)`` of the baggage headers, in order.

    Properties (after ``;``) are dropped: devmesh only reads values. A member with a bad key,
    a value outside baggage-octets or broken percent-encoding is skipped.
    """
    joined = ",".join(_text(v) for v in values)[:MAX_BAGGAGE_CHARS]
    out: list[tuple[str, str]] = []
    for member in joined.split(","):
        head = member.split(";", 1)[0]
        if "=" not in head:
            continue
        key, value = (part.strip(" \t") for part in head.split("=", 1))
        if not _TOKEN.fullmatch(key) or not _BAGGAGE_OCTETS.fullmatch(value):
            continue
        decoded = _percent_decode(value)
        if decoded is not None:
            out.append((key, decoded))
    return out


def from_host(host: str, projects: Collection[str]) -> str | None:
    """The branch a Host header names (see the module docstring), else None."""
    labels = hostroute.hostname(host).split(".")
    if not all(labels) or labels[-1] != hostroute.SUFFIX:
        return None
    if len(labels) == 4:
        return labels[1]
    if len(labels) == 3 and labels[1] not in projects:
        return labels[1]
    return None


def _named(name: str, source: Source) -> Branch:
    error = problem(name)
    if error is not None:
        return Branch(name=None, source=source, error=f"{error} (from the {source.value})")
    return Branch(name=name, source=source)


def extract(
    headers: Iterable[tuple[str | bytes, str | bytes]],
    host: str | bytes | None = None,
    *,
    projects: Collection[str] = (),
) -> Branch:
    """The branch a request asks for; ``projects`` are the project names the agent knows.

    ``host`` defaults to the request's Host header. Never raises, whatever the bytes.
    """
    explicit: list[str] = []
    baggage: list[str | bytes] = []
    host_header: str | None = None
    for raw_name, raw_value in headers:
        name = _text(raw_name).strip().lower()
        if name == HEADER:
            explicit.append(_text(raw_value).strip(" \t"))
        elif name == BAGGAGE_HEADER:
            baggage.append(raw_value)
        elif name == "host" and host_header is None:
            host_header = _text(raw_value)
    if explicit:
        if len(set(explicit)) > 1:
            shown = ", ".join(repr(e[:40]) for e in sorted(set(explicit))[:3])
            return Branch(
                name=None,
                source=Source.HEADER,
                error=f"conflicting X-Devmesh-Branch headers: {shown}",
            )
        return _named(explicit[0], Source.HEADER)
    for key, value in baggage_entries(baggage):
        if key == BAGGAGE_KEY:
            return _named(value.strip(), Source.BAGGAGE)
    host_text = _text(host) if host is not None else host_header
    if host_text is not None:
        label = from_host(host_text, projects)
        if label is not None:
            if not _HOST_BRANCH.fullmatch(label) or not is_valid(label):
                return Branch(
                    name=None,
                    source=Source.HOST,
                    error=f"host label {label[:40]!r} is not a branch name (from the host)",
                )
            return Branch(name=label, source=Source.HOST)
    return DEFAULT

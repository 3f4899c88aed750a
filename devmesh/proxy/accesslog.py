"""Access log: one line per request, as text or JSON lines, to a file the agent names.

Why buffered with a periodic flush: a write(2) per request costs more than the rest of a small
proxied request's bookkeeping. Lines are collected in memory and written with one ``write``
on an O_APPEND descriptor when ``ProxyServer`` flushes (every quarter second, on shutdown, or
past 64 KiB), so ``devmesh logs --proxy`` lags by at most that long, and several worker
processes can share one file without splitting each other's lines.
"""

from __future__ import annotations

import json
import operator
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    time: float
    """Unix time at which the request head arrived."""
    client: str
    """Client address as ip:port."""
    method: str
    host: str
    path: str
    status: int
    """Status sent to the client; 0 when the client left before any answer."""
    bytes_in: int
    """Request body bytes read from the client."""
    bytes_out: int
    """Response body bytes written to the client."""
    duration_ms: float
    upstream: str | None
    """host:port of the service used, None when the proxy answered itself."""
    caller: str | None = None
    """The calling service (service.project) when the request came in on an edge listener;
    ``peer NODE`` on the peer listener."""
    route: str | None = None
    """Where the call went: ``local``, ``peer`` or ``fallback``; None when the proxy answered."""
    node: str | None = None
    """The peer node that answered (route ``peer``), else None."""
    target: str | None = None
    """``PROJECT/SERVICE`` called when another project than the caller's runs it (a
    dependency with ``project: NAME``), else None."""
    error: str | None = None
    pid: int | None = None
    """The proxy process that served the request (the agent or one of its workers); the
    JSON lines carry the writing process's pid when the entry has none."""


def format_text(entry: Entry) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.time))
    millis = int((entry.time % 1) * 1000)
    parts = [
        f"{stamp}.{millis:03d}Z",
        entry.client,
        entry.method,
        entry.host or "-",
        entry.path,
        str(entry.status),
        f"in={entry.bytes_in}",
        f"out={entry.bytes_out}",
        f"{entry.duration_ms:.2f}ms",
        f"upstream={entry.upstream or '-'}",
    ]
    if entry.caller:
        parts.append(f"caller={entry.caller}")
    if entry.target:
        parts.append(f"target={entry.target}")
    if entry.node:
        parts.append(f"node {entry.node}")
    elif entry.route and entry.route != "local":
        parts.append(f"route={entry.route}")
    if entry.error:
        parts.append(f"error={json.dumps(entry.error)}")
    return " ".join(parts)


_FIELDS = tuple(f.name for f in fields(Entry))
_values = operator.attrgetter(*_FIELDS)
_encode = json.JSONEncoder(separators=(",", ":")).encode


def format_json(entry: Entry, pid: int | None = None) -> str:
    # Not dataclasses.asdict: it deep-copies every field and cost a fifth of a small
    # proxied request's CPU; the fields are flat, so a zip and the C encoder suffice.
    doc = dict(zip(_FIELDS, _values(entry), strict=True))
    if doc["pid"] is None:
        doc["pid"] = pid
    return _encode(doc)


class AccessLog:
    """Appends entries to ``path`` (or nowhere when path is None); ``json`` picks the format."""

    def __init__(self, path: Path | str | None, *, json_lines: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self._json = json_lines
        self._pid = os.getpid()
        self._fd: int | None = None
        self._lines: list[str] = []
        self._size = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @property
    def enabled(self) -> bool:
        """False when entries go nowhere: the proxy then skips building them."""
        return self._fd is not None

    def record(self, entry: Entry) -> None:
        if self._fd is not None:
            line = format_json(entry, self._pid) if self._json else format_text(entry)
            self._add(line)

    def record_fields(self, fields: dict[str, object]) -> None:
        """``record(Entry(**fields))`` without the Entry for JSON lines: this runs once per
        proxied request, and a frozen dataclass plus its conversion back to a dict cost a
        twentieth of a small request's CPU. ``fields`` has Entry's fields (pid optional)."""
        if self._fd is None:
            return
        if not self._json:
            # fields holds Entry's fields by contract (see above); the values are typed per field
            # there, object here, so the check is the dataclass's own.
            self._add(format_text(Entry(**fields)))  # type: ignore[arg-type]
            return
        fields.setdefault("pid", self._pid)
        self._add(_encode(fields))

    def _add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size > 64 * 1024:
            self.flush()

    def flush(self) -> None:
        if self._fd is not None and self._lines:
            data = ("\n".join(self._lines) + "\n").encode()
            self._lines.clear()
            self._size = 0
            while data:
                data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

"""Access log: one line per request, as text or JSON lines, to a file the agent names.

Why buffered with a periodic flush: a write(2) per request costs more than the rest of a small
proxied request's bookkeeping. Lines go through a 64 KiB buffer that ``ProxyServer`` flushes
every quarter second and on shutdown, so ``devmesh logs --proxy`` lags by at most that long.
Lines are never reordered and never split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


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
    """The calling service (service.project) when the request came in on an edge listener."""
    error: str | None = None


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
    if entry.error:
        parts.append(f"error={json.dumps(entry.error)}")
    return " ".join(parts)


def format_json(entry: Entry) -> str:
    return json.dumps(asdict(entry), separators=(",", ":"))


class AccessLog:
    """Appends entries to ``path`` (or nowhere when path is None); ``json`` picks the format."""

    def __init__(self, path: Path | str | None, *, json_lines: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self._format = format_json if json_lines else format_text
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=64 * 1024)  # noqa: SIM115

    def record(self, entry: Entry) -> None:
        if self._file is not None:
            self._file.write(self._format(entry) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Pages the proxy answers itself: the unknown-host index and error pages.

Why three formats: a browser should see links it can click, curl and test clients should see
one plain sentence they can read or compare, and a program that asks for JSON
(``Accept: application/json``) gets ``{"status", "error"}``. The Accept header decides; the
sentence is the same in all, so a test asserting on the plain text covers the others too.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from http import HTTPStatus

from devmesh.core import hostroute
from devmesh.proxy import table


def _wants_html(accept: bytes | None) -> bool:
    return accept is not None and b"text/html" in accept


def service_lines(
    backends: Sequence[table.Backend], *, port: int, https_port: int | None, now_s: float
) -> list[tuple[str, str, str | None]]:
    """(label, http url, https url) for each known service, sorted by project then name.

    ``now_s`` (Unix seconds) says how long a restarting service still waits."""
    rows = []
    for b in sorted(backends, key=lambda b: (b.project, b.service)):
        http = hostroute.service_url(b.service, b.project, scheme="http", port=port)
        https = (
            hostroute.service_url(b.service, b.project, scheme="https", port=https_port)
            if https_port
            else None
        )
        rows.append((f"{b.service} ({b.project}, {table.state_words(b, now_s)})", http, https))
    return rows


def render(
    status: int,
    message: str,
    *,
    accept: bytes | None,
    services: list[tuple[str, str, str | None]] | None = None,
) -> tuple[bytes, bytes]:
    """(content type, body) for a status and message, listing services when given."""
    phrase = HTTPStatus(status).phrase
    if accept is not None and b"application/json" in accept and not _wants_html(accept):
        doc = {"status": status, "error": message}
        return b"application/json", (json.dumps(doc) + "\n").encode()
    if _wants_html(accept):
        items = ""
        if services is not None:
            lis = "".join(
                f'<li>{html.escape(label)}: <a href="{html.escape(u)}">{html.escape(u)}</a>'
                + (f' <a href="{html.escape(s)}">{html.escape(s)}</a>' if s else "")
                + "</li>"
                for label, u, s in services
            )
            items = f"<h2>Known services</h2><ul>{lis or '<li>none</li>'}</ul>"
        body = (
            f"<!doctype html><meta charset=utf-8><title>{status} {phrase}</title>"
            f"<h1>{status} {phrase}</h1><p>{html.escape(message)}</p>{items}"
            "<p><small>devmesh proxy</small></p>\n"
        )
        return b"text/html; charset=utf-8", body.encode()
    lines = [f"{status} {phrase}: {message}"]
    if services is not None:
        lines.append("")
        lines.append("Known services:")
        lines.extend(f"  {label}: {u}" + (f" {s}" if s else "") for label, u, s in services)
        if not services:
            lines.append("  (none)")
    return b"text/plain; charset=utf-8", ("\n".join(lines) + "\n").encode()

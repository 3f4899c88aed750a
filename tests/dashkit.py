"""Helpers for the dashboard tests: its URL from the real CLI, a logged-in client, a real
headless Chromium (Debian's, driven by Playwright), and a page of another origin.

Chromium runs with the flags the network-safety rules ask for and a fresh profile per use;
it resolves every ``*.localhost`` name to loopback by itself, so the pages it opens are the
proxy's on 127.0.0.1 and nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from agentkit import Mesh

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
SHOTS = os.environ.get("DEVMESH_SCREENSHOTS")
"""Folder to save the screenshots in (docs/img when the docs' pictures are retaken)."""


def dashboard_url(mesh: Mesh) -> str:
    """The URL `devmesh dashboard --no-open` prints (its first line of output)."""
    r = mesh.cli("dashboard", "--no-open", check=True)
    url = r.stdout.splitlines()[0]
    assert url.startswith(f"http://devmesh.localhost:{mesh.proxy_port}/?token="), r.stdout
    return url


def token_of(url: str) -> str:
    return url.split("token=", 1)[1]


def origin(mesh: Mesh) -> str:
    return f"http://devmesh.localhost:{mesh.proxy_port}"


def client(mesh: Mesh) -> httpx.Client:
    """An HTTP client that talks to the proxy on loopback with Host devmesh.localhost."""
    return httpx.Client(
        base_url=f"http://127.0.0.1:{mesh.proxy_port}",
        headers={"host": f"devmesh.localhost:{mesh.proxy_port}"},
        timeout=30,
        trust_env=False,
    )


def login(mesh: Mesh, url: str) -> str:
    """The ``Cookie`` header value the token URL sets."""
    with client(mesh) as c:
        r = c.get("/?token=" + token_of(url))
    assert r.status_code == 303, r.text
    return r.headers["set-cookie"].split(";", 1)[0]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser context of Debian's headless Chromium, fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="dmt-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def shot(page: Any, name: str, part: str | None = None) -> None:
    """Save a screenshot (of the whole page, or of the element ``part`` selects) when
    DEVMESH_SCREENSHOTS names a folder."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        path = str(Path(SHOTS) / f"{name}.png")
        if part is None:
            page.screenshot(path=path, full_page=True)
        else:
            page.locator(part).screenshot(path=path)


class OtherSite:
    """A page of another origin served by the test on loopback: ``http://HOST:PORT/``.

    ``evil.localhost`` is another site to Chromium (it sends no SameSite cookie there);
    ``devmesh.localhost`` on another port is the same site, another origin: the token
    cookie goes along, and only the Origin and CSRF checks stand in the way.
    """

    def __init__(self, host: str = "evil.localhost") -> None:
        self.host = host

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<!doctype html><title>another site</title><p>another site</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def access(mesh: Mesh, path: str) -> list[dict[str, Any]]:
    """The access-log entries of requests to devmesh.localhost for ``path``."""
    return [
        e
        for e in mesh.access_entries()
        if e.get("path") == path and str(e.get("host", "")).startswith("devmesh.localhost")
    ]


def pid_of(mesh: Mesh, service: str) -> int | None:
    return mesh.services().get(service, {}).get("pid")


def dumps(doc: Any) -> str:
    return json.dumps(doc)

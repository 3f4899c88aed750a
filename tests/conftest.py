"""Shared fixtures: a private agent home per test (see agentkit.Mesh), and the root gate.

The root gate: a test that can only run as root (network namespaces, a database cluster's
system user) is marked ``needs_root`` (``netkit.NETNS``, ``dbkit.ROOT``). Run as another
user it skips, so a developer's plain ``pytest`` stays green; with ``DEVMESH_REQUIRE_ROOT=1``
(``scripts/test``, hence CI, sets it) the skip is a failure instead, so a run that did not
test them can never pass as a whole, as ``DEVMESH_REQUIRE_DOCKER`` does for Docker.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator

import pytest
from agentkit import Mesh

REQUIRE_ROOT = "DEVMESH_REQUIRE_ROOT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_root(what, check=None): runs only as root (check() says whether it can run "
        f"here, default: euid 0); skipped otherwise, a failure when {REQUIRE_ROOT}=1",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_root"):
        check = mark.kwargs.get("check") or (lambda: os.geteuid() == 0)
        if check():
            continue
        why = f"needs root: {mark.args[0]}"
        if os.environ.get(REQUIRE_ROOT) == "1":
            pytest.fail(
                f"{why}; {REQUIRE_ROOT}=1 (set by scripts/test, as in CI) makes this a "
                "failure, not a skip: run the suite as root (sudo ./scripts/test)",
                pytrace=False,
            )
        pytest.skip(f"{why} (with {REQUIRE_ROOT}=1, as scripts/test sets, this fails)")


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    """A DEVMESH_HOME of its own, its proxy on free ports; every process it made is gone after."""
    m = Mesh()
    try:
        yield m
    finally:
        m.close()


class _Fallback(http.server.BaseHTTPRequestHandler):
    """Answers every GET with JSON naming itself: the team's staging server in a test."""

    def do_GET(self) -> None:
        doc = {"from": "fallback", "path": self.path, "env": {"DEVMESH_PROJECT": "fallback"}}
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fallback() -> Iterator[str]:
    """A real HTTP server on loopback standing for a service's ``fallback`` URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fallback)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

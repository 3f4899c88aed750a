"""The dashboard's guards and feed with real clients: httpx for the pages and the action,
the `websockets` library for the feed, a raw TLS socket for HTTPS, and the real CLI for
`devmesh dashboard`. One agent each, its proxy on loopback.

Guards: every page and the feed answer 401 without the token; the token URL sets an
``HttpOnly; SameSite=Strict`` cookie and redirects to ``/``; the restart needs the token,
the dashboard's own Origin and the page's CSRF token (each missing one is a 403 naming it);
the feed refuses a browser of another origin.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import stat
import sys
from pathlib import Path
from typing import Any

import websockets
from agentkit import PY, SERVER, Mesh, free_port
from dashkit import client, dashboard_url, login, origin, pid_of, token_of

SHOP = f"""
version: 1
project: shop
services:
  api:
    version: 2.0.0
    command: {PY} server.py
    health: {{http: /healthz, interval_s: 0.5}}
  web:
    version: 1.0.0
    command: {PY} server.py
    depends_on:
      api: ^2
"""


def up(mesh: Mesh, *services: str) -> Path:
    d = mesh.project("shop", SHOP, {"server.py": SERVER})
    mesh.cli("up", "-d", *services, cwd=d, check=True, timeout=90)
    return d


def csrf_of(html: str) -> str:
    found = re.search(r'<meta name="devmesh-csrf" content="([^"]+)">', html)
    assert found, html[:500]
    return found.group(1)


async def states(
    mesh: Mesh, headers: dict[str, str], want: Any, timeout: float = 15
) -> dict[str, Any]:
    """The first state document from the feed for which ``want(state)`` holds."""
    uri = f"ws://devmesh.localhost:{mesh.proxy_port}/feed"
    async with websockets.connect(uri, host="127.0.0.1", additional_headers=headers) as ws:
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "state" and want(msg["state"]):
                    return msg["state"]


def refused_status(mesh: Mesh, headers: dict[str, str]) -> int:
    async def attempt() -> int:
        try:
            await states(mesh, headers, lambda s: True, timeout=5)
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        return 101

    return asyncio.run(attempt())


def test_pages_and_feed_answer_401_without_the_token_and_the_url_logs_in(mesh: Mesh) -> None:
    up(mesh)
    url = dashboard_url(mesh)
    token = token_of(url)
    with client(mesh) as c:
        for path in ("/", "/static/app.js", "/feed", "/api/restart", "/anything"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert "api" not in r.text and "shop" not in r.text  # shows nothing
            assert "devmesh dashboard" in r.text  # says how to get in
        assert c.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
        wrong = c.get("/?token=" + token[:-1] + "x")
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        r = c.get("/?token=" + token)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        attrs = {a.strip() for a in cookie.split(";")[1:]}
        assert cookie.startswith(f"devmesh-token-{mesh.proxy_port}={token};")
        assert attrs == {"HttpOnly", "SameSite=Strict", "Path=/"}
        page = c.get("/", headers={"cookie": cookie.split(";")[0]})
        assert page.status_code == 200 and "<title>devmesh</title>" in page.text
        assert token not in page.text  # the page never carries the token itself
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert c.get("/static/app.js", headers={"cookie": cookie.split(";")[0]}).status_code == 200
    # The token is kept in DEVMESH_HOME, readable by its user only.
    token_file = mesh.home / "dashboard.token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    assert refused_status(mesh, {}) == 401
    assert refused_status(mesh, {"cookie": f"devmesh-token-{mesh.proxy_port}=nope"}) == 401


def test_the_feed_sends_the_state_and_each_change(mesh: Mesh) -> None:
    d = up(mesh, "api")
    cookie = login(mesh, dashboard_url(mesh))

    async def follow() -> tuple[dict[str, Any], dict[str, Any]]:
        uri = f"ws://devmesh.localhost:{mesh.proxy_port}/feed"
        async with websockets.connect(
            uri, host="127.0.0.1", additional_headers={"cookie": cookie}
        ) as ws:
            async with asyncio.timeout(30):
                first = json.loads(await ws.recv())
                assert first["type"] == "state"
                # A change made now (web started) arrives on the same connection.
                started = asyncio.get_running_loop().run_in_executor(
                    None, lambda: mesh.cli("up", "-d", "web", cwd=d, check=True, timeout=90)
                )
                while True:
                    msg = json.loads(await ws.recv())
                    names = {s["name"]: s["state"] for s in msg["state"]["services"]}
                    if names.get("web") == "running":
                        await started
                        return first["state"], msg["state"]

    first, later = asyncio.run(follow())
    assert {s["name"] for s in first["services"]} == {"api"}
    assert first["overall"]["level"] in ("healthy", "starting")
    assert later["overall"] == {"level": "healthy", "words": "all 2 services running"}
    assert [(r["caller"], r["service"], r["target"]) for r in later["routes"]] == [
        ("web", "api", "local")
    ]
    edge = next(e for e in later["graph"]["edges"] if e["caller"] == "web")
    assert edge["to"] == "local:shop/api"


def test_the_feed_refuses_a_browser_of_another_origin(mesh: Mesh) -> None:
    up(mesh, "api")
    cookie = login(mesh, dashboard_url(mesh))
    for other in (
        "http://evil.localhost:1234",
        f"http://devmesh.localhost:{free_port()}",  # same site, another origin
        f"http://api.localhost:{mesh.proxy_port}",
    ):
        assert refused_status(mesh, {"cookie": cookie, "origin": other}) == 403, other
    got = asyncio.run(
        states(mesh, {"cookie": cookie, "origin": origin(mesh)}, lambda s: s["services"])
    )
    assert got["services"][0]["name"] == "api"


def test_restart_needs_the_token_the_origin_and_the_page_csrf_token(mesh: Mesh) -> None:
    up(mesh)
    cookie = login(mesh, dashboard_url(mesh))
    body = json.dumps({"project": "shop", "service": "api"})
    old = pid_of(mesh, "api")
    with client(mesh) as c:
        csrf = csrf_of(c.get("/", headers={"cookie": cookie}).text)
        other_csrf = csrf_of(c.get("/", headers={"cookie": cookie}).text)
        assert csrf != other_csrf  # per page
        good = {"cookie": cookie, "origin": origin(mesh), "x-devmesh-csrf": csrf}

        def post(headers: dict[str, str]) -> Any:
            return c.post("/api/restart", content=body, headers=headers)

        assert post({**good, "cookie": ""}).status_code == 401
        for name, headers in {
            "no Origin": {k: v for k, v in good.items() if k != "origin"},
            "another site": {**good, "origin": "http://evil.localhost:8080"},
            "same site, other port": {**good, "origin": f"http://devmesh.localhost:{free_port()}"},
            "a service's origin": {**good, "origin": f"http://api.localhost:{mesh.proxy_port}"},
        }.items():
            r = post(headers)
            assert r.status_code == 403, name
            assert "does not come from the dashboard" in r.json()["error"], name
        for name, headers in {
            "no CSRF token": {k: v for k, v in good.items() if k != "x-devmesh-csrf"},
            "a made-up CSRF token": {**good, "x-devmesh-csrf": csrf.split(".")[0] + ".forged"},
        }.items():
            r = post(headers)
            assert r.status_code == 403, name
            assert "CSRF" in r.json()["error"], name
        assert pid_of(mesh, "api") == old  # nothing refused restarted anything

        unknown = c.post(
            "/api/restart", content=json.dumps({"project": "shop", "service": "nope"}), headers=good
        )
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        r = post(good)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["old_pid"] == old and doc["pid"] not in (None, old) and doc["restarts"] == 1
    row = mesh.wait_for(
        lambda: (s := mesh.services()["api"])["state"] == "running" and s, what="api running"
    )
    assert row["pid"] == doc["pid"] and row["restarts"] == 1


def test_https_sets_a_secure_cookie(mesh: Mesh) -> None:
    up(mesh, "api")
    url = dashboard_url(mesh)
    ca = mesh.cli("ca", "path", check=True).stdout.strip()
    ctx = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", mesh.https_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="devmesh.localhost") as tls,
    ):
        tls.sendall(
            f"GET /?token={token_of(url)} HTTP/1.1\r\nHost: devmesh.localhost:"
            f"{mesh.https_port}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head = answer.decode("latin-1").split("\r\n\r\n")[0]
    assert head.startswith("HTTP/1.1 303"), head
    cookie = next(line for line in head.split("\r\n") if line.lower().startswith("set-cookie"))
    assert f"devmesh-token-{mesh.https_port}=" in cookie and "Secure" in cookie


def test_the_command_opens_a_browser_or_says_why_not(mesh: Mesh, tmp_path: Path) -> None:
    up(mesh, "api")
    seen = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(seen)!r}, 'w').write(sys.argv[1])\n"
    )
    browser.chmod(0o755)
    mesh.env["BROWSER"] = str(browser)
    r = mesh.cli("dashboard", check=True)
    url = r.stdout.splitlines()[0]
    assert url.startswith(f"http://devmesh.localhost:{mesh.proxy_port}/?token=")
    mesh.wait_for(lambda: seen.exists() and seen.read_text() == url, what="the browser to open")
    assert "Opened in your browser" in r.stderr
    # No display and no $BROWSER: the URL, and why nothing opened; it does not hang.
    for var in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        mesh.env.pop(var, None)
    seen.unlink()
    r = mesh.cli("dashboard", check=True, timeout=20)
    assert r.stdout.splitlines()[0] == url
    assert "No browser to open here" in r.stderr
    assert not seen.exists()
    # --no-open: only the URL, even with a browser at hand.
    mesh.env["BROWSER"] = str(browser)
    r = mesh.cli("dashboard", "--no-open", check=True)
    assert r.stdout == url + "\n" and not seen.exists()


def test_the_token_survives_an_agent_restart_and_the_cookie_still_works(mesh: Mesh) -> None:
    up(mesh, "api")
    url = dashboard_url(mesh)
    cookie = login(mesh, url)
    pid = mesh.agent_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    mesh.wait_for(lambda: mesh.agent_pid() is None, what="the agent to stop")
    mesh.start_agent()
    assert dashboard_url(mesh) == url  # the same token: open pages keep working
    got = asyncio.run(states(mesh, {"cookie": cookie}, lambda s: True))
    assert got["agent"]["pid"] == mesh.agent_pid() != pid

"""The agent's proxy end to end: stable URLs, edge listeners, errors, HTTPS, access log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from agentkit import PY, SERVER, Mesh, alive

SHOP = f"""
version: 1
project: shop
services:
  api:
    version: 1.4.0
    command: {PY} server.py
    health: {{http: /healthz, interval_s: 0.5}}
  web:
    version: 0.1.0
    command: {PY} web.py
    depends_on:
      api: {{version: "^1.2", condition: healthy}}
"""

# web answers / by calling API_URL with plain urllib (no *.localhost resolver help); when
# the call fails with an HTTP error, web answers 502 quoting what it got.
WEB = """
import http.server, os, urllib.error, urllib.request
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with urllib.request.urlopen(os.environ["API_URL"] + "/from-web", timeout=5) as r:
                status, body = 200, b"web got: " + r.read()
        except urllib.error.HTTPError as e:
            status, body = 502, b"web got %d: " % e.code + e.read()
        self.send_response(status); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
print("web up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def shop(mesh: Mesh) -> os.PathLike[str]:
    d = mesh.project("shop", SHOP, {"server.py": SERVER, "web.py": WEB})
    mesh.cli("up", "-d", cwd=d, check=True)
    return d


def test_services_answer_on_stable_names_and_call_each_other_through_edges(mesh: Mesh) -> None:
    shop(mesh)
    r = curl(f"http://web.localhost:{mesh.proxy_port}/")
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "200", r
    assert body.startswith("web got: {")  # api's answer, fetched by web through API_URL
    assert json.loads(body.removeprefix("web got: "))["DEVMESH_SERVICE"] == "api"
    r = curl(f"http://api.shop.localhost:{mesh.proxy_port}/")
    assert r.stdout.endswith("\n200")

    def access_log() -> list[dict] | None:
        out = mesh.cli("logs", "--proxy", "--json").stdout  # the proxy flushes every 0.25 s
        return [json.loads(x) for x in out.splitlines()] if "from-web" in out else None

    log_lines = mesh.wait_for(access_log, what="access log lines")
    edge = next(e for e in log_lines if e["path"] == "/from-web")
    assert edge["caller"] == "web.shop" and edge["status"] == 200
    assert edge["upstream"].startswith("127.0.0.1:")
    front = next(e for e in log_lines if e["host"].startswith("web.localhost"))
    assert front["status"] == 200 and front["method"] == "GET"
    text = mesh.cli("logs", "--proxy").stdout
    assert " GET web.localhost:" in text and "caller=web.shop" in text


def test_stopped_service_gets_a_502_naming_it_and_unknown_host_a_404(mesh: Mesh) -> None:
    d = shop(mesh)
    mesh.cli("down", "api", cwd=d, check=True)
    # web's call through its edge gets the proxy's 502 naming api, and web passes it on.
    r = curl(f"http://web.localhost:{mesh.proxy_port}/")
    assert r.stdout.startswith(
        "web got 502: 502 Bad Gateway: service 'api' of project 'shop' is stopped"
    ), r.stdout
    assert r.stdout.endswith("\n502"), r.stdout
    r = curl(f"http://api.localhost:{mesh.proxy_port}/")
    assert r.stdout.endswith("\n502"), r.stdout
    assert "service 'api' of project 'shop' is stopped" in r.stdout
    assert "devmesh up api" in r.stdout
    r = curl(f"http://nope.localhost:{mesh.proxy_port}/")
    assert r.stdout.endswith("\n404")
    assert f"web (shop, running): http://web.shop.localhost:{mesh.proxy_port}" in r.stdout


def test_https_with_the_local_ca(mesh: Mesh) -> None:
    shop(mesh)
    ca_path = mesh.cli("ca", "path", check=True).stdout.strip()
    assert ca_path == str(mesh.home / "ca" / "ca.pem")
    r = curl("--cacert", ca_path, f"https://web.localhost:{mesh.https_port}/")
    assert r.stdout.endswith("\n200"), r
    assert r.stdout.startswith("web got:")


def test_edge_url_is_stable_across_an_agent_kill_and_restart(mesh: Mesh) -> None:
    d = shop(mesh)
    before = mesh.services()
    agent = mesh.agent_pid()
    os.kill(agent, signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent), what="agent death")
    r = mesh.cli("up", "-d", cwd=d, check=True)
    assert "everything is up to date" in r.stderr
    after = mesh.services()
    assert after["web"]["pid"] == before["web"]["pid"]
    r = curl(f"http://web.localhost:{mesh.proxy_port}/")
    assert r.stdout.endswith("\n200"), r


def test_proxy_port_in_use_is_named_when_the_agent_starts(mesh: Mesh) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", mesh.proxy_port))
    holder.listen()
    try:
        d = mesh.project("shop", SHOP, {"server.py": SERVER, "web.py": WEB})
        r = mesh.cli("up", "-d", cwd=d)
    finally:
        holder.close()
    assert r.returncode == 1
    assert (
        f"cannot start the proxy: port {mesh.proxy_port} on 127.0.0.1 is already in use by pid "
        f"{os.getpid()}" in r.stderr
    )


SLOW = """
import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(5)
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def test_project_proxy_timeouts_and_body_limit_reach_the_agent_it_starts(mesh: Mesh) -> None:
    for key in ("DEVMESH_PROXY_PORT", "DEVMESH_HTTPS_PORT"):
        del mesh.env[key]  # let the file decide, as a user's first `up` does
    d = mesh.project(
        "limits",
        f"""
        version: 1
        proxy: {{port: {mesh.proxy_port}, https_port: {mesh.https_port}, idle_timeout_s: 0.5, max_body_mb: 1}}
        services:
          slow: {{version: 1.0.0, command: {PY} slow.py}}
        """,
        {"slow.py": SLOW},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    url = f"http://slow.localhost:{mesh.proxy_port}"
    assert curl(f"{url}/").stdout.endswith("ok\n200")
    r = curl(f"{url}/slow")
    assert r.stdout.endswith("\n504"), r.stdout
    assert "slow" in r.stdout
    big = mesh.root / "big.bin"
    big.write_bytes(b"x" * (2 * 2**20))
    r = curl("--data-binary", f"@{big}", f"{url}/upload")
    assert r.stdout.endswith("\n413"), r.stdout
    assert "1048576 bytes" in r.stdout


def test_bad_proxy_setting_in_the_environment_is_named(mesh: Mesh) -> None:
    mesh.env["DEVMESH_PROXY_IDLE_TIMEOUT_S"] = "soon"
    d = mesh.project("bad", SHOP, {"server.py": SERVER, "web.py": WEB})
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "cannot start the proxy: DEVMESH_PROXY_IDLE_TIMEOUT_S='soon' is not a number" in r.stderr

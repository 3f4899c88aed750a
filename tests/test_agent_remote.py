"""`remote: true` from an override file, end to end with a real agent.

The committed file runs web -> api, and api has a command and a fallback: a small real HTTP
server the test runs on loopback. A developer's devmesh.override.yaml says
``services: {api: {remote: true}}``: `up` starts web only, api's process never runs (it
would write a mark file at start), and web's API_URL is answered by the fallback. Without
the override, the same `up` starts api here and web's calls reach it.
"""

from __future__ import annotations

import json
import subprocess

from agentkit import PY, Mesh, alive

FROM_FALLBACK = json.dumps(
    {"from": "fallback", "path": "/orders", "env": {"DEVMESH_PROJECT": "fallback"}}
)
"""What the shared ``fallback`` fixture (conftest.py) answers to GET /orders."""

# Answers / with its caller-visible URLs (the env), /healthz with 200.
WEB = """
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        env = {k: v for k, v in os.environ.items() if k.endswith("_URL")}
        body = b"ok" if self.path == "/healthz" else json.dumps(env).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

# Leaves a mark when it starts, then answers every path with "local api".
API = """
import http.server, os, pathlib
pathlib.Path(os.environ["MARK"]).write_text(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"local api"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def curl(url: str, *headers: str) -> tuple[int, str]:
    args = ["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", url]
    for h in headers:
        args += ["-H", h]
    r = subprocess.run(args, capture_output=True, text=True, check=False, timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def api_url_of_web(mesh: Mesh) -> str:
    """web's API_URL as its process got it (what web's own calls to api use)."""
    code, body = curl(f"http://127.0.0.1:{mesh.proxy_port}/", "Host: web.localhost")
    assert code == 200, body
    return str(json.loads(body)["API_URL"])


def test_remote_in_the_override_keeps_api_off_this_machine_until_the_override_goes(
    mesh: Mesh, fallback: str
) -> None:
    mark = mesh.root / "api-started"
    folder = mesh.project(
        "shop",
        f"""\
        version: 1
        project: shop
        services:
          web:
            version: 1.0.0
            command: {PY} web.py
            health: {{http: /healthz, interval_s: 0.3}}
            depends_on: [api]
          api:
            version: 2.0.0
            command: {PY} api.py
            env:
              MARK: {mark}
            fallback: {fallback}
        """,
        {
            "web.py": WEB,
            "api.py": API,
            "devmesh.override.yaml": "services:\n  api:\n    remote: true\n",
        },
    )
    plan = mesh.cli("plan", cwd=folder, check=True)
    assert "api: remote - not run on this machine (remote: true)" in plan.stdout
    assert "api: start" not in plan.stdout
    r = mesh.cli("up", "-d", cwd=folder, timeout=90)
    assert r.returncode == 0, r.stderr
    services = mesh.services("shop")
    assert services["web"]["state"] == "running"
    assert services["api"]["state"] == "remote" and services["api"]["pid"] is None
    assert services["api"]["url"] == fallback
    status = mesh.cli("status", cwd=folder, check=True).stdout
    assert any(
        line.split()[1:2] == ["api"] and "remote" in line.split() for line in status.splitlines()
    )

    url = api_url_of_web(mesh)
    assert curl(url + "/orders") == (200, FROM_FALLBACK)
    assert not mark.exists()  # api's process never ran

    # Without the override the committed file runs api here, and web's calls reach it.
    (folder / "devmesh.override.yaml").unlink()
    r = mesh.cli("up", "-d", cwd=folder, timeout=90)
    assert r.returncode == 0, r.stderr
    assert mark.exists()
    api = mesh.services("shop")["api"]
    assert api["state"] == "running" and api["pid"] == int(mark.read_text())
    assert curl(api_url_of_web(mesh) + "/orders") == (200, "local api")

    # And back: the override again stops the local api; calls go to the fallback again.
    (folder / "devmesh.override.yaml").write_text("services:\n  api:\n    remote: true\n")
    r = mesh.cli("up", "-d", cwd=folder, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "api: stop" in r.stderr
    mesh.wait_for(
        lambda: mesh.services("shop")["api"]["state"] == "remote",
        what="api to be stopped and shown as remote",
    )
    assert not alive(api["pid"])
    assert curl(api_url_of_web(mesh) + "/orders") == (200, FROM_FALLBACK)

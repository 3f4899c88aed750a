"""A real agent in a private DEVMESH_HOME, driven through the real CLI, for the agent tests.

Every process a test starts carries DEVMESH_HOME=<its home> in its environment (services
inherit the CLI's environment), so `leftovers()` finds orphans by that mark and `close()`
kills them: no test can leak a process into the next, and tests can assert there are none.

Agents run no proxy worker processes unless a test asks for them (``Mesh(proxy_workers=N)``
or ``mesh.env["DEVMESH_PROXY_WORKERS"]``), so a test that counts the agent's processes counts
the agent alone, whatever the machine's core count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

PY = sys.executable


class Mesh:
    def __init__(self, *, proxy_workers: int = 0, netns: str | None = None) -> None:
        # Short path: a Unix socket path must fit in ~100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dmt-", dir="/tmp"))
        self.home = self.root / "home"
        self.proxy_port, self.https_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "DEVMESH_HOME": str(self.home),
            "NO_COLOR": "1",
            "DEVMESH_PROXY_PORT": str(self.proxy_port),
            "DEVMESH_HTTPS_PORT": str(self.https_port),
            "DEVMESH_PROXY_WORKERS": str(proxy_workers),
        }
        self.env.pop("DEVMESH_SECRET", None)
        self.agent: subprocess.Popen[bytes] | None = None
        self.netns = netns
        """Network namespace the agent (and so its services) runs in; the CLI talks to it
        over its Unix socket from anywhere."""

    # ---------------------------------------------------------------- files

    def project(self, name: str, yaml_text: str, files: dict[str, str] | None = None) -> Path:
        d = self.root / name
        d.mkdir(exist_ok=True)
        (d / "devmesh.yaml").write_text(textwrap.dedent(yaml_text))
        for rel, content in (files or {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(content))
        return d

    # ---------------------------------------------------------------- CLI

    def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [PY, "-m", "devmesh", *args],
            cwd=cwd or self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"devmesh {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def status(self, project: str | None = None) -> dict[str, Any]:
        args = ["status", "--json"] + (["-p", project] if project else [])
        return json.loads(self.cli(*args, check=True).stdout)

    def services(self, project: str | None = None) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.status(project)["services"]}

    def wait_for(self, predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")

    # ---------------------------------------------------------------- agent

    def start_agent(self) -> subprocess.Popen[bytes]:
        self.home.mkdir(exist_ok=True, mode=0o700)
        log = open(self.root / "agent-fg.log", "ab")  # noqa: SIM115
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.agent = subprocess.Popen(
            [*prefix, PY, "-m", "devmesh", "agent"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        agent = self.agent

        def up_or_dead() -> bool:
            if agent.poll() is not None:
                raise AssertionError(
                    f"the agent exited with {agent.returncode} before its socket appeared:\n"
                    + self._agent_output()
                )
            return (self.home / "agent.sock").exists()

        try:
            self.wait_for(up_or_dead, what="agent socket")
        except AssertionError as exc:
            if "exited with" in str(exc):
                raise
            raise AssertionError(f"{exc}\n{self._agent_output()}") from None
        return self.agent

    def _agent_output(self) -> str:
        """The last lines the agent wrote, for a test that fails while starting one."""
        parts = []
        for path in (self.root / "agent-fg.log", self.home / "agent.log"):
            try:
                lines = path.read_text(errors="replace").splitlines()[-30:]
            except OSError:
                continue
            parts.append(f"--- {path}:\n" + "\n".join(lines))
        return "\n".join(parts) or "(the agent wrote nothing)"

    def agent_pid(self) -> int | None:
        try:
            return int((self.home / "agent.pid").read_text())
        except (OSError, ValueError):
            return None

    def agent_log(self) -> str:
        """What the agent wrote (its stderr and stdout)."""
        try:
            return (self.root / "agent-fg.log").read_text(errors="replace")
        except OSError:
            return ""

    def access_entries(self) -> list[dict[str, Any]]:
        """The proxy's access log as it stands (JSON lines; flushed every quarter second)."""
        try:
            text = (self.home / "logs" / "proxy.log").read_text(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # ---------------------------------------------------------------- mesh

    def mesh_init(self, node_name: str, mesh: str = "team") -> None:
        """Create a team identity in this home (what `devmesh mesh init` does)."""
        self.home.mkdir(exist_ok=True, mode=0o700)
        _mesh_cli("init", "--home", str(self.home), "--mesh", mesh, "--node-name", node_name)

    def mesh_join(self, teammate: Mesh, node_name: str) -> None:
        """Install ``teammate``'s team bundle in this home (what `devmesh mesh join` does)."""
        self.home.mkdir(exist_ok=True, mode=0o700)
        bundle = self.root / "team.bundle"
        _mesh_cli("export", "--home", str(teammate.home), str(bundle))
        _mesh_cli("join", "--home", str(self.home), str(bundle), "--node-name", node_name)
        bundle.unlink()

    def secret(self) -> str:
        """The team secret as it is stored (base64), to check it never shows anywhere."""
        return (self.home / "mesh" / "secret").read_text().strip()

    def peers(self) -> dict[str, Any]:
        return json.loads(self.cli("peers", "--json", check=True).stdout)

    def alive_peers(self) -> set[str]:
        return {p["name"] for p in self.status().get("peers", []) if p["state"] == "alive"}

    # ---------------------------------------------------------------- processes

    def leftovers(self) -> list[int]:
        """Live processes (not zombies) that carry this home in their environment."""
        mark = f"DEVMESH_HOME={self.home}".encode()
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if mark in environ.split(b"\0") and stat.rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(entry))
        return out

    def close(self) -> None:
        pid = self.agent_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                self.wait_for(lambda: not _alive(pid), timeout=15, what="agent exit")
        for p in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if self.agent is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def _mesh_cli(*args: str) -> None:
    subprocess.run([PY, "-m", "devmesh.mesh", *args], check=True, capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def alive(pid: int) -> bool:
    return _alive(pid)


# A tiny HTTP service: listens on $PORT after $DELAY seconds, /healthz answers 200,
# / answers with its env; writes "<name> listening <time>" to $MARK when given.
SERVER = """
import http.server, json, os, sys, time
time.sleep(float(os.environ.get("DELAY", "0")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k: v for k, v in os.environ.items() if k.endswith("_URL") or k in ("PORT", "LOG_LEVEL", "DEVMESH_SERVICE", "DEVMESH_PROJECT")}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
if os.environ.get("MARK"):
    with open(os.environ["MARK"], "a") as f: f.write(f"{os.environ['DEVMESH_SERVICE']} listening {time.time()}\\n")
print(os.environ["DEVMESH_SERVICE"], "ready on", os.environ["PORT"], flush=True)
srv.serve_forever()
"""


# A service for routing tests: answers every path with who it is (service, NODE, branch) and
# what it received (headers, path); /call?dep=API&path=/x does what a caller does (GET
# $API_URL/x) and reports the status, headers and body it got; /sse streams events; /ws is a
# WebSocket echo; /work?ms=N answers after N ms; /healthz is not counted. Every other request
# appends a line to $COUNT_DIR/SERVICE-NODE.log when COUNT_DIR is set, so a test counts the
# requests each instance served. Binds $BIND (default 127.0.0.1) on $PORT.
ROUTE_SERVICE = r"""
import base64, hashlib, http.server, json, os, socket, socketserver, struct, sys, time, urllib.error, urllib.parse, urllib.request

NODE = os.environ.get("NODE", "?")
NAME = os.environ.get("DEVMESH_SERVICE", os.environ.get("NAME", "?"))
COUNT = os.environ.get("COUNT_DIR")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def _json(self, status, doc, extra=()):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        # Head and body in one write: a SIGKILL (the tests kill services under load) lands
        # before or after the answer, never between its head and its body.
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.flush_headers()

    def do_POST(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/healthz":
            return self._json(200, {"ok": True})
        if COUNT:
            with open(os.path.join(COUNT, f"{NAME}-{NODE}.log"), "a") as f:
                f.write(f"{self.command} {self.path}\n")
        if url.path == "/env":
            return self._json(200, dict(os.environ))
        if url.path == "/call":  # what a caller does: GET $DEP_URL + path, and say what came back
            target = os.environ[q.get("dep", "API") + "_URL"].rstrip("/") + q.get("path", "/")
            try:
                with OPENER.open(target, timeout=20) as r:
                    status, headers, got = r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                status, headers, got = e.code, dict(e.headers), e.read()
            try:
                got_doc = json.loads(got)
            except ValueError:
                got_doc = got.decode(errors="replace")
            return self._json(200, {"url": target, "status": status,
                                    "headers": {k.lower(): v for k, v in headers.items()},
                                    "body": got_doc})
        if url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for i in range(int(q.get("n", "5"))):
                self.wfile.write(f"id: {i}\ndata: {NODE} {i}\n\n".encode())
                self.wfile.flush()
                time.sleep(float(q.get("interval", "0.05")))
            return
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        if url.path == "/work":
            time.sleep(float(q.get("ms", "0")) / 1000)
        self._json(200, {"service": NAME, "node": NODE, "branch": os.environ.get("DEVMESH_BRANCH"),
                         "method": self.command, "path": self.path, "body_length": len(body),
                         "headers": {k.lower(): v for k, v in self.headers.items()}})

    def _websocket(self):
        # Echo text frames prefixed with the node name (client frames are masked).
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        rf = self.rfile
        while True:
            head = rf.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", rf.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", rf.read(8))[0]
            mask = rf.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(rf.read(n)))
            if opcode == 8:  # close: answer it and stop
                self.wfile.write(b"\x88\x02" + (data[:2] or b"\x03\xe8"))
                self.wfile.flush()
                return
            if opcode == 9:  # ping -> pong
                self.wfile.write(bytes([0x8A, len(data)]) + data)
                self.wfile.flush()
                continue
            out = f"{NODE}: ".encode() + data
            hdr = bytes([0x81, len(out)]) if len(out) < 126 else bytes([0x81, 126]) + struct.pack("!H", len(out))
            self.wfile.write(hdr + out)
            self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


srv = Server((os.environ.get("BIND", "127.0.0.1"), int(os.environ["PORT"])), H)
print(NAME, "on", NODE, "ready on", os.environ["PORT"], flush=True)
srv.serve_forever()
"""


class Machines:
    """N network-namespace "machines" (tests/netkit.py), one agent each, in one team.

    ``names[i]`` is machine i's node name; all join the team that machine 0 creates. Agents
    start on ``up``; ``close`` stops every agent and process and deletes the namespaces.
    """

    def __init__(self, names: list[str], *, proxy_workers: int = 0) -> None:
        from netkit import Net

        self.names = names
        self.net = Net(len(names))
        self.agents: list[Mesh] = []
        try:
            for i in range(len(names)):
                self.agents.append(Mesh(netns=self.net.hosts[i], proxy_workers=proxy_workers))
            self.agents[0].mesh_init(names[0])
            for i in range(1, len(names)):
                self.agents[i].mesh_join(self.agents[0], names[i])
        except BaseException:
            self.close()
            raise

    def up(self, i: int, project: str, yaml_text: str, files: dict[str, str]) -> Path:
        """Start machine i's agent if needed and ``devmesh up -d`` the project there."""
        m = self.agents[i]
        if m.agent is None:
            m.start_agent()
        d = m.project(project, yaml_text, files)
        m.cli("up", "-d", cwd=d, timeout=90, check=True)
        return d

    def kill(self, i: int) -> None:
        """The machine dies: SIGKILL every process in its namespace (agent, services, and
        whatever they started), at once."""
        self.net.kill_all(i)

    def close(self) -> None:
        for m in self.agents:
            m.close()
        for i in range(len(self.agents)):
            self.net.kill_all(i)  # what outlived its agent (a service that cleared its env)
        self.net.close()

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

"""Agent benchmark: how much time and memory devmesh itself adds on top of the services.

Why a script and not a test: the figures depend on the machine, so they are printed as
ratios against baselines measured in the same run (a service started directly, alone and 20
at once) and never asserted. Run it from the repository root:

    python bench/agent.py            # 20 services, about half a minute on 2 cores
    python bench/agent.py --services 5 --keep

It uses its own temporary DEVMESH_HOME and project folder, so it never touches the agent of
the user running it, and every process it starts is stopped at the end (``devmesh down``,
SIGTERM to the agent, SIGKILL to anything left). All traffic stays on 127.0.0.1.

What is measured:
- own start: a service process from spawn to answering GET /healthz, started directly;
  the slowest of N runs is what the issue's overhead figure subtracts;
- ``up -d`` (cold: the agent is started by it; warm: the agent already runs) until every
  service is healthy, minus the slowest own start = devmesh's overhead;
- a no-op ``up -d`` (median), ``status`` (median), the agent's RSS with the services running;
- ``-X importtime`` of ``status`` and of a no-op ``up -d``: the modules that cost the most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = '''\
"""A trivial service: GET /healthz -> 200 on 127.0.0.1:$PORT."""
import http.server
import os


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''

REPO = Path(__file__).resolve().parent.parent
ENV_NOISE = ("certifi", "certifi.core")
"""Imported on first use of anything by a .pth hook of some machines, not by devmesh."""
CLI_TIMEOUT_S = 120.0
"""No single CLI call may take longer than this."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):  # read to EOF so the server never sees a reset
                data += chunk
            return data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def start_direct(server: Path, count: int, timeout_s: float = 30.0) -> float:
    """Start ``count`` servers at once; seconds until the last one answers."""
    ports = [free_port() for _ in range(count)]
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for p in ports:
            env = dict(os.environ, PORT=str(p))
            procs.append(
                subprocess.Popen([sys.executable, str(server)], env=env, stderr=subprocess.DEVNULL)
            )
        pending = set(ports)
        deadline = t0 + timeout_s
        while pending:
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"direct start: ports {sorted(pending)} not ready in {timeout_s} s"
                )
            pending = {p for p in pending if not healthy(p)}
            if pending:
                time.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        for pr in procs:
            pr.kill()
        for pr in procs:
            pr.wait(10)


def write_project(folder: Path, services: int) -> Path:
    folder.mkdir(parents=True)
    server = folder / "server.py"
    server.write_text(SERVER)
    lines = ["version: 1", "project: bench", "services:"]
    for i in range(services):
        lines += [
            f"  svc{i:02d}:",
            "    version: 1.0.0",
            "    command: python3 server.py",
            "    port: auto",
            "    health: {http: /healthz}",
        ]
    (folder / "devmesh.yaml").write_text("\n".join(lines) + "\n")
    return server


class Bench:
    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.project = root / "project"
        self.env = dict(os.environ, DEVMESH_HOME=str(self.home), NO_COLOR="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.seen_pids: set[int] = set()

    def cli(self, *words: str, check: bool = True, extra: list[str] | None = None):
        argv = [sys.executable, *(extra or []), "-m", "devmesh", *words]
        t0 = time.perf_counter()
        r = subprocess.run(
            argv,
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        elapsed = time.perf_counter() - t0
        if check and r.returncode != 0:
            raise RuntimeError(
                f"`devmesh {' '.join(words)}` exited {r.returncode}:\n{r.stderr}{r.stdout}"
            )
        return elapsed, r

    def agent_pid(self) -> int | None:
        try:
            return int((self.home / "agent.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def status(self) -> dict:
        _, r = self.cli("status", "--json")
        data = json.loads(r.stdout)
        self.seen_pids |= {s["pid"] for s in data["services"] if s.get("pid")}
        return data

    def cleanup(self) -> None:
        if (self.home / "agent.sock").exists():
            try:
                self.cli("down", check=False)
            except subprocess.TimeoutExpired:
                pass
        pid = self.agent_pid()
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            _wait_gone(pid, 15.0)
            _signal(pid, signal.SIGKILL)
        for p in self.seen_pids:  # only if the agent failed to stop them
            _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM (peak) in MiB from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "devmesh" else parts[0]


def import_offenders(stderr: str, top: int) -> tuple[float, list[tuple[str, float]]]:
    """Import time beyond ``site`` and the costliest packages (ms, cumulative).

    A package's cost is the cumulative time of each place where another package first
    imports it, so ``jsonschema`` includes ``referencing`` and ``rpds`` it pulls in, and
    ``devmesh.config`` shows what a lazy import of the loader would save. ``site`` (the
    interpreter's own start-up, with the machine's .pth files) is listed but left out of
    the total; ENV_NOISE modules are left out altogether.
    """
    rows: list[tuple[int, str, float]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        if line.rstrip().endswith(ENV_NOISE):
            continue
        parts = line[len("import time:") :].split("|")
        cum_us, name = int(parts[1]), parts[2].rstrip()
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((depth, name.strip(), cum_us / 1000))
    total = sum(ms for depth, name, ms in rows if depth == 0 and name != "site")
    # importtime prints children before their parent; reversed, a row's parent is the
    # latest row one level up.
    packages: dict[str, float] = {}
    stack: list[str] = []
    for depth, name, ms in reversed(rows):
        del stack[depth:]
        parent = stack[-1] if stack else None
        stack.append(name)
        pkg = _package(name)
        if parent is None or _package(parent) != pkg:
            if parent is not None and parent == "site":
                continue  # the interpreter's start-up, counted under site
            packages[pkg] = packages.get(pkg, 0.0) + ms
    ranked = sorted(packages.items(), key=lambda r: -r[1])
    return total, ranked[:top]


def fmt_row(what: str, value: str, goal: str, ratio: str) -> str:
    return f"{what:<44} {value:>10} {goal:>9} {ratio:>8}"


def run(services: int, noop_runs: int, status_runs: int, own_runs: int, top: int, root: Path):
    server = write_project(root / "project", services)
    b = Bench(root)
    report: list[str] = []
    try:
        singles = [start_direct(server, 1) for _ in range(own_runs)]
        own_slowest = max(singles)
        parallel = start_direct(server, services)

        cold, r = b.cli("up", "-d")
        data = b.status()
        states = {s["state"] for s in data["services"]}
        if len(data["services"]) != services or states != {"running"}:
            raise RuntimeError(f"after up -d: {len(data['services'])} services, states {states}")
        pid = b.agent_pid()
        assert pid is not None, "no agent.pid after up -d"
        rss, hwm = rss_mb(pid)

        noops = []
        for _ in range(noop_runs):
            t, r = b.cli("up", "-d")
            if "everything is up to date" not in r.stderr:
                raise RuntimeError(f"a second `up -d` changed something:\n{r.stderr}")
            noops.append(t)
        if b.status()["services"] != data["services"]:
            # pids and restarts must be the same: nothing restarted
            before = {s["name"]: (s["pid"], s["restarts"]) for s in data["services"]}
            after = {s["name"]: (s["pid"], s["restarts"]) for s in b.status()["services"]}
            if before != after:
                raise RuntimeError("a no-op `up -d` restarted services")
        stat = [b.cli("status")[0] for _ in range(status_runs)]
        _, r_status = b.cli("status", extra=["-X", "importtime"])
        _, r_up = b.cli("up", "-d", extra=["-X", "importtime"])
        _, r_bare = b.cli("--version", extra=["-X", "importtime"])

        b.cli("down")
        warm, _ = b.cli("up", "-d")
        b.status()
        rss2, hwm2 = rss_mb(pid)
    finally:
        b.cleanup()

    med = statistics.median
    report.append(
        f"devmesh agent benchmark: {services} services, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs"
    )
    report.append("")
    report.append(fmt_row("measure", "value", "goal", "ratio"))
    report.append(fmt_row("own start, 1 service (median / slowest)", "", "", ""))
    report.append(
        fmt_row(f"  of {own_runs} runs", f"{med(singles):.3f}/{own_slowest:.3f} s", "", "")
    )
    report.append(fmt_row(f"direct start, {services} at once", f"{parallel:.3f} s", "", ""))
    for label, wall in (("cold (starts the agent)", cold), ("warm (agent running)", warm)):
        over = wall - own_slowest
        report.append(fmt_row(f"up -d {label}", f"{wall:.3f} s", "", ""))
        report.append(
            fmt_row(
                "  overhead = wall - slowest own start",
                f"{over:.3f} s",
                "< 1 s",
                f"{over / 1.0:.2f}",
            )
        )
        report.append(
            fmt_row(
                f"  vs direct start of {services} at once",
                f"+{wall - parallel:.3f} s",
                "",
                f"x{wall / parallel:.2f}",
            )
        )
    report.append(
        fmt_row(
            f"no-op up -d (median of {noop_runs})",
            f"{med(noops):.3f} s",
            "< 0.3 s",
            f"{med(noops) / 0.3:.2f}",
        )
    )
    report.append(
        fmt_row(
            f"status (median of {status_runs})",
            f"{med(stat):.3f} s",
            "< 0.25 s",
            f"{med(stat) / 0.25:.2f}",
        )
    )
    report.append(
        fmt_row(
            f"agent RSS, {services} services (VmRSS)",
            f"{rss:.1f} MiB",
            "< 60 MB",
            f"{rss * 1.048576 / 60:.2f}",
        )
    )
    report.append(fmt_row("  peak (VmHWM) / after down + up", f"{hwm:.1f}/{rss2:.1f}", "", ""))
    del hwm2
    for title, res in (
        ("devmesh --version", r_bare),
        ("devmesh status", r_status),
        ("devmesh up -d (no-op)", r_up),
    ):
        total, offenders = import_offenders(res.stderr, top)
        report.append("")
        report.append(
            f"import time of `{title}`: {total:.0f} ms beyond `site`; costliest (cumulative):"
        )
        report.extend(f"  {ms:7.1f} ms  {name}" for name, ms in offenders)
    return "\n".join(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--noop-runs", type=int, default=5)
    ap.add_argument("--status-runs", type=int, default=10)
    ap.add_argument("--own-runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="import offenders to list")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    a = ap.parse_args()
    if not 1 <= a.services <= 100:
        ap.error("--services must be between 1 and 100")
    root = Path(tempfile.mkdtemp(prefix="devmesh-bench-"))
    try:
        print(run(a.services, a.noop_runs, a.status_runs, a.own_runs, a.top, root))
    finally:
        if a.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

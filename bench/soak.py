"""Endurance: minutes of mixed traffic through two agents; memory, files, tasks and failures
each minute (not a test; run as root: it builds network namespaces).

    .venv/bin/python bench/soak.py [--minutes 10] [--kill-every 60]

Two network-namespace "machines" of one team (tests/netkit.py), one devmesh agent each:
alpha runs ``web`` and ``flaky`` (tests/agentkit.py's ROUTE_SERVICE) and declares ``api``
without a command; beta runs ``api`` and shares it, so alpha's calls to it cross the peer
hop. Inside alpha's namespace, one client thread per kind of traffic, back to back:

- keep-alive:  GET web.localhost on one connection
- fresh:       GET web.localhost, a new connection each (``Connection: close``)
- https:       GET web.localhost over TLS (verified against the agent's CA), keep-alive
- websocket:   connect ws://web.localhost/ws, five echoes, close
- sse:         GET /sse (five events), read to the end
- peer hop:    GET api.localhost: alpha's proxy -> mTLS -> beta's proxy -> beta's api
- flaky:       GET flaky.localhost, a service SIGKILLed every ``--kill-every`` seconds (the
               agent restarts it); the proxy's own 502 while it is down is counted as
               ``down``, not as a failure (nothing could answer); any other answer is a
               failure

Every minute it prints the requests and failures of that minute and, for both agents, RSS,
open files and asyncio tasks (``status --json``'s ``proxy.tasks``). Goal: flat after
warm-up (RSS under 5 % growth from the first minute to the last), 0 failed requests. At the
end the traffic stops and, once no client connection is left, the open files and tasks are
compared with the same quiet moment after the first minute: what is still held then is a
leak. Every loop is bounded by the run's duration; everything stays inside the namespaces.
tests/test_soak.py runs two minutes of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agentkit import PY, ROUTE_SERVICE, Machines
from netkit import NsHTTP, ns_socket

ALPHA, BETA = 0, 1
MESH = (
    "version: 1\nproject: shop\n"
    "mesh:\n  name: team\n  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
    "services:\n"
)


def _svc(name: str, node: str, *, share: bool = False) -> str:
    return (
        f"  {name}:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        + ("    share: true\n" if share else "")
        + "    health: {http: /healthz, interval_s: 0.5}\n"
        + f"    env: {{NODE: {node}}}\n"
    )


ALPHA_YAML = MESH + _svc("web", "alpha") + _svc("flaky", "alpha") + "  api: {}\n"
BETA_YAML = MESH + _svc("api", "beta", share=True)


@dataclasses.dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    down: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int
    tasks: int
    connections: int


@dataclasses.dataclass(frozen=True)
class Minute:
    minute: int
    requests: int
    failed: int
    down: int
    alpha: Usage
    beta: Usage


def usage(agent: Any) -> Usage:
    pid = agent.agent_pid()
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    proxy = agent.status()["proxy"]
    return Usage(rss, fds, int(proxy["tasks"]), int(proxy["connections"]))


class Soak:
    """The two machines and the traffic; ``with Soak() as s: s.run(...)``."""

    def __init__(self) -> None:
        self.m = Machines(["alpha", "beta"])
        try:
            files = {"svc.py": ROUTE_SERVICE}
            self.m.up(BETA, "shop", BETA_YAML, files)
            self.m.up(ALPHA, "shop", ALPHA_YAML, files)
            self.alpha, self.beta = self.m.agents[ALPHA], self.m.agents[BETA]
            self.ns = self.m.net.hosts[ALPHA]
            self.port = self.alpha.proxy_port
            self.https_port = self.alpha.https_port
            ca = self.alpha.cli("ca", "path", check=True).stdout.strip()
            self.tls = ssl.create_default_context(cafile=ca)
            self._wait_hop()
        except BaseException:
            self.m.close()
            raise
        self.counts: dict[str, Counts] = {}
        self.kills = 0
        """How many times flaky was SIGKILLed."""
        self.lock = threading.Lock()

    def __enter__(self) -> Soak:
        return self

    def __exit__(self, *exc: object) -> None:
        self.m.close()

    def _wait_hop(self) -> None:
        def ready() -> bool:
            try:
                status, body = self._get("api.localhost", "/ready")
            except OSError:
                return False
            return status == 200 and json.loads(body).get("node") == "beta"

        self.alpha.wait_for(ready, timeout=60, what="api on beta through alpha's proxy")

    def _get(self, host: str, path: str) -> tuple[int, bytes]:
        with NsHTTP(self.ns, "127.0.0.1", self.port) as c:
            r = c.request("GET", path, headers={"Host": f"{host}:{self.port}"})
            return r.status, r.body

    # -- the flows: each returns when ``stop`` is set; one iteration is one request --------

    def _count(self, flow: str, outcome: str, error: str = "") -> None:
        with self.lock:
            c = self.counts.setdefault(flow, Counts())
            if outcome == "ok":
                c.ok += 1
            elif outcome == "down":
                c.down += 1
            else:
                c.failed += 1
                if len(c.errors) < 5:
                    c.errors.append(error[:300])

    def _loop(self, flow: str, stop: threading.Event, one: Callable[[], str]) -> None:
        while not stop.is_set():
            try:
                outcome = one()
                self._count(flow, outcome, outcome)
            except Exception as exc:
                self._count(flow, "failed", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _check(status: int, body: bytes, service: str, node: str = "alpha") -> str:
        if status != 200:
            return f"{status} {body[:200]!r}"
        doc = json.loads(body)
        if doc.get("service") != service or doc.get("node") != node:
            return f"wrong answer {doc.get('service')}@{doc.get('node')}"
        return "ok"

    def _keepalive(
        self, stop: threading.Event, host: str, service: str, node: str
    ) -> Iterator[str]:
        with NsHTTP(self.ns, "127.0.0.1", self.port) as c:
            while not stop.is_set():
                r = c.request("GET", "/soak", headers={"Host": f"{host}:{self.port}"})
                yield self._check(r.status, r.body, service, node)

    def flows(self, stop: threading.Event) -> dict[str, Callable[[], None]]:
        def keepalive(
            flow: str, host: str, service: str, node: str = "alpha"
        ) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    try:
                        for outcome in self._keepalive(stop, host, service, node):
                            self._count(flow, outcome, outcome)
                    except Exception as exc:
                        self._count(flow, "failed", f"{type(exc).__name__}: {exc}")

            return run

        def fresh() -> str:
            with NsHTTP(self.ns, "127.0.0.1", self.port) as c:
                r = c.request(
                    "GET",
                    "/fresh",
                    headers={"Host": f"web.localhost:{self.port}", "Connection": "close"},
                )
                return self._check(r.status, r.body, "web")

        outer = self

        class _TLS(http.client.HTTPSConnection):
            def connect(self) -> None:
                raw = ns_socket(outer.ns, "127.0.0.1", outer.https_port)
                self.sock = outer.tls.wrap_socket(raw, server_hostname="web.localhost")

        def https() -> None:
            while not stop.is_set():
                conn = _TLS("web.localhost", self.https_port, timeout=10)
                try:
                    while not stop.is_set():
                        conn.request(
                            "GET", "/tls", headers={"Host": f"web.localhost:{self.https_port}"}
                        )
                        r = conn.getresponse()
                        outcome = self._check(r.status, r.read(), "web")
                        self._count("https", outcome, outcome)
                except Exception as exc:
                    self._count("https", "failed", f"{type(exc).__name__}: {exc}")
                finally:
                    conn.close()

        def websocket() -> str:
            from websockets.sync.client import connect

            sock = ns_socket(self.ns, "127.0.0.1", self.port)
            with connect(f"ws://web.localhost:{self.port}/ws", sock=sock, open_timeout=10) as ws:
                for i in range(5):
                    ws.send(f"m{i}")
                    got = ws.recv(timeout=10)
                    if got != f"alpha: m{i}":
                        return f"websocket echo {got!r}"
            return "ok"

        def sse() -> str:
            with NsHTTP(self.ns, "127.0.0.1", self.port) as c:
                r = c.request(
                    "GET",
                    "/sse?n=5&interval=0.01",
                    headers={"Host": f"web.localhost:{self.port}"},
                    stream=True,
                )
                body = r.read()
                if r.status != 200 or body.count(b"data: alpha ") != 5:
                    return f"sse {r.status} {body[:200]!r}"
            return "ok"

        def flaky() -> None:
            with NsHTTP(self.ns, "127.0.0.1", self.port) as c:
                while not stop.is_set():
                    try:
                        r = c.request(
                            "GET", "/soak", headers={"Host": f"flaky.localhost:{self.port}"}
                        )
                    except Exception as exc:
                        self._count("flaky", "failed", f"{type(exc).__name__}: {exc}")
                        continue
                    own = r.status == 502 and r.getheader("via", "").endswith("devmesh")
                    if own and b"flaky" in r.body:
                        self._count("flaky", "down")  # the proxy's word: nothing to answer
                        time.sleep(0.05)  # a client would not hammer a service that is down
                    else:
                        outcome = self._check(r.status, r.body, "flaky")
                        self._count("flaky", outcome, outcome)

        return {
            "keep-alive": keepalive("keep-alive", "web.localhost", "web"),
            "fresh": lambda: self._loop("fresh", stop, fresh),
            "https": https,
            "websocket": lambda: self._loop("websocket", stop, websocket),
            "sse": lambda: self._loop("sse", stop, sse),
            "peer hop": keepalive("peer hop", "api.localhost", "api", "beta"),
            "flaky": flaky,
        }

    def kill_flaky(self) -> None:
        """SIGKILL flaky's process; its agent restarts it."""
        pid = self.alpha.services("shop")["flaky"].get("pid")
        if pid:
            os.kill(int(pid), signal.SIGKILL)
            self.kills += 1

    def run(
        self,
        seconds: float,
        *,
        kill_every: float = 60.0,
        report: Callable[[Minute], None] | None = None,
        first_minute: int = 1,
    ) -> list[Minute]:
        """Traffic for ``seconds``, sampled every minute (and at the end); the samples."""
        stop = threading.Event()
        threads = [
            threading.Thread(target=f, daemon=True, name=n) for n, f in self.flows(stop).items()
        ]
        for t in threads:
            t.start()
        start = time.monotonic()
        next_kill = start + kill_every
        next_sample = start + 60.0
        minute = first_minute
        seen = self.totals()
        samples = []
        end = start + seconds
        try:
            while True:
                now = time.monotonic()
                if now >= end or now >= next_sample:
                    total = self.totals()
                    sample = Minute(
                        minute=minute,
                        requests=total[0] - seen[0],
                        failed=total[1] - seen[1],
                        down=total[2] - seen[2],
                        alpha=usage(self.alpha),
                        beta=usage(self.beta),
                    )
                    seen = total
                    samples.append(sample)
                    if report:
                        report(sample)
                    minute += 1
                    next_sample += 60.0
                    if now >= end:
                        break
                if now >= next_kill:
                    self.kill_flaky()
                    next_kill += kill_every
                time.sleep(min(1.0, max(0.0, min(end, next_sample, next_kill) - time.monotonic())))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        return samples

    def totals(self) -> tuple[int, int, int]:
        with self.lock:
            ok = sum(c.ok for c in self.counts.values())
            failed = sum(c.failed for c in self.counts.values())
            down = sum(c.down for c in self.counts.values())
        return ok + failed + down, failed, down

    def quiet(self) -> tuple[Usage, Usage]:
        """Both agents' usage once the traffic has stopped: alpha holds no client connection
        any more, flaky runs again, and beta's count of connections (alpha's pooled peer
        connections, kept alive) holds still."""

        def settled(agent: Any, want_none: bool) -> Usage | None:
            u = usage(agent)
            if want_none and u.connections:
                return None
            time.sleep(0.5)  # polling: the same reading half a second apart means settled
            again = usage(agent)
            return again if again == u else None

        self.alpha.wait_for(
            lambda: self.alpha.services("shop")["flaky"]["state"] == "running",
            timeout=60,
            what="flaky up",
        )
        a = self.alpha.wait_for(lambda: settled(self.alpha, True), timeout=60, what="alpha quiet")
        b = self.beta.wait_for(lambda: settled(self.beta, False), timeout=60, what="beta quiet")
        return a, b


def _row(s: Minute) -> str:
    return (
        f"{s.minute:>6} {s.requests:>9} {s.failed:>6} {s.down:>5}  "
        f"{s.alpha.rss_kib / 1024:>7.1f} {s.alpha.fds:>5} {s.alpha.tasks:>5}  "
        f"{s.beta.rss_kib / 1024:>7.1f} {s.beta.fds:>5} {s.beta.tasks:>5}"
    )


HEADER = (
    "minute  requests failed  down  alphaMiB   fds tasks   betaMiB   fds tasks\n"
    "------ --------- ------ -----  -------- ----- -----  -------- ----- -----"
)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between flaky's kills")
    args = p.parse_args()
    with Soak() as soak:
        print(HEADER, flush=True)
        report = lambda s: print(_row(s), flush=True)  # noqa: E731
        warm = soak.run(60.0, kill_every=args.kill_every, report=report)
        quiet_a, quiet_b = soak.quiet()
        rest = soak.run(
            (args.minutes - 1) * 60.0, kill_every=args.kill_every, report=report, first_minute=2
        )
        end_a, end_b = soak.quiet()
        samples = warm + rest
        print()
        for flow, c in sorted(soak.counts.items()):
            print(
                f"{flow:<11} ok {c.ok:>8}  failed {c.failed:>4}  down {c.down:>4}  {c.errors[:2]}"
            )
        first, last = samples[0], samples[-1]
        growth = (last.alpha.rss_kib - first.alpha.rss_kib) / first.alpha.rss_kib * 100
        growth_b = (last.beta.rss_kib - first.beta.rss_kib) / first.beta.rss_kib * 100
        failed = sum(s.failed for s in samples)
        print(
            f"\nRSS growth after warm-up: alpha {growth:+.1f} %, beta {growth_b:+.1f} %"
            " (goal < 5 %)"
            f"\nfailed requests: {failed} (goal 0); proxy's own 502 while flaky was down: "
            f"{sum(s.down for s in samples)}"
            f"\nquiet after minute 1 / at the end: alpha fds {quiet_a.fds} / {end_a.fds}, tasks "
            f"{quiet_a.tasks} / {end_a.tasks}; beta fds {quiet_b.fds} / {end_b.fds}, tasks "
            f"{quiet_b.tasks} / {end_b.tasks}"
        )
        ok = failed == 0 and growth < 5 and growth_b < 5
        ok = ok and end_a.fds <= quiet_a.fds and end_a.tasks <= quiet_a.tasks
        ok = ok and end_b.fds <= quiet_b.fds and end_b.tasks <= quiet_b.tasks
        print("goals met" if ok else "goals NOT met")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

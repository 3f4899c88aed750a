"""Test helpers: the proxy as a real child process, and a real upstream.

The proxy's tests and the agent's integration tests all need "a proxy process fed this route
table" and "an HTTP service that streams, stalls and counts its connections". Both use only
the standard library and bind only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ProxyProcess:
    """``python -m devmesh.proxy`` in a child process with a routes file it watches."""

    def __init__(
        self,
        routes: dict[str, Any],
        *,
        https: bool = False,
        args: tuple[str, ...] = (),
        home: Path | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="devmesh-proxy-"))
        self.home = home or self.dir / "home"
        self.routes_path = self.dir / "routes.json"
        self.access_log = self.dir / "access.log"
        self.routes_path.write_text(json.dumps(routes))
        cmd = [
            sys.executable,
            "-m",
            "devmesh.proxy",
            "--routes",
            str(self.routes_path),
            "--port",
            "0",
            "--home",
            str(self.home),
            "--access-log",
            str(self.access_log),
            *args,
        ]
        if https:
            cmd += ["--https-port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.proc.wait(5)
            raise RuntimeError(f"proxy did not start: {err}")
        info = json.loads(line)
        self.pid: int = info["pid"]
        self.port: int = info["http_port"]
        self.https_port: int | None = info["https_port"]
        self.edges: dict[tuple[str, str, str], int] = {
            (p, c, t): port for p, c, t, port in info["edges"]
        }

    def update_routes(self, routes: dict[str, Any]) -> None:
        """Replace the table. The proxy polls the file (a new inode is a change even within
        one mtime tick) and applies it within a second: wait for its effect (``wait_for``)."""
        tmp = self.routes_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(routes))
        tmp.replace(self.routes_path)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log_lines(self) -> list[str]:
        """The access log as written so far (the proxy flushes it every 0.25 s)."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def wait_log(self, predicate: Callable[[list[str]], bool], what: str) -> list[str]:
        """The access log's lines once ``predicate`` holds for them (deadline 10 s)."""
        return wait_for(lambda: (lines := self.log_lines()) and predicate(lines) and lines, what)

    def stop(self) -> str:
        """Stop the proxy; its stderr (empty when nothing went wrong)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        return err


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> tuple[int, str]:
        """Consume the request body chunk by chunk: (length, sha256) without holding it."""
        digest = hashlib.sha256()
        total = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    digest.update(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
                total += len(chunk)
        return total, digest.hexdigest()

    def handle_expect_100(self) -> bool:
        """``/reject-expect`` refuses any body up front, as a service with an upload limit
        does: a final 413 instead of ``100 Continue``, and the connection closes."""
        if not self.path.startswith("/reject-expect"):
            return super().handle_expect_100()
        with self.server.lock:
            self.server.expect_rejections += 1
        self.close_connection = True
        self._send(413, b"too large for this service\n", "text/plain", (("Connection", "close"),))
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self.do_GET()

    def do_PUT(self) -> None:
        self.do_GET()

    def do_DELETE(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        path = url.path
        if path.startswith("/status/"):
            self.send_response(int(path.rsplit("/", 1)[1]))
            if int(path.rsplit("/", 1)[1]) == 304:
                self.send_header("ETag", '"v1"')
            self.end_headers()
            return
        if path == "/download":
            n = int(q.get("n", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * (1 << 18)
            while n > 0:
                self.wfile.write(block[: min(n, len(block))])
                n -= len(block)
            return
        if path == "/sse":
            self._sse(int(q.get("n", "5")), float(q.get("interval", "0.05")), "gated" in q)
            return
        if path == "/hold":
            self.server.held.set()  # the request is here; the answer waits for release
            self.server.release.wait(10)
            self._send(200, b"released")
            return
        if path == "/sleep":
            time.sleep(float(q.get("s", "1")))
            self._send(200, b"slept")
            return
        if path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"y" * 10)
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        length, sha = self._read_body()
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "version": self.request_version,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body_length": length,
                "body_sha256": sha,
            }
        ).encode()
        self._send(200, body)

    def _sse(self, n: int, interval: float, gated: bool) -> None:
        """n events, one per ``interval`` or, ``gated``, one per release of ``sse_gate``
        (the test then knows which events can have been sent)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for i in range(n):
                self.wfile.write(f"id: {i}\ndata: event {i}\n\n".encode())
                self.wfile.flush()
                if not gated:
                    time.sleep(interval)
                elif i < n - 1 and not self.server.sse_gate.acquire(timeout=10):
                    return
        except OSError:
            with self.server.lock:
                self.server.sse_disconnects += 1


class UpstreamServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP/1.1 service on 127.0.0.1 that counts connections and disconnects."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.sse_disconnects = 0
        self.expect_rejections = 0
        self.sse_gate = threading.Semaphore(0)
        self.held = threading.Event()
        """Set once a request for /hold arrived."""
        self.release = threading.Event()
        """Set to let /hold answer."""

    @property
    def port(self) -> int:
        return self.server_address[1]


@contextlib.contextmanager
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class RawService:
    """A service written with raw sockets, for behaviour no HTTP library would produce.

    Each accepted connection runs ``handler(conn, number)`` in a thread of its own (numbered
    from 0); the connection is closed when the handler returns. Use as a context manager.
    """

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RawService:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number, self.accepted = self.accepted, self.accepted + 1
            thread = threading.Thread(target=self._serve, args=(conn, number), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            self.handler(conn, number)


def read_head(conn: socket.socket) -> bytes:
    """One request head from ``conn`` (b"" when the peer closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


def free_port() -> int:
    """A port nothing listens on right now (for connection-refused cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T | None], what: str, timeout_s: float = 10) -> T:
    """``predicate()``'s first truthy value, polled until the deadline (then AssertionError)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; last: {last!r}")


def env_without_proxy() -> dict[str, str]:
    """The environment minus *_proxy variables, so clients talk to our proxy directly."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


class InProcessProxy:
    """A ``ProxyServer`` on an event loop in a thread of its own, fed a table by assignment.

    Two or three of them in one test act as mesh nodes: each is what one agent runs. The
    test thread keeps using blocking clients (httpx, curl, websockets) against their ports.
    ``table`` is read on every request, so assigning a new one is a route change.
    """

    def __init__(
        self,
        routes: Any,
        folder: Path,
        *,
        https: bool = False,
        router: Any = None,
    ) -> None:
        import asyncio

        from devmesh.proxy import accesslog, ca, metrics, server, settings

        self.table = routes
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "access.log"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.metrics_dir = folder / "metrics"
        metrics.prepare(self.metrics_dir)
        self.recorder = metrics.Recorder(self.metrics_dir)
        """Counts every exchange, as the agent's proxy does (``metrics()`` reads them)."""
        self.server = server.ProxyServer(
            settings.Settings(port=0, https_port=0 if https else None, ipv6=False),
            lambda: self.table,
            ca.LocalCA(folder / "ca") if https else None,
            accesslog.AccessLog(self.log_path, json_lines=True),
            router=router,
            recorder=self.recorder,
        )
        self._task: asyncio.Task[None] | None = None

        async def begin() -> None:
            self._task = asyncio.ensure_future(self.server.serve())

        self.call(begin())
        wait_for(lambda: self.server.http_port, "the in-process proxy to listen")
        self.port: int = self.server.http_port or 0

    def call(self, coro: Any) -> Any:
        """Run a coroutine of the proxy (set_edges, set_peer_listener) on its loop."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the proxy's loop (its state is the loop's) and return its value."""
        import asyncio

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def entries(self) -> list[dict[str, Any]]:
        """The access log's JSON entries so far (flushed every 0.25 s)."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def wait_entries(self, count: int) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (e := self.entries()) and len(e) >= count and e, f"{count} log entries"
        )

    def close(self) -> None:
        import asyncio

        async def end() -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

        self.call(end())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.server.access_log.close()
        self.recorder.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``/metrics`` as this proxy answers it, parsed: (sample name, sorted labels) ->
        value (the proxy's own buffered counts are written first, on its loop)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.on_loop(self.recorder.exposition).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


class Node:
    """A mesh node for proxy tests: a team identity (``devmesh.mesh.identity``), its
    ``PeerTLS`` files, and an in-process proxy with its peer listener open on loopback."""

    def __init__(
        self,
        folder: Path,
        name: str,
        *,
        bundle: bytes | None = None,
        mesh_name: str = "team",
        refuse: frozenset[str] = frozenset(),
        https: bool = False,
        router: Any = None,
        catalog: bytes = b'{"services": []}',
        listener_options: dict[str, Any] | None = None,
    ) -> None:
        """``listener_options``: more ``PeerListener`` fields (a small connection cap)."""
        from devmesh.mesh import channel
        from devmesh.mesh import identity as ids
        from devmesh.proxy import peering, table

        home = folder / name
        if bundle is None:
            self.identity = ids.init(home, mesh_name, node_name=name)
        else:
            self.identity = ids.join(home, bundle, node_name=name)
        self.name = name
        self.mesh_name = mesh_name
        self.refuse = set(refuse)
        self.bundle = ids.encode_bundle(self.identity.team)
        self.tls = table.PeerTLS(
            ca_file=str(self.identity.ca_path),
            cert_file=str(self.identity.node_cert_path),
            key_file=str(self.identity.node_key_path),
            node_id=self.identity.node_id,
            node_name=name,
        )
        self.proxy = InProcessProxy(
            table.RouteTable(peer_tls=self.tls),
            folder / f"{name}-proxy",
            https=https,
            router=router,
        )

        def authorize(cert: dict[str, object] | None, ip: str) -> Any:
            peer = channel.peer_identity(cert, mesh_name, ip)
            if peer is None:
                return "no team certificate"
            if peer.node_name in self.refuse:
                return f"{peer.node_name} is not in mesh.allow"
            return peering.PeerCaller(node_id=peer.node_id, node_name=peer.node_name, address=ip)

        listener = peering.PeerListener(
            host="127.0.0.1",
            port=0,
            ssl_context=channel.server_context(self.identity),
            authorize=authorize,
            catalog=lambda: catalog,
            **(listener_options or {}),
        )
        self.peer_port: int = self.proxy.call(self.proxy.server.set_peer_listener(listener))

    def instance(self, project: str, service: str, **kw: Any) -> Any:
        """This node's shared instance as a peer's table lists it."""
        from devmesh.proxy import table

        return table.PeerInstance(
            node_id=self.identity.node_id,
            node_name=self.name,
            server_name=self.identity.node_id_dns_name,
            host="127.0.0.1",
            port=self.peer_port,
            project=project,
            service=service,
            **kw,
        )

    def set_table(self, **kw: Any) -> None:
        from devmesh.proxy import table

        self.proxy.table = table.RouteTable(peer_tls=self.tls, **kw)

    def close(self) -> None:
        self.proxy.close()

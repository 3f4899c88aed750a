"""Control-API transport: a real server on a temp Unix socket, driven by real clients.

The server runs in an anyio blocking portal (its own thread and event loop); the tests talk
to it with devmesh's synchronous client, httpx, or a raw socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from devmesh.agent import client, http_server


@dataclass
class Probe:
    """What the server-side handlers saw, for the test thread to check."""

    gate: anyio.Event | None = None
    sent: list[int] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


def build_router(probe: Probe) -> http_server.Router:
    router = http_server.Router()

    @router.route("GET", "/echo")
    async def echo(req: http_server.Request) -> http_server.Response:
        return http_server.Response(200, {"path": req.path, "query": req.query})

    @router.route("POST", "/v1/projects/{name}/up")
    async def up(req: http_server.Request) -> http_server.Response:
        return http_server.Response(201, {"name": req.params["name"], "body": req.json()})

    @router.route("GET", "/v1/projects/{name}/up")
    async def up_status(req: http_server.Request) -> http_server.Response:
        return http_server.Response(200, None)

    @router.route("GET", "/teapot")
    async def teapot(req: http_server.Request) -> http_server.Response:
        raise http_server.ApiError(418, "short and stout")

    @router.route("GET", "/boom")
    async def boom(req: http_server.Request) -> http_server.Response:
        raise RuntimeError("boom")

    @router.route("GET", "/unencodable")
    async def unencodable(req: http_server.Request) -> http_server.Response:
        return http_server.Response(200, {1, 2})

    @router.route("GET", "/not-a-response")
    async def not_a_response(req: http_server.Request) -> Any:
        return {"oops": True}

    @router.route("GET", "/slow")
    async def slow(req: http_server.Request) -> http_server.Response:
        await anyio.sleep(30)
        return http_server.Response(200, "late")

    async def gated() -> AsyncIterator[int]:
        probe.gate = anyio.Event()
        probe.sent.append(1)
        yield 1
        await probe.gate.wait()
        probe.sent.append(2)
        yield 2

    @router.route("GET", "/gated")
    async def gated_stream(req: http_server.Request) -> http_server.StreamResponse:
        return http_server.StreamResponse(200, gated())

    async def forever() -> AsyncIterator[dict[str, int]]:
        try:
            for i in range(10_000):
                yield {"n": i}
                await anyio.sleep(0.01)
        finally:
            probe.closed.set()

    @router.route("GET", "/forever")
    async def forever_stream(req: http_server.Request) -> http_server.StreamResponse:
        return http_server.StreamResponse(200, forever())

    async def failing() -> AsyncIterator[str]:
        yield "one"
        raise RuntimeError("disk gone\nreally")

    @router.route("GET", "/failing")
    async def failing_stream(req: http_server.Request) -> http_server.StreamResponse:
        return http_server.StreamResponse(200, failing())

    return router


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short, not pytest's tmp_path: Unix socket paths must stay under ~107 bytes.
    path = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p


async def serve_then_signal(
    path: Path,
    router: http_server.Router,
    done: threading.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await http_server.serve_unix(path, router, task_status=task_status)
    finally:
        done.set()


@contextlib.contextmanager
def running(portal: BlockingPortal, path: Path, router: http_server.Router) -> Iterator[None]:
    """Serve until the block ends, then wait until serve_unix has really returned."""
    done = threading.Event()
    future, _ = portal.start_task(serve_then_signal, path, router, done)
    try:
        yield
    finally:
        future.cancel()
        assert done.wait(10)


@pytest.fixture
def server(sock_dir: Path, portal: BlockingPortal) -> Iterator[tuple[Path, Probe]]:
    path = sock_dir / "agent.sock"
    probe = Probe()
    with running(portal, path, build_router(probe)):
        yield path, probe


def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send bytes, then read until the server closes or 2 s of silence."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_json_request_and_response(server: tuple[Path, Probe]) -> None:
    c = client.Client(server[0])
    got = c.request("POST", "/v1/projects/web%20app/up", {"services": [1, 2]})
    assert got == {"name": "web app", "body": {"services": [1, 2]}}
    assert c.request("GET", "/echo", query={"tail": "10", "q": "a b&c"}) == {
        "path": "/echo",
        "query": {"tail": "10", "q": "a b&c"},
    }
    assert c.request("GET", "/v1/projects/x/up") is None


def test_api_error_carries_status_and_message(server: tuple[Path, Probe]) -> None:
    with pytest.raises(client.ApiError) as info:
        client.Client(server[0]).request("GET", "/teapot")
    assert (info.value.status, info.value.message) == (418, "short and stout")
    assert str(info.value) == "418: short and stout"


def test_unknown_path_is_404_and_wrong_method_405(server: tuple[Path, Probe]) -> None:
    c = client.Client(server[0])
    with pytest.raises(client.ApiError) as info:
        c.request("GET", "/v1/nope")
    assert (info.value.status, info.value.message) == (404, "no such endpoint: GET /v1/nope")
    with pytest.raises(client.ApiError) as info:
        c.request("DELETE", "/v1/projects/x/up")
    assert info.value.status == 405
    assert info.value.message == "DELETE is not allowed on /v1/projects/x/up (allowed: GET, POST)"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(server[0]))) as hx:
        r = hx.delete("http://agent/v1/projects/x/up")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"


def test_bad_json_body_is_400(server: tuple[Path, Probe]) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(server[0]))) as hx:
        r = hx.post("http://agent/v1/projects/x/up", content=b"{nope")
        assert r.status_code == 400
        assert r.json() == {
            "error": "request body is not valid JSON: Expecting property name enclosed in "
            "double quotes: line 1 column 2 (char 1)"
        }
        r = hx.post("http://agent/v1/projects/x/up")
        assert r.status_code == 400
        assert r.json() == {"error": "POST /v1/projects/x/up expects a JSON body"}


def test_handler_crash_is_500_and_server_keeps_serving(server: tuple[Path, Probe]) -> None:
    c = client.Client(server[0])
    with pytest.raises(client.ApiError) as info:
        c.request("GET", "/boom")
    assert (info.value.status, info.value.message) == (500, "internal error: RuntimeError: boom")
    with pytest.raises(client.ApiError) as info:
        c.request("GET", "/unencodable")
    assert (
        info.value.message
        == "internal error: TypeError: Object of type set is not JSON serializable"
    )
    with pytest.raises(client.ApiError) as info:
        c.request("GET", "/not-a-response")
    assert info.value.message == "internal error: TypeError: handler returned dict, not a Response"
    assert c.request("GET", "/echo")["path"] == "/echo"


def test_malformed_http_is_400_and_server_keeps_serving(server: tuple[Path, Probe]) -> None:
    reply = raw_exchange(server[0], b"NOT AN HTTP REQUEST\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"].startswith("malformed HTTP request: ")
    assert raw_exchange(server[0], b"\x00\xff" * 100).startswith(b"HTTP/1.1 400 ")
    assert client.Client(server[0]).request("GET", "/echo")["path"] == "/echo"


def test_oversized_body_is_413(server: tuple[Path, Probe]) -> None:
    size = http_server.MAX_BODY_BYTES + 1
    head = f"POST /v1/projects/x/up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server[0]))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head.encode() + b"x" * size)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head_bytes, _, body = reply.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body) == {"error": f"request body exceeds {http_server.MAX_BODY_BYTES} bytes"}


def test_keep_alive_serves_several_requests_on_one_connection(server: tuple[Path, Probe]) -> None:
    one = b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    two = b"GET /echo?n=2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(server[0], one + two)
    assert reply.count(b"HTTP/1.1 200 ") == 2
    assert b'"query": {"n": "1"}' in reply
    assert b'"query": {"n": "2"}' in reply


def test_stream_items_arrive_before_the_stream_ends(
    server: tuple[Path, Probe], portal: BlockingPortal
) -> None:
    path, probe = server
    items = client.Client(path).stream("GET", "/gated")
    assert next(items) == 1
    assert probe.sent == [1]  # the server is still waiting at the gate
    assert probe.gate is not None
    portal.call(probe.gate.set)
    assert list(items) == [2]
    assert probe.sent == [1, 2]


def test_client_disconnect_closes_the_server_iterator(server: tuple[Path, Probe]) -> None:
    path, probe = server
    items = client.Client(path).stream("GET", "/forever")
    assert [next(items), next(items)] == [{"n": 0}, {"n": 1}]
    items.close()
    assert probe.closed.wait(5)
    assert client.Client(path).request("GET", "/echo")["path"] == "/echo"


def test_stream_that_fails_midway_raises_after_its_items(server: tuple[Path, Probe]) -> None:
    got: list[Any] = []
    with pytest.raises(client.ApiError) as info:
        got.extend(client.Client(server[0]).stream("GET", "/failing"))
    assert got == ["one"]
    assert (info.value.status, info.value.message) == (
        500,
        "internal error: RuntimeError: disk gone really",
    )


def test_stream_error_status_raises(server: tuple[Path, Probe]) -> None:
    with pytest.raises(client.ApiError) as info:
        list(client.Client(server[0]).stream("GET", "/teapot"))
    assert (info.value.status, info.value.message) == (418, "short and stout")


def test_client_timeout_is_unreachable(server: tuple[Path, Probe]) -> None:
    with pytest.raises(client.AgentUnreachable) as info:
        client.Client(server[0], timeout_s=0.2).request("GET", "/slow")
    assert (
        str(info.value) == f"cannot reach the devmesh agent at {server[0]}: no answer within 0.2 s"
    )
    assert client.Client(server[0]).request("GET", "/echo")["path"] == "/echo"


def test_socket_is_private(server: tuple[Path, Probe]) -> None:
    mode = server[0].stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert sorted(p.name for p in server[0].parent.iterdir()) == ["agent.sock"]


def test_stale_socket_file_is_replaced(sock_dir: Path, portal: BlockingPortal) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking: what a killed agent leaves
    with pytest.raises(client.AgentUnreachable):
        client.Client(path).request("GET", "/echo")
    with running(portal, path, build_router(Probe())):
        assert client.Client(path).request("GET", "/echo")["path"] == "/echo"
    assert not path.exists()


def test_second_server_on_a_live_socket_is_refused(
    server: tuple[Path, Probe], portal: BlockingPortal
) -> None:
    path = server[0]
    with pytest.raises(http_server.SocketInUse) as info:
        portal.call(http_server.serve_unix, path, build_router(Probe()))
    assert str(info.value) == (
        f"cannot serve the control API on {path}: another server is answering on it"
    )
    assert client.Client(path).request("GET", "/echo")["path"] == "/echo"


def test_non_socket_path_is_refused(sock_dir: Path, portal: BlockingPortal) -> None:
    path = sock_dir / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(http_server.SocketInUse) as info:
        portal.call(http_server.serve_unix, path, build_router(Probe()))
    assert str(info.value) == (
        f"cannot serve the control API on {path}: the path exists and is not a socket"
    )
    assert path.read_text() == "not a socket"


def test_too_long_socket_path_is_refused(sock_dir: Path, portal: BlockingPortal) -> None:
    path = sock_dir / ("d" * 100) / "agent.sock"
    with pytest.raises(http_server.SocketPathTooLong, match="too long for a Unix socket"):
        portal.call(http_server.serve_unix, path, build_router(Probe()))


def test_unreachable_when_socket_missing(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    with pytest.raises(client.AgentUnreachable) as info:
        client.Client(path).request("GET", "/v1/status")
    assert info.value.socket_path == path
    assert str(info.value) == (
        f"cannot reach the devmesh agent at {path}: no socket file (is the agent running?)"
    )


def test_unreachable_when_socket_stale(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    with pytest.raises(client.AgentUnreachable) as info:
        next(client.Client(path).stream("GET", "/v1/logs"))
    assert str(info.value) == (
        f"cannot reach the devmesh agent at {path}: "
        "connection refused (stale socket: the agent is not running)"
    )


def test_duplicate_route_is_rejected() -> None:
    router = http_server.Router()

    async def handler(req: http_server.Request) -> http_server.Response:
        return http_server.Response(200, None)

    router.route("GET", "/a/{x}")(handler)
    with pytest.raises(ValueError, match=r"^route GET /a/\{x\} is registered twice$"):
        router.route("get", "/a/{x}")(handler)


def test_client_module_imports_no_async_stack() -> None:
    code = "import sys, devmesh.agent.client; print(sorted({'anyio', 'httpx'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.stdout.strip() == "[]"

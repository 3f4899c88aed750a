"""Malformed input thrown at the proxy process: never a crash, a 4xx, and it keeps serving."""

from __future__ import annotations

import socket

import httpx
import proxykit
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def proxy():
    with proxykit.upstream() as up:
        p = proxykit.ProxyProcess(
            {"backends": [{"project": "p", "service": "api", "port": up.port}]},
            args=("--max-header", "4096", "--idle-timeout", "2"),
        )
        yield p
        assert p.stop() == ""


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may answer and close before reading everything
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


token = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20)
methods = st.sampled_from(["GET", "POST", "PUT", "HEAD", "G ET", "", "\x00", "OPTIONS"])
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", "", "HTTP/1.1 x"])
hosts = st.sampled_from(
    [
        "api.localhost",
        "api.p.localhost",
        "",
        "x" * 300,
        "[::1]:1",
        "a..localhost",
        "api.localhost:abc",
        "devmesh.localhost",
    ]
)
headers = st.lists(st.tuples(token, token), max_size=6)
framing = st.sampled_from(
    [
        "",
        "Content-Length: 5\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1, 2\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        "Expect: 100-continue\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket\r\n",
        "X-Big: " + "b" * 5000 + "\r\n",
    ]
)
bodies = st.sampled_from(
    [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]
)


@st.composite
def requests(draw) -> bytes:
    head = f"{draw(methods)} {draw(token)} {draw(versions)}\r\n"
    head += f"Host: {draw(hosts)}\r\n" if draw(st.booleans()) else ""
    head += "".join(f"{k}: {v}\r\n" for k, v in draw(headers))
    head += draw(framing) + "\r\n"
    return head.encode("latin-1") + draw(bodies)


ALLOWED = {b"200", b"400", b"404", b"405", b"413", b"431", b"501", b"502"}


def check(proxy, data: bytes) -> None:
    out = exchange(proxy.port, data)
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:200]
        status = out[9:12]
        assert status in ALLOWED, out[:300]
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/echo", headers={"host": "api.localhost"})
    assert r.status_code == 200
    assert proxy.proc.poll() is None


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=requests())
def test_structured_garbage(proxy, data):
    check(proxy, data)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=2000))
def test_random_bytes(proxy, data):
    check(proxy, data)

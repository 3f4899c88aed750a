"""Malformed input thrown at the proxy process: never a crash, and it keeps serving.

Every output is checked against h11 (the proxy's parser) as the oracle: bytes that are no
request get exactly one plain 400 (431 for a head too large) and a close; a close before any
request gets no answer; a request gets whole HTTP/1.1 answers, each passed through the proxy.
"""

from __future__ import annotations

import re
import socket
from http import HTTPStatus

import h11
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


ANSWER = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


def h11_verdict(data: bytes) -> int | str | None:
    """What h11, the proxy's parser, makes of the bytes followed by the client's EOF: the
    proxy's status for bytes that are no request (400, or 431 for a head too large), None
    for a close before any request, "request" when a request head parses."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=4096)
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return 431 if exc.error_status_hint == 431 else 400
    return None if type(event) is h11.ConnectionClosed else "request"


def answers(out: bytes, *, head_request: bool) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split the proxy's output into whole responses; AssertionError on anything else."""
    found = []
    while out:
        m = ANSWER.match(out)
        assert m is not None, f"not an HTTP/1.1 response head: {out[:300]!r}"
        hdrs = {
            k.strip().lower(): v.strip()
            for k, v in (line.split(b":", 1) for line in m.group(2).split(b"\r\n") if line)
        }
        status, rest = int(m.group(1)), out[m.end() :]
        length = 0 if head_request and status >= 200 else int(hdrs.get(b"content-length", b"0"))
        assert len(rest) >= length, f"short body: {out[:300]!r}"
        found.append((status, hdrs, rest[:length]))
        out = rest[length:]
    return found


def check(proxy, data: bytes) -> None:
    out = exchange(proxy.port, data)
    verdict = h11_verdict(data)
    got = answers(out, head_request=verdict == "request" and data.startswith(b"HEAD "))
    if verdict is None:  # nothing to answer: a clean close
        assert got == []
    elif verdict in (400, 431):  # one plain answer naming the problem, then the close
        ((status, hdrs, body),) = got
        phrase = HTTPStatus(status).phrase
        assert (status, hdrs[b"connection"]) == (verdict, b"close")
        assert body.startswith(f"{status} {phrase}: ".encode())
        assert b"bytearray" not in body
    else:  # a request: every answer the proxy's or the service's, through the proxy
        assert all(hdrs[b"via"].endswith(b"1.1 devmesh") for _, hdrs, _ in got), got
        assert {status for status, _, _ in got} <= {200, 400, 404, 413, 501, 502}, got
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

"""The proxy process against a real threaded upstream, driven by curl, httpx and raw sockets."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
import urllib.request

import httpx
import proxykit
import pytest


@pytest.fixture
def upstream():
    with proxykit.upstream() as server:
        yield server


def routes(up_port: int, **extra) -> dict:
    doc = {
        "backends": [
            {"project": "shop", "service": "api", "port": up_port},
            {"project": "blog", "service": "api", "port": up_port},
            {
                "project": "shop",
                "service": "worker",
                "port": up_port,
                "state": "crash-looping",
                "reason": "exited with status 1, 5 restarts in 30 s",
            },
            {"project": "shop", "service": "cron", "port": up_port, "state": "stopped"},
        ],
        "edges": [{"caller_project": "shop", "caller_service": "web", "target_service": "api"}],
    }
    doc.update(extra)
    return doc


@pytest.fixture
def proxy(upstream):
    p = proxykit.ProxyProcess(
        routes(upstream.port), args=("--max-body", "1000000", "--idle-timeout", "0.5")
    )
    yield p
    assert p.stop() == ""


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env=proxykit.env_without_proxy(),
    )


def echo(proxy, host: str = "api.localhost", **kw) -> dict:
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/echo", headers={"host": host}, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def hdr(doc: dict, name: str) -> list[str]:
    return [v for k, v in doc["headers"] if k == name]


def test_curl_reaches_service_by_name_and_by_project_name(proxy):
    for host in ("api.localhost", "api.shop.localhost", "API.Shop.localhost"):
        r = curl(f"http://{host}:{proxy.port}/echo?x=1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "/echo?x=1"


def test_forwarding_headers_are_set_and_appended(proxy):
    r = httpx.get(
        f"http://127.0.0.1:{proxy.port}/echo",
        headers={"host": "api.localhost:1234", "x-forwarded-for": "10.9.9.9", "via": "1.0 corp"},
    )
    doc = r.json()
    assert hdr(doc, "x-forwarded-for") == ["10.9.9.9, 127.0.0.1"]
    assert hdr(doc, "x-forwarded-proto") == ["http"]
    assert hdr(doc, "x-forwarded-host") == ["api.localhost:1234"]
    assert hdr(doc, "forwarded") == ['for=127.0.0.1;host="api.localhost:1234";proto=http']
    assert hdr(doc, "via") == ["1.0 corp, 1.1 devmesh"]
    assert hdr(doc, "host") == ["api.localhost:1234"]


def test_hop_by_hop_headers_are_removed_both_ways(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"GET /echo HTTP/1.1\r\nHost: api.localhost\r\nConnection: keep-alive, x-secret"
            b"\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            b"Proxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n"
        )
        data = _read_response(s)
    head, _, body = data.partition(b"\r\n\r\n")
    names = {k for k, _ in json.loads(body)["headers"]}
    assert "x-kept" in names
    assert not names & {"x-secret", "keep-alive", "te", "proxy-authorization"}
    assert b"via: 1.1 devmesh" in head.lower()


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(data.split(b"\r\n\r\n", 1)[1]) < length:
        data += s.recv(65536)
    return data


def test_unknown_host_gets_404_listing_services(proxy):
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "nope.localhost"})
    assert r.status_code == 404
    lines = r.text.splitlines()
    assert lines[0] == "404 Not Found: no service is named by host 'nope.localhost'"
    assert f"  api (shop, running): http://api.shop.localhost:{proxy.port}" in lines
    html = httpx.get(
        f"http://127.0.0.1:{proxy.port}/", headers={"host": "nope.localhost", "accept": "text/html"}
    )
    assert html.headers["content-type"] == "text/html; charset=utf-8"
    assert f'<a href="http://api.blog.localhost:{proxy.port}">' in html.text


def test_reserved_agent_host_is_not_a_service(proxy):
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "devmesh.localhost"})
    assert r.status_code == 200
    assert r.text.startswith("200 OK: devmesh agent")


def test_stopped_and_crash_looping_services_get_502_naming_them(proxy):
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "worker.localhost"})
    assert r.status_code == 502
    assert r.text == (
        "502 Bad Gateway: service 'worker' of project 'shop' is crash-looping:"
        " exited with status 1, 5 restarts in 30 s\n"
    )
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "cron.localhost"})
    assert r.text == "502 Bad Gateway: service 'cron' of project 'shop' is stopped\n"


def test_restarting_service_gets_502_and_index_line_with_attempt_and_countdown(upstream):
    """The wait is counted by the proxy's clock from the table's retry_at: checked against
    the test's clock before and after the request, and never below zero once due."""
    retry_at = time.time() + 600
    backends = [
        {"project": "shop", "service": "api", "port": upstream.port},
        {
            "project": "shop",
            "service": "jobs",
            "port": upstream.port,
            "state": "restarting",
            "reason": "exited with status 3",
            "attempt": 2,
            "retry_at": retry_at,
        },
        {
            "project": "shop",
            "service": "mail",
            "port": upstream.port,
            "state": "restarting",
            "attempt": 7,
            "retry_at": 1.0,  # long due: the agent is about to start it
        },
    ]
    p = proxykit.ProxyProcess({"backends": backends})
    try:
        before = time.time()
        r = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "jobs.localhost"})
        after = time.time()
        assert r.status_code == 502
        m = re.fullmatch(
            r"502 Bad Gateway: service 'jobs' of project 'shop' is restarting, attempt 2,"
            r" next try in (\d+) s: exited with status 3\n",
            r.text,
        )
        assert m is not None, r.text
        assert math.ceil(retry_at - after) <= int(m.group(1)) <= math.ceil(retry_at - before)
        r = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "mail.localhost"})
        assert r.text == (
            "502 Bad Gateway: service 'mail' of project 'shop' is restarting, attempt 7,"
            " next try in 0 s\n"
        )
        index = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "nope.localhost"})
        assert index.status_code == 404
        assert (
            f"  mail (shop, restarting, attempt 7, next try in 0 s): http://mail.shop.localhost:{p.port}"
            in index.text.splitlines()
        )
        assert "  jobs (shop, restarting, attempt 2, next try in " in index.text
        assert "stopped" not in index.text
    finally:
        assert p.stop() == ""


def test_raw_utf8_path_gets_a_400_in_plain_words(proxy):
    """h11 refuses a request line with raw UTF-8 (a URL must percent-encode it): the answer
    says which byte and how to write it, not a Python repr of the line."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall("GET /café HTTP/1.1\r\nHost: api.localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert body.decode() == (
        '400 Bad Request: malformed request: illegal request line "GET /caf\\xc3\\xa9'
        ' HTTP/1.1": non-ASCII byte at offset 8; a URL carries it percent-encoded, as %C3\n'
    )
    r = curl(f"http://api.localhost:{proxy.port}/caf%C3%A9")  # the same path, encoded
    assert json.loads(r.stdout)["path"] == "/caf%C3%A9"


def test_connection_refused_gets_502_naming_port(upstream):
    port = proxykit.free_port()
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "shop", "service": "api", "port": port, "state": "starting"}]}
    )
    try:
        r = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "api.localhost"})
        assert r.status_code == 502
        assert r.text == (
            f"502 Bad Gateway: service 'api' is not reachable: connection refused"
            f" on 127.0.0.1:{port} (the service is still starting)\n"
        )
        # the proxy keeps serving
        r = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "nope.localhost"})
        assert r.status_code == 404
    finally:
        assert p.stop() == ""


def test_idle_upstream_gets_504(proxy):
    r = httpx.get(f"http://127.0.0.1:{proxy.port}/sleep?s=2", headers={"host": "api.localhost"})
    assert r.status_code == 504
    assert r.text == (
        f"504 Gateway Timeout: service 'api' on 127.0.0.1:{proxy_up(proxy)}"
        " timed out: no response within 0.5 s\n"
    )


def proxy_up(proxy) -> int:
    return json.loads(proxy.routes_path.read_text())["backends"][0]["port"]


def test_connect_timeout_gets_504():
    # A listener with a full accept queue drops further SYNs: a real connect that hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "p", "service": "api", "port": port}]},
        args=("--connect-timeout", "0.3"),
    )
    try:
        r = httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "api.localhost"}, timeout=10)
        assert r.status_code == 504
        assert r.text == (
            f"504 Gateway Timeout: service 'api' on 127.0.0.1:{port} timed out:"
            " no connection within 0.3 s\n"
        )
    finally:
        assert p.stop() == ""
        for f in fillers:
            f.close()
        listener.close()


def test_head_204_and_304_have_no_body(proxy):
    r = curl("-I", f"http://api.localhost:{proxy.port}/echo")
    assert r.stdout.startswith("HTTP/1.1 200 OK")
    length = [ln for ln in r.stdout.splitlines() if ln.lower().startswith("content-length")]
    assert length and int(length[0].split(":")[1]) > 0
    for code in (204, 304):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            req = f"GET /status/{code} HTTP/1.1\r\nHost: api.localhost\r\n\r\n".encode()
            s.sendall(req + req)  # pipelined: the second answer must follow directly
            data = b""
            while data.count(b"\r\n\r\n") < 2:
                chunk = s.recv(65536)
                assert chunk
                data += chunk
        first, second = data.split(b"\r\n\r\n")[:2]
        assert first.startswith(f"HTTP/1.1 {code} ".encode())
        assert second.startswith(f"HTTP/1.1 {code} ".encode())
        assert b"transfer-encoding" not in first.lower()


def test_http10_client(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /download?n=5 HTTP/1.0\r\nHost: api.localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head.lower()
    assert body == b"xxxxx"


def test_expect_100_continue(proxy):
    body = b"z" * 200_000
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "@-",
            f"http://api.localhost:{proxy.port}/echo",
        ],
        input=body,
        capture_output=True,
        timeout=20,
        env=proxykit.env_without_proxy(),
        check=False,
    )
    assert b"HTTP/1.1 100 Continue" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["body_length"] == len(body)
    assert hdr(doc, "expect") == ["100-continue"]  # the service's own 100 came through


def test_early_answer_to_expect_100_continue_reaches_curl_cleanly(proxy, upstream):
    """A service that refuses a chunked upload up front (413 instead of 100 Continue) is
    heard: curl gets the 413, sends no body and exits 0, as through nginx."""
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            f"http://api.localhost:{proxy.port}/reject-expect",
        ],
        input=b"z" * 300_000,
        capture_output=True,
        timeout=20,
        env=proxykit.env_without_proxy(),
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.endswith(b"\n413")
    assert b"100 Continue" not in r.stderr
    assert upstream.expect_rejections == 1
    assert echo(proxy)["method"] == "GET"  # still serving


def test_expect_100_continue_to_a_service_that_ignores_it():
    """A service that never answers the expectation (it just reads the body) must not leave a
    client that waits for 100 Continue hanging: after a second the proxy says go on."""

    def handler(conn: socket.socket, number: int) -> None:
        head = proxykit.read_head(conn)
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < 5:
            body += conn.recv(65536)
        answer = b"got " + body
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
        proxykit.read_head(conn)

    with proxykit.RawService(handler) as service:
        p = proxykit.ProxyProcess(
            {"backends": [{"project": "p", "service": "api", "port": service.port}]}
        )
        try:
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
                s.sendall(
                    b"POST /up HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                data = b""
                while b"\r\n\r\n" not in data:  # this client sends nothing before a 100
                    data += s.recv(65536)
                assert data.startswith(b"HTTP/1.1 100 Continue\r\n"), data
                s.sendall(b"hello")
                data = data.split(b"\r\n\r\n", 1)[1]
                while not data.endswith(b"got hello"):
                    chunk = s.recv(65536)
                    assert chunk, data
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        finally:
            assert p.stop() == ""


def test_body_over_limit_gets_413(proxy):
    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/echo",
        headers={"host": "api.localhost"},
        content=b"a" * 1_000_001,
    )
    assert r.status_code == 413
    assert r.text == (
        "413 Request Entity Too Large: request body exceeds the proxy's limit of 1000000 bytes\n"
    )

    def chunks():
        for _ in range(30):
            yield b"b" * 50_000

    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/echo", headers={"host": "api.localhost"}, content=chunks()
    )
    assert r.status_code == 413
    assert echo(proxy)["method"] == "GET"  # still serving


def test_chunked_upload_is_rechunked_to_upstream(proxy):
    def chunks():
        for i in range(10):
            yield bytes([65 + i]) * 1000

    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/echo", headers={"host": "api.localhost"}, content=chunks()
    )
    doc = r.json()
    assert doc["body_length"] == 10_000
    assert hdr(doc, "transfer-encoding") == ["chunked"]


def test_malformed_request_400_and_huge_head_431(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api.localhost\r\nBad Header\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"400 Bad Request: malformed request: " in data
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api.localhost\r\nX-Big: " + b"a" * 70_000 + b"\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert data.endswith(b"431 Request Header Fields Too Large: request head too large\n")
    assert echo(proxy)["method"] == "GET"


def test_keep_alive_reuses_one_upstream_connection(upstream, proxy):
    with httpx.Client(
        base_url=f"http://127.0.0.1:{proxy.port}", headers={"host": "api.localhost"}
    ) as client:
        for i in range(25):
            assert client.get(f"/echo?i={i}").status_code == 200
    assert upstream.connections == 1


def test_truncated_upstream_answer_aborts_the_client(proxy):
    r = curl(f"http://api.localhost:{proxy.port}/truncated")
    assert r.returncode == 18, r  # curl: partial file
    assert echo(proxy)["method"] == "GET"


def test_edge_listener_needs_no_resolver_and_names_the_caller(proxy):
    port = proxy.edges[("shop", "web", "api")]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo?edge=1", timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["path"] == "/echo?edge=1"
    lines = proxy.wait_log(lambda ls: any("edge=1" in ln for ln in ls), "the edge's line")
    line = next(ln for ln in lines if "edge=1" in ln)
    assert line.endswith(f"upstream=127.0.0.1:{proxy_up(proxy)} caller=web.shop")
    assert " GET 127.0.0.1:" in line and " 200 in=0 out=" in line


def test_route_changes_apply_without_restart(upstream, proxy):
    assert echo(proxy)["method"] == "GET"
    proxy.update_routes(
        {
            "backends": [
                {
                    "project": "shop",
                    "service": "api",
                    "port": upstream.port,
                    "state": "stopped",
                    "reason": "stopped by devmesh down",
                }
            ]
        }
    )

    def answer() -> str | None:
        r = httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "api.localhost"})
        return r.text if r.status_code == 502 else None

    assert proxykit.wait_for(answer, "the new table") == (
        "502 Bad Gateway: service 'api' of project 'shop' is stopped: stopped by devmesh down\n"
    )


def test_first_listed_project_keeps_the_short_name(upstream):
    with proxykit.upstream() as other:
        p = proxykit.ProxyProcess(
            {
                "backends": [
                    {"project": "one", "service": "api", "port": upstream.port},
                    {"project": "two", "service": "api", "port": other.port},
                ]
            }
        )
        try:
            httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "api.localhost"})
            assert (upstream.connections, other.connections) == (1, 0)
            httpx.get(f"http://127.0.0.1:{p.port}/", headers={"host": "api.two.localhost"})
            assert (upstream.connections, other.connections) == (1, 1)
        finally:
            assert p.stop() == ""


def test_access_log_json_lines(upstream):
    p = proxykit.ProxyProcess(routes(upstream.port), args=("--json",))
    try:
        httpx.post(
            f"http://127.0.0.1:{p.port}/echo?q=1",
            headers={"host": "api.localhost"},
            content=b"12345",
        )
        entry = json.loads(p.wait_log(bool, "a log line")[-1])
    finally:
        assert p.stop() == ""
    assert {k: entry[k] for k in ("method", "host", "path", "status", "bytes_in", "upstream")} == {
        "method": "POST",
        "host": "api.localhost",
        "path": "/echo?q=1",
        "status": 200,
        "bytes_in": 5,
        "upstream": f"127.0.0.1:{upstream.port}",
    }
    assert entry["bytes_out"] > 0 and entry["duration_ms"] > 0 and entry["caller"] is None


def test_ipv6_loopback_listener(proxy):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.connect(("::1", proxy.port))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    r = curl("-g", "-H", "Host: api.localhost", f"http://[::1]:{proxy.port}/echo")
    doc = json.loads(r.stdout)
    assert hdr(doc, "x-forwarded-for") == ["::1"]
    assert hdr(doc, "forwarded") == ['for="[::1]";host=api.localhost;proto=http']


@pytest.mark.parametrize(
    "extra",
    [{}, {"connection": "keep-alive"}],
    ids=["in-callbacks", "in-a-task"],  # a Connection header takes the request to a task
)
def test_idle_pooled_connection_closed_by_service_is_retried(extra):
    """A service that closes a kept-alive connection as the next request arrives on it (its
    idle timeout fired at that moment) must not turn that request into an error: the proxy
    sends it once more on a new connection, whichever way the exchange runs. Each connection
    here answers one request and closes on the second without a byte, so every request after
    the first meets that race."""

    def handler(conn: socket.socket, number: int) -> None:
        proxykit.read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        proxykit.read_head(conn)  # then close, without having said Connection: close

    with proxykit.RawService(handler) as service:
        p = proxykit.ProxyProcess(
            {"backends": [{"project": "p", "service": "api", "port": service.port}]},
            args=("--json",),
        )
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{p.port}", headers={"host": "api.localhost", **extra}
            ) as client:
                for i in range(3):
                    r = client.get(f"/{i}")
                    assert (r.status_code, r.text) == (200, "ok")
            assert service.accepted == 3
            lines = p.wait_log(lambda ls: len(ls) == 3, "three access log lines")
            assert [json.loads(ln)["error"] for ln in lines] == [None, None, None]
        finally:
            assert p.stop() == ""

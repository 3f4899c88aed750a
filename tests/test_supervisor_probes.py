"""Probes against real tiny servers on 127.0.0.1:0 and real commands."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trustme
from anyio.streams.tls import TLSListener

from devmesh.core import model
from devmesh.supervisor import probes

HTTP = model.HealthKind.HTTP


def _health(kind: model.HealthKind, **kw) -> model.Health:
    return model.Health(kind=kind, timeout_s=kw.pop("timeout_s", 2.0), **kw)


async def _serve(
    answer: bytes | None,
    body: Callable[[int], Awaitable[probes.ProbeResult]],
    *,
    tls: trustme.CA | None = None,
) -> tuple[probes.ProbeResult, list[bytes]]:
    """Serve `answer` to every connection (None: read and never answer) while `body` runs."""
    requests: list[bytes] = []
    listener: anyio.abc.Listener = await anyio.create_tcp_listener(
        local_host="127.0.0.1", local_port=0
    )
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if tls is not None:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.issue_cert("127.0.0.1").configure_cert(ctx)
        listener = TLSListener(listener, ctx, standard_compatible=False)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            requests.append(data)
            if answer is None:
                await anyio.sleep_forever()
            await stream.send(answer)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        result = await body(port)
        tg.cancel_scope.cancel()
    return result, requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(answer: bytes | None, *, timeout_s: float = 2.0, scheme: str = "http", tls=None):
    health = _health(HTTP, http_path="/healthz", timeout_s=timeout_s)

    async def main():
        return await _serve(
            answer,
            lambda port: probes.probe(health, port=port, cwd="/", env={}, scheme=scheme),
            tls=tls,
        )

    return anyio.run(main)


def test_http_200_passes_and_sends_a_proper_request():
    result, requests = _http(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head = requests[0].decode()
    assert head.startswith("GET /healthz HTTP/1.1\r\n")
    port = int(head.lower().split("host: 127.0.0.1:")[1].split("\r\n")[0])
    assert result == probes.ProbeResult(True, f"GET /healthz on 127.0.0.1:{port} answered 200")
    result, _ = _http(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result.ok


def test_http_redirect_passes():
    result, _ = _http(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n")
    assert result.ok


def test_http_503_fails_with_the_status():
    result, requests = _http(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    port = int(requests[0].decode().lower().split("host: 127.0.0.1:")[1].split("\r\n")[0])
    assert result == probes.ProbeResult(False, f"GET /healthz on 127.0.0.1:{port} answered 503")


def test_http_no_answer_times_out():
    result, requests = _http(None, timeout_s=0.3)
    port = int(requests[0].decode().lower().split("host: 127.0.0.1:")[1].split("\r\n")[0])
    assert result == probes.ProbeResult(
        False, f"GET /healthz on 127.0.0.1:{port}: no answer within 0.3 s"
    )


def test_http_garbage_answer():
    result, _ = _http(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert not result.ok
    assert ": invalid HTTP answer (" in result.detail


def test_http_connection_refused():
    port = _free_port()
    health = _health(HTTP, http_path="/healthz")
    result = anyio.run(lambda: probes.probe(health, port=port, cwd="/", env={}))
    assert result == probes.ProbeResult(
        False, f"GET /healthz on 127.0.0.1:{port}: connection refused"
    )


def test_https_probe_does_not_verify_the_certificate():
    result, _ = _http(b"HTTP/1.1 200 OK\r\n\r\n", scheme="https", tls=trustme.CA())
    assert result.ok, result.detail


def test_tcp_probe():
    health = _health(model.HealthKind.TCP)

    async def main():
        return await _serve(b"", lambda port: probes.probe(health, port=port, cwd="/", env={}))

    result, _ = anyio.run(main)
    assert result.ok
    assert result.detail.startswith("TCP connect to 127.0.0.1:")
    port = _free_port()
    result = anyio.run(lambda: probes.probe(health, port=port, cwd="/", env={}))
    assert result == probes.ProbeResult(
        False, f"TCP connect to 127.0.0.1:{port}: connection refused"
    )


def test_port_probe_without_a_port():
    result = anyio.run(
        lambda: probes.probe(_health(model.HealthKind.TCP), port=None, cwd="/", env={})
    )
    assert result == probes.ProbeResult(False, "tcp probe needs a port and the service has none")


def test_none_probe_passes():
    result = anyio.run(
        lambda: probes.probe(_health(model.HealthKind.NONE), port=None, cwd="/", env={})
    )
    assert result.ok


def _command(code: str, tmp_path: Path, *, timeout_s: float = 5.0, env=None):
    argv = (sys.executable, "-c", code)
    health = _health(model.HealthKind.COMMAND, command=argv, timeout_s=timeout_s)
    env = dict(os.environ) if env is None else env
    result = anyio.run(lambda: probes.probe(health, port=None, cwd=str(tmp_path), env=env))
    return result, f"command {shlex.join(argv)!r}"


def test_command_ok_runs_in_cwd_with_env(tmp_path):
    code = "import os; print(os.getcwd() == os.environ['WANT'])"
    result, shown = _command(code, tmp_path, env={"WANT": str(tmp_path)})
    assert result == probes.ProbeResult(True, f"{shown} exited with code 0: True")


def test_command_failure_names_code_and_last_line(tmp_path):
    code = "import sys; print('checking'); print('db is down', file=sys.stderr); sys.exit(3)"
    result, shown = _command(code, tmp_path)
    assert result == probes.ProbeResult(False, f"{shown} exited with code 3: db is down")
    result, shown = _command("raise SystemExit(1)", tmp_path)
    assert result == probes.ProbeResult(False, f"{shown} exited with code 1 (no output)")


def test_command_timeout_kills_the_command_and_its_children(tmp_path):
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('child', 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    result, shown = _command(code, tmp_path, timeout_s=1.0)
    assert result == probes.ProbeResult(False, f"{shown} did not finish within 1 s (killed)")
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"probe command's child {child} survived the timeout")


def test_command_not_found(tmp_path):
    health = _health(model.HealthKind.COMMAND, command=("no-such-probe-tool", "-x"))
    result = anyio.run(
        lambda: probes.probe(health, port=None, cwd=str(tmp_path), env={"PATH": "/nope"})
    )
    assert result == probes.ProbeResult(
        False, "command 'no-such-probe-tool -x' could not start: no such file or directory"
    )

"""Readiness probes: one HTTP, TCP or command check, bounded in time, explained in words.

Why it exists: the agent needs a yes/no per probe plus a sentence a human can act on
("GET /healthz on 127.0.0.1:8001 answered 503"); what a run of results means (retries, start
period) is decided in ``devmesh.core.health``. A probe never raises for a failing service:
every failure of the service is a ``ProbeResult(ok=False)``; only programming errors escape.

The HTTP probe speaks HTTP/1.1 through h11 on a plain anyio stream (httpx is a test-only
dependency). ``scheme="https"`` wraps the stream in TLS without verifying the certificate: the
probe asks "is my own local service up", not "is it who it claims to be". The command probe
runs in its own session and the whole session is SIGKILLed on timeout, so a shell script's
children cannot outlive it.
"""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import h11

from devmesh.core import model

HOST = "127.0.0.1"
_MAX_OUTPUT = 4096
"""Bytes of a probe command's output kept to find its last line."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _oserror(exc: OSError) -> str:
    """anyio wraps connect failures in a generic OSError; the cause names the real one."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ConnectionResetError):
        return "connection reset"
    return (cause.strerror or str(cause)).lower()


async def probe(
    health: model.Health,
    *,
    port: int | None,
    cwd: str,
    env: Mapping[str, str],
    scheme: str = "http",
) -> ProbeResult:
    """Run one probe of ``health``, bounded by ``health.timeout_s``."""
    if health.kind is model.HealthKind.NONE:
        return ProbeResult(True, "no health check: ready once running")
    if health.kind is model.HealthKind.COMMAND:
        return await _command(tuple(health.command or ()), cwd, env, health.timeout_s)
    if port is None:
        return ProbeResult(
            False, f"{health.kind.value} probe needs a port and the service has none"
        )
    if health.kind is model.HealthKind.TCP:
        return await _tcp(port, health.timeout_s)
    return await _http(health.http_path or "/", port, health.timeout_s, scheme)


async def _tcp(port: int, timeout_s: float) -> ProbeResult:
    where = f"TCP connect to {HOST}:{port}"
    try:
        with anyio.fail_after(timeout_s):
            stream = await anyio.connect_tcp(HOST, port)
            await stream.aclose()
    except TimeoutError:
        return ProbeResult(False, f"{where}: no answer within {_seconds(timeout_s)}")
    except OSError as exc:
        return ProbeResult(False, f"{where}: {_oserror(exc)}")
    return ProbeResult(True, f"{where} succeeded")


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _http(path: str, port: int, timeout_s: float, scheme: str) -> ProbeResult:
    where = f"GET {path} on {HOST}:{port}"
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", f"{HOST}:{port}"),
            ("User-Agent", "devmesh-probe"),
            ("Connection", "close"),
        ],
    )
    try:
        with anyio.fail_after(timeout_s):
            stream: anyio.abc.ByteStream
            if scheme == "https":
                stream = await anyio.connect_tcp(
                    HOST, port, tls=True, ssl_context=_tls_context(), tls_standard_compatible=False
                )
            else:
                stream = await anyio.connect_tcp(HOST, port)
            async with stream:
                await stream.send(conn.send(request) + conn.send(h11.EndOfMessage()))
                status = await _read_status(stream, conn)
    except TimeoutError:
        return ProbeResult(False, f"{where}: no answer within {_seconds(timeout_s)}")
    except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
        reason = _oserror(exc) if isinstance(exc, OSError) else "connection broken"
        return ProbeResult(False, f"{where}: {reason}")
    except h11.RemoteProtocolError as exc:
        return ProbeResult(False, f"{where}: invalid HTTP answer ({exc})")
    if status is None:
        return ProbeResult(False, f"{where}: connection closed without an answer")
    return ProbeResult(200 <= status < 400, f"{where} answered {status}")


async def _read_status(stream: anyio.abc.ByteStream, conn: h11.Connection) -> int | None:
    """The final status code, or None when the server closed before answering."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            return event.status_code
        if isinstance(event, h11.ConnectionClosed):
            return None
        # InformationalResponse (1xx): keep reading for the final answer.


async def _command(
    argv: tuple[str, ...], cwd: str, env: Mapping[str, str], timeout_s: float
) -> ProbeResult:
    shown = f"command {shlex.join(argv)!r}"
    if not argv:
        return ProbeResult(False, "command probe has no command")
    try:
        proc = await anyio.open_process(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ProbeResult(False, f"{shown} could not start: {(exc.strerror or str(exc)).lower()}")
    output = b""
    async with proc:
        try:
            with anyio.fail_after(timeout_s):
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    output = (output + chunk)[-_MAX_OUTPUT:]
                code = await proc.wait()
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
            return ProbeResult(
                False, f"{shown} did not finish within {_seconds(timeout_s)} (killed)"
            )
    lines = output.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1].strip() if lines else ""
    tail = f": {last}" if last else " (no output)"
    if code == 0:
        return ProbeResult(True, f"{shown} exited with code 0{tail}")
    if code < 0:
        return ProbeResult(False, f"{shown} killed by {signal.Signals(-code).name}{tail}")
    return ProbeResult(False, f"{shown} exited with code {code}{tail}")

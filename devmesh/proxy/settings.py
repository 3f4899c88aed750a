"""Proxy settings: ports, timeouts and limits, grouped in one frozen dataclass.

Why separate from ``model.ProxySettings``: the config file exposes only the ports a team
agrees on; the timeouts and limits here are the agent's (and the tests') business, so they
get defaults that suit a developer machine and can be tightened per run.
"""

from __future__ import annotations

from dataclasses import dataclass

from devmesh.core import model


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    """IPv4 loopback address the listeners bind; never a real interface."""
    port: int = model.DEFAULT_PROXY_PORT
    """HTTP listener port; 0 picks a free one (tests)."""
    https_port: int | None = model.DEFAULT_HTTPS_PORT
    """HTTPS listener port; 0 picks a free one, None disables HTTPS."""
    ipv6: bool = True
    """Also bind ::1 on the same ports where the machine has IPv6 loopback."""
    connect_timeout_s: float = 5.0
    """Seconds to open a connection to a service before answering 504."""
    idle_timeout_s: float = 60.0
    """Seconds a service may stay silent (before or during its answer) before a 504/abort.
    The service's side; the two deadlines below are the client's."""
    header_timeout_s: float = 10.0
    """Seconds a client has to send a whole request head: from its first byte, or from the
    connection's opening for its first request. Then 408 (nothing if nothing came) and close."""
    keepalive_timeout_s: float = 75.0
    """Seconds a client connection may sit idle between requests before it is closed."""
    max_header_bytes: int = 64 * 1024
    """Largest request head accepted; larger heads get 431."""
    max_body_bytes: int | None = None
    """Largest request body forwarded; None is unlimited (bodies are streamed, not held)."""
    pool_idle_per_upstream: int = 64
    """Idle keep-alive connections kept per service address."""
    read_size: int = 256 * 1024
    """Bytes asked of the socket per read; bigger means fewer wake-ups on bulk transfers."""
    reuse_port: bool = False
    """Bind every listener with SO_REUSEPORT (after proving the port free) so worker
    processes can share the ports."""
    join_ports: bool = False
    """This process is a worker: its agent already holds the ports; bind them shared."""
    upstream_verify_tls: bool = False
    """Verify certificates of services with scheme https. Off: they are loopback processes
    whose self-signed certificates no trust store knows."""
    upstream_ca_file: str | None = None
    """CA bundle used when upstream_verify_tls is on; None uses the system store."""
    fallback_ca_file: str | None = None
    """CA bundle that https ``fallback`` URLs are verified against; None uses the system
    store (a fallback is a real server, unlike a local service's port)."""

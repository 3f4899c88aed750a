"""HTTPS: leaves per SNI name from the local CA, verified by curl and Python's ssl."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import warnings

import proxykit
import pytest
import trustme
from cryptography import x509


@pytest.fixture
def upstream():
    with proxykit.upstream() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "shop", "service": "api", "port": upstream.port}]}, https=True
    )
    yield p
    assert p.stop() == ""


def tls_get(proxy, name: str, path: str = "/echo") -> tuple[dict, bytes]:
    """(TLS facts, raw HTTP response) of one verified HTTPS request."""
    ctx = ssl.create_default_context(cafile=str(proxy.home / "ca" / "ca.pem"))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        facts = {
            "alpn": s.selected_alpn_protocol(),
            "version": s.version(),
            "der": s.getpeercert(binary_form=True),
        }
    return facts, data


def test_curl_verifies_against_the_exported_ca(proxy):
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(proxy.home / "ca" / "ca.pem"),
            f"https://api.localhost:{proxy.https_port}/echo",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=proxykit.env_without_proxy(),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert ["x-forwarded-proto", "https"] in doc["headers"]


def test_python_ssl_gets_a_leaf_per_sni_name(proxy):
    for name in ("api.localhost", "api.shop.localhost"):
        facts, data = tls_get(proxy, name)
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert facts["alpn"] == "http/1.1"
        assert facts["version"] in ("TLSv1.2", "TLSv1.3")
        leaf = x509.load_der_x509_certificate(facts["der"])
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [name]
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 8
    assert (proxy.home / "ca" / "leaves" / "api.shop.localhost.pem").exists()


def test_tls_1_1_is_refused(proxy):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point is an obsolete version
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="api.localhost")
    _, data = tls_get(proxy, "api.localhost")  # still serving
    assert data.startswith(b"HTTP/1.1 200 OK")


class _TLSUpstream(proxykit.UpstreamServer):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.ctx = ctx

    def get_request(self):
        sock, addr = super().get_request()
        return self.ctx.wrap_socket(sock, server_side=True), addr


@pytest.mark.parametrize("verify", [False, True])
def test_https_upstream(tmp_path, verify):
    authority = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = _TLSUpstream(server_ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    ca_file = tmp_path / "upstream-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    args = ("--upstream-ca", str(ca_file)) if verify else ()
    p = proxykit.ProxyProcess(
        {
            "backends": [
                {"project": "p", "service": "secure", "port": server.port, "scheme": "https"}
            ]
        },
        args=args,
    )
    try:
        r = subprocess.run(
            ["curl", "-sS", f"http://secure.localhost:{p.port}/echo"],
            capture_output=True,
            text=True,
            timeout=20,
            env=proxykit.env_without_proxy(),
            check=False,
        )
        assert json.loads(r.stdout)["method"] == "GET"
    finally:
        assert p.stop() == ""
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_https_upstream_with_untrusted_certificate_gets_502(tmp_path):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = _TLSUpstream(server_ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    p = proxykit.ProxyProcess(
        {
            "backends": [
                {"project": "p", "service": "secure", "port": server.port, "scheme": "https"}
            ]
        },
        args=("--upstream-ca", str(other)),
    )
    try:
        r = subprocess.run(
            ["curl", "-sS", f"http://secure.localhost:{p.port}/"],
            capture_output=True,
            text=True,
            timeout=20,
            env=proxykit.env_without_proxy(),
            check=False,
        )
        assert r.stdout.startswith(
            "502 Bad Gateway: service 'secure' is not reachable: TLS handshake failed"
            " (CERTIFICATE_VERIFY_FAILED) on 127.0.0.1:"
        )
    finally:
        assert p.stop() == ""
        server.shutdown()
        server.server_close()
        thread.join(5)

"""HTTPS: leaves per SNI name from the local or team CA, verified by curl, Python's ssl and
OpenSSL; the CA's name constraints; a team CA installed while the proxy runs."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from pathlib import Path

import proxykit
import pytest
import trustme
from cryptography import x509

from devmesh.mesh import identity as ids


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


# -- which CA signs: name constraints, the team CA, an old unconstrained CA --------------------

OPENSSL = shutil.which("openssl")


def served_leaf(port: int, name: str, cafile: Path | None = None) -> x509.Certificate:
    """The leaf the listener presents for SNI ``name``; verified against ``cafile`` when given
    (hostname included)."""
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def openssl_verify(cafile: Path, leaf_pem: bytes, tmp_path: Path) -> subprocess.CompletedProcess:
    assert OPENSSL, "openssl is needed for the command-line check (scripts/test installs it)"
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(leaf_pem)
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(cafile), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def mint(ca_dir_cert: Path, ca_key: Path, dns: list[str], ips: list[str] | None = None) -> bytes:
    """A leaf for any names signed with a CA's key: what someone who read the key could do."""
    team = ids.Team(
        mesh="x",
        ca_cert_pem=ca_dir_cert.read_bytes(),
        ca_key_pem=ca_key.read_bytes(),
        secret=ids.Secret(b"0" * 16),
    )
    return ids.issue_leaf(team, dns_names=dns, ips=ips)[0]


def test_the_machine_ca_is_name_constrained(proxy, tmp_path):
    served_leaf(proxy.https_port, "api.localhost")  # creates the CA
    ca_file = proxy.home / "ca" / "ca.pem"
    cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    permitted = {str(getattr(n, "value", n)) for n in ext.value.permitted_subtrees or []}
    assert permitted == {"localhost", ".localhost", "127.0.0.0/8", "::1/128"}
    key = proxy.home / "ca" / "ca-key.pem"
    good = openssl_verify(ca_file, mint(ca_file, key, ["api.localhost"], ["127.0.0.1"]), tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    for dns, ips in (
        (["example.com"], []),
        (["www.google.com", "api.localhost"], []),
        ([], ["8.8.8.8"]),
    ):
        out = openssl_verify(ca_file, mint(ca_file, key, dns, ips), tmp_path)
        assert out.returncode != 0, (dns, ips)
        assert "subtree violation" in out.stdout + out.stderr


def test_sni_outside_localhost_gets_the_localhost_leaf(proxy):
    leaf = served_leaf(proxy.https_port, "example.com")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert not (proxy.home / "ca" / "leaves" / "example.com.pem").exists()


def test_a_team_ca_installed_while_running_signs_the_next_leaves(proxy):
    machine_ca = proxy.home / "ca" / "ca.pem"
    before = served_leaf(proxy.https_port, "api.localhost", machine_ca)
    ident = ids.init(proxy.home, "shop", node_name="alpha")  # what `devmesh mesh init` writes
    after = served_leaf(proxy.https_port, "api.localhost", ident.ca_path)  # no restart
    assert after.serial_number != before.serial_number
    with pytest.raises(ssl.SSLCertVerificationError):
        served_leaf(proxy.https_port, "api.localhost", machine_ca)
    on_disk = x509.load_pem_x509_certificate(
        (proxy.home / "ca" / "leaves" / "api.localhost.pem").read_bytes()
    )
    on_disk.verify_directly_issued_by(x509.load_pem_x509_certificate(ident.ca_path.read_bytes()))
    assert proxy.proc.poll() is None
    # A new team (init --force, join) replaces the CA again, still without a restart.
    aside = ids.set_aside(proxy.home)
    assert aside is not None
    other = ids.init(proxy.home, "shop", node_name="alpha")
    served_leaf(proxy.https_port, "web.localhost", other.ca_path)
    served_leaf(proxy.https_port, "api.localhost", other.ca_path)


def test_an_unconstrained_machine_ca_is_set_aside_and_replaced(tmp_path, upstream):
    home = tmp_path / "home"
    (home / "ca" / "leaves").mkdir(parents=True)
    old = trustme.CA()  # like a CA of an earlier version: it can sign any name
    old_cert, old_key = old.cert_pem.bytes(), old.private_key_pem.bytes()
    (home / "ca" / "ca.pem").write_bytes(old_cert)
    (home / "ca" / "ca-key.pem").write_bytes(old_key)
    (home / "ca" / "ca-key.pem").chmod(0o600)
    old_leaf = old.issue_cert("api.localhost")
    (home / "ca" / "leaves" / "api.localhost.pem").write_bytes(
        old_leaf.cert_chain_pems[0].bytes() + old_leaf.private_key_pem.bytes()
    )
    p = proxykit.ProxyProcess(
        {"backends": [{"project": "shop", "service": "api", "port": upstream.port}]},
        https=True,
        home=home,
    )
    try:
        leaf = served_leaf(p.https_port, "api.localhost", home / "ca" / "ca.pem")
        new_ca = x509.load_pem_x509_certificate((home / "ca" / "ca.pem").read_bytes())
        new_ca.extensions.get_extension_for_class(x509.NameConstraints)
        leaf.verify_directly_issued_by(new_ca)
    finally:
        err = p.stop()
    (aside,) = (home / "ca").glob("unconstrained-*")
    assert (aside / "ca.pem").read_bytes() == old_cert
    assert (aside / "ca-key.pem").read_bytes() == old_key
    assert stat.S_IMODE(aside.stat().st_mode) == 0o700
    assert "replaced the local CA" in err and str(aside) in err
    assert "devmesh ca install" in err

"""Team identity: files and modes, the bundle, and the name constraints OpenSSL enforces."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from devmesh.mesh import identity as ids

OPENSSL = shutil.which("openssl")


@pytest.fixture
def team_home(tmp_path: Path) -> ids.Identity:
    return ids.init(tmp_path / "a", "team", node_name="alpha")


def test_init_creates_private_files_and_a_persistent_node(team_home: ids.Identity) -> None:
    d = ids.mesh_dir(team_home.home)
    for name in (
        "team-ca-key.pem",
        "secret",
        "node-key.pem",
        "node.json",
        "team-ca.pem",
        "node.pem",
    ):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
    again = ids.load(team_home.home)
    assert (again.node_id, again.node_name) == (team_home.node_id, "alpha")
    assert len(team_home.node_id) == 32
    with pytest.raises(ids.IdentityError, match="exists already"):
        ids.init(team_home.home, "team")


def test_node_name_defaults_to_the_hostname_as_a_label(tmp_path: Path) -> None:
    ident = ids.init(tmp_path / "h", "team")
    assert ident.node_name == ids.default_node_name()
    assert ids.check_label("x", ident.node_name)
    renamed = ids.load(tmp_path / "h", node_name="other")
    assert renamed.node_name == "other" and renamed.node_id == ident.node_id
    cert = x509.load_pem_x509_certificate(renamed.node_cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "other.team.devmesh.internal" in names.get_values_for_type(x509.DNSName)


def test_node_certificate_names_and_usages(team_home: ids.Identity) -> None:
    cert = x509.load_pem_x509_certificate(team_home.node_cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "alpha.team.devmesh.internal",
        f"{team_home.node_id}.team.devmesh.internal",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    ca = x509.load_pem_x509_certificate(team_home.team.ca_cert_pem)
    nc = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted = {str(getattr(n, "value", n)) for n in nc.value.permitted_subtrees or ()}
    assert permitted == {
        "localhost",
        ".localhost",
        "team.devmesh.internal",
        "127.0.0.0/8",
        "::1/128",
    }


def test_export_and_join_share_the_team_but_not_the_node(
    team_home: ids.Identity, tmp_path: Path
) -> None:
    bundle = tmp_path / "team.bundle"
    ids.export_bundle(team_home.home, bundle)
    assert bundle.stat().st_mode & 0o777 == 0o600
    other = ids.join(tmp_path / "b", bundle.read_bytes(), node_name="beta")
    assert other.team.mesh == "team"
    assert other.team.secret == team_home.team.secret
    assert other.team.ca_cert_pem == team_home.team.ca_cert_pem
    assert other.node_id != team_home.node_id
    # The node certificate of the joined node chains to the same CA.
    ctx = ssl.create_default_context(cafile=str(team_home.ca_path))
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_the_secret_never_shows(
    team_home: ids.Identity, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = team_home.team.secret.reveal()
    forms = {raw.hex(), base64.b64encode(raw).decode(), repr(raw)}
    logging.getLogger("test").warning(
        "identity %s %r team %s", team_home, team_home, team_home.team
    )
    shown = " ".join(
        [
            repr(team_home),
            str(team_home),
            repr(team_home.team),
            str(team_home.team.secret),
            caplog.text,
        ]
    )
    for form in forms:
        assert form not in shown
    assert "hidden" in repr(team_home.team.secret)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(team_home.team.secret)
    # A broken bundle's error does not echo the secret line either.
    text = ids.encode_bundle(team_home.team).decode()
    broken = text.replace("-----BEGIN CERTIFICATE-----", "")
    with pytest.raises(ids.IdentityError) as err:
        ids.decode_bundle(broken.encode())
    for form in forms:
        assert form not in str(err.value)


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda t: "hello", "not a devmesh team bundle"),
        (lambda t: t.replace("mesh: team", "mesh: Team Name"), "not a DNS label"),
        (lambda t: t.replace("secret: ", "secret: !!"), "secret: not base64"),
        (lambda t: t.split("-----BEGIN PRIVATE KEY-----")[0], "missing"),
    ],
)
def test_bad_bundles_are_refused(team_home: ids.Identity, mangle, problem: str) -> None:
    text = ids.encode_bundle(team_home.team).decode()
    with pytest.raises(ids.IdentityError, match=problem):
        ids.decode_bundle(mangle(text).encode())


def test_a_bundle_with_another_key_or_no_constraints_is_refused(
    team_home: ids.Identity, tmp_path: Path
) -> None:
    other = ids.create_team("team")
    mixed = ids.Team(
        mesh="team",
        ca_cert_pem=team_home.team.ca_cert_pem,
        ca_key_pem=other.ca_key_pem,
        secret=other.secret,
    )
    with pytest.raises(ids.IdentityError, match="does not match"):
        ids.decode_bundle(ids.encode_bundle(mixed))
    # An unconstrained CA (say, a mkcert root) is refused.
    import trustme

    ca = trustme.CA()
    loose = ids.Team(
        mesh="team",
        ca_cert_pem=ca.cert_pem.bytes(),
        ca_key_pem=ca.private_key_pem.bytes(),
        secret=other.secret,
    )
    with pytest.raises(ids.IdentityError, match="no name constraints"):
        ids.decode_bundle(ids.encode_bundle(loose))


def test_a_key_readable_by_others_is_refused(team_home: ids.Identity) -> None:
    os.chmod(ids.mesh_dir(team_home.home) / "team-ca-key.pem", 0o644)
    with pytest.raises(ids.IdentityError, match="mode is 644"):
        ids.load(team_home.home)


# -- the name constraints, checked by OpenSSL ----------------------------------------------


@contextlib.contextmanager
def tls_server(cert_pem: bytes, key_pem: bytes, tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting the given leaf; handshakes until closed."""
    (tmp_path / "leaf.pem").write_bytes(cert_pem)
    (tmp_path / "leaf-key.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf-key.pem")
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with (
                contextlib.suppress(OSError, ssl.SSLError),
                ctx.wrap_socket(conn, server_side=True),
            ):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        srv.close()
        t.join(timeout=5)


def handshake(port: int, ca_path: Path, server_name: str, check_hostname: bool = True) -> None:
    ctx = ssl.create_default_context(cafile=str(ca_path))  # the team CA is the only anchor
    # OpenSSL never matches a wildcard over a single label (``*.localhost``): such a leaf's
    # chain and constraints are still checked with check_hostname off.
    ctx.check_hostname = check_hostname
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=server_name),
    ):
        pass


@pytest.mark.parametrize(
    ("dns", "ips", "server_name"),
    [
        (["api.localhost"], [], "api.localhost"),
        (["*.localhost"], [], "web.localhost"),
        (["localhost"], ["127.0.0.1"], "127.0.0.1"),
        (["alpha.team.devmesh.internal"], [], "alpha.team.devmesh.internal"),
    ],
)
def test_openssl_accepts_leaves_inside_the_constraints(
    team_home, tmp_path, dns, ips, server_name
) -> None:
    cert, key = ids.issue_leaf(team_home.team, dns_names=dns, ips=ips)
    with tls_server(cert, key, tmp_path) as port:
        handshake(port, team_home.ca_path, server_name, check_hostname="*" not in dns[0])
    if OPENSSL:
        out = subprocess.run([OPENSSL, "verify", "-CAfile", str(team_home.ca_path), str(tmp_path / "leaf.pem")],
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("dns", "ips", "server_name"),
    [
        (["example.com"], [], "example.com"),
        (["www.google.com", "api.localhost"], [], "www.google.com"),
        ([], ["8.8.8.8"], "8.8.8.8"),
        (["alpha.othermesh.devmesh.internal"], [], "alpha.othermesh.devmesh.internal"),
        (["localhost.example.com"], [], "localhost.example.com"),
    ],
)
def test_openssl_rejects_a_leaked_bundle_impersonating_a_real_site(
    team_home, tmp_path, dns, ips, server_name
) -> None:
    cert, key = ids.issue_leaf(team_home.team, dns_names=dns, ips=ips)
    with (
        tls_server(cert, key, tmp_path) as port,
        pytest.raises(ssl.SSLCertVerificationError) as err,
    ):
        handshake(port, team_home.ca_path, server_name)
    assert "violation" in str(err.value) or "constraint" in str(err.value).lower()
    assert OPENSSL, "openssl is needed for the command-line check"
    out = subprocess.run([OPENSSL, "verify", "-CAfile", str(team_home.ca_path), str(tmp_path / "leaf.pem")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode != 0
    assert "subtree violation" in out.stdout + out.stderr


def test_cli_init_export_join(tmp_path: Path) -> None:
    py = [sys.executable, "-m", "devmesh.mesh"]

    def run(*a):
        return subprocess.run([*py, *a], capture_output=True, text=True, check=False, timeout=60)

    out = run("init", "--home", str(tmp_path / "a"), "--mesh", "team", "--node-name", "alpha")
    assert out.returncode == 0, out.stderr
    secret = (tmp_path / "a" / "mesh" / "secret").read_text().strip()
    assert secret not in out.stdout + out.stderr
    out = run("export", "--home", str(tmp_path / "a"), str(tmp_path / "b.bundle"))
    assert (
        out.returncode == 0
        and out.stdout == ""
        and (tmp_path / "b.bundle").stat().st_mode & 0o777 == 0o600
    )
    out = run("export", "--home", str(tmp_path / "a"), "-")
    assert out.stdout.startswith(ids.BUNDLE_HEADER)
    out = run(
        "join", "--home", str(tmp_path / "b"), str(tmp_path / "b.bundle"), "--node-name", "beta"
    )
    assert out.returncode == 0 and "joined team team" in out.stdout and secret not in out.stdout
    out = run("join", "--home", str(tmp_path / "c"), str(tmp_path / "nope"))
    assert out.returncode == 1 and "No such file" in out.stderr

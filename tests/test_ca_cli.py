"""`devmesh ca` against temporary homes and stores: the real trust stores are never touched."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from agentkit import Mesh
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from devmesh.proxy import ca, errors


@pytest.fixture
def user(mesh: Mesh) -> Path:
    """A HOME of the test's own, so no real trust store is ever read or written."""
    home = mesh.root / "user"
    home.mkdir()
    mesh.env["HOME"] = str(home)
    return home


def cert_of(mesh: Mesh) -> Path:
    return mesh.home / "ca" / "ca.pem"


def certutil_or_skip() -> str:
    found = shutil.which("certutil")
    if found is None:
        pytest.skip("certutil (libnss3-tools) not installed; scripts/test installs it")
    return found


def listed(certutil: str, database: Path) -> str:
    return subprocess.run(
        [certutil, "-L", "-d", f"sql:{database}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def no_agent(mesh: Mesh) -> None:
    """No agent was started for this home: no pid file, no socket, no process."""
    assert not (mesh.home / "agent.pid").exists()
    assert not (mesh.home / "agent.sock").exists()
    assert mesh.leftovers() == []


def test_path_creates_the_ca_once_and_starts_no_agent(mesh: Mesh) -> None:
    # The proxy port an agent of this home would take is held by something else: the CA
    # commands need a file, not the proxy, so they work all the same.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", mesh.proxy_port))
        held.listen()
        r = mesh.cli("ca", "path")
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{cert_of(mesh)}\n"
        assert r.stderr == ""
        no_agent(mesh)
        key = mesh.home / "ca" / "ca-key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        first = cert_of(mesh).read_bytes()
        for args in (("ca", "path"), ("ca", "export")):
            again = mesh.cli(*args)
            assert again.returncode == 0 and again.stderr == "", again
        no_agent(mesh)
    assert cert_of(mesh).read_bytes() == first  # created on first use only
    # The agent started later serves HTTPS with that same CA.
    mesh.start_agent()
    ctx = ssl.create_default_context(cafile=str(cert_of(mesh)))
    with (
        socket.create_connection(("127.0.0.1", mesh.https_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="web.localhost"),
    ):
        pass
    assert cert_of(mesh).read_bytes() == first
    cert = x509.load_pem_x509_certificate(first)
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert round(years) == 10
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # It can vouch for localhost names and loopback only, never for a real site.
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical


def test_export_prints_or_writes_the_pem(mesh: Mesh) -> None:
    r = mesh.cli("ca", "export")
    assert r.stdout.startswith("-----BEGIN CERTIFICATE-----\n")
    assert r.stdout == cert_of(mesh).read_text()
    out = mesh.root / "exported.pem"
    r = mesh.cli("ca", "export", "--out", str(out))
    assert r.returncode == 0
    assert out.read_text() == cert_of(mesh).read_text()


def test_install_into_injected_system_dir_and_existing_nss_db(mesh: Mesh, user: Path) -> None:
    certutil = certutil_or_skip()
    anchors = mesh.root / "anchors"
    anchors.mkdir()
    nss = user / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    subprocess.run(
        [certutil, "-N", "-d", f"sql:{nss}", "--empty-password"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    r = mesh.cli("ca", "install", "--system-dir", str(anchors), "--update-command", "")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"ok   system store {anchors}: installed as {anchors / 'devmesh-local-ca.crt'}",
        f"ok   NSS store {nss}: added as 'devmesh local CA'",
        f"The CA {cert_of(mesh)} is trusted in 2 store(s); restart browsers to pick it up.",
    ]
    assert "devmesh local CA" in listed(certutil, nss)


def test_install_creates_the_nss_store_chromium_reads(mesh: Mesh, user: Path) -> None:
    """A fresh HOME has no ~/.pki/nssdb: Chromium would never see the CA unless it is made."""
    certutil = certutil_or_skip()
    nss = user / ".pki" / "nssdb"
    r = mesh.cli("ca", "install", "--no-system")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"ok   NSS store {nss}: created it and added as 'devmesh local CA'",
        f"The CA {cert_of(mesh)} is trusted in 1 store(s); restart browsers to pick it up.",
    ]
    assert "devmesh local CA" in listed(certutil, nss)
    assert stat.S_IMODE(nss.stat().st_mode) == 0o700
    again = mesh.cli("ca", "install", "--no-system")  # the store exists now: added again
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[0] == f"ok   NSS store {nss}: added as 'devmesh local CA'"


def test_install_prints_precise_instructions_when_it_cannot(mesh: Mesh, user: Path) -> None:
    missing = mesh.root / "no-such-dir"
    profile = user / ".mozilla" / "firefox" / "abc.default"
    profile.mkdir(parents=True)
    (profile / "cert9.db").write_bytes(b"")
    mesh.env["PATH"] = "/nonexistent"  # no certutil to be found
    r = mesh.cli(
        "ca",
        "install",
        "--system-dir",
        str(missing),
        "--update-command",
        "update-ca-certificates",
    )
    assert r.returncode == 1
    cert = cert_of(mesh)
    nss = user / ".pki" / "nssdb"
    assert r.stdout.splitlines() == [
        f"TODO system store {missing}: No such file or directory; run: sudo cp {cert} "
        f"{missing / 'devmesh-local-ca.crt'} && sudo update-ca-certificates",
        f"TODO NSS store {nss}: certutil not found (Debian package libnss3-tools); run: "
        f"mkdir -p {nss} && certutil -N --empty-password -d sql:{nss} && "
        f"certutil -A -d sql:{nss} -t C,, -n 'devmesh local CA' -i {cert}",
        f"TODO NSS store {profile}: certutil not found (Debian package libnss3-tools); run: "
        f"certutil -A -d sql:{profile} -t C,, -n 'devmesh local CA' -i {cert}",
    ]
    assert r.stderr.splitlines()[-1] == (
        f"devmesh ca: the CA is trusted nowhere yet; not in: system store {missing}; "
        f"NSS store {nss}; NSS store {profile}; the TODO lines above say how"
    )


def test_world_readable_key_is_refused(tmp_path):
    authority = ca.LocalCA(tmp_path)
    authority.cert_path()
    (tmp_path / "ca" / "ca-key.pem").chmod(0o644)
    with pytest.raises(errors.CAError) as info:
        ca.LocalCA(tmp_path).cert_path()
    assert str(info.value) == (
        f"{tmp_path / 'ca' / 'ca-key.pem'}: key file mode is 644, expected 600"
    )


def test_with_a_team_identity_the_ca_commands_give_the_team_ca(mesh: Mesh) -> None:
    machine = mesh.cli("ca", "export", check=True).stdout
    mesh.cli("mesh", "init", "shop", check=True)
    team_ca = mesh.home / "mesh" / "team-ca.pem"
    assert mesh.cli("ca", "path", check=True).stdout == f"{team_ca}\n"
    exported = mesh.cli("ca", "export", check=True).stdout
    assert exported == team_ca.read_text() != machine
    cert = x509.load_pem_x509_certificate(exported.encode())
    assert "devmesh team CA shop" in cert.subject.rfc4514_string()


def test_install_replaces_the_machine_ca_by_the_team_ca_in_nss(mesh: Mesh, user: Path) -> None:
    """NSS keeps one certificate per nickname: the team CA must replace the machine CA."""
    certutil = certutil_or_skip()
    nss = user / ".pki" / "nssdb"
    r = mesh.cli("ca", "install", "--no-system")
    assert r.returncode == 0, r.stdout + r.stderr
    mesh.cli("mesh", "init", "shop", check=True)
    r = mesh.cli("ca", "install", "--no-system")
    assert r.returncode == 0, r.stdout + r.stderr
    team_ca = mesh.home / "mesh" / "team-ca.pem"
    assert r.stdout.splitlines() == [
        f"ok   NSS store {nss}: added as 'devmesh local CA'",
        f"The CA {team_ca} is trusted in 1 store(s); restart browsers to pick it up.",
    ]
    held = subprocess.run(
        [certutil, "-L", "-d", f"sql:{nss}", "-n", "devmesh local CA", "-a"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    certs = [x509.load_pem_x509_certificate(b) for b in _pem_blocks(held)]
    assert [c.fingerprint(hashes.SHA256()) for c in certs] == [
        x509.load_pem_x509_certificate(team_ca.read_bytes()).fingerprint(hashes.SHA256())
    ]


def _pem_blocks(text: str) -> list[bytes]:
    end = "-----END CERTIFICATE-----"
    return [(b + end).strip().encode() for b in text.split(end) if "BEGIN" in b]


def test_an_unconstrained_ca_is_replaced_and_the_command_says_where_it_went(
    mesh: Mesh,
) -> None:
    import trustme

    (mesh.home / "ca").mkdir(parents=True, mode=0o700)
    old = trustme.CA()  # a CA that can sign any name, as earlier versions made
    cert_of(mesh).write_bytes(old.cert_pem.bytes())
    key = mesh.home / "ca" / "ca-key.pem"
    key.write_bytes(old.private_key_pem.bytes())
    key.chmod(0o600)
    r = mesh.cli("ca", "export", check=True)
    assert r.stdout != old.cert_pem.bytes().decode()
    x509.load_pem_x509_certificate(r.stdout.encode()).extensions.get_extension_for_class(
        x509.NameConstraints
    )
    (aside,) = (mesh.home / "ca").glob("unconstrained-*")
    assert (aside / "ca.pem").read_bytes() == old.cert_pem.bytes()
    assert f"devmesh ca: replaced the local CA {cert_of(mesh)}" in r.stderr
    assert str(aside) in r.stderr

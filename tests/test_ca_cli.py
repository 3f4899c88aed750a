"""`devmesh ca` against temporary homes and stores: the real trust stores are never touched."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from devmesh.proxy import ca, errors


def run(home, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEVMESH_HOME": str(home), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "devmesh", "ca", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_path_creates_the_ca_once_with_a_private_key(tmp_path):
    r = run(tmp_path, "path")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'ca' / 'ca.pem'}\n"
    key = tmp_path / "ca" / "ca-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = (tmp_path / "ca" / "ca.pem").read_bytes()
    assert run(tmp_path, "path").returncode == 0
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == first  # created on first use only
    cert = x509.load_pem_x509_certificate(first)
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_export_prints_or_writes_the_pem(tmp_path):
    r = run(tmp_path, "export")
    assert r.stdout.startswith("-----BEGIN CERTIFICATE-----\n")
    out = tmp_path / "exported.pem"
    r = run(tmp_path, "export", "--out", str(out))
    assert r.returncode == 0
    assert out.read_text() == (tmp_path / "ca" / "ca.pem").read_text()


def test_install_into_injected_system_dir_and_nss_db(tmp_path):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    home = tmp_path / "user"
    nss = home / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    certutil = shutil.which("certutil")
    if certutil is None:
        pytest.skip("certutil (libnss3-tools) not installed")
    subprocess.run(
        [certutil, "-N", "-d", f"sql:{nss}", "--empty-password"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    r = run(
        tmp_path / "dm",
        "install",
        "--system-dir",
        str(anchors),
        "--update-command",
        "",
        "--nss-home",
        str(home),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"ok   system store {anchors}: installed as {anchors / 'devmesh-local-ca.crt'}",
        f"ok   NSS store {nss}: added as 'devmesh local CA'",
    ]
    listed = subprocess.run(
        [certutil, "-L", "-d", f"sql:{nss}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "devmesh local CA" in listed


def test_install_prints_precise_instructions_when_it_cannot(tmp_path):
    missing = tmp_path / "no-such-dir"
    home = tmp_path / "user"
    (home / ".mozilla" / "firefox" / "abc.default").mkdir(parents=True)
    (home / ".mozilla" / "firefox" / "abc.default" / "cert9.db").write_bytes(b"")
    r = run(
        tmp_path / "dm",
        "install",
        "--system-dir",
        str(missing),
        "--update-command",
        "update-ca-certificates",
        "--nss-home",
        str(home),
        "--certutil",
        "",
        env_extra={"PATH": "/nonexistent"},
    )
    assert r.returncode == 1
    cert = tmp_path / "dm" / "ca" / "ca.pem"
    profile = home / ".mozilla" / "firefox" / "abc.default"
    assert r.stdout.splitlines() == [
        f"TODO system store {missing}: No such file or directory; run: sudo cp {cert} "
        f"{missing / 'devmesh-local-ca.crt'} && sudo update-ca-certificates",
        f"TODO NSS store {profile}: certutil not found (Debian package libnss3-tools); run: "
        f"certutil -A -d sql:{profile} -t C,, -n devmesh local CA -i {cert}",
    ]


def test_world_readable_key_is_refused(tmp_path):
    authority = ca.LocalCA(tmp_path)
    authority.cert_path()
    (tmp_path / "ca" / "ca-key.pem").chmod(0o644)
    with pytest.raises(errors.CAError) as info:
        ca.LocalCA(tmp_path).cert_path()
    assert str(info.value) == (
        f"{tmp_path / 'ca' / 'ca-key.pem'}: key file mode is 644, expected 600"
    )

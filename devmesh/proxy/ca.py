"""The local certificate authority behind the HTTPS listener.

Why behind a small interface: the mesh issue replaces this CA by a team CA every teammate
holds, so the proxy only ever asks a ``CertificateAuthority`` for a server ``SSLContext`` and
for the CA certificate to export. ``LocalCA`` is the single-machine implementation.

What it does: on first use it creates an EC P-256 CA (10 years) in ``HOME/ca/`` with the key
file mode 0600; then, per SNI name a client sends, it issues a leaf (7 days, renewed a day
before expiry), caches it in memory and in ``HOME/ca/leaves/`` so restarts reuse it. Names
that are not plausible DNS names get the default ``localhost`` leaf instead of a certificate
for whatever a client typed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import ssl
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # cryptography is imported when a certificate is needed: a fast start
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _CA = tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]

from devmesh.proxy import errors

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=7)
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)
DEFAULT_NAME = "localhost"
_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")


class CertificateAuthority(Protocol):
    def cert_path(self) -> Path:
        """The CA certificate as a PEM file (what `devmesh ca path` prints)."""
        ...

    def cert_pem(self) -> bytes:
        """The CA certificate, PEM encoded (what `devmesh ca export` prints)."""
        ...

    def ssl_context_for_server(self) -> ssl.SSLContext:
        """A TLS 1.2+ server context, ALPN http/1.1, that picks a leaf per SNI name."""
        ...


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant.

    The temp file's name is unique: the agent and its proxy workers may issue the same leaf
    at the same moment, and a shared temp name let one truncate the other's file mid-write.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class LocalCA:
    """A CA whose files live in ``home/ca``; safe to share between threads."""

    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / "ca"
        self._lock = threading.Lock()
        self._ca: _CA | None = None  # (certificate, private key)
        self._leaves: dict[str, tuple[ssl.SSLContext, datetime.datetime]] = {}

    # -- the CA itself -------------------------------------------------------------------

    def cert_path(self) -> Path:
        self._load_or_create()
        return self.dir / "ca.pem"

    def key_path(self) -> Path:
        return self.dir / "ca-key.pem"

    def cert_pem(self) -> bytes:
        return self.cert_path().read_bytes()

    def _load_or_create(self) -> _CA:
        with self._lock:
            if self._ca is None:
                self._ca = self._load() or self._create()
            return self._ca

    def _load(self) -> _CA | None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        cert_file, key_file = self.dir / "ca.pem", self.key_path()
        if not cert_file.exists() or not key_file.exists():
            return None
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise errors.CAError(str(key_file), f"key file mode is {mode:o}, expected 600")
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise errors.CAError(str(cert_file), f"cannot load the CA: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise errors.CAError(
                str(key_file), f"a {type(key).__name__} cannot sign certificates (EC or RSA)"
            )
        return cert, key

    def _create(self) -> _CA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        user = os.environ.get("USER", "user")
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devmesh local CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"devmesh local CA ({user})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self.key_path(), key_pem)
        (self.dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    # -- leaves --------------------------------------------------------------------------

    def issue_leaf(self, name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``name``, valid LEAF_VALIDITY from now."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_cert, ca_key = self._load_or_create()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        if name == DEFAULT_NAME:
            sans += [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def _leaf_files(self, name: str) -> tuple[Path, datetime.datetime]:
        """Cached leaf on disk for name, issued again when missing or near expiry."""
        from cryptography import x509

        leaf_dir = self.dir / "leaves"
        path = leaf_dir / f"{name}.pem"
        if path.exists():
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                expires = cert.not_valid_after_utc
                if expires - LEAF_RENEW_BEFORE > _now():
                    return path, expires
            except ValueError:
                pass
        leaf_dir.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = self.issue_leaf(name)
        _write_private(path, cert_pem + key_pem)
        return path, _now() + LEAF_VALIDITY

    def leaf_context(self, name: str | None) -> ssl.SSLContext:
        """The server context for one SNI name (default leaf for None or odd names)."""
        name = (name or DEFAULT_NAME).lower().rstrip(".")
        if len(name) > 253 or not _DNS_NAME.match(name):
            name = DEFAULT_NAME
        with self._lock:
            cached = self._leaves.get(name)
        if cached is not None and cached[1] - LEAF_RENEW_BEFORE > _now():
            return cached[0]
        self._load_or_create()
        path, expires = self._leaf_files(name)
        ctx = _base_context()
        ctx.load_cert_chain(path)
        with self._lock:
            self._leaves[name] = (ctx, expires)
        return ctx

    def ssl_context_for_server(self) -> ssl.SSLContext:
        ctx = _base_context()
        ctx.load_cert_chain(self._leaf_files(DEFAULT_NAME)[0])

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            sslobj.context = self.leaf_context(server_name)

        ctx.sni_callback = pick
        return ctx


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

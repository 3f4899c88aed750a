"""The certificate authority behind the HTTPS listener: the team CA, or this machine's own.

Why one class for both: a browser should trust one CA per team, not one per teammate, so
once this node holds a team identity (``HOME/mesh/team-ca.pem`` and ``team-ca-key.pem``,
written by ``devmesh mesh init|join``) every ``*.localhost`` leaf is signed by the team CA;
before that, by a CA of this machine created on first use in ``HOME/ca/``. The proxy only
ever asks a ``CertificateAuthority`` for a server ``SSLContext`` and for the CA certificate
to export, and the agent and its proxy workers each build ``LocalCA(home)``, so they agree
on which CA signs without being told.

Why the switch needs no restart: before each handshake's leaf is picked, the team files are
``stat``-ed (they are replaced by rename, so a new bundle has a new inode); when they
changed, the CA is loaded again and every cached leaf is dropped. A leaf on disk is reused
only when the current CA signed it, so leaves of a previous CA are issued again.

Why name constraints on the machine's CA too: a CA trusted by the browser that can sign any
name is a standing risk (whoever reads its key can impersonate any site). Both CAs carry a
critical X.509 Name Constraints extension; this one permits only ``localhost``,
``.localhost`` and loopback addresses. A machine CA from an earlier version, without
constraints, is set aside (``HOME/ca/unconstrained-STAMP/``) and replaced, with a warning in
the log. Leaves are issued only for ``localhost`` and names under ``.localhost``; any other
SNI name (or none) gets the ``localhost`` leaf.

Leaves: EC P-256, 7 days, renewed a day before expiry, cached in memory and in
``HOME/ca/leaves/`` (mode 0600) so restarts reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # cryptography is imported when a certificate is needed: a fast start
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devmesh.proxy import errors

log = logging.getLogger("devmesh.proxy.ca")

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=7)
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)
DEFAULT_NAME = "localhost"
TEAM_CA_CERT = Path("mesh") / "team-ca.pem"
"""The team CA certificate, relative to DEVMESH_HOME (written by ``devmesh.mesh.identity``)."""
TEAM_CA_KEY = Path("mesh") / "team-ca-key.pem"
"""The team CA key, relative to DEVMESH_HOME, mode 0600."""
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Issuer:
    """The CA that signs leaves now: its certificate, key, PEM file and kind."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = dataclasses.field(repr=False)
    path: Path
    team: bool


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


def serves_name(name: str) -> bool:
    """Whether the listener issues a leaf for ``name``: ``localhost`` and ``*.localhost``."""
    return name == DEFAULT_NAME or name.endswith(".localhost")


def is_name_constrained(cert: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    return True


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise creating or replacing the CA between the agent and its proxy workers."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class LocalCA:
    """The CA of ``home`` (team CA when installed, else this machine's); thread-safe."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.dir = self.home / "ca"
        self._lock = threading.Lock()
        self._issuer: Issuer | None = None
        self._stamp: tuple[int, ...] | None = None  # the team files when _issuer was chosen
        self._leaves: dict[str, tuple[ssl.SSLContext, datetime.datetime]] = {}

    # -- the CA itself -------------------------------------------------------------------

    def cert_path(self) -> Path:
        return self.issuer().path

    def key_path(self) -> Path:
        """This machine's CA key (the team CA's key is ``HOME/mesh/team-ca-key.pem``)."""
        return self.dir / "ca-key.pem"

    def cert_pem(self) -> bytes:
        return self.cert_path().read_bytes()

    def issuer(self) -> Issuer:
        """The CA that signs now; notices a team CA installed or replaced since the last call."""
        with self._lock:
            stamp = self._team_stamp()
            if self._issuer is not None and stamp == self._stamp:
                return self._issuer
            chosen = self._load_team() if stamp is not None else None
            if chosen is None:
                if stamp is not None and self._issuer is not None:
                    return self._issuer  # the team files are being written: ask again later
                chosen = self._machine_ca()
                stamp = None  # look at the team files again on the next call
            if self._issuer is not None and chosen.cert != self._issuer.cert:
                self._leaves.clear()
                log.info("HTTPS leaves are now signed by %s", _describe(chosen))
            self._issuer, self._stamp = chosen, stamp
            return chosen

    def _team_stamp(self) -> tuple[int, ...] | None:
        try:
            cert = (self.home / TEAM_CA_CERT).stat()
            key = (self.home / TEAM_CA_KEY).stat()
        except FileNotFoundError:
            return None
        return (cert.st_ino, cert.st_mtime_ns, cert.st_size, key.st_ino, key.st_mtime_ns)

    def _load_team(self) -> Issuer | None:
        """The team CA; None while its files do not match (a bundle is being written)."""
        cert_file, key_file = self.home / TEAM_CA_CERT, self.home / TEAM_CA_KEY
        try:
            loaded = _load_pair(cert_file, key_file, team=True)
        except FileNotFoundError:
            return None
        if loaded is None:
            return None
        if not is_name_constrained(loaded.cert):
            raise errors.CAError(
                str(cert_file), "the team CA has no name constraints; refusing to sign with it"
            )
        return loaded

    def _machine_ca(self) -> Issuer:
        """This machine's CA: loaded, created on first use, or replaced when unconstrained."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        with _dir_lock(self.dir):
            try:
                loaded = _load_pair(self.dir / "ca.pem", self.key_path(), team=False)
            except FileNotFoundError:
                loaded = None
            if loaded is None and (self.dir / "ca.pem").exists():
                raise errors.CAError(
                    str(self.key_path()), "the CA key does not match the CA certificate"
                )
            if loaded is not None and not is_name_constrained(loaded.cert):
                aside = self._set_aside()
                log.warning(
                    "replaced the local CA %s: it could sign a certificate for any name; the "
                    "new one signs only localhost, *.localhost and loopback addresses. The old "
                    "files are in %s. Trust the new CA once: devmesh ca install",
                    self.dir / "ca.pem",
                    aside,
                )
                loaded = None
            return loaded or self._create()

    def _set_aside(self) -> Path:
        stamp = _now().strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.dir / f"unconstrained-{stamp}"
        aside.mkdir(mode=0o700)
        for name in ("ca.pem", "ca-key.pem", "leaves"):
            if (self.dir / name).exists():
                os.replace(self.dir / name, aside / name)
        return aside

    def _create(self) -> Issuer:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        user = os.environ.get("USER", "user")
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devmesh local CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"devmesh local CA ({user})"),
            ]
        )
        constraints = x509.NameConstraints(
            permitted_subtrees=[
                x509.DNSName("localhost"),
                x509.DNSName(".localhost"),
                x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
                x509.IPAddress(ipaddress.ip_network("::1/128")),
            ],
            excluded_subtrees=None,
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
            .add_extension(constraints, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self.key_path(), key_pem)
        tmp = self.dir / ".ca.pem.tmp"
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.dir / "ca.pem")
        return Issuer(cert=cert, key=key, path=self.dir / "ca.pem", team=False)

    # -- leaves --------------------------------------------------------------------------

    def issue_leaf(self, name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``name``, valid LEAF_VALIDITY from now."""
        return _issue(self.issuer(), name)

    def _leaf_files(self, name: str, issuer: Issuer) -> tuple[Path, datetime.datetime]:
        """Cached leaf on disk for name, issued again when missing, near expiry or signed
        by another CA than ``issuer``."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature

        leaf_dir = self.dir / "leaves"
        path = leaf_dir / f"{name}.pem"
        if path.exists():
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                cert.verify_directly_issued_by(issuer.cert)
                expires = cert.not_valid_after_utc
                if expires - LEAF_RENEW_BEFORE > _now():
                    return path, expires
            except (ValueError, TypeError, InvalidSignature):
                pass  # unreadable or another CA's: issue it again
        leaf_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_pem, key_pem = _issue(issuer, name)
        _write_private(path, cert_pem + key_pem)
        return path, _now() + LEAF_VALIDITY

    def leaf_context(self, name: str | None) -> ssl.SSLContext:
        """The server context for one SNI name (the default leaf for None or other names)."""
        name = (name or DEFAULT_NAME).lower().rstrip(".")
        if len(name) > 253 or not _DNS_NAME.match(name) or not serves_name(name):
            name = DEFAULT_NAME
        issuer = self.issuer()
        with self._lock:
            cached = self._leaves.get(name)
        if cached is not None and cached[1] - LEAF_RENEW_BEFORE > _now():
            return cached[0]
        path, expires = self._leaf_files(name, issuer)
        ctx = _base_context()
        ctx.load_cert_chain(path)
        with self._lock:
            if self._issuer is issuer:  # a CA switch meanwhile: do not cache the old leaf
                self._leaves[name] = (ctx, expires)
        return ctx

    def ssl_context_for_server(self) -> ssl.SSLContext:
        ctx = _base_context()
        ctx.load_cert_chain(self._leaf_files(DEFAULT_NAME, self.issuer())[0])

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            sslobj.context = self.leaf_context(server_name)

        ctx.sni_callback = pick
        return ctx


def _load_pair(cert_file: Path, key_file: Path, *, team: bool) -> Issuer | None:
    """A CA from its two files; None when the key is not the certificate's.

    FileNotFoundError when either is missing; CAError when the key is readable by others
    or a file cannot be parsed.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    mode = key_file.stat().st_mode & 0o777
    if mode & 0o077:
        raise errors.CAError(str(key_file), f"key file mode is {mode:o}, expected 600")
    cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise errors.CAError(str(cert_file), f"cannot load the CA: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise errors.CAError(
            str(key_file), f"a {type(key).__name__} cannot sign certificates (EC or RSA)"
        )
    if cert.public_key() != key.public_key():
        return None
    return Issuer(cert=cert, key=key, path=cert_file, team=team)


def _describe(issuer: Issuer) -> str:
    from cryptography.x509.oid import NameOID

    names = issuer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    kind = "the team CA" if issuer.team else "this machine's CA"
    return f"{kind} {names[0].value if names else ''!s} ({issuer.path})"


def _issue(issuer: Issuer, name: str) -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
        .sign(issuer.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

"""Team identity: the team CA, the mesh secret, and this node's id, name and certificate.

Why a name-constrained CA: every member of a team holds the CA key (each agent issues its
own ``*.localhost`` leaves and its node certificate), so a leaked bundle must not let
anyone impersonate a real site to a browser that trusts the CA. The CA certificate carries
a critical X.509 Name Constraints extension that permits only

- DNS ``localhost`` and ``.localhost`` (every ``*.localhost`` service),
- IP 127.0.0.0/8 and ::1/128 (loopback),
- DNS ``MESH.devmesh.internal``: the node names of this mesh (``.internal`` is reserved for
  private use by ICANN, so no public name can ever fall under it),

and OpenSSL, browsers and Python's ``ssl`` reject any leaf outside those, whoever signed it.

Files (``DEVMESH_HOME/mesh/``; keys and the secret mode 0600, written atomically):
``team.json`` (mesh name), ``team-ca.pem``, ``team-ca-key.pem``, ``secret``, ``node.json``
(node id and name), ``node.pem``, ``node-key.pem``.

The bundle (``export``/``join``) is one text file: a header, the mesh name, the secret in
base64, the CA certificate and the CA key in PEM. It is written with mode 0600, and a bundle
file readable by others is refused (``read_bundle_file``). A replaced identity is never
deleted: ``set_aside`` moves it to ``mesh/previous-STAMP/`` (the node id stays).

The secret never appears in a repr, a str or a log line: it is held in ``Secret``, whose
only way out is ``reveal()``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_DOMAIN = "devmesh.internal"
BUNDLE_HEADER = "devmesh team bundle v1"
CA_VALIDITY = datetime.timedelta(days=3650)
NODE_VALIDITY = datetime.timedelta(days=365)
NODE_RENEW_BEFORE = datetime.timedelta(days=30)
SECRET_BYTES = 32
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NODE_ID = re.compile(r"[0-9a-f]{32}")


class IdentityError(Exception):
    """A problem with the team identity; the message names the file or the value."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class Secret:
    """The mesh secret. Never shown: repr and str hide it; ``reveal`` is the only way out."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if len(value) < 16:
            raise IdentityError("mesh secret", "shorter than 16 bytes")
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> str:
        raise TypeError("a mesh secret cannot be pickled")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Team:
    """What every member shares: the mesh name, the CA (key included) and the secret."""

    mesh: str
    ca_cert_pem: bytes
    ca_key_pem: bytes = dataclasses.field(repr=False)
    secret: Secret

    @property
    def node_domain(self) -> str:
        """The DNS subtree of this mesh's node names."""
        return f"{self.mesh}.{NODE_DOMAIN}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """One node of the team: the team plus this node's id, name and certificate files."""

    home: Path
    team: Team
    node_id: str
    node_name: str
    node_cert_path: Path
    node_key_path: Path
    ca_path: Path

    @property
    def node_dns_name(self) -> str:
        return node_dns_name(self.node_name, self.team.mesh)

    @property
    def node_id_dns_name(self) -> str:
        """The name a peer checks: ids are unique where names may collide."""
        return node_dns_name(self.node_id, self.team.mesh)


def node_dns_name(label: str, mesh: str) -> str:
    return f"{label}.{mesh}.{NODE_DOMAIN}"


def mesh_dir(home: Path) -> Path:
    return Path(home) / "mesh"


def default_node_name() -> str:
    """The hostname as a DNS label (``Ana's MacBook.local`` -> ``ana-s-macbook``)."""
    host = socket.gethostname().split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", host).strip("-")[:63].strip("-")
    return label or "node"


def check_label(what: str, value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise IdentityError(what, f"{value!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    return value


# -- files -----------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write a file that is never readable by others, not even for an instant (temp+rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise IdentityError(str(path), "missing") from None
    if mode & 0o077:
        raise IdentityError(str(path), f"mode is {mode:o}, expected 600 (it holds a secret)")
    return path.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- the CA and leaves -----------------------------------------------------------------------


def create_team(mesh: str, *, now: datetime.datetime | None = None) -> Team:
    """A new team: a name-constrained EC P-256 CA and a random 32-byte secret."""
    check_label("mesh name", mesh)
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"devmesh team CA {mesh}"),
        ]
    )
    constraints = x509.NameConstraints(
        permitted_subtrees=[
            x509.DNSName("localhost"),
            x509.DNSName(".localhost"),
            x509.DNSName(f"{mesh}.{NODE_DOMAIN}"),
            x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
            x509.IPAddress(ipaddress.ip_network("::1/128")),
        ],
        excluded_subtrees=None,
    )
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
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Team(
        mesh=mesh,
        ca_cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        ca_key_pem=_key_pem(key),
        secret=Secret(secrets.token_bytes(SECRET_BYTES)),
    )


def issue_leaf(
    team: Team,
    *,
    dns_names: list[str],
    ips: list[str] | None = None,
    client: bool = False,
    validity: datetime.timedelta = NODE_VALIDITY,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a leaf signed by the team CA: (certificate PEM, key PEM).

    Nothing here refuses a name outside the constraints: the constraints are enforced by
    whoever verifies the chain, which is the point (a leaked key can sign, but nobody
    will believe the result). ``client`` adds clientAuth to serverAuth.
    """
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(team.ca_cert_pem)
    ca_key = serialization.load_pem_private_key(team.ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise IdentityError("team CA key", "not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips or ()]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devmesh")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# -- the bundle ------------------------------------------------------------------------------


def encode_bundle(team: Team) -> bytes:
    """The bundle text: what ``mesh export`` writes and ``mesh join`` reads."""
    secret = base64.b64encode(team.secret.reveal()).decode()
    head = (
        f"{BUNDLE_HEADER}\n"
        "# Keep private: it holds the team CA key and the mesh secret.\n"
        f"mesh: {team.mesh}\nsecret: {secret}\n"
    )
    return head.encode() + team.ca_cert_pem + team.ca_key_pem


def decode_bundle(data: bytes, where: str = "bundle") -> Team:
    """Parse a bundle; raises IdentityError naming what is wrong (never echoing the secret)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise IdentityError(where, "not a devmesh team bundle (not ASCII text)") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != BUNDLE_HEADER:
        raise IdentityError(
            where, f"not a devmesh team bundle (first line is not {BUNDLE_HEADER!r})"
        )
    fields = {}
    for line in lines[1:]:
        if line.startswith("-----"):
            break
        if line.startswith("#") or not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise IdentityError(where, f"unexpected line {line[:20]!r}...")
        fields[key.strip()] = value.strip()
    mesh = fields.get("mesh", "")
    check_label(f"{where}: mesh", mesh)
    try:
        secret = Secret(base64.b64decode(fields.get("secret", ""), validate=True))
    except (ValueError, IdentityError):
        raise IdentityError(where, "secret: not base64 of at least 16 bytes") from None
    cert_match = re.search(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", text, re.S
    )
    key_match = re.search(
        r"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----.+?-----END ([A-Z]+ )?PRIVATE KEY-----\n?",
        text,
        re.S,
    )
    if not cert_match or not key_match:
        raise IdentityError(where, "the CA certificate or its key is missing")
    team = Team(
        mesh=mesh,
        ca_cert_pem=cert_match.group(0).encode(),
        ca_key_pem=key_match.group(0).encode(),
        secret=secret,
    )
    _check_team(team, where)
    return team


def _check_team(team: Team, where: str) -> None:
    try:
        cert = x509.load_pem_x509_certificate(team.ca_cert_pem)
        key = serialization.load_pem_private_key(team.ca_key_pem, password=None)
    except ValueError as exc:
        raise IdentityError(where, f"cannot load the CA: {exc}") from None
    pub = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != mine:
        raise IdentityError(where, "the CA key does not match the CA certificate")
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        raise IdentityError(where, "the CA has no name constraints; refusing it") from None


# -- on disk ---------------------------------------------------------------------------------


def _save_team(home: Path, team: Team) -> None:
    d = mesh_dir(home)
    write_private(d / "team-ca-key.pem", team.ca_key_pem)
    write_private(d / "secret", base64.b64encode(team.secret.reveal()) + b"\n")
    write_private(d / "team-ca.pem", team.ca_cert_pem)
    write_private(d / "team.json", json.dumps({"mesh": team.mesh}).encode())


def _load_team(home: Path) -> Team:
    d = mesh_dir(home)
    if not (d / "team.json").exists():
        raise IdentityError(str(d), "no team identity: run `devmesh mesh init` or `mesh join`")
    try:
        mesh = json.loads((d / "team.json").read_text())["mesh"]
    except (ValueError, KeyError, TypeError):
        raise IdentityError(str(d / "team.json"), "unreadable") from None
    try:
        secret = Secret(base64.b64decode(_read_private(d / "secret").strip(), validate=True))
    except ValueError:
        raise IdentityError(str(d / "secret"), "not base64") from None
    team = Team(
        mesh=check_label("mesh name", str(mesh)),
        ca_cert_pem=(d / "team-ca.pem").read_bytes(),
        ca_key_pem=_read_private(d / "team-ca-key.pem"),
        secret=secret,
    )
    _check_team(team, str(d))
    return team


def _node(home: Path, node_name: str | None, team: Team, fresh: bool) -> Identity:
    d = mesh_dir(home)
    node_file = d / "node.json"
    stored: dict[str, str] = {}
    if node_file.exists():
        try:
            stored = json.loads(node_file.read_text())
        except ValueError:
            raise IdentityError(str(node_file), "unreadable") from None
    node_id = stored.get("id") or secrets.token_hex(16)
    if not _NODE_ID.fullmatch(node_id):
        raise IdentityError(str(node_file), "id: expected 32 hex digits")
    name = check_label("node name", node_name or stored.get("name") or default_node_name())
    if stored != {"id": node_id, "name": name}:
        write_private(node_file, json.dumps({"id": node_id, "name": name}).encode())
        fresh = True
    cert_path, key_path = d / "node.pem", d / "node-key.pem"
    if not fresh and cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(team.ca_cert_pem)
        fresh = (
            cert.issuer != ca.subject
            or cert.not_valid_after_utc - _now() < NODE_RENEW_BEFORE
            or cert.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            ).value.key_identifier
            != x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
        )
    else:
        fresh = True
    if fresh:
        cert_pem, key_pem = issue_leaf(
            team,
            dns_names=[node_dns_name(name, team.mesh), node_dns_name(node_id, team.mesh)],
            client=True,
        )
        write_private(key_path, key_pem)
        write_private(cert_path, cert_pem)
    else:
        _read_private(key_path)  # refuses a key readable by others
    return Identity(
        home=Path(home),
        team=team,
        node_id=node_id,
        node_name=name,
        node_cert_path=cert_path,
        node_key_path=key_path,
        ca_path=d / "team-ca.pem",
    )


def init(home: Path, mesh: str, *, node_name: str | None = None) -> Identity:
    """Create a new team in ``home`` (refuses to replace an existing one)."""
    if (mesh_dir(home) / "team.json").exists():
        raise IdentityError(str(mesh_dir(home)), "a team identity exists already")
    team = create_team(mesh)
    _save_team(home, team)
    return _node(home, node_name, team, fresh=True)


def join(
    home: Path, bundle: bytes, *, node_name: str | None = None, where: str = "bundle"
) -> Identity:
    """Install a teammate's bundle; keeps this node's id, issues a new node certificate."""
    team = decode_bundle(bundle, where)
    _save_team(home, team)
    return _node(home, node_name, team, fresh=True)


def load(home: Path, *, node_name: str | None = None) -> Identity:
    """The identity in ``home``; renews the node certificate when it is near expiry."""
    team = _load_team(home)
    return _node(home, node_name, team, fresh=False)


def export_bundle(home: Path, path: Path) -> None:
    """Write the bundle to ``path`` with mode 0600 (never readable by others)."""
    write_private(Path(path), encode_bundle(_load_team(home)))


# -- what `devmesh mesh` needs on top: replace without losing, read a teammate's file -------

TEAM_FILES = ("team.json", "team-ca.pem", "team-ca-key.pem", "secret", "node.pem", "node-key.pem")
"""The files of a team identity; ``node.json`` (the node id and name) is not one: it stays."""


def exists(home: Path) -> bool:
    return (mesh_dir(home) / "team.json").exists()


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate, as browsers show it (``AB:CD:...``)."""
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def set_aside(home: Path, *, now: datetime.datetime | None = None) -> Path | None:
    """Move the current team identity to ``mesh/previous-STAMP/`` and return that folder.

    Why not delete: a team identity is a CA key that browsers may trust; replacing it by
    mistake must be recoverable. The node id and name stay, so this node remains itself.
    """
    d = mesh_dir(home)
    present = [name for name in TEAM_FILES if (d / name).exists()]
    if not present:
        return None
    stamp = (now or _now()).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = d / f"previous-{stamp}"
    aside.mkdir(mode=0o700)
    # team.json first: without it the folder no longer holds an identity, even if a later
    # move failed, and nothing ever reads a half-moved one as complete.
    for name in sorted(present, key=lambda n: n != "team.json"):
        os.replace(d / name, aside / name)
    return aside


def read_bundle_file(path: Path) -> bytes:
    """A teammate's bundle file, refused when others can read it (it holds the CA key).

    The error says what is wrong and how to fix it; the content is never echoed.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(str(path), "no such file") from None
    except OSError as exc:
        raise IdentityError(str(path), f"cannot read it: {exc.strerror}") from None
    if not path.is_file():
        raise IdentityError(str(path), "not a regular file")
    mode = st.st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(
            str(path),
            f"mode is {mode:o}: others can read the team CA key and the mesh secret in it; "
            f"run `chmod 600 {path}` (and ask whoever sent it how it travelled)",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(str(path), f"cannot read it: {exc.strerror}") from None


def remove_team_files(home: Path) -> None:
    """Remove a half-written team identity (team.json first: then it is no identity)."""
    d = mesh_dir(home)
    for name in TEAM_FILES:
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()


def restore_aside(home: Path, aside: Path) -> None:
    """Undo ``set_aside`` after a replacement failed half-way: the old identity comes back."""
    d = mesh_dir(home)
    remove_team_files(home)
    # team.json last: the folder holds an identity again only once every file is back.
    for name in sorted(TEAM_FILES, key=lambda n: n == "team.json"):
        if (aside / name).exists():
            os.replace(aside / name, d / name)
    with contextlib.suppress(OSError):
        aside.rmdir()

"""`devmesh mesh init|export|join|show` against real agents, checked with real TLS clients.

Two agents, each with its own DEVMESH_HOME and proxy ports, stand for two teammates'
machines. What matters to a user is checked from outside: exit status and messages, the
files' modes, and that curl and Python's ssl trust both agents' HTTPS listeners with the
ONE team CA file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from agentkit import Mesh
from cryptography import x509

from devmesh.mesh import identity as ids

HEADER = ids.BUNDLE_HEADER


@pytest.fixture
def teammate() -> Iterator[Mesh]:
    """A second machine: another DEVMESH_HOME, another agent, other proxy ports."""
    m = Mesh()
    try:
        yield m
    finally:
        m.close()


def ok(m: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return m.cli(*args, check=True)


def show(m: Mesh) -> dict:
    return json.loads(ok(m, "mesh", "show", "--json").stdout)["identity"]


def mesh_files(m: Mesh) -> dict[str, bytes]:
    """Every file under DEVMESH_HOME/mesh, by relative path (to see that nothing changed)."""
    d = m.home / "mesh"
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leaf(port: int, name: str, cafile: Path) -> x509.Certificate:
    """The leaf served for ``name``, verified (chain, constraints, hostname) against cafile."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def curl(port: int, name: str, cafile: Path) -> subprocess.CompletedProcess[str]:
    """curl --cacert: TLS verified by another client; any HTTP status is fine (no route)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cafile),
         f"https://{name}:{port}/"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip


def export(m: Mesh, target: Path) -> Path:
    ok(m, "mesh", "export", str(target))
    return target


def test_init_export_join_one_team_ca_for_both_agents(mesh: Mesh, teammate: Mesh) -> None:
    outputs = []
    # Both agents run; the teammate's already serves HTTPS with its machine CA before joining.
    mesh.start_agent()
    teammate.start_agent()
    machine_ca = Path(ok(teammate, "ca", "path").stdout.strip())
    leaf(teammate.https_port, "web.localhost", machine_ca)
    teammate_pid = teammate.agent_pid()

    r = ok(mesh, "mesh", "init", "shop", "--node-name", "alpha")
    outputs.append(r)
    assert "Created the team shop; this node is alpha" in r.stdout
    bundle = export(mesh, mesh.root / "shop.bundle")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert bundle.read_text().startswith(HEADER)

    r = ok(teammate, "mesh", "join", str(bundle), "--node-name", "beta")
    outputs.append(r)
    assert "Joined the team shop; this node is beta" in r.stdout
    assert teammate.agent_pid() == teammate_pid  # the same agent: no restart

    a, b = show(mesh), show(teammate)
    assert (a["mesh"], a["node_name"], b["mesh"], b["node_name"]) == (
        "shop", "alpha", "shop", "beta",
    )  # fmt: skip
    assert a["ca_fingerprint"] == b["ca_fingerprint"]
    assert a["node_id"] != b["node_id"]
    assert a["ca_fingerprint"] in r.stdout

    # ONE file, the team CA as `ca export` gives it on the first machine, trusts both.
    team_ca = mesh.root / "team-ca.pem"
    team_ca.write_text(ok(mesh, "ca", "export").stdout)
    assert ok(teammate, "ca", "export").stdout == team_ca.read_text()
    assert ok(teammate, "ca", "path").stdout.strip() == b["files"]["ca"]
    for m in (mesh, teammate):
        for name in ("api.localhost", "web.shop.localhost", "localhost"):
            leaf(m.https_port, name, team_ca)
            r = curl(m.https_port, name, team_ca)
            assert r.returncode == 0, (m.home, name, r.stderr)
        # httpx too; *.localhost may not resolve here, so it dials 127.0.0.1 and sends SNI.
        ctx = ssl.create_default_context(cafile=str(team_ca))
        with httpx.Client(verify=ctx, trust_env=False) as client:
            answer = client.get(
                f"https://127.0.0.1:{m.https_port}/",
                headers={"Host": "api.localhost"},
                extensions={"sni_hostname": "api.localhost"},
            )
            assert answer.status_code == 404  # verified TLS; no route is applied
    with pytest.raises(ssl.SSLCertVerificationError):  # the old machine CA no longer works
        leaf(teammate.https_port, "web.localhost", machine_ca)

    # Each node's own certificate is signed by the team CA, for its own names.
    ca_cert = x509.load_pem_x509_certificate(team_ca.read_bytes())
    for ident in (a, b):
        node = x509.load_pem_x509_certificate(Path(ident["files"]["node_cert"]).read_bytes())
        node.verify_directly_issued_by(ca_cert)
        sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"{ident['node_id']}.shop.devmesh.internal" in sans.get_values_for_type(x509.DNSName)

    # Keys and the secret stay private; the secret shows nowhere but in the bundle.
    for m in (mesh, teammate):
        for name in ("team-ca-key.pem", "secret", "node-key.pem"):
            assert stat.S_IMODE((m.home / "mesh" / name).stat().st_mode) == 0o600
    outputs += [
        mesh.cli("mesh", "show"),
        mesh.cli("mesh", "show", "--json"),
        teammate.cli("mesh", "show"),
        teammate.cli("status", "--json"),
    ]
    secret_b64 = (mesh.home / "mesh" / "secret").read_text().strip()
    secret_raw = base64.b64decode(secret_b64)
    assert secret_b64 in bundle.read_text()
    logs = b"".join(
        p.read_bytes() for m in (mesh, teammate) for p in m.home.rglob("*.log") if p.is_file()
    )
    for text in [o.stdout + o.stderr for o in outputs] + [logs.decode(errors="replace")]:
        assert secret_b64 not in text
        assert secret_raw.hex() not in text
    assert secret_raw not in logs


def test_show_without_an_identity(mesh: Mesh) -> None:
    r = mesh.cli("mesh", "show")
    assert r.returncode == 1
    assert "no team identity yet: run `devmesh mesh init`" in r.stderr
    r = mesh.cli("mesh", "show", "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == {"identity": None}


def test_init_refuses_an_existing_identity_and_force_keeps_it_aside(mesh: Mesh) -> None:
    mesh.start_agent()  # its proxy follows the identity on disk
    ok(mesh, "mesh", "init", "shop", "--node-name", "alpha")
    first, before = show(mesh), mesh_files(mesh)
    r = mesh.cli("mesh", "init", "shop")
    assert r.returncode == 1
    assert "this node already has a team identity (mesh shop" in r.stderr
    assert "`devmesh mesh init --force`" in r.stderr
    assert mesh_files(mesh) == before  # nothing changed

    r = ok(mesh, "mesh", "init", "shop", "--force")
    second = show(mesh)
    assert second["ca_fingerprint"] != first["ca_fingerprint"]
    assert second["node_id"] == first["node_id"] and second["node_name"] == "alpha"
    (aside,) = (mesh.home / "mesh").glob("previous-*")
    assert f"The previous team identity is kept in {aside}" in r.stdout
    for name in ids.TEAM_FILES:  # the old identity, byte for byte
        assert (aside / name).read_bytes() == before[name], name
    assert stat.S_IMODE(aside.stat().st_mode) == 0o700
    leaf(mesh.https_port, "api.localhost", Path(second["files"]["ca"]))


def test_init_takes_the_mesh_name_from_devmesh_yaml_or_asks_for_one(mesh: Mesh) -> None:
    bare = mesh.root / "bare"
    bare.mkdir()
    r = mesh.cli("mesh", "init", cwd=bare)
    assert r.returncode == 1 and "name the mesh: `devmesh mesh init NAME`" in r.stderr
    assert mesh_files(mesh) == {}
    r = mesh.cli("mesh", "init", "Not A Label")
    assert r.returncode == 1 and "is not a DNS label" in r.stderr
    assert mesh_files(mesh) == {}
    proj = mesh.project(
        "proj",
        """
        version: 1
        project: proj
        mesh:
          name: kitchen
        services:
          web:
            command: ["true"]
            version: 1.0.0
        """,
    )
    r = mesh.cli("-f", str(proj / "devmesh.yaml"), "mesh", "init", cwd=bare)
    assert r.returncode == 0, r.stderr
    assert show(mesh)["mesh"] == "kitchen"
    r = mesh.cli("mesh", "init", "--force", cwd=proj)
    assert r.returncode == 0, r.stderr
    assert show(mesh)["mesh"] == "kitchen"


def test_join_another_team_needs_force_and_keeps_the_node_id(mesh: Mesh, teammate: Mesh) -> None:
    teammate.start_agent()
    ok(mesh, "mesh", "init", "shop")
    bundle = export(mesh, mesh.root / "shop.bundle")
    ok(teammate, "mesh", "init", "garage", "--node-name", "beta")
    mine, before = show(teammate), mesh_files(teammate)

    r = teammate.cli("mesh", "join", str(bundle))
    assert r.returncode == 1
    assert "already has a team identity (mesh garage" in r.stderr
    assert f"`devmesh mesh join --force {bundle}`" in r.stderr
    assert mesh_files(teammate) == before
    leaf(teammate.https_port, "api.localhost", Path(mine["files"]["ca"]))

    ok(teammate, "mesh", "join", "--force", str(bundle))
    joined = show(teammate)
    assert joined["mesh"] == "shop" and joined["ca_fingerprint"] == show(mesh)["ca_fingerprint"]
    assert (joined["node_id"], joined["node_name"]) == (mine["node_id"], "beta")
    (aside,) = (teammate.home / "mesh").glob("previous-*")
    assert (aside / "team-ca-key.pem").read_bytes() == before["team-ca-key.pem"]
    leaf(teammate.https_port, "api.localhost", mesh.home / "mesh" / "team-ca.pem")
    # Joining the same team again is not a replacement: nothing is set aside.
    r = ok(teammate, "mesh", "join", str(bundle))
    assert "previous team identity" not in r.stdout
    assert len(list((teammate.home / "mesh").glob("previous-*"))) == 1


def _bad_bundles(good: bytes, root: Path) -> list[tuple[str, Path, str]]:
    """(case, file, what the error must say) for each way a bundle file can be wrong."""
    team = ids.decode_bundle(good)
    other = ids.create_team("shop")
    loose_ca = trustme.CA()

    def write(name: str, data: bytes, mode: int = 0o600) -> Path:
        p = root / name
        p.write_bytes(data)
        p.chmod(mode)
        return p

    mismatched = ids.Team(
        mesh="shop", ca_cert_pem=team.ca_cert_pem, ca_key_pem=other.ca_key_pem, secret=team.secret
    )
    unconstrained = ids.Team(
        mesh="shop",
        ca_cert_pem=loose_ca.cert_pem.bytes(),
        ca_key_pem=loose_ca.private_key_pem.bytes(),
        secret=team.secret,
    )
    cut = good.index(b"-----BEGIN CERTIFICATE-----") + 100
    return [
        ("truncated", write("truncated", good[:cut]), "the CA certificate or its key is missing"),
        ("world-readable", write("loose", good, 0o644), "mode is 644: others can read"),
        ("unreadable", write("locked", good, 0o000), "cannot read it"),
        (
            "unconstrained",
            write("mkcert", ids.encode_bundle(unconstrained)),
            "the CA has no name constraints; refusing it",
        ),
        (
            "mismatched key",
            write("mixed", ids.encode_bundle(mismatched)),
            "the CA key does not match the CA certificate",
        ),
        ("not a bundle", write("notes.txt", b"hello\n"), "not a devmesh team bundle"),
        ("binary", write("random.bin", os.urandom(300)), "not a devmesh team bundle"),
        ("missing", root / "nope", "no such file"),
        ("a directory", root, "not a regular file"),
    ]


def test_bad_bundles_are_refused_with_a_reason_and_change_nothing(
    mesh: Mesh, teammate: Mesh
) -> None:
    ok(mesh, "mesh", "init", "shop")
    good = export(mesh, mesh.root / "good.bundle").read_bytes()
    bad_dir = teammate.root / "bad"
    bad_dir.mkdir()
    cases = _bad_bundles(good, bad_dir)
    if os.geteuid() == 0:  # root reads a mode-000 file: that case cannot happen for root
        cases = [c for c in cases if c[0] != "unreadable"]
    # A fresh node: a refused bundle leaves no identity behind.
    for case, path, problem in cases:
        r = teammate.cli("mesh", "join", str(path))
        assert r.returncode == 1, case
        assert f"devmesh mesh: {path}" in r.stderr and problem in r.stderr, (case, r.stderr)
        assert mesh_files(teammate) == {}, case
    # A node with an identity keeps it byte for byte, even with --force.
    ok(teammate, "mesh", "init", "garage")
    before = mesh_files(teammate)
    for case, path, problem in cases:
        r = teammate.cli("mesh", "join", "--force", str(path))
        assert r.returncode == 1 and problem in r.stderr, (case, r.stderr)
        assert mesh_files(teammate) == before, case
    assert "BEGIN" not in r.stderr


def test_export_never_overwrites_and_writes_stdout(mesh: Mesh) -> None:
    target = mesh.root / "out.bundle"
    r = mesh.cli("mesh", "export", str(target))
    assert r.returncode == 1 and "no team identity yet" in r.stderr
    assert not target.exists()

    ok(mesh, "mesh", "init", "shop")
    target.write_text("precious\n")
    r = mesh.cli("mesh", "export", str(target))
    assert r.returncode == 1
    assert f"{target} exists; not overwriting it (--force replaces it)" in r.stderr
    assert target.read_text() == "precious\n"
    link = mesh.root / "link.bundle"
    link.symlink_to(mesh.root / "elsewhere")  # a dangling link is not followed either
    assert mesh.cli("mesh", "export", str(link)).returncode == 1
    assert not (mesh.root / "elsewhere").exists()

    ok(mesh, "mesh", "export", "--force", str(target))
    assert target.read_text().startswith(HEADER)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    r = ok(mesh, "mesh", "export", "-")
    assert r.stdout == target.read_text()
    assert ids.decode_bundle(r.stdout.encode()).mesh == "shop"
    assert not list(mesh.root.glob(".out.bundle.*"))  # no temp file left behind
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    r = ok(mesh, "mesh", "export", "--force", str(target))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


def test_openssl_rejects_a_real_site_signed_with_the_team_key(mesh: Mesh, tmp_path: Path) -> None:
    """What a leaked bundle can do: sign anything; what it cannot: be believed for it."""
    ok(mesh, "mesh", "init", "shop")
    team = ids.decode_bundle(ok(mesh, "mesh", "export", "-").stdout.encode())
    ca_file = mesh.home / "mesh" / "team-ca.pem"
    for dns, ips, verdict in [
        (["api.localhost"], ["127.0.0.1"], True),
        (["example.com"], [], False),
        (["www.google.com", "api.localhost"], [], False),
        ([], ["8.8.8.8"], False),
        (["alpha.othermesh.devmesh.internal"], [], False),
    ]:
        cert, _ = ids.issue_leaf(team, dns_names=dns, ips=ips)
        (tmp_path / "leaf.pem").write_bytes(cert)
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca_file), str(tmp_path / "leaf.pem")],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert (out.returncode == 0) is verdict, (dns, ips, out.stdout + out.stderr)
        if not verdict:
            assert "subtree violation" in out.stdout + out.stderr


def test_proxy_workers_switch_to_the_team_ca_too() -> None:
    """Worker processes share the HTTPS port: every one must sign with the team CA after join,
    without a restart (the kernel spreads connections over them)."""
    m = Mesh(proxy_workers=2)
    try:
        m.start_agent()
        machine_ca = Path(ok(m, "ca", "path").stdout.strip())
        m.wait_for(lambda: len(m.leftovers()) >= 3, what="the agent and its two proxy workers")
        for _ in range(6):
            leaf(m.https_port, "api.localhost", machine_ca)
        pids = sorted(m.leftovers())
        ok(m, "mesh", "init", "shop")
        team_ca = m.home / "mesh" / "team-ca.pem"
        for i in range(30):  # bounded: enough connections to reach every worker
            # api.localhost was cached with the machine CA in each worker that served it.
            leaf(m.https_port, "api.localhost" if i % 2 else f"s{i % 5}.localhost", team_ca)
        assert sorted(m.leftovers()) == pids  # same processes: nothing restarted
    finally:
        m.close()


def test_a_failed_replacement_brings_the_old_identity_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing half-way (disk full, I/O error) cannot be produced for real here (the
    tests may run as root, whom permissions do not stop), so the failure is injected into
    the certificate issue step: everything around it is the real code on real files."""
    from devmesh.mesh import membership

    home = tmp_path / "home"
    old = ids.init(home, "garage", node_name="beta")
    before = {p.name: p.read_bytes() for p in (home / "mesh").iterdir() if p.is_file()}
    bundle = tmp_path / "shop.bundle"
    ids.write_private(bundle, ids.encode_bundle(ids.create_team("shop")))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ids, "issue_leaf", disk_full)
    for attempt in (
        lambda: membership.init(home, "shop", None, True),
        lambda: membership.join(home, bundle, None, True),
    ):
        with pytest.raises(OSError, match="No space left"):
            attempt()
        after = {p.name: p.read_bytes() for p in (home / "mesh").iterdir() if p.is_file()}
        assert after == before
        assert not list((home / "mesh").glob("previous-*"))
    # A node that had no identity keeps none, rather than half of one.
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        membership.join(fresh, bundle, None, False)
    assert not ids.exists(fresh)
    assert sorted(p.name for p in (fresh / "mesh").iterdir()) == ["node.json"]
    monkeypatch.undo()
    assert ids.load(home).team.ca_cert_pem == old.team.ca_cert_pem

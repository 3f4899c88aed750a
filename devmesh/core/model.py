"""The configuration model: what a devmesh.yaml means once it has been checked.

Why it exists: every layer above the loader (planner, supervisor, proxy, mesh) reads this
model and never the raw YAML, so the meaning of a key is decided in exactly one place.
The model is built only from a document that already passed the JSON Schema and the
semantic checks in ``devmesh.config``; ``from_document`` therefore trusts its input and
fills defaults, while ``to_document`` writes a normalised document that validates again
(the CLI sends that document to the agent, and the property tests round-trip it).

What it does not guarantee: that files named by the model (``cwd``) exist, or
that ports are free. Those are facts about a machine, checked by the agent at apply time.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_PROXY_PORT = 7700
DEFAULT_HTTPS_PORT = 7743
DEFAULT_MESH_PORT = 7701
DEFAULT_DISCOVERY_PORT = 7702


class HealthKind(enum.Enum):
    """How readiness is probed. NONE means "ready once the process is running"."""

    HTTP = "http"
    TCP = "tcp"
    COMMAND = "command"
    NONE = "none"


class Condition(enum.Enum):
    """What a dependent waits for before it starts."""

    STARTED = "started"
    HEALTHY = "healthy"


class RestartPolicy(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class VersionPolicy(enum.Enum):
    WARN = "warn"
    REJECT = "reject"


class Prefer(enum.Enum):
    LOCAL = "local"
    PEER = "peer"
    FALLBACK = "fallback"


class Balance(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"
    RANDOM = "random"
    FIRST = "first"


class DbEngine(enum.Enum):
    POSTGRES = "postgres"
    SQLITE = "sqlite"


class DbProvider(enum.Enum):
    AUTO = "auto"
    NATIVE = "native"
    DOCKER = "docker"


class Scheme(enum.Enum):
    """What the service's own port speaks; the proxy terminates TLS either way."""

    HTTP = "http"
    HTTPS = "https"


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    kind: HealthKind
    http_path: str | None = None
    """Path probed with GET on 127.0.0.1:port; a 2xx or 3xx answer passes."""
    command: tuple[str, ...] | None = None
    """Argument vector run in the service's cwd and env; exit status 0 passes."""
    interval_s: float = 1.0
    """Seconds between two probes."""
    timeout_s: float = 2.0
    """Seconds one probe may take before it counts as failed."""
    retries: int = 3
    """Consecutive failures after which a started service is marked unhealthy."""
    start_period_s: float = 10.0
    """Seconds after start during which failures do not count against retries."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Dependency:
    name: str
    version_range: str | None = None
    """Semver range the caller accepts (npm syntax: ^1.4, ~2.3, >=2 <3, 1.x)."""
    condition: Condition = Condition.STARTED
    versions: VersionPolicy | None = None
    """``policy.versions`` for this edge only; None follows the project's policy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Restart:
    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_retries: int | None = None
    """Restarts allowed before the service is left crash-looping; None is unlimited."""
    backoff_s: float = 1.0
    """First restart delay in seconds; doubles per consecutive crash, capped at 60 s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    signal: str = "SIGTERM"
    grace_s: float = 10.0
    """Seconds between the stop signal and SIGKILL."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DbSync:
    """Where a database's staging subset comes from, and which rows it holds."""

    source: str
    """The source's PostgreSQL URL (``from`` in the file); it holds a password."""
    tables: Mapping[str, str]
    """Table -> SQL ``where`` choosing its rows."""
    limit: int | None = None
    follow_foreign_keys: bool = True
    exclude_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    on_first_up: bool = False
    """Run the sync when the database is created by an ``up``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Db:
    engine: DbEngine
    version: str | None = None
    provider: DbProvider = DbProvider.AUTO
    name: str | None = None
    """Database name; defaults to the service's name."""
    image: str | None = None
    """Docker image of the docker provider; None is ``postgres:VERSION``."""
    init: tuple[str, ...] = ()
    """Absolute paths of SQL files run once, in order, when the database is created."""
    sync: DbSync | None = None
    snapshots_keep: int = 5
    """Snapshots kept by the one a sync takes first; older ones are deleted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    name: str
    version: str | None = None
    command: tuple[str, ...] | None = None
    """None marks a service this repo depends on but does not run (a teammate's)."""
    cwd: str | None = None
    """Absolute working directory; None is the folder of devmesh.yaml."""
    port: int | None = None
    """Fixed port, or None when the agent picks one (see ``wants_port``) or there is none."""
    port_auto: bool = False
    """``port: auto`` was written: the agent picks a port even for a service without checks."""
    scheme: Scheme = Scheme.HTTP
    env: Mapping[str, str] = field(default_factory=dict)
    """The service's own environment: env_file entries overridden by ``env``."""
    env_file: tuple[str, ...] = ()
    """Files the env was read from (already merged into env); kept to show the user."""
    health: Health | None = None
    """None is the default check: TCP on the port when there is one, else none."""
    depends_on: tuple[Dependency, ...] = ()
    restart: Restart = field(default_factory=Restart)
    stop: Stop = field(default_factory=Stop)
    share: bool = False
    branch: str | None = None
    """Namespace among peers; "auto" is resolved to the git branch by the agent."""
    fallback: str | None = None
    db: Db | None = None
    project: str | None = None
    """For a service without a command: the project that runs it (None: this project)."""
    remote: bool = False
    """Never run on this machine: taken from the mesh or the fallback, as without a command."""

    @property
    def runs_here(self) -> bool:
        return self.command is not None and not self.remote

    @property
    def target_project(self) -> str | None:
        """The project whose instance answers calls to this service; None: this project."""
        return self.project

    @property
    def effective_health(self) -> Health:
        if self.health is not None:
            return self.health
        if self.runs_here and (self.port is not None or self.wants_port):
            return Health(kind=HealthKind.TCP)
        return Health(kind=HealthKind.NONE)

    @property
    def wants_port(self) -> bool:
        """Whether the agent gives this service a port (PORT, a URL, NAME_URL for callers).

        A service that runs here has one when ``port:`` says so (a number or ``auto``), or
        when nothing says it listens on none: without ``health:`` it is checked by a TCP
        connect to its port, and an http or tcp check needs one too. A worker written with
        ``health: {tcp: false}`` or a command check, and no ``port:``, listens on nothing:
        it gets no port, no URL and no edge, as a compose service without ``ports:``.
        """
        if not self.runs_here:
            return False
        if self.port is not None or self.port_auto or self.health is None:
            return True
        return self.health.kind in (HealthKind.HTTP, HealthKind.TCP)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    port: int = DEFAULT_PROXY_PORT
    https_port: int = DEFAULT_HTTPS_PORT
    connect_timeout_s: float = 5.0
    """Seconds to connect to a service before the proxy answers 504."""
    idle_timeout_s: float = 60.0
    """Seconds a service may stay silent before the proxy answers 504 or cuts the stream
    (the service's side of an exchange; the two below are the client's)."""
    header_timeout_s: float = 10.0
    """Seconds a client has to send a whole request head once it began (from the connection's
    opening for the first one); then 408 and the connection closes."""
    keepalive_timeout_s: float = 75.0
    """Seconds an idle keep-alive client connection stays open between requests (nginx's)."""
    max_body_mb: float | None = None
    """Largest request body forwarded, in MiB; None is no limit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    retention_days: float = 7.0
    """Days of per-minute metrics history the agent keeps (``devmesh metrics``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Serf:
    """``mesh.discovery.serf``: gossip discovery on the machine's Serf agent."""

    port: int = 7946
    join: tuple[str, ...] = ()
    """HOST:PORT of members' Serf ports; one reachable member finds everyone."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    broadcast: bool = True
    interfaces: tuple[str, ...] = ("auto",)
    port: int = DEFAULT_DISCOVERY_PORT
    """UDP port of discovery datagrams; seeds name this port of a peer."""
    interval_s: float = 2.0
    peers: tuple[str, ...] = ()
    mdns: bool = False
    serf: Serf | None = None
    """None: Serf is not used (the default)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshSettings:
    name: str | None = None
    """None: the mesh of the node's team identity."""
    node_name: str | None = None
    """None: the name the node's identity holds (the hostname at first)."""
    port: int = DEFAULT_MESH_PORT
    discovery: Discovery = field(default_factory=Discovery)
    allow: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    versions: VersionPolicy = VersionPolicy.WARN
    prefer: Prefer = Prefer.LOCAL
    balance: Balance = Balance.ROUND_ROBIN


@dataclass(frozen=True, slots=True, kw_only=True)
class Project:
    name: str
    directory: str
    """Absolute folder of the devmesh.yaml; relative paths in the file are resolved from it."""
    source: str = "devmesh.yaml"
    """Where the config came from (a path, or "<stdin>"), for messages."""
    proxy: ProxySettings = field(default_factory=ProxySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    mesh: MeshSettings | None = None
    policy: Policy = field(default_factory=Policy)
    services: Mapping[str, Service] = field(default_factory=dict)
    """Services in file order."""

    def service(self, name: str) -> Service:
        return self.services[name]


# ---------------------------------------------------------------------------------------------
# Document <-> model. The document is the YAML shape (after interpolation), so what the model
# writes validates against schemas/devmesh.schema.json again.


def _opt(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = d.get(key, default)
    return default if value is None else value


def _serf(doc: Mapping[str, Any] | None) -> Serf | None:
    if doc is None:
        return None
    return Serf(port=int(_opt(doc, "port", 7946)), join=tuple(_opt(doc, "join", [])))


def _argv(value: str | list[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # Shell-style splitting without a shell: quotes group, nothing is expanded.
        import shlex

        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


def _health(doc: Mapping[str, Any] | None) -> Health | None:
    if doc is None:
        return None
    kind, http_path, command = HealthKind.NONE, None, None
    if "http" in doc:
        kind, http_path = HealthKind.HTTP, str(doc["http"])
    elif "command" in doc:
        kind, command = HealthKind.COMMAND, _argv(doc["command"])
    elif doc.get("tcp"):
        kind = HealthKind.TCP
    return Health(
        kind=kind,
        http_path=http_path,
        command=command,
        interval_s=float(_opt(doc, "interval_s", 1.0)),
        timeout_s=float(_opt(doc, "timeout_s", 2.0)),
        retries=int(_opt(doc, "retries", 3)),
        start_period_s=float(_opt(doc, "start_period_s", 10.0)),
    )


def _dependency(name: str, doc: str | Mapping[str, Any] | None) -> Dependency:
    if doc is None:
        return Dependency(name=name)
    if isinstance(doc, str):
        return Dependency(name=name, version_range=doc)
    return Dependency(
        name=name,
        version_range=doc.get("version"),
        condition=Condition(_opt(doc, "condition", "started")),
        versions=VersionPolicy(doc["versions"]) if doc.get("versions") else None,
    )


def _service(name: str, doc: Mapping[str, Any], directory: str) -> Service:
    import posixpath

    port_doc = doc.get("port")
    cwd = doc.get("cwd")
    if cwd is not None:
        cwd = posixpath.normpath(posixpath.join(directory, cwd))
    restart_doc = doc.get("restart") or {}
    stop_doc = doc.get("stop") or {}
    db_doc = doc.get("db")
    deps_doc = doc.get("depends_on") or {}
    if isinstance(deps_doc, list):
        deps_doc = dict.fromkeys(deps_doc)
    env_file = doc.get("env_file") or ()
    if isinstance(env_file, str):
        env_file = (env_file,)
    # Long form {path, required}: the model keeps the path; the loader read the file.
    env_file = [f["path"] if isinstance(f, Mapping) else f for f in env_file]
    return Service(
        name=name,
        version=None if doc.get("version") is None else str(doc["version"]),
        command=_argv(doc.get("command")),
        cwd=cwd,
        port=port_doc if isinstance(port_doc, int) else None,
        port_auto=port_doc == "auto",
        scheme=Scheme(_opt(doc, "scheme", "http")),
        env={
            str(k): "" if v is None else _scalar_str(v) for k, v in (doc.get("env") or {}).items()
        },
        env_file=tuple(env_file),
        health=_health(doc.get("health")),
        depends_on=tuple(_dependency(k, v) for k, v in deps_doc.items()),
        restart=Restart(
            policy=RestartPolicy(_opt(restart_doc, "policy", "on-failure")),
            max_retries=restart_doc.get("max_retries"),
            backoff_s=float(_opt(restart_doc, "backoff_s", 1.0)),
        ),
        stop=Stop(
            signal=str(_opt(stop_doc, "signal", "SIGTERM")),
            grace_s=float(_opt(stop_doc, "grace_s", 10.0)),
        ),
        share=bool(doc.get("share", False)),
        branch=doc.get("branch"),
        fallback=doc.get("fallback"),
        db=None if db_doc is None else _db(db_doc, directory),
        project=None if doc.get("project") is None else str(doc["project"]),
        remote=bool(doc.get("remote", False)),
    )


def _db(doc: Mapping[str, Any], directory: str) -> Db:
    import posixpath

    sync_doc = doc.get("sync")
    sync = None
    if sync_doc is not None:
        sync = DbSync(
            source=str(sync_doc["from"]),
            tables={str(k): str(v) for k, v in (sync_doc.get("tables") or {}).items()},
            limit=sync_doc.get("limit"),
            follow_foreign_keys=bool(_opt(sync_doc, "follow_foreign_keys", True)),
            exclude_columns={
                str(k): tuple(str(c) for c in v)
                for k, v in (sync_doc.get("exclude_columns") or {}).items()
            },
            on_first_up=bool(_opt(sync_doc, "on_first_up", False)),
        )
    init = doc.get("init") or ()
    if isinstance(init, str):
        init = (init,)
    return Db(
        engine=DbEngine(doc["engine"]),
        version=None if doc.get("version") is None else str(doc["version"]),
        provider=DbProvider(_opt(doc, "provider", "auto")),
        name=doc.get("name"),
        image=doc.get("image"),
        init=tuple(posixpath.normpath(posixpath.join(directory, str(f))) for f in init),
        sync=sync,
        snapshots_keep=int(_opt(doc.get("snapshots") or {}, "keep", 5)),
    )


def _scalar_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def from_document(
    doc: Mapping[str, Any], *, directory: str, default_name: str, source: str = "devmesh.yaml"
) -> Project:
    """Build the model from a document that passed validation.

    Raises KeyError or ValueError only when given a document that did not pass validation.
    """
    proxy_doc = doc.get("proxy") or {}
    mesh_doc = doc.get("mesh")
    policy_doc = doc.get("policy") or {}
    mesh = None
    if mesh_doc is not None:
        disc = mesh_doc.get("discovery") or {}
        mesh = MeshSettings(
            name=mesh_doc.get("name"),
            node_name=mesh_doc.get("node_name"),
            port=int(_opt(mesh_doc, "port", DEFAULT_MESH_PORT)),
            discovery=Discovery(
                broadcast=bool(_opt(disc, "broadcast", True)),
                interfaces=tuple(_opt(disc, "interfaces", ["auto"])),
                port=int(_opt(disc, "port", DEFAULT_DISCOVERY_PORT)),
                interval_s=float(_opt(disc, "interval_s", 2.0)),
                peers=tuple(_opt(disc, "peers", [])),
                mdns=bool(_opt(disc, "mdns", False)),
                serf=_serf(disc.get("serf")),
            ),
            allow=tuple(_opt(mesh_doc, "allow", ["*"])),
        )
    services = {
        str(name): _service(str(name), sdoc or {}, directory)
        for name, sdoc in (doc.get("services") or {}).items()
    }
    return Project(
        name=str(doc.get("project") or default_name),
        directory=directory,
        source=source,
        proxy=ProxySettings(
            port=int(_opt(proxy_doc, "port", DEFAULT_PROXY_PORT)),
            https_port=int(_opt(proxy_doc, "https_port", DEFAULT_HTTPS_PORT)),
            connect_timeout_s=float(_opt(proxy_doc, "connect_timeout_s", 5.0)),
            idle_timeout_s=float(_opt(proxy_doc, "idle_timeout_s", 60.0)),
            header_timeout_s=float(_opt(proxy_doc, "header_timeout_s", 10.0)),
            keepalive_timeout_s=float(_opt(proxy_doc, "keepalive_timeout_s", 75.0)),
            max_body_mb=None
            if proxy_doc.get("max_body_mb") is None
            else float(proxy_doc["max_body_mb"]),
        ),
        metrics=MetricsSettings(
            retention_days=float(_opt(doc.get("metrics") or {}, "retention_days", 7.0))
        ),
        mesh=mesh,
        policy=Policy(
            versions=VersionPolicy(_opt(policy_doc, "versions", "warn")),
            prefer=Prefer(_opt(policy_doc, "prefer", "local")),
            balance=Balance(_opt(policy_doc, "balance", "round_robin")),
        ),
        services=services,
    )


def _health_doc(h: Health) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if h.kind is HealthKind.HTTP:
        out["http"] = h.http_path
    elif h.kind is HealthKind.COMMAND:
        out["command"] = list(h.command or ())
    elif h.kind is HealthKind.TCP:
        out["tcp"] = True
    else:
        out["tcp"] = False
    out.update(
        interval_s=h.interval_s,
        timeout_s=h.timeout_s,
        retries=h.retries,
        start_period_s=h.start_period_s,
    )
    return out


def service_document(s: Service) -> dict[str, Any]:
    """The normalised document of one service: explicit defaults, list commands, absolute cwd.

    env_file is left out because its content is already merged into env.
    """
    out: dict[str, Any] = {}
    if s.version is not None:
        out["version"] = s.version
    if s.command is not None:
        out["command"] = list(s.command)
    if s.cwd is not None:
        out["cwd"] = s.cwd
    if s.port is not None:
        out["port"] = s.port
    elif s.port_auto:
        out["port"] = "auto"
    out["scheme"] = s.scheme.value
    if s.env:
        out["env"] = dict(sorted(s.env.items()))
    if s.health is not None:
        out["health"] = _health_doc(s.health)
    if s.depends_on:
        out["depends_on"] = {
            d.name: {
                **({"version": d.version_range} if d.version_range is not None else {}),
                "condition": d.condition.value,
                **({"versions": d.versions.value} if d.versions is not None else {}),
            }
            for d in s.depends_on
        }
    out["restart"] = {
        "policy": s.restart.policy.value,
        **({"max_retries": s.restart.max_retries} if s.restart.max_retries is not None else {}),
        "backoff_s": s.restart.backoff_s,
    }
    out["stop"] = {"signal": s.stop.signal, "grace_s": s.stop.grace_s}
    out["share"] = s.share
    if s.branch is not None:
        out["branch"] = s.branch
    if s.fallback is not None:
        out["fallback"] = s.fallback
    if s.project is not None:
        out["project"] = s.project
    if s.remote:
        out["remote"] = True
    if s.db is not None:
        db: dict[str, Any] = {"engine": s.db.engine.value, "provider": s.db.provider.value}
        if s.db.version is not None:
            db["version"] = s.db.version
        if s.db.name is not None:
            db["name"] = s.db.name
        if s.db.image is not None:
            db["image"] = s.db.image
        if s.db.init:
            db["init"] = list(s.db.init)
        if s.db.sync is not None:
            sy = s.db.sync
            db["sync"] = {
                "from": sy.source,
                "tables": dict(sy.tables),
                **({"limit": sy.limit} if sy.limit is not None else {}),
                "follow_foreign_keys": sy.follow_foreign_keys,
                "exclude_columns": {k: list(v) for k, v in sy.exclude_columns.items()},
                "on_first_up": sy.on_first_up,
            }
        db["snapshots"] = {"keep": s.db.snapshots_keep}
        out["db"] = db
    return out


def to_document(p: Project) -> dict[str, Any]:
    """The normalised document of a project; it validates against the schema again."""
    doc: dict[str, Any] = {
        "version": 1,
        "project": p.name,
        "proxy": {
            "port": p.proxy.port,
            "https_port": p.proxy.https_port,
            "connect_timeout_s": p.proxy.connect_timeout_s,
            "idle_timeout_s": p.proxy.idle_timeout_s,
            "header_timeout_s": p.proxy.header_timeout_s,
            "keepalive_timeout_s": p.proxy.keepalive_timeout_s,
        },
    }
    if p.proxy.max_body_mb is not None:
        doc["proxy"]["max_body_mb"] = p.proxy.max_body_mb
    if p.metrics != MetricsSettings():
        doc["metrics"] = {"retention_days": p.metrics.retention_days}
    if p.mesh is not None:
        m = p.mesh
        mesh: dict[str, Any] = {}
        if m.name is not None:
            mesh["name"] = m.name
        if m.node_name is not None:
            mesh["node_name"] = m.node_name
        mesh["port"] = m.port
        mesh["discovery"] = {
            "broadcast": m.discovery.broadcast,
            "interfaces": list(m.discovery.interfaces),
            "port": m.discovery.port,
            "interval_s": m.discovery.interval_s,
            "peers": list(m.discovery.peers),
            "mdns": m.discovery.mdns,
        }
        if m.discovery.serf is not None:
            mesh["discovery"]["serf"] = {
                "port": m.discovery.serf.port,
                "join": list(m.discovery.serf.join),
            }
        mesh["allow"] = list(m.allow)
        doc["mesh"] = mesh
    doc["policy"] = {
        "versions": p.policy.versions.value,
        "prefer": p.policy.prefer.value,
        "balance": p.policy.balance.value,
    }
    doc["services"] = {name: service_document(s) for name, s in p.services.items()}
    return doc


ROUTING_ONLY_KEYS = ("share", "fallback", "branch")
"""Service keys that change where calls go, never how the process runs."""


def restart_spec(s: Service) -> dict[str, Any]:
    """The normalised document of everything that requires a restart when it changes.

    Two files that differ only in spelling (string vs list command, short vs long
    depends_on, key order) give the same spec. Routing-only keys are left out: changing
    them must not restart a running process.
    """
    doc = service_document(s)
    for key in ROUTING_ONLY_KEYS:
        doc.pop(key, None)
    return doc


def digest(doc: Mapping[str, Any]) -> str:
    """A short stable digest of a JSON-able document (key order does not matter)."""
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

"""The catalog a node serves to its peers at ``GET /mesh/v1/catalog``, built and checked.

Why it is validated like a config: the document comes from another machine. A teammate's
agent with a bug, or anybody holding a leaked bundle, must not be able to crash this agent
or make it hold megabytes: the raw size is bounded before parsing, the number of entries
and every string length are bounded, versions must be semver, and anything else is
rejected with a path-first message (``services[3].version: expected semver, got 'x'``).
A rejected catalog leaves the previously held one in place.

The revision is a digest of the normalised document, so a node announces a new revision
exactly when what it shares changes, and peers fetch again only then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from devmesh.core import versions

MAX_CATALOG_BYTES = 256 * 1024
MAX_SERVICES = 256
MAX_TEXT_CHARS = 128
HEALTH_VALUES = ("healthy", "starting", "unhealthy", "stopped")
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_BRANCH = re.compile(r"[A-Za-z0-9._/-]{1,128}")
_NODE_ID = re.compile(r"[0-9a-f]{32}")


class CatalogError(ValueError):
    """A catalog that was refused; ``problems`` lists every one, path first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SharedService:
    """One service a node lets its peers call (``share: true``)."""

    name: str
    project: str
    version: str
    branch: str | None = None
    """Branch namespace of the instance; None is the default namespace."""
    health: str = "starting"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """What one node shares: the document behind one catalog revision."""

    node_id: str
    services: tuple[SharedService, ...]

    @property
    def revision(self) -> str:
        return revision(self)


def to_document(catalog: Catalog) -> dict[str, object]:
    """The JSON document, services sorted so equal catalogs give equal bytes."""
    services = sorted(catalog.services, key=lambda s: (s.project, s.name, s.branch or ""))
    return {
        "version": 1,
        "node": catalog.node_id,
        "services": [
            {
                "name": s.name,
                "project": s.project,
                "version": s.version,
                "branch": s.branch,
                "health": s.health,
            }
            for s in services
        ],
    }


def encode(catalog: Catalog) -> bytes:
    """Serialise a catalog (raises CatalogError when it is over the limits peers enforce)."""
    data = json.dumps(to_document(catalog), separators=(",", ":"), sort_keys=True).encode()
    problems = _check_services(to_document(catalog)["services"])
    if len(data) > MAX_CATALOG_BYTES:
        problems.append(f"catalog: {len(data)} bytes, over the limit of {MAX_CATALOG_BYTES}")
    if problems:
        raise CatalogError(problems)
    return data


def revision(catalog: Catalog) -> str:
    """A short digest of the catalog's content (what the datagrams carry)."""
    data = json.dumps(to_document(catalog), separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _text(path: str, value: object, pattern: re.Pattern[str], what: str) -> str | None:
    if not isinstance(value, str):
        return f"{path}: expected {what}, got {type(value).__name__}"
    if len(value) > MAX_TEXT_CHARS or not pattern.fullmatch(value):
        shown = value[:40] + ("..." if len(value) > 40 else "")
        return f"{path}: expected {what}, got {shown!r}"
    return None


def _check_services(services: object) -> list[str]:
    if not isinstance(services, list):
        return ["services: expected a list"]
    if len(services) > MAX_SERVICES:
        return [f"services: {len(services)} entries, at most {MAX_SERVICES}"]
    problems: list[str] = []
    for i, entry in enumerate(services):
        path = f"services[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{path}: expected an object")
            continue
        extra = sorted(set(entry) - {"name", "project", "version", "branch", "health"})
        if extra:
            problems.append(f"{path}: unknown keys {', '.join(map(str, extra))[:80]}")
        for key, pattern, what in (
            ("name", _NAME, "a service name"),
            ("project", _NAME, "a project name"),
        ):
            problem = _text(f"{path}.{key}", entry.get(key), pattern, what)
            if problem:
                problems.append(problem)
        version = entry.get("version")
        if not isinstance(version, str) or len(version) > MAX_TEXT_CHARS:
            problems.append(f"{path}.version: expected a semver version")
        else:
            try:
                versions.parse_version(version)
            except versions.VersionError:
                problems.append(f"{path}.version: expected semver, got {version[:40]!r}")
        branch = entry.get("branch")
        if branch is not None:
            problem = _text(f"{path}.branch", branch, _BRANCH, "a branch name")
            if problem:
                problems.append(problem)
        if entry.get("health") not in HEALTH_VALUES:
            problems.append(f"{path}.health: expected one of {', '.join(HEALTH_VALUES)}")
        if len(problems) > 20:
            problems.append("... more problems not shown")
            break
    return problems


def decode(data: bytes, *, node_id: str) -> Catalog:
    """Parse and check a catalog received from ``node_id``.

    Raises CatalogError naming every problem; never anything else, whatever ``data`` is.
    """
    if len(data) > MAX_CATALOG_BYTES:
        raise CatalogError([f"catalog: over {MAX_CATALOG_BYTES} bytes"])
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CatalogError([f"catalog: not JSON ({type(exc).__name__})"]) from None
    if not isinstance(doc, dict):
        raise CatalogError(["catalog: expected an object"])
    problems: list[str] = []
    if doc.get("version") != 1 or type(doc.get("version")) is not int:
        problems.append("version: expected 1")
    node = doc.get("node")
    if not isinstance(node, str) or not _NODE_ID.fullmatch(node):
        problems.append("node: expected a node id")
    elif node != node_id:
        problems.append(f"node: {node} is not the peer that served it ({node_id})")
    extra = sorted(set(doc) - {"version", "node", "services"})
    if extra:
        problems.append(f"catalog: unknown keys {', '.join(map(str, extra))[:80]}")
    problems.extend(_check_services(doc.get("services")))
    if problems:
        raise CatalogError(problems)
    services = tuple(
        SharedService(
            name=e["name"],
            project=e["project"],
            version=e["version"],
            branch=e.get("branch"),
            health=e["health"],
        )
        for e in doc["services"]
    )
    return Catalog(node_id=node_id, services=services)

"""Checks the JSON Schema cannot express: references between services, semver, port clashes,
and the routing values (a ``fallback`` URL with a host, a valid ``branch`` name).

They run on the interpolated document even when the schema already found problems, so a
user sees every problem in one run. Each check therefore looks only at the parts that
have the right shape and silently skips the rest (the schema has reported those).
"""

from __future__ import annotations

import shlex
import shutil
import urllib.parse
from collections.abc import Iterator
from typing import Any

from devmesh.config import marks as marks_mod
from devmesh.config import report
from devmesh.core import branches, graph, versions

Key = tuple[str | int, ...]


class _Out:
    """Collects problems placed by key path."""

    def __init__(self, marks: marks_mod.Marks, file: str) -> None:
        self.marks = marks
        self.file = file
        self.problems: list[report.Problem] = []

    def add(
        self, path: Key, message: str, *, at_key: bool = False, severity: str = report.ERROR
    ) -> None:
        pos = self.marks.key(path) if at_key else self.marks.value(path)
        self.problems.append(report.placed(self.file, pos, path, message, severity))

    def at(self, pos: marks_mod.Position) -> str:
        """``FILE:LINE:COL`` of a position, to point at a second place in a message."""
        return f"{pos.file or self.file}:{pos.line}:{pos.column}"


def services_of(doc: Any) -> dict[str, dict[str, Any]]:
    """The services that are mappings, by name; anything malformed is left out."""
    services = doc.get("services") if isinstance(doc, dict) else None
    if not isinstance(services, dict):
        return {}
    return {str(k): v for k, v in services.items() if isinstance(v, dict)}


def dependencies(service: dict[str, Any]) -> Iterator[tuple[str, Key, Any]]:
    """(name, path inside the service, range-or-spec) for each well-formed dependency."""
    deps = service.get("depends_on")
    if isinstance(deps, list):
        for i, name in enumerate(deps):
            if isinstance(name, str):
                yield name, ("depends_on", i), None
    elif isinstance(deps, dict):
        for name, spec in deps.items():
            yield str(name), ("depends_on", name), spec


def check(
    doc: Any, marks: marks_mod.Marks, file: str, *, project: str | None = None
) -> list[report.Problem]:
    """Every semantic problem of an interpolated document (see the module docstring);
    ``project`` is the project's name (a service's ``project:`` naming it is the default)."""
    out = _Out(marks, file)
    services = services_of(doc)
    _check_dependencies(services, out)
    _check_versions(services, out)
    _check_ranges_against_declared(doc, services, out)
    _check_ports(services, out)
    _check_commands(services, out)
    _check_routing(services, out)
    _check_project_and_remote(services, project, out)
    _check_serf(doc, out)
    return out.problems


def _check_serf(doc: Any, out: _Out) -> None:
    """``mesh.discovery.serf`` runs the machine's ``serf``: without one, say what to install.

    A warning, not an error: the node starts without Serf and the other backends go on.
    """
    mesh = doc.get("mesh") if isinstance(doc, dict) else None
    disc = mesh.get("discovery") if isinstance(mesh, dict) else None
    if isinstance(disc, dict) and isinstance(disc.get("serf"), dict) and not shutil.which("serf"):
        out.add(
            ("mesh", "discovery", "serf"),
            "no `serf` binary on PATH: install the `serf` package (Debian/Ubuntu: apt install "
            "serf; macOS: brew install serf); until then this node discovers without Serf",
            at_key=True,
            severity=report.WARNING,
        )


def _check_dependencies(services: dict[str, dict[str, Any]], out: _Out) -> None:
    edges: dict[str, list[str]] = {}
    for name, service in services.items():
        edges[name] = []
        for dep, where, _ in dependencies(service):
            path = ("services", name, *where)
            if dep in services:
                edges[name].append(dep)
                continue
            out.add(
                path,
                f"unknown service {dep!r}: every dependency must be a service of this file; "
                f"declare a service that runs elsewhere without `command` "
                f"(services: {{{dep}: {{version: ...}}}})",
                at_key=isinstance(where[-1], str),
            )
    cycle = graph.find_cycle(edges)
    if cycle:
        first, second = cycle[0], cycle[1]
        deps = services[first].get("depends_on")
        at: Key = ("depends_on", second)
        if isinstance(deps, list):
            at = ("depends_on", deps.index(second))
        out.add(
            ("services", first, *at),
            "dependency cycle: " + " -> ".join(cycle),
            at_key=isinstance(at[-1], str),
        )


def _check_versions(services: dict[str, dict[str, Any]], out: _Out) -> None:
    for name, service in services.items():
        version = service.get("version")
        if isinstance(version, str):
            try:
                versions.parse_version(version)
            except versions.VersionError as exc:
                out.add(("services", name, "version"), f"invalid version: {exc.message}")
        for _dep, where, spec in dependencies(service):
            path: Key = ("services", name, *where)
            text = spec
            if isinstance(spec, dict):
                text = spec.get("version")
                path = (*path, "version")
            if not isinstance(text, str) or not text:
                continue
            try:
                versions.parse_range(text)
            except versions.VersionError as exc:
                out.add(path, f"invalid version range: {exc.message}")


def _check_ranges_against_declared(
    doc: Any, services: dict[str, dict[str, Any]], out: _Out
) -> None:
    """A dependency whose range excludes the version this file declares for it.

    The file itself says the call cannot be satisfied: the local instance (or the one the
    project expects elsewhere) is outside the caller's range. Under ``policy.versions:
    warn`` that is a warning naming both places; a malformed version or range is left
    to _check_versions.
    """
    policy = doc.get("policy") if isinstance(doc, dict) else None
    rule = policy.get("versions", "warn") if isinstance(policy, dict) else "warn"
    for name, service in services.items():
        for dep, where, spec in dependencies(service):
            text = spec.get("version") if isinstance(spec, dict) else spec
            target = services.get(dep) or {}
            declared = target.get("version")
            if not isinstance(text, str) or not text or not isinstance(declared, str):
                continue
            try:
                fits = versions.satisfies(declared, text)
                plain = versions.parse_range(text).desugared()
            except versions.VersionError:
                continue
            if fits:
                continue
            needs = f" ({plain})" if plain != text.strip() else ""
            path: Key = ("services", name, *where)
            if isinstance(spec, dict):
                path = (*path, "version")
            there = out.marks.value(("services", dep, "version"))
            runs = "the local" if "command" in target else "the declared"
            edge_rule = spec.get("versions") if isinstance(spec, dict) else None
            where_rule = (
                f"services.{name}.depends_on.{dep}.versions"
                if edge_rule in ("warn", "reject")
                else "policy.versions"
            )
            effective = edge_rule if edge_rule in ("warn", "reject") else rule
            out.add(
                path,
                f"{name} accepts {dep} {text}{needs}, but {runs} {dep} is {declared} "
                f"(services.{dep}.version at {out.at(there)}); "
                f"{_consequence(effective, where_rule, has_fallback=bool(target.get('fallback')))}",
                severity=report.WARNING,
            )


def _consequence(rule: Any, where: str, *, has_fallback: bool) -> str:
    """What route selection will do with such an instance (see core.routes)."""
    if rule == "reject":
        last = "else to its fallback" if has_fallback else "else they get 409"
        return f"calls go to a compatible instance on a peer, {last} ({where}: reject)"
    return (
        "calls go to a compatible instance on a peer when one is found, "
        f"else to this one with a version warning ({where}: warn)"
    )


def _check_ports(services: dict[str, dict[str, Any]], out: _Out) -> None:
    owners: dict[int, str] = {}
    for name, service in services.items():
        port = service.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            continue
        if port in owners:
            first = owners[port]
            pos = out.marks.value(("services", first, "port"))
            here = out.marks.value(("services", name, "port"))
            line = f"line {pos.line}" if pos.file == here.file else out.at(pos)
            out.add(
                ("services", name, "port"),
                f"port {port} is already used by service {first!r} ({line}); "
                "two services cannot listen on one port (use port: auto)",
            )
        else:
            owners[port] = name


def _check_commands(services: dict[str, dict[str, Any]], out: _Out) -> None:
    """A string command is split like a shell would; an unbalanced quote cannot be."""
    for name, service in services.items():
        health = service.get("health")
        candidates: list[tuple[Key, Any]] = [
            (("services", name, "command"), service.get("command"))
        ]
        if isinstance(health, dict):
            candidates.append((("services", name, "health", "command"), health.get("command")))
        for path, command in candidates:
            if not isinstance(command, str):
                continue
            try:
                shlex.split(command)
            except ValueError as exc:
                out.add(path, f"cannot split the command into words: {str(exc).lower()}")


def _check_routing(services: dict[str, dict[str, Any]], out: _Out) -> None:
    """``fallback`` must be a URL the proxy can connect to; ``branch`` a name it can route by.

    The schema only checks that a fallback starts with http:// or https:// (values that do
    not are its to report) and that a branch is a non-empty string.
    """
    for name, service in services.items():
        fallback = service.get("fallback")
        if isinstance(fallback, str) and fallback.startswith(("http://", "https://")):
            problem = _url_problem(fallback)
            if problem:
                out.add(("services", name, "fallback"), f"invalid fallback URL: {problem}")
        branch = service.get("branch")
        if isinstance(branch, str) and branch and branch != "auto":
            problem = branches.problem(branch)
            if problem:
                out.add(
                    ("services", name, "branch"),
                    f"{problem}; use auto (the git branch of the project folder) or a branch name",
                )


def _check_project_and_remote(
    services: dict[str, dict[str, Any]], project: str | None, out: _Out
) -> None:
    """``project:`` names who runs a service declared without ``command``; ``remote: true``
    keeps a service from running here, which leaves ``share`` and ``db`` nothing to act on.

    ``project:`` beside ``command`` is an error: the service runs here, in this project, so
    naming another project is a contradiction (naming this one is the default, and fine).
    ``remote: true`` with ``share: true`` or a ``db:`` warns when one file writes both: its
    author asks for two things that cannot both happen. When an override file makes a
    shared service (or one with a database) remote, that is what override files are for,
    and ``plan`` and ``status`` say "remote" instead of a warning at every ``up``.
    """
    for name, service in services.items():
        at: Key = ("services", name)
        given = service.get("project")
        if isinstance(given, str) and given != project and "command" in service:
            command = out.marks.key((*at, "command"))
            out.add(
                (*at, "project"),
                f"project {given!r} on a service that has a command ({out.at(command)}): a "
                f"service with a command runs here, in this project; project: names the "
                f"project that runs a service declared without command. Remove project, or "
                f"drop command (in an override file: command: !reset) to take {name} from "
                f"project {given}",
                at_key=True,
            )
        if service.get("remote") is not True:
            continue
        remote = out.marks.key((*at, "remote"))
        if service.get("share") is True:
            share = out.marks.key((*at, "share"))
            if share.file == remote.file:
                out.add(
                    (*at, "share"),
                    f"share: true has no effect: remote: true ({out.at(remote)}) keeps "
                    f"{name} from running on this machine, so there is nothing to share",
                    at_key=True,
                    severity=report.WARNING,
                )
        if isinstance(service.get("db"), dict):
            db = out.marks.key((*at, "db"))
            if db.file == remote.file:
                out.add(
                    (*at, "db"),
                    f"the database is not provisioned: remote: true ({out.at(remote)}) keeps "
                    f"{name} from running on this machine, and a database is provisioned "
                    "only for a service that runs here",
                    at_key=True,
                    severity=report.WARNING,
                )


def _url_problem(url: str) -> str | None:
    """Why ``url`` (http:// or https://) is not an absolute URL with a host, or None."""
    if any(ch.isspace() for ch in url):
        return f"{url!r} contains whitespace"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r}: {exc}"
    if not parts.hostname:
        return f"{url!r} names no host (expected e.g. https://api.staging.example.com)"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to"
    return None

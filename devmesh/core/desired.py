"""From an applied project to the planner's ``wants`` and each process's argv and environment.

Why here and not in the agent: which services run, what each one's environment holds and
what counts as "changed" are decisions, so they are pure functions the tests can call
without processes. The agent supplies the facts it alone knows: the ports it picked for
``port: auto`` services, the URL by which each dependency is reached, and the base
environment of the CLI that applied the project.

The base environment is deliberately left out of the fingerprint: running ``devmesh up``
from another shell must not restart everything because ``$OLDPWD`` differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from devmesh.core import interpolate, model, plan


def url_var(dep: str) -> str:
    """Environment name of a dependency's URL: ``payments-v2`` -> ``PAYMENTS_V2_URL``."""
    return interpolate.url_variable(dep)


def enabled_closure(
    project: model.Project, roots: Iterable[str] | None, *, no_deps: bool = False
) -> set[str]:
    """Services to run for ``up [SERVICE...]``: the roots (all when None) and their deps.

    ``no_deps`` (``up --no-deps SERVICE...``) takes the roots alone: their dependencies
    that do not run here are routed as a service without ``command`` is (``routed_instead``).
    """
    deps = {n: [d.name for d in s.depends_on] for n, s in project.services.items()}
    names = list(project.services) if roots is None else list(roots)
    chosen = set(names) if no_deps and roots is not None else plan.closure(deps, names)
    return {n for n in chosen if project.services[n].runs_here}


@dataclass(frozen=True, slots=True, kw_only=True)
class Routed:
    """A dependency of a started service that ``up --no-deps`` does not start."""

    service: str
    callers: tuple[str, ...]
    """The enabled services that depend on it."""
    running: bool
    """It runs here anyway, enabled by an earlier ``up``: left running, as compose does."""

    def words(self, project: model.Project) -> str:
        """What becomes of calls to it, as ``plan`` and ``up`` say it."""
        who = ", ".join(self.callers)
        if self.running:
            return (
                f"left running (started by an earlier `up`; {who} call it here; "
                f"`devmesh down {self.service}` stops it)"
            )
        svc = project.services[self.service]
        where = ["a teammate's shared instance"]
        if svc.fallback:
            where.append(f"its fallback {svc.fallback}")
        tail = " else ".join(where) + ("" if svc.fallback else ", else 502 (no fallback)")
        return f"not started (--no-deps): calls from {who} go to {tail}"


def routed_instead(
    project: model.Project, roots: Iterable[str], enabled: Iterable[str]
) -> list[Routed]:
    """The dependencies of ``roots`` that ``up --no-deps`` leaves to routing, or that keep
    running from an earlier ``up`` (``enabled`` is the record after the apply)."""
    on = set(enabled)
    callers: dict[str, list[str]] = {}
    for root in roots:
        for dep in project.services[root].depends_on:
            target = project.services.get(dep.name)
            if target is not None and target.runs_here and dep.name not in roots:
                callers.setdefault(dep.name, []).append(root)
    return [
        Routed(service=name, callers=tuple(sorted(who)), running=name in on)
        for name, who in sorted(callers.items())
    ]


def dependency_urls(
    project: model.Project,
    service: model.Service,
    ports: Mapping[str, int],
    edges: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """NAME -> URL for each dependency of ``service``.

    In order of preference: the proxy's listener for this edge (``edges``: dependency ->
    port on 127.0.0.1), the dependency's own local port when it runs here, its fallback.
    A dependency that has none of these gets no URL; ``unreachable`` lists those so
    ``devmesh plan`` can say so.
    """
    urls: dict[str, str] = {}
    for dep in service.depends_on:
        target = project.services.get(dep.name)
        if target is None:
            continue
        if edges and dep.name in edges:
            urls[dep.name] = f"http://127.0.0.1:{edges[dep.name]}"
        elif target.runs_here and target.wants_port and dep.name in ports:
            scheme = target.scheme.value
            urls[dep.name] = f"{scheme}://127.0.0.1:{ports[dep.name]}"
        elif target.fallback:
            urls[dep.name] = target.fallback.rstrip("/")
    return urls


def local_edges(project: model.Project, enabled: Iterable[str]) -> list[tuple[str, str]]:
    """(caller, target) for each dependency edge of a service that runs here.

    Each gets a proxy listener, so the caller's URL never changes when the target restarts
    on another port or moves to a peer, and the proxy knows who is calling. A target that
    does not run here (no ``command``) gets one too: route selection decides per call
    between peers' instances and its ``fallback``. Only a target that runs here and
    listens on no port (a worker) gets none: nothing could answer there.
    """
    out = []
    for name in enabled:
        svc = project.services.get(name)
        if svc is None or not svc.runs_here:
            continue
        for dep in svc.depends_on:
            target = project.services.get(dep.name)
            if target is None:
                continue
            if not target.runs_here or target.wants_port:
                out.append((name, dep.name))
    return out


def resolve_branches(project: model.Project, branches: Mapping[str, str]) -> model.Project:
    """The project with each service's ``branch`` as resolved at apply.

    ``branches`` maps a service to its branch namespace (``branch: auto`` already turned
    into the git branch by the agent); a service with a ``branch`` key that is absent from
    it runs in the default namespace (``auto`` outside a git repository, or on a detached
    HEAD). Services without a ``branch`` key are left as they are.
    """
    services = {
        name: svc if svc.branch is None else replace(svc, branch=branches.get(name))
        for name, svc in project.services.items()
    }
    return replace(project, services=services)


def unreachable(service: model.Service, urls: Mapping[str, str]) -> list[str]:
    return [d.name for d in service.depends_on if d.name not in urls]


def instance_spec(
    service: model.Service, *, port: int | None, urls: Mapping[str, str]
) -> dict[str, Any]:
    spec = model.restart_spec(service)
    spec["port"] = port
    spec["dep_urls"] = dict(sorted(urls.items()))
    if service.branch is not None:
        # Routing-only in the file, but the process sees it as DEVMESH_BRANCH: a service
        # whose branch changed (another `git checkout`, then `up`) restarts to learn it.
        spec["branch"] = service.branch
    return spec


def fingerprint(spec: Mapping[str, Any]) -> str:
    """The instance's restart digest: its service's spec plus port and dependency URLs."""
    return model.digest(spec)


def wants_for(
    project: model.Project,
    enabled: Iterable[str],
    ports: Mapping[str, int],
    urls: Mapping[str, Mapping[str, str]],
) -> dict[plan.Key, plan.Want]:
    """One Want per enabled service that runs here; ``urls`` is per service, from the agent."""
    out: dict[plan.Key, plan.Want] = {}
    names = list(enabled)
    on = set(names)  # a dependency left out (`up --no-deps`) is routed, not waited for
    for name in names:
        s = project.services.get(name)
        if s is None or not s.runs_here:
            continue
        # A fixed port is the service's own; only `port: auto` ones are in ``ports``. (The
        # agent starts with the same rule: a mismatch here restarted fixed-port services in a
        # loop, "port changed".)
        port = None if not s.wants_port else s.port if s.port is not None else ports.get(name)
        spec = instance_spec(s, port=port, urls=urls.get(name, {}))
        deps = tuple(
            ((project.name, d.name), d.condition)
            for d in s.depends_on
            if d.name in on and project.services[d.name].runs_here
        )
        out[(project.name, name)] = plan.Want(
            key=(project.name, name),
            fingerprint=fingerprint(spec),
            spec=spec,
            deps=deps,
            restart=s.restart.policy,
            max_retries=s.restart.max_retries,
        )
    return out


def runtime_vars(
    project: model.Project,
    service: model.Service,
    *,
    port: int | None,
    urls: Mapping[str, str],
    db_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables devmesh itself provides to a process (``db_env``: its database's)."""
    out = {**(db_env or {}), "DEVMESH_SERVICE": service.name, "DEVMESH_PROJECT": project.name}
    if service.branch is not None:
        out["DEVMESH_BRANCH"] = service.branch
    if port is not None:
        out["PORT"] = str(port)
    for dep, url in urls.items():
        out[url_var(dep)] = url
    return out


def launch_env(
    base_env: Mapping[str, str],
    project: model.Project,
    service: model.Service,
    *,
    port: int | None,
    urls: Mapping[str, str],
    db_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of the process: base, then the service's env, then devmesh's.

    The database's variables (``DATABASE_URL``, ``PG*``) replace those of the base
    environment, but a value the service's own ``env`` sets explicitly wins over them.
    Raises interpolate.InterpolationError for a ``${NAME}`` left in env that has no value.
    """
    runtime = runtime_vars(project, service, port=port, urls=urls, db_env=db_env)
    env = dict(base_env)
    env.update(runtime)
    for k, v in service.env.items():
        env[k] = interpolate.expand(v, runtime.get)
    env.update({k: v for k, v in runtime.items() if k not in (db_env or {})})
    return env


def probe_health(health: model.Health, env: Mapping[str, str]) -> model.Health:
    """The health check with ``${PORT}``-style names of its command filled in from ``env``."""
    if health.command is None:
        return health
    return replace(health, command=tuple(interpolate.expand(a, env.get) for a in health.command))


def launch_argv(
    project: model.Project,
    service: model.Service,
    *,
    port: int | None,
    urls: Mapping[str, str],
    db_env: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The command with ``${PORT}``-style runtime names filled in."""
    runtime = runtime_vars(project, service, port=port, urls=urls, db_env=db_env)
    return tuple(interpolate.expand(a, runtime.get) for a in service.command or ())


def service_from_spec(name: str, spec: Mapping[str, Any], *, directory: str) -> model.Service:
    """The typed service an ``instance_spec`` describes (what a persisted instance runs).

    The agent persists the spec as JSON; a restarted agent rebuilds the service it started
    from it, so it stops and probes an adopted process as it was started, not as a newer
    configuration says. Raises KeyError or ValueError for a spec that is not one.
    """
    doc = {k: v for k, v in spec.items() if k not in ("dep_urls",)}
    project = model.from_document(
        {"version": 1, "services": {name: doc}}, directory=directory, default_name="adopted"
    )
    return project.services[name]

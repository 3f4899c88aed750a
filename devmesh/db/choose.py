"""Which provider serves a database when the config says ``provider: auto``.

Why a function of its own: the rule (Docker when an engine answers, else the machine's
PostgreSQL, else an error that says how to get either) must be the same for ``up``,
``devmesh db status`` and ``plan``, and it is easiest to trust as a pure decision over two
probes the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable

from devmesh.db.errors import PermanentDbError
from devmesh.db.spec import DbSpec, Engine

PROVIDERS = ("auto", "native", "docker")


class NoProviderError(PermanentDbError):
    def __init__(self, service: str, docker_reason: str, native_reason: str) -> None:
        super().__init__(
            f"service {service!r} needs PostgreSQL and no provider can run it: "
            f"docker: {docker_reason}; native: {native_reason}"
        )


def choose(
    spec: DbSpec,
    provider: str,
    *,
    docker_probe: Callable[[], str | None],
    native_probe: Callable[[], str | None],
) -> str:
    """``"sqlite"``, ``"native"`` or ``"docker"`` for ``spec``.

    Each probe returns None when its provider can run here, else the reason it cannot
    (that reason is what the error shows). An explicit ``native``/``docker`` is returned
    as asked: its own errors are more precise than a guess here.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if spec.engine is Engine.SQLITE:
        return "sqlite"
    if provider != "auto":
        return provider
    docker_reason = docker_probe()
    if docker_reason is None:
        return "docker"
    native_reason = native_probe()
    if native_reason is None:
        return "native"
    raise NoProviderError(spec.service, docker_reason, native_reason)

"""Before an apply: pick ports for ``port: auto`` and find what would make it fail half-way.

Why it exists: an apply is all or nothing. A port another process holds, a command that is
not on the PATH, a working folder that does not exist: each is found here, against the
machine, before the engine sees the new desired state, and the whole apply is rejected
with every problem listed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from devmesh.agent import state as state_mod
from devmesh.core import model, plan
from devmesh.supervisor import ports, process


class NoFreePortError(Exception):
    def __init__(self) -> None:
        super().__init__("could not find a free port on 127.0.0.1")


def pick_ports(
    proj: model.Project,
    enabled: Iterable[str],
    kept: Mapping[str, int],
    taken: set[int],
) -> dict[str, int]:
    """Ports for the enabled ``port: auto`` services: the one kept from before, else a free one.

    Raises NoFreePortError when 50 picks all land on ports other projects use.
    """
    out = {k: v for k, v in kept.items() if k in proj.services and proj.services[k].wants_port}
    for n in sorted(enabled):
        svc = proj.services[n]
        if not svc.wants_port:
            continue
        if svc.port is None and n not in out:
            out[n] = _pick(taken)
        taken.add(out.get(n, svc.port or 0))
    return out


def _pick(taken: set[int]) -> int:
    for _ in range(50):
        port = ports.pick_free()
        if port not in taken:
            return port
    raise NoFreePortError


def problems(
    rec: state_mod.ProjectRecord,
    proj: model.Project,
    ours: Mapping[int, plan.Key],
) -> list[str]:
    """Problems that would make the apply fail half-way; none means it is safe to apply.

    ``ours`` maps the ports devmesh's own running services hold to those services, so a
    clash with one of them names it rather than a pid.
    """
    found: list[str] = []
    path = rec.base_env.get("PATH", os.defpath)
    for n in rec.enabled:
        svc = proj.services[n]
        cwd = svc.cwd or proj.directory
        if not os.path.isdir(cwd):
            found.append(f"service {n}: working folder {cwd} does not exist")
            continue
        argv0 = (svc.command or ("",))[0]
        if "${" not in argv0:
            try:
                process.resolve(argv0, cwd, path)
            except process.SpawnError as exc:
                found.append(f"service {n}: {exc}")
        if svc.port is not None:
            owner_key = ours.get(svc.port)
            if owner_key is not None and owner_key != (proj.name, n):
                found.append(
                    f"service {n}: port {svc.port} is already in use by devmesh service "
                    f"{plan.key_text(owner_key)}"
                )
            elif owner_key is None:
                owner = ports.check_free(svc.port)
                if owner is not None:
                    who = f" by pid {owner.pid} ({owner.name})" if owner.pid else ""
                    found.append(f"service {n}: port {svc.port} is already in use{who}")
    return found

"""Dependency graph of a project's services: a stable start order and cycle reporting.

Kept apart from the model so the planner and the validator share one definition of
"dependency order". Edges that point at unknown services are ignored here: reporting them
is the validator's job, and the planner only ever sees validated projects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def order(deps: Mapping[str, Iterable[str]]) -> list[str]:
    """Topological order, dependencies first; ties keep the input's order.

    Raises ValueError naming the cycle when there is one.
    """
    names = list(deps)
    known = set(names)
    edges = {n: [d for d in deps[n] if d in known] for n in names}
    done: set[str] = set()
    out: list[str] = []
    while len(out) < len(names):
        progressed = False
        for n in names:
            if n not in done and all(d in done for d in edges[n]):
                done.add(n)
                out.append(n)
                progressed = True
        if not progressed:
            cycle = find_cycle(edges)
            raise ValueError("dependency cycle: " + " -> ".join(cycle or ()))
    return out


def find_cycle(deps: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts (``a -> b -> a``), or None."""
    edges = {n: list(ds) for n, ds in deps.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in edges.get(n, ()):
            if d not in edges:
                continue
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in edges:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def dependents(deps: Mapping[str, Iterable[str]], roots: Sequence[str]) -> set[str]:
    """Every service that depends, directly or not, on one of ``roots`` (roots excluded)."""
    reverse: dict[str, set[str]] = {}
    for n, ds in deps.items():
        for d in ds:
            reverse.setdefault(d, set()).add(n)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        for n in reverse.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen - set(roots)

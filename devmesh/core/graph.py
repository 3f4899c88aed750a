"""Dependency graph of a project's services: cycle reporting.

Kept apart from the model so the planner and the validator share one definition of
"a dependency cycle". Edges that point at unknown services are ignored here: reporting them
is the validator's job, and the planner only ever sees validated projects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


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

"""How a node is named on screen when two share a name: ``NAME#ID6``.

Why: node names default to the host name, and two teammates' laptops are both ``ubuntu``
as often as not (machines in network namespaces share the host's). Shown under one name,
they cannot be told apart in `status`, `peers`, route reasons or the access log. Node ids
are unique (random, 128 bits), so every node whose name another live node also carries is
shown with the first 6 hex digits of its id, and only those: a name nobody shares stays as
it is. Every view takes its names from here, so they all agree. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ID_DIGITS = 6


def label(name: str, node_id: str) -> str:
    """``NAME#ID6``: the name with the first 6 hex digits of the node id."""
    return f"{name}#{node_id[:ID_DIGITS]}"


def shared(live: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The names carried by two or more distinct nodes among ``live`` ((node id, name))."""
    owners: dict[str, set[str]] = {}
    for node_id, name in live:
        owners.setdefault(name, set()).add(node_id)
    return frozenset(name for name, ids in owners.items() if len(ids) > 1)


def display_names(
    live: Iterable[tuple[str, str]], others: Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """Node id -> the name to show, for the ``live`` nodes (this node and the peers alive
    now) and ``others`` (expired or refused peers, shown but not counted: a name is shared
    only while two live nodes carry it)."""
    live = list(live)
    clash = shared(live)
    return {
        node_id: label(name, node_id) if name in clash else name
        for node_id, name in [*live, *others]
    }


def shown(names: Mapping[str, str], node_id: str | None, name: str) -> str:
    """The name to show for ``node_id`` (``name`` itself when the id is unknown)."""
    if node_id is None:
        return name
    return names.get(node_id, name)

"""The traffic of the mesh graph's edges, from the proxy's per-route counts.

Why apart from ``core.graph``: the graph decides what the picture shows; this turns the
metrics' routes (``core.metrics.RouteKey``: caller, service, target) into the graph's
keys (an edge is a caller and a dependency, whatever the target; an inbound entry a
calling node and a local service), with ``core.metrics.summarize``'s arithmetic, so
`devmesh metrics` and `devmesh graph` agree on every number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from devmesh.core import graph, metrics


def edge_traffic(
    counts: Mapping[metrics.RouteKey, metrics.Stats], *, seconds: float
) -> dict[graph.TrafficKey, graph.Traffic]:
    """The calls through each dependency edge over a period of ``seconds``.

    The proxy counts per route: the caller (``SERVICE.PROJECT``, known from the edge
    listener the call came through), the service, and where the call went (local, a peer,
    the fallback, or ``none`` when devmesh answered it 409 or 502). An edge's traffic is
    every route of its caller and service whatever the target, since the target may have
    changed within the period; calls from a browser or curl (no caller) belong to no edge.
    The numbers are ``core.metrics.summarize``'s, so `devmesh metrics` and the graph agree.
    """
    grouped = _grouped(
        (("route", caller_project, caller, key.service), stats)
        for key, stats in counts.items()
        if key.kind == metrics.ROUTE and key.caller
        for caller, _, caller_project in [key.caller.partition(".")]
    )
    return {(k[1], k[2], k[3]): t for k, t in _summaries(grouped, seconds).items()}


def inbound_traffic(
    counts: Mapping[metrics.RouteKey, metrics.Stats], *, seconds: float
) -> dict[graph.InboundKey, graph.Traffic]:
    """The calls teammates' nodes made into this machine's shared services over a period,
    per calling node and service (the owner's side of their edges: the proxy's peer
    listener counts them by the caller's node name)."""
    grouped = _grouped(
        (("served", key.project, key.node, key.service), stats)
        for key, stats in counts.items()
        if key.kind == metrics.SERVED
    )
    return {(k[2], k[1], k[3]): t for k, t in _summaries(grouped, seconds).items()}


def _grouped(
    items: Iterable[tuple[tuple[str, str, str, str], metrics.Stats]],
) -> dict[metrics.RouteKey, metrics.Stats]:
    """Counts added per group, the group written as a RouteKey (kind, project, caller,
    service) so ``metrics.summarize`` can read it."""
    return metrics.merge(
        {metrics.RouteKey(kind, project, caller, service, "", ""): stats}
        for (kind, project, caller, service), stats in items
    )


def _summaries(
    grouped: Mapping[metrics.RouteKey, metrics.Stats], seconds: float
) -> dict[tuple[str, str, str, str], graph.Traffic]:
    out = {}
    for row in metrics.summarize(grouped, seconds=seconds):
        if not row.requests:
            continue
        k = row.key
        out[(k.kind, k.project, k.caller, k.service)] = graph.Traffic(
            requests=row.requests,
            rps=row.rps,
            error_rate=row.error_rate if row.error_rate is not None else 0.0,
            p50_ms=row.p50_ms,
            p99_ms=row.p99_ms,
        )
    return out

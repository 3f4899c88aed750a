"""`devmesh graph`'s renderings of the graph document: text, Graphviz DOT and Mermaid.

Why they read the JSON document (``core.graph.document``, the contract of docs/cli.md) and
not the model: the CLI gets the document from the agent, and a rendering that only uses
documented fields is one any consumer could write, so the contract is known to be enough.
Pure string building, no I/O.

- Text fits an 80-column terminal: every line is wrapped (long words, such as URLs, are cut)
  with a hanging indent, and names that would push a column past the edge are shortened
  with ``~``. Marks have words: ``!`` is explained in a legend line when it appears.
- DOT: one cluster per machine, a box per service, a note for a fallback, a dashed octagon
  for a dependency nothing serves; a version mismatch is a red bold edge, calls that go
  nowhere a dashed grey one. ``dot -Tsvg`` renders it.
- Mermaid: ``flowchart LR`` with a subgraph per machine. Ids are generated (``n0``, ``m0``),
  never taken from names, so any service, project or node name is safe; labels are quoted
  with ``"`` escaped as ``#quot;``.
"""

from __future__ import annotations

import textwrap
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

WIDTH = 80
NAME_MAX = 32
"""A service's ``project/name`` is shortened past this in the text's columns."""

Doc = Mapping[str, Any]


# ---------------------------------------------------------------------------------- words


def rate(rps: float) -> str:
    """``120 req/s``, ``12.5 req/s``, ``0.25 req/s``."""
    if rps >= 100:
        return f"{rps:.0f} req/s"
    if rps >= 10:
        return f"{rps:.1f} req/s"
    return f"{rps:.2f} req/s"


def percent(share: float) -> str:
    """``0%``, ``0.5%``, ``12%`` of a share between 0 and 1."""
    p = share * 100
    if p == 0:
        return "0%"
    if p >= 10:
        return f"{p:.0f}%"
    return f"{p:.1f}%"


def millis(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def traffic_words(edge: Doc) -> str:
    """``12.0 req/s, 0.5% errors, p50 3.0 ms, p99 40 ms`` or ``no traffic``."""
    if edge.get("rps") is None:
        return "no traffic"
    parts = [rate(float(edge["rps"])), f"{percent(float(edge.get('error_rate') or 0))} errors"]
    if edge.get("p50_ms") is not None:
        parts.append(f"p50 {millis(float(edge['p50_ms']))}")
    if edge.get("p99_ms") is not None:
        parts.append(f"p99 {millis(float(edge['p99_ms']))}")
    return ", ".join(parts)


def where(edge: Doc, nodes: Mapping[str, Doc], names: Mapping[str, str]) -> str:
    """Where an edge's calls go: ``local api 2.3.1``, ``ben api 2.3.0``, ``fallback URL``,
    ``nowhere (502)``."""
    if edge.get("target") is None:
        status = edge.get("status")
        return f"nowhere ({status})" if status else "nowhere"
    return node_words(nodes.get(str(edge.get("to"))), names)


def node_words(node: Doc | None, names: Mapping[str, str]) -> str:
    """A serving node in a few words: where, the service, its version and branch."""
    if node is None:
        return "?"
    if node.get("kind") == "fallback":
        return f"fallback {node.get('url') or ''}".rstrip()
    if node.get("kind") == "missing":
        return "nowhere"
    machine = node.get("machine")
    who = "local" if machine == "local" else names.get(str(machine), "peer")
    text = f"{who} {node.get('name')}"
    if node.get("version"):
        text += f" {node['version']}"
    if node.get("branch"):
        text += f" (branch {node['branch']})"
    return text


def machine_title(m: Doc) -> str:
    """``ana (this machine)``, ``ben (peer at 192.168.1.23, alive)``."""
    if m.get("local"):
        return f"{m.get('name')} (this machine)"
    at = f" at {m['address']}" if m.get("address") else ""
    return f"{m.get('name')} (peer{at}, {m.get('state')})"


def service_state(n: Doc) -> str:
    """``running, healthy``, ``crash-looping``, ``healthy, shared`` (a peer's)."""
    words = []
    state, health = n.get("state"), n.get("health")
    if state:
        words.append(str(state))
    if health and health not in ("none", state):
        words.append(str(health))
    if n.get("shared"):
        words.append("shared")
    return ", ".join(words) or "-"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def clean(value: object) -> str:
    """``value`` as one line of printable text: control characters, line and paragraph
    separators (which terminals, Graphviz and Mermaid would each read their own way) become
    spaces."""
    return "".join(
        " " if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in str(value)
    )


def _wrap(text: str, indent: str = "", hanging: str | None = None) -> list[str]:
    """``text`` in lines of at most WIDTH columns, continued under ``hanging``."""
    return textwrap.wrap(
        clean(text),
        width=WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "    " if hanging is None else hanging,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


# ----------------------------------------------------------------------------------- text


def text(doc: Doc) -> str:
    """The graph for a terminal: machines and their services, then every call, per project."""
    machines = list(doc.get("machines") or [])
    nodes = list(doc.get("nodes") or [])
    edges = list(doc.get("edges") or [])
    names = {str(m["id"]): str(m.get("name")) for m in machines}
    by_id = {str(n["id"]): n for n in nodes}
    services = [n for n in nodes if n.get("kind") == "service"]
    mismatches = sum(1 for e in edges if e.get("mismatch"))
    nowhere = sum(1 for e in edges if e.get("target") is None)
    scope = f"project {doc['project']}" if doc.get("project") else "all projects"
    out = _wrap(
        f"Mesh of {scope}: {_count(len(machines), 'machine')}, "
        f"{_count(len(services), 'service')}, "
        f"{_count(len(edges), 'dependency', 'dependencies')}"
    )
    notes = []
    if mismatches:
        notes.append(_count(mismatches, "version mismatch", "version mismatches") + " (!)")
    if nowhere:
        notes.append(f"{_count(nowhere, 'dependency', 'dependencies')} served nowhere")
    if notes:
        out += _wrap("Attention: " + ", ".join(notes))
    for m in machines:
        out.append("")
        out += _wrap(machine_title(m))
        mine = [n for n in services if n.get("machine") == m["id"]]
        if not mine:
            out.append("  runs nothing" if m.get("local") else "  shares nothing")
            continue
        labels = [_short(f"{n.get('project')}/{n.get('name')}", NAME_MAX) for n in mine]
        width = max(len(label) for label in labels)
        versions = [str(n.get("version") or "-") for n in mine]
        vwidth = min(max(len(v) for v in versions), 16)
        for n, label, version in zip(mine, labels, versions, strict=True):
            line = f"  {label.ljust(width)}  {_short(version, 16).ljust(vwidth)}  "
            line += service_state(n)
            if n.get("branch"):
                line += f", branch {n['branch']}"
            out += _wrap(line, hanging=" " * min(width + 4, 40))
            if n.get("reason") and n.get("state") not in ("running", None):
                out += _wrap(f"why: {n['reason']}", "      ")
    outside = [n for n in nodes if n.get("kind") == "fallback"]
    if outside:
        out += ["", "fallbacks (outside the mesh)"]
        for n in outside:
            out += _wrap(f"{n.get('project')}/{n.get('name')}: fallback {n.get('url')}", "  ")
    metrics_on = doc.get("metrics", True) is not False
    if edges:
        window = float(doc.get("window_s") or 300)
        if metrics_on:
            out += ["", f"CALLS (traffic over the last {max(1, int(window // 60))} min)"]
        else:
            out += ["", "CALLS (the proxy's metrics are off: calls are not counted)"]
    project = None
    for e in edges:
        if e.get("project") != project:
            project = e.get("project")
            out += _wrap(str(project))
        out += _edge_lines(e, by_id, names, traffic=metrics_on)
    inbound = list(doc.get("inbound") or [])
    if inbound:
        window = float(doc.get("window_s") or 300)
        out += ["", f"CALLS FROM TEAMMATES (last {max(1, int(window // 60))} min)"]
        for i in inbound:
            out += _wrap(f"  {i.get('node')} → {i.get('project')}/{i.get('service')}")
            out += _wrap(traffic_words(i), "      ")
    if mismatches:
        out += ["", "! the instance called is outside the caller's version range"]
    return "\n".join(line.rstrip() for line in out) + "\n"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _edge_lines(
    e: Doc, nodes: Mapping[str, Doc], names: Mapping[str, str], *, traffic: bool
) -> list[str]:
    mark = "!" if e.get("mismatch") else " "
    head = f"{mark} {e.get('caller')} → {e.get('service')}"
    if e.get("range"):
        head += f" {e['range']}"
    if e.get("target") is None:
        status = e.get("status")
        goes = f"nowhere, calls get {status}" if status else "nowhere"
    else:
        goes = f"served by {where(e, nodes, names)}"
    lines = _wrap(f"{head}: {goes}", hanging="      ")
    if traffic and (e.get("target") is not None or e.get("rps") is not None):
        lines += _wrap(traffic_words(e), "      ")
    if e.get("target") is not None:
        then = [node_words(nodes.get(str(t)), names) for t in e.get("failover") or []]
        if then:
            lines += _wrap("failover: " + ", then ".join(then), "      ")
    else:
        lines += _wrap(f"why: {e.get('reason')}", "      ")
    if e.get("warning"):
        lines += _wrap(f"warning: {e['warning']}", "      ")
    return lines


# ------------------------------------------------------------------------------------ DOT


def _dot_quote(value: str) -> str:
    value = "\n".join(clean(line) for line in value.split("\n"))
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_attrs(**attrs: str) -> str:
    return "[" + ", ".join(f"{k}={_dot_quote(v)}" for k, v in attrs.items()) + "]"


def _node_label(n: Doc) -> str:
    if n.get("kind") == "fallback":
        return f"{n.get('project')}/{n.get('name')}\nfallback\n{n.get('url') or ''}"
    if n.get("kind") == "missing":
        return f"{n.get('project')}/{n.get('name')}\nnowhere"
    version = f" {n['version']}" if n.get("version") else ""
    lines = [f"{n.get('project')}/{n.get('name')}{version}", service_state(n)]
    if n.get("branch"):
        lines.append(f"branch {n['branch']}")
    return "\n".join(lines)


def _edge_label(e: Doc) -> str:
    lines = [str(e["range"])] if e.get("range") else []
    if e.get("target") is None:
        lines.append(f"nowhere ({e['status']})" if e.get("status") else "nowhere")
    if e.get("rps") is not None:
        lines.append(traffic_words(e))
    if e.get("mismatch"):
        lines.append("! version mismatch")
    return "\n".join(lines)


def _arrows(doc: Doc) -> list[tuple[str, str, str, str]]:
    """What DOT and Mermaid draw: (from, to, label, kind) per edge, each followed by a
    ``failover`` arrow to every node its calls would go to next. ``kind`` is ``mismatch``,
    ``nowhere``, ``errors`` (calls answered 5xx in the window) or ``call``."""
    out = []
    for e in doc.get("edges") or []:
        if e.get("mismatch"):
            kind = "mismatch"
        elif e.get("target") is None:
            kind = "nowhere"
        elif e.get("error_rate"):
            kind = "errors"
        else:
            kind = "call"
        out.append((str(e["from"]), str(e["to"]), _edge_label(e), kind))
        out += [(str(e["from"]), str(f), "failover", "failover") for f in e.get("failover") or []]
    for i in doc.get("inbound") or []:
        kind = "errors" if i.get("error_rate") else "call"
        out.append((_caller_id(i), str(i["to"]), traffic_words(i), kind))
    return out


def _caller_id(inbound: Doc) -> str:
    """The node drawn for a teammate's node that calls here (one per calling node)."""
    return f"caller:{inbound.get('node')}"


def _callers(doc: Doc) -> dict[str, tuple[str, str | None]]:
    """Each calling teammate's drawn node: id -> (its name, its machine id or None)."""
    return {_caller_id(i): (str(i.get("node")), i.get("machine")) for i in doc.get("inbound") or []}


DOT_LOOKS: dict[str, dict[str, str]] = {
    "call": {},
    "mismatch": {"color": "red", "fontcolor": "red", "style": "bold"},
    "nowhere": {"color": "grey40", "fontcolor": "grey40", "style": "dashed"},
    "errors": {"color": "darkorange", "fontcolor": "darkorange3", "penwidth": "1.5"},
    "failover": {"color": "grey60", "fontcolor": "grey40", "style": "dotted"},
}
MERMAID_ARROWS = {
    "call": "-->",
    "mismatch": "==>",
    "nowhere": "-.->",
    "errors": "-->",
    "failover": "-.->",
}
MERMAID_LINK_STYLES = {
    "mismatch": "stroke:red,color:red",
    "nowhere": "stroke:grey",
    "errors": "stroke:darkorange,color:darkorange",
    "failover": "stroke:lightgrey,color:grey",
}


def _dot_caller(name: str) -> dict[str, str]:
    return {"label": f"calls from {name}", "shape": "ellipse", "style": "dashed"}


def dot(doc: Doc) -> str:
    """Graphviz DOT: ``devmesh graph --format dot | dot -Tsvg > mesh.svg``."""
    out = [
        "digraph devmesh {",
        "  rankdir=LR;",
        '  graph [fontname="Helvetica", fontsize=11];',
        '  node [shape=box, style="rounded", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    nodes = list(doc.get("nodes") or [])
    callers = _callers(doc)
    for i, m in enumerate(doc.get("machines") or []):
        out.append(f"  subgraph cluster_{i} {{")
        out.append(f"    label={_dot_quote(machine_title(m))};")
        out.append('    style="rounded"; color="grey50";')
        for n in nodes:
            if n.get("machine") == m["id"]:
                style = "rounded" if n.get("state") in (None, "running") else "rounded,dashed"
                out.append(
                    f"    {_dot_quote(n['id'])} {_dot_attrs(label=_node_label(n), style=style)};"
                )
        for cid, (name, machine) in callers.items():
            if machine == m["id"]:
                out.append(f"    {_dot_quote(cid)} {_dot_attrs(**_dot_caller(name))};")
        out.append("  }")
    for cid, (name, machine) in callers.items():
        if machine is None:
            out.append(f"  {_dot_quote(cid)} {_dot_attrs(**_dot_caller(name))};")
    for n in nodes:
        if n.get("machine") is not None:
            continue
        if n.get("kind") == "fallback":
            attrs = _dot_attrs(label=_node_label(n), shape="note", style="solid")
        else:
            attrs = _dot_attrs(
                label=_node_label(n), shape="octagon", style="dashed", color="grey40"
            )
        out.append(f"  {_dot_quote(n['id'])} {attrs};")
    for source, dest, label, kind in _arrows(doc):
        look = {"label": label, **DOT_LOOKS[kind]}
        out.append(f"  {_dot_quote(source)} -> {_dot_quote(dest)} {_dot_attrs(**look)};")
    out.append("}")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------- Mermaid


def _mermaid_text(value: str) -> str:
    """A label inside ``"..."``: quotes, ``#`` (Mermaid's entity mark) and the characters it
    reads as markup escaped as entities; a line break becomes ``<br/>``."""
    value = "\n".join(clean(line) for line in value.split("\n"))
    escaped = (
        value.replace("#", "#35;")
        .replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("|", "#124;")
    )
    return escaped.replace("\n", "<br/>")


def _mermaid_ids(items: Sequence[Doc], prefix: str) -> dict[str, str]:
    return {str(item["id"]): f"{prefix}{i}" for i, item in enumerate(items)}


def mermaid(doc: Doc) -> str:
    """A Mermaid flowchart for a Markdown page (inside a ```` ```mermaid ```` block)."""
    machines = list(doc.get("machines") or [])
    nodes = list(doc.get("nodes") or [])
    callers = _callers(doc)
    mids = _mermaid_ids(machines, "m")
    nids = _mermaid_ids(nodes, "n")
    nids.update({cid: f"c{i}" for i, cid in enumerate(callers)})
    out = ["flowchart LR"]

    def caller_line(cid: str, indent: str) -> str:
        return f'{indent}{nids[cid]}(("{_mermaid_text("calls from " + callers[cid][0])}"))'

    def node_line(n: Doc, indent: str) -> str:
        label = f'"{_mermaid_text(_node_label(n))}"'
        nid = nids[str(n["id"])]
        if n.get("kind") == "fallback":
            return f"{indent}{nid}[/{label}/]"
        if n.get("kind") == "missing":
            return f"{indent}{nid}{{{{{label}}}}}:::missing"
        return f"{indent}{nid}[{label}]"

    for m in machines:
        out.append(f'  subgraph {mids[str(m["id"])]}["{_mermaid_text(machine_title(m))}"]')
        out += [node_line(n, "    ") for n in nodes if n.get("machine") == m["id"]]
        out += [caller_line(c, "    ") for c, (_, mid) in callers.items() if mid == m["id"]]
        out.append("  end")
    out += [node_line(n, "  ") for n in nodes if n.get("machine") is None]
    out += [caller_line(c, "  ") for c, (_, mid) in callers.items() if mid is None]
    styled: dict[str, list[int]] = {}
    drawn = 0
    for source, dest, label, kind in _arrows(doc):
        a, b = nids.get(source), nids.get(dest)
        if a is None or b is None:
            continue  # the document names every node an edge uses; never draw half an edge
        text_part = f'|"{_mermaid_text(label)}"|' if label else ""
        out.append(f"  {a} {MERMAID_ARROWS[kind]}{text_part} {b}")
        styled.setdefault(kind, []).append(drawn)
        drawn += 1
    out.append("  classDef missing stroke-dasharray: 5 5")
    for kind, style in MERMAID_LINK_STYLES.items():
        if styled.get(kind):
            out.append(f"  linkStyle {','.join(map(str, styled[kind]))} {style}")
    return "\n".join(out) + "\n"


RENDERERS = {"text": text, "dot": dot, "mermaid": mermaid}

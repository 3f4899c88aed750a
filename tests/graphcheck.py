"""Checks of `devmesh graph`'s renderings and document, shared by the core and agent tests.

- ``documented_fields``: the keys docs/cli.md lists for each part of the JSON contract.
- ``check_document``: a document has exactly the documented keys with the documented types,
  and every id an edge names is a node, every node's machine a machine.
- ``check_mermaid``: the structure of a Mermaid flowchart as devmesh writes it (generated ids,
  quoted labels without a bare quote, balanced subgraphs, edges between defined nodes,
  ``linkStyle`` indices in range). Structural on purpose: CI has no Mermaid renderer.
- ``render_dot``: the DOT rendered by Graphviz (``dot -Tsvg``), which must succeed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
TABLES = {
    "Top level:": "top",
    "`machines[]`:": "machines",
    "`nodes[]`:": "nodes",
    "`edges[]`:": "edges",
    "`inbound[]`:": "inbound",
}


def documented_fields() -> dict[str, dict[str, str]]:
    """{part: {key: type words}} from the graph contract's tables in docs/cli.md."""
    text = DOCS.read_text()
    section = text[text.index("### `graph --format json` contract") :]
    section = section[: section.index("\n## ")]
    out: dict[str, dict[str, str]] = {}
    part = None
    for line in section.splitlines():
        if line.strip() in TABLES:
            part = TABLES[line.strip()]
            out[part] = {}
            continue
        m = re.match(r"^\| `([a-z_0-9]+)` \| ([^|]+) \|", line)
        if part is not None and m:
            out[part][m.group(1)] = m.group(2).strip()
    return out


TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "list": (list,),
    "list of strings": (list,),
}


def _check_value(where: str, value: Any, words: str) -> None:
    nullable = words.endswith(" or null")
    base = words.removesuffix(" or null")
    if value is None:
        assert nullable, f"{where} is null, documented as {words!r}"
        return
    kinds = TYPES[base]
    assert isinstance(value, kinds) and not (
        base in ("number", "integer") and isinstance(value, bool)
    ), f"{where} = {value!r} is not a {words}"
    if base == "list of strings":
        assert all(isinstance(v, str) for v in value), f"{where} = {value!r}"


def check_document(doc: dict[str, Any]) -> None:
    fields = documented_fields()
    assert set(fields) == {"top", "machines", "nodes", "edges", "inbound"}, fields.keys()
    assert set(doc) == set(fields["top"]), set(doc) ^ set(fields["top"])
    for key, words in fields["top"].items():
        _check_value(key, doc[key], words)
    for part in ("machines", "nodes", "edges", "inbound"):
        for i, item in enumerate(doc[part]):
            assert set(item) == set(fields[part]), (part, set(item) ^ set(fields[part]))
            for key, words in fields[part].items():
                _check_value(f"{part}[{i}].{key}", item[key], words)
    machines = [m["id"] for m in doc["machines"]]
    nodes = [n["id"] for n in doc["nodes"]]
    assert len(set(machines)) == len(machines) and len(set(nodes)) == len(nodes)
    assert [m["local"] for m in doc["machines"]][:1] == [True]
    for n in doc["nodes"]:
        assert n["machine"] is None or n["machine"] in machines, n
        assert (n["machine"] is None) == (n["kind"] != "service"), n
    for e in doc["edges"]:
        assert e["from"] in nodes and e["to"] in nodes, e
        assert all(f in nodes for f in e["failover"]), e
        assert (e["target"] is None) == (e["outcome"] != "route"), e
        traffic = [e[k] for k in ("requests", "rps", "error_rate", "p50_ms", "p99_ms")]
        assert all(v is None for v in traffic[:3]) or all(v is not None for v in traffic[:3]), e
    for i in doc["inbound"]:
        assert i["to"] in nodes and (i["machine"] is None or i["machine"] in machines), i
        assert i["requests"] > 0 and i["rps"] is not None, i


_ID = r"[nmc][0-9]+"
_LABEL = r'"[^"]*"'
_NODE = re.compile(
    rf"^\s+({_ID})(\[{_LABEL}\]|\[/{_LABEL}/\]|\{{\{{{_LABEL}\}}\}}|\(\({_LABEL}\)\))(:::\w+)?$"
)
_EDGE = re.compile(rf"^\s+({_ID}) (-->|-\.->|==>)(\|{_LABEL}\|)? ({_ID})$")
_SUBGRAPH = re.compile(rf"^\s+subgraph ({_ID})\[{_LABEL}\]$")


def check_mermaid(text: str) -> dict[str, Any]:
    """The parts of a Mermaid flowchart, checked: {nodes, subgraphs, edges: [(a, arrow, b)]}."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR", lines[:1]
    nodes: dict[str, str] = {}
    subgraphs: list[str] = []
    edges: list[tuple[str, str, str]] = []
    depth = 0
    link_styles: list[int] = []
    for line in lines[1:]:
        if m := _SUBGRAPH.match(line):
            assert depth == 0, f"nested subgraph: {line!r}"
            subgraphs.append(m.group(1))
            depth += 1
        elif line.strip() == "end":
            assert depth == 1, f"unbalanced end: {line!r}"
            depth -= 1
        elif m := _NODE.match(line):
            assert m.group(1) not in nodes, f"node defined twice: {line!r}"
            nodes[m.group(1)] = m.group(2)
        elif m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), m.group(4)))
        elif line.strip().startswith("linkStyle "):
            link_styles += [int(i) for i in line.split()[1].split(",")]
        elif line.strip().startswith("classDef "):
            continue
        else:
            raise AssertionError(f"not a line devmesh writes: {line!r}")
    assert depth == 0, "a subgraph is not closed"
    for a, _, b in edges:
        assert a in nodes and b in nodes, (a, b)
    assert all(0 <= i < len(edges) for i in link_styles), link_styles
    return {"nodes": nodes, "subgraphs": subgraphs, "edges": edges}


def render_dot(text: str) -> str:
    """The SVG Graphviz draws from ``text``; fails the test when dot refuses it."""
    r = subprocess.run(
        ["dot", "-Tsvg"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, f"dot -Tsvg exited {r.returncode}: {r.stderr}\n{text}"
    assert "<svg" in r.stdout
    return r.stdout

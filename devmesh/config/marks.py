"""YAML text to plain data, remembering where each key and value was written.

Why not ``yaml.safe_load``: it forgets positions and silently lets a duplicate key win,
and every problem the validator prints must point at FILE:LINE:COL. So we let PyYAML
compose the node tree (its scanner and parser are fine) and build the Python data
ourselves, recording 1-based (line, column) per key path, the style and raw text of each
scalar, and every duplicate key with both locations.

Paths are tuples of str keys and int list indexes: ``("services", "api", "port")``.
Scalars are constructed by PyYAML's SafeConstructor, so YAML 1.1 typing applies
(``on``/``no`` are booleans, ``0755`` is octal); callers that need the text as written
(env values, ``restart.policy: no``) read ``Marks.raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Position:
    line: int
    column: int
    file: str = ""
    """The file the position is in, as shown in messages; "" is the file being read (the
    one a problem is reported against when the position names none)."""


@dataclass(slots=True)
class Marks:
    """Where things were written; positions are 1-based."""

    values: dict[Path, Position] = field(default_factory=dict)
    """Start of the value (scalar, mapping or sequence) at each path."""
    keys: dict[Path, Position] = field(default_factory=dict)
    """Start of the key text of each mapping entry, by the entry's path."""
    raw: dict[Path, tuple[str, str]] = field(default_factory=dict)
    """(style, text as written) of each scalar value; style "" is plain (unquoted)."""
    duplicates: list[tuple[Path, Position, Position]] = field(default_factory=list)
    """(path, first position, duplicate position) of each repeated key."""
    tags: dict[Path, str] = field(default_factory=dict)
    """The compose merge tags written on values: ``!reset`` or ``!override`` (config/merge.py)."""

    def value(self, path: Path) -> Position:
        """Position of the value at path, else of the closest ancestor that has one."""
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), Position(1, 1))

    def key(self, path: Path) -> Position:
        """Position of the key of the entry at path, else of its value's closest ancestor."""
        return self.keys.get(path) or self.value(path)


class YamlSyntaxError(ValueError):
    """The text is not YAML; line and column locate the parser's complaint (1-based)."""

    def __init__(self, problem: str, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: {problem}")
        self.problem = problem
        self.line = line
        self.column = column


def _pos(node: yaml.Node, file: str = "") -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1, file)


MERGE_TAGS = ("!reset", "!override")
"""Compose's tags for override files: drop the value, or replace it instead of merging."""


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode) -> Any:
    try:
        return _constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError:
        return node.value


def _key_text(node: yaml.Node) -> str | None:
    """Keys are names; anything but a scalar key is refused by returning None."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    value = _scalar(node)
    if isinstance(value, bool):
        return node.value  # `on:` as a key means the word, not True
    return None if value is None and node.value in ("", "~") else str(value)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_NODES = 200_000


class _Builder:
    """One build pass; bounds alias expansion so a hostile file cannot exhaust memory."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.marks = Marks()
        self.bad_keys: list[tuple[Path, Position]] = []
        self.count = 0
        self.active: set[int] = set()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            pos = _pos(node, self.file)
            raise YamlSyntaxError(
                f"document too large (more than {_MAX_NODES} nodes after aliases)",
                pos.line,
                pos.column,
            )
        if id(node) in self.active:
            pos = _pos(node, self.file)
            raise YamlSyntaxError("recursive alias", pos.line, pos.column)
        self.marks.values.setdefault(path, _pos(node, self.file))
        if node.tag in MERGE_TAGS:
            self.marks.tags[path] = node.tag
            node = _untagged(node)
        if isinstance(node, yaml.ScalarNode):
            self.marks.raw[path] = (node.style or "", node.value)
            return _scalar(node)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            assert isinstance(node, yaml.SequenceNode)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in sources:
                    value = self.build(source, path)
                    if isinstance(value, dict):
                        for k, v in value.items():
                            merged.setdefault(k, v)
                continue
            key = _key_text(key_node)
            if key is None:
                self.bad_keys.append((path, _pos(key_node, self.file)))
                continue
            child = (*path, key)
            if key in seen:
                self.marks.duplicates.append((child, seen[key], _pos(key_node, self.file)))
                continue  # the first spelling wins; the duplicate is reported
            seen[key] = _pos(key_node, self.file)
            self.marks.keys[child] = _pos(key_node, self.file)
            self.marks.values[child] = _pos(value_node, self.file)
            out[key] = self.build(value_node, child)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


@dataclass(frozen=True, slots=True)
class Parsed:
    data: Any
    marks: Marks
    bad_keys: list[tuple[Path, Position]]
    """Mappings that have a key that is not a plain scalar (a list or mapping as a key)."""


def _untagged(node: yaml.Node) -> yaml.Node:
    """The node as if written without its merge tag, so it is built as plain YAML."""
    if isinstance(node, yaml.ScalarNode):
        plain = not node.style
        tag = _constructor.resolve(yaml.ScalarNode, node.value, (plain, not plain))
        return yaml.ScalarNode(tag, node.value, node.start_mark, node.end_mark, node.style)
    return node


def parse(text: str, *, file: str = "") -> Parsed:
    """Compose and build one YAML document; ``file`` is recorded in every position.

    Raises YamlSyntaxError for text that is not YAML or holds several documents.
    Anchors and aliases work (an alias is built again at each use); merge keys (``<<``)
    give defaults that the mapping's own keys override without counting as duplicates.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        cm = exc.context_mark
        if exc.context and exc.problem and cm is not None and cm is not mark:
            problem = f"{problem} ({exc.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise YamlSyntaxError(problem, line, column) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None
    finally:
        loader.dispose()
    builder = _Builder(file)
    data = None if node is None else builder.build(node, ())
    return Parsed(data=data, marks=builder.marks, bad_keys=builder.bad_keys)

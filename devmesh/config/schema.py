"""The JSON Schema of devmesh.yaml, and its errors turned into sentences a person can act on.

Why the translation: jsonschema says ``42 is not valid under any of the given schemas``.
A user needs ``expected a string or a list of strings, got 42``, at the line of the 42,
and for a misspelt key ``unknown key 'healthchek'; did you mean 'health'?`` at the key
itself. Compose v1 showed that schema-first validation is only as good as this layer.

Strategy for oneOf/anyOf: find the alternatives whose type (or const/enum) fits the value.
None fit: list what each alternative expects. Some fit: report the errors of the one
that fits best, as if it were the only alternative (so a wrong port inside a valid-looking
mapping reads as a port error, not as "matches no alternative").
"""

from __future__ import annotations

import difflib
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from devmesh.config import marks as marks_mod
from devmesh.config import report

_SCHEMA_NAME = "devmesh.schema.json"

REMOVED: dict[tuple[str | int, ...], str] = {
    ("mesh", "secret"): (
        "the team secret comes from the bundle, not from devmesh.yaml: run "
        "`devmesh mesh join FILE` (or `devmesh mesh init`) and delete this key"
    ),
}
"""Keys the schema once had, with what to do instead (said rather than 'unknown key')."""

# Patterns of the schema, said in words.
_PATTERNS = {
    "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$": (
        "a name of lower-case letters, digits and dashes (like a host name label, "
        "at most 63 characters, not starting or ending with a dash)"
    ),
    "^[A-Za-z_][A-Za-z0-9_]*$": "a name of letters, digits and _, not starting with a digit",
    "^/": "a path starting with /",
    "^https?://": "a URL starting with http:// or https://",
    "^SIG[A-Z0-9]+$": "a signal name such as SIGTERM",
    "^(\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$": "HOST:PORT (e.g. 10.0.0.7:7701)",
}
_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
    "object": "a mapping",
    "array": "a list",
}


@functools.cache
def load_schema() -> dict[str, Any]:
    """The schema from the installed package, else from the source checkout.

    The wheel force-includes schemas/devmesh.schema.json as devmesh/schemas/; an editable
    or source checkout has it at the repository root.
    """
    try:
        packaged = resources.files("devmesh").joinpath("schemas", _SCHEMA_NAME)
        if packaged.is_file():
            return json.loads(packaged.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    repo = Path(__file__).resolve().parents[2] / "schemas" / _SCHEMA_NAME
    return json.loads(repo.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def is_valid(document: Any) -> bool:
    return bool(_validator().is_valid(document))


def found(value: Any) -> str:
    """A value as the user wrote it, for "got ..."."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null (nothing)"
    if isinstance(value, str):
        return "an empty string" if value == "" else repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """The subschema with a local ``$ref`` (``#/$defs/...``) replaced by its target."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = load_schema()
        for part in ref[2:].split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _join(words: list[str], conjunction: str = "or") -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + f" {conjunction} " + words[-1]


def describe(schema: dict[str, Any]) -> str:
    """What a (sub)schema accepts, in a few words: "a list of strings", "'auto'"."""
    schema = resolve(schema)
    if "const" in schema:
        return found(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(found(v) for v in schema["enum"])
    kinds = schema.get("type")
    if kinds is None:
        return "a value"
    if isinstance(kinds, list):
        return _join([_TYPES[k] for k in kinds])
    if kinds == "array" and isinstance(schema.get("items"), dict):
        inner = describe(schema["items"])
        if inner.startswith(("a ", "an ")):
            return "a list of " + inner.split(" ", 1)[1] + "s"
    if kinds == "string" and schema.get("pattern") in _PATTERNS:
        return _PATTERNS[schema["pattern"]]
    return _TYPES[kinds]


def _fits(schema: dict[str, Any], value: Any) -> bool:
    """Whether value has the right type (or const/enum) for the alternative ``schema``."""
    schema = resolve(schema)
    if "const" in schema:
        return bool(value == schema["const"] and type(value) is type(schema["const"]))
    if "enum" in schema:
        return value in schema["enum"]
    kinds = schema.get("type")
    if kinds is None:
        return True
    checker = _validator().TYPE_CHECKER
    return any(checker.is_type(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds))


def _key_names(schema: dict[str, Any]) -> list[str]:
    return list(schema.get("properties", {}))


def _message(error: jsonschema.ValidationError) -> str:
    """One error, in words; the caller places it."""
    v = error.validator
    # jsonschema types these as possibly unset; an error from iter_errors always has them.
    value: Any = error.instance
    arg: Any = error.validator_value
    schema = error.schema if isinstance(error.schema, dict) else {}
    if v == "type":
        text = f"expected {describe({'type': arg})}, got {found(value)}"
        if arg == "string" and isinstance(value, int | float) and not isinstance(value, bool):
            text += " (put it in quotes)"
        return text
    if v == "const":
        return f"expected {found(arg)}, got {found(value)}"
    if v == "enum":
        text = f"expected one of {', '.join(found(a) for a in arg)}, got {found(value)}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in arg], n=1)
            if close:
                text += f"; did you mean {close[0]!r}?"
        elif value is False and "no" in arg:
            text += " (YAML reads unquoted no, off and false as false; write no)"
        return text
    if v == "required":
        missing = [k for k in arg if k not in value]
        return f"missing required key {_join([repr(k) for k in missing])}"
    if v == "dependentRequired":
        pairs = [(k, [d for d in deps if d not in value]) for k, deps in arg.items() if k in value]
        k, deps = next((k, d) for k, d in pairs if d)
        return f"{_join([repr(d) for d in deps])} is required when {k!r} is given"
    if v == "pattern":
        words = _PATTERNS.get(arg, f"a string matching {arg}")
        return f"expected {words}, got {found(value)}"
    number = "an integer" if schema.get("type") == "integer" else "a number"
    if v == "minimum":
        return f"expected {number} >= {arg}, got {found(value)}"
    if v == "maximum":
        return f"expected {number} <= {arg}, got {found(value)}"
    if v == "minLength":
        return "expected a non-empty string" if arg == 1 else f"expected at least {arg} characters"
    if v == "minItems":
        return f"expected at least {report.plural(arg, 'item')}, got an empty list"
    if v == "uniqueItems":
        seen: list[Any] = []
        dup = None
        for x in value:
            if x in seen:
                dup = x
                break
            seen.append(x)
        return f"expected each item once, got {found(dup)} more than once"
    if v in ("oneOf", "anyOf"):
        alternatives = [resolve(a) for a in arg]
        if all(set(a) == {"required"} for a in alternatives):
            keys = [k for a in alternatives for k in a["required"]]
            given = [k for k in keys if isinstance(value, dict) and k in value]
            got = _join([repr(k) for k in given], "and") if given else "none"
            return f"expected exactly one of {_join(keys)}, got {got}"
        if not error.context:
            return f"expected only one of {_join([describe(a) for a in alternatives])}"
        return f"expected {_join([describe(a) for a in alternatives])}, got {found(value)}"
    description = schema.get("description")
    return error.message + (f" ({description})" if description else "")


def _best_branch(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError] | None:
    """For a oneOf/anyOf error: the errors of the alternative that fits the value's type."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        return None
    given: Any = error.validator_value
    alternatives = [resolve(a) for a in given]
    if all(set(a) == {"required"} for a in alternatives):
        return None
    fitting = [i for i, alt in enumerate(alternatives) if _fits(alt, error.instance)]
    if not fitting:
        return None
    by_branch = {i: [e for e in error.context if e.relative_schema_path[0] == i] for i in fitting}
    best = min(fitting, key=lambda i: len(by_branch[i]))
    return by_branch[best] or None


def _flatten(errors: list[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    out: list[jsonschema.ValidationError] = []
    for error in errors:
        branch = _best_branch(error)
        if branch is None:
            out.append(error)
        else:
            out.extend(_flatten(branch))
    return out


def problems(
    document: Any,
    marks: marks_mod.Marks,
    file: str,
    *,
    skip: tuple[tuple[str | int, ...], ...] = (),
) -> list[report.Problem]:
    """Every schema violation of document, placed with marks. Paths in ``skip`` (and below)
    are left out because the caller reports them better itself."""
    out: list[report.Problem] = []
    seen: set[report.Problem] = set()

    def add(path: tuple[str | int, ...], message: str, *, at_key: bool = False) -> None:
        if any(path[: len(s)] == s for s in skip):
            return
        problem = report.placed(
            file, marks.key(path) if at_key else marks.value(path), path, message
        )
        if problem not in seen:
            seen.add(problem)
            out.append(problem)

    for error in _flatten(list(_validator().iter_errors(document))):
        path = tuple(error.absolute_path)
        schema = error.schema if isinstance(error.schema, dict) else {}
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = _key_names(schema)
            for key in error.instance:
                if key in allowed:
                    continue
                if (*path, key) in REMOVED:
                    add((*path, key), REMOVED[(*path, key)], at_key=True)
                    continue
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f"; expected one of: {', '.join(allowed)}"
                )
                add((*path, key), f"unknown key {key!r}{hint}", at_key=True)
        elif "propertyNames" in error.absolute_schema_path:
            name: Any = error.instance
            what = "key" if path and path[-1] == "env" else "name"
            words = _message(error).split(", got ")[0]
            add((*path, name), f"invalid {what} {name!r}: {words}", at_key=True)
        else:
            given: Any = error.validator_value
            at_key = error.validator in ("required", "dependentRequired") or (
                error.validator == "oneOf" and all(set(resolve(a)) == {"required"} for a in given)
            )
            add(path, _message(error), at_key=at_key)
    return out


def key_paths(
    node: dict[str, Any] | None = None, prefix: str = ""
) -> list[tuple[str, dict[str, Any]]]:
    """Every key the schema allows, as dotted paths with placeholders, in schema order.

    Map keys chosen by the user read ``<name>`` (services, dependencies) or ``<VAR>``
    (env); the keys of mappings inside a list read ``list[].key`` (``env_file[].path``).
    Alternatives (oneOf/anyOf) contribute the keys of each alternative, so both
    spellings of depends_on are covered. Used by the reference generator and by the test
    that every key appears in devmesh.yaml.example.
    """
    node = resolve(load_schema() if node is None else node)
    out: list[tuple[str, dict[str, Any]]] = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        out.append((path, sub))
        out.extend(key_paths(sub, path))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        placeholder = "<VAR>" if prefix.endswith(".env") else "<name>"
        path = f"{prefix}.{placeholder}"
        out.append((path, extra))
        out.extend(key_paths(extra, path))
    items = node.get("items")
    if isinstance(items, dict):
        out.extend(key_paths(items, f"{prefix}[]"))
    seen = {p for p, _ in out}
    for alternative in node.get("oneOf", []) + node.get("anyOf", []):
        for path, sub in key_paths(alternative, prefix):
            if path not in seen:
                seen.add(path)
                out.append((path, sub))
    return out


def _children(node: dict[str, Any], part: str | int) -> list[dict[str, Any]]:
    """The subschemas that a value at ``part`` inside a value of ``node`` must match."""
    node = resolve(node)
    out: list[dict[str, Any]] = []
    for alternative in node.get("oneOf", []) + node.get("anyOf", []):
        out.extend(_children(alternative, part))
    if isinstance(part, int):
        items = node.get("items")
        if isinstance(items, dict):
            out.append(items)
        return out
    properties = node.get("properties", {})
    if part in properties:
        out.append(properties[part])
    elif isinstance(node.get("additionalProperties"), dict):
        out.append(node["additionalProperties"])
    return out


def _kinds(node: dict[str, Any]) -> set[str]:
    node = resolve(node)
    out: set[str] = set()
    for alternative in node.get("oneOf", []) + node.get("anyOf", []):
        out |= _kinds(alternative)
    for value in [node["const"]] if "const" in node else node.get("enum", []):
        if not isinstance(value, str):  # a string const/enum is no free-form string
            out.add("boolean" if isinstance(value, bool) else "number")
    kinds = node.get("type", [])
    out.update([kinds] if isinstance(kinds, str) else kinds)
    return out


def kinds_at(path: tuple[str | int, ...]) -> frozenset[str]:
    """The JSON types the schema accepts at path ("string" means any free-form string).

    The loader asks this after interpolation, to give a value that came from a variable
    the type of the field it fills, as compose does (``port: ${P}`` is an integer).
    Empty when the schema does not know the path.
    """
    nodes = [load_schema()]
    for part in path:
        nodes = [child for node in nodes for child in _children(node, part)]
    kinds: set[str] = set()
    for node in nodes:
        kinds |= _kinds(node)
    return frozenset(kinds)

"""`${VAR}` interpolation, as docker compose does it, shared by the loader and the supervisor.

Why it is in core: the same text is expanded twice. The loader fills variables from the
environment and ``.env`` when it reads devmesh.yaml, but leaves the runtime names (``PORT``,
``<DEP>_URL``...) of a service's command and env untouched, because their values exist only
when the process starts; the supervisor then expands what is left. One parser guarantees
both passes agree on what ``${...}`` means.

Forms: ``${NAME}``, ``${NAME:-default}`` (unset or empty), ``${NAME-default}`` (unset),
``${NAME:?message}`` / ``${NAME?message}`` (required), ``${NAME:+alt}`` / ``${NAME+alt}``
(alternative when set) and ``$$`` for a literal ``$``. Defaults may nest ``${...}``.
A ``$`` not followed by ``{`` or ``$`` is literal: unbraced ``$NAME`` is NOT expanded, so
``sh -c 'echo $HOME'`` reaches the shell intact.

Two-pass safety: the first pass runs with ``keep_escapes=True``. It keeps ``$$`` as ``$$``
and escapes every ``$`` of a substituted value as ``$$``, so the second pass (default
options) turns them into one ``$`` and never reads a value as a template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


RUNTIME_NAMES: frozenset[str] = frozenset(
    {"PORT", "DEVMESH_SERVICE", "DEVMESH_PROJECT", "DATABASE_URL"}
)
"""Filled by the supervisor at start, in a service's command, env and health command."""

DB_NAMES: frozenset[str] = frozenset({"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"})
"""libpq's variables, also filled at start for a service with a ``db:`` (PostgreSQL)."""


def url_variable(dependency: str) -> str:
    """The variable that carries a dependency's URL: ``auth-api`` -> ``AUTH_API_URL``."""
    return dependency.upper().replace("-", "_") + "_URL"


def runtime_names(dependencies: Iterable[str]) -> frozenset[str]:
    """Every name left for the start-time pass of a service with these dependencies."""
    return RUNTIME_NAMES | {url_variable(d) for d in dependencies}


class InterpolationError(ValueError):
    """A ``${...}`` that is malformed or names a required variable that has no value."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset})")
        self.message = message
        """What is wrong, quoting the ``${...}`` text."""
        self.offset = offset
        """Index in the text of the ``$`` that starts the faulty expression."""


def _never(name: str) -> bool:
    return False


def _closing(text: str, start: int) -> int:
    """Index of the ``}`` that closes the ``${`` whose ``{`` is at ``start - 1``, or -1."""
    depth = 1
    i = start
    while i < len(text):
        c = text[i]
        if c == "$" and text.startswith("$$", i):
            i += 2
            continue
        if c == "$" and text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def expand(
    text: str,
    lookup: Callable[[str], str | None],
    *,
    keep: Callable[[str], bool] = _never,
    keep_escapes: bool = False,
    on_unset: Callable[[str], None] | None = None,
) -> str:
    """Expand every ``${...}`` of ``text``; ``lookup`` returns None for an unset variable.

    ``keep(name)`` true leaves ``${name...}`` verbatim for a later pass. ``on_unset`` is
    told about each plain ``${NAME}`` that was unset and became an empty string (compose
    warns about those). Raises InterpolationError for an unterminated ``${``, an invalid
    or empty name, an unknown operator, or a ``?`` form whose variable has no value.
    """
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == "$":
            out.append("$$" if keep_escapes else "$")
            i += 2
            continue
        if nxt != "{":
            out.append("$")
            i += 1
            continue
        end = _closing(text, i + 2)
        if end < 0:
            raise InterpolationError(f"missing '}}' to close {text[i:]!r}", i)
        out.append(
            _one(
                text, i, end, lookup=lookup, keep=keep, keep_escapes=keep_escapes, on_unset=on_unset
            )
        )
        i = end + 1
    return "".join(out)


def _one(
    text: str,
    start: int,
    end: int,
    *,
    lookup: Callable[[str], str | None],
    keep: Callable[[str], bool],
    keep_escapes: bool,
    on_unset: Callable[[str], None] | None,
) -> str:
    """Expand the expression ``text[start:end+1]`` (``${`` ... ``}``)."""
    whole = text[start : end + 1]
    body = text[start + 2 : end]
    match = _NAME_RE.match(body)
    if match is None:
        if not body:
            raise InterpolationError(f"empty variable name in {whole!r}", start)
        raise InterpolationError(f"invalid variable name in {whole!r}", start)
    name = match.group()
    rest = body[match.end() :]
    op = next((o for o in _OPERATORS if rest.startswith(o)), None)
    if rest and op is None:
        raise InterpolationError(
            f"invalid variable name or operator in {whole!r} "
            "(expected ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, "
            "${NAME?message}, ${NAME:+alt} or ${NAME+alt})",
            start,
        )
    if keep(name):
        return whole
    value = lookup(name)
    arg = rest[len(op) :] if op else ""

    def sub(v: str) -> str:
        return v.replace("$", "$$") if keep_escapes else v

    def nested(t: str) -> str:
        try:
            return expand(t, lookup, keep=keep, keep_escapes=keep_escapes, on_unset=on_unset)
        except InterpolationError as exc:
            raise InterpolationError(exc.message, start + 2 + len(name) + len(op or "")) from None

    if op is None:
        if value is None:
            if on_unset is not None:
                on_unset(name)
            return ""
        return sub(value)
    usable = bool(value) if op.startswith(":") else value is not None
    if op in (":-", "-"):
        return sub(value) if usable and value is not None else nested(arg)
    if op in (":+", "+"):
        return nested(arg) if usable else ""
    # ":?" or "?": required.
    if usable and value is not None:
        return sub(value)
    unset = " (it is empty)" if value == "" else " (it is not set)"
    detail = ": " + nested(arg) if arg else unset
    raise InterpolationError(f"required variable {name} is missing a value{detail}", start)


_INTEGER_RE = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLEANS = {
    "true": True,
    "false": False,
    "yes": True,
    "no": False,
    "y": True,
    "n": False,
    "on": True,
    "off": False,
}


def cast(text: str, kinds: frozenset[str]) -> str | int | float | bool:
    """The value an interpolated ``text`` takes in a field that accepts JSON ``kinds``.

    Compose's rule: a ``${...}`` substitution always yields a string, and only a field
    typed as a number or a boolean converts it (compose-go casts by path), so a variable
    can never change the document's structure nor turn a string field into a number
    (``branch: ${B}`` with B=``1.10`` stays "1.10"). A field that accepts free-form
    strings keeps the text. Integers are decimal digits with an optional sign, numbers
    add a fraction and an exponent, booleans are true/false and the YAML 1.1 words
    (yes/no, y/n, on/off, any case), as compose accepts them. Text that does not convert
    stays a string, so the schema reports it at the field with the type it expected
    (an unset variable in ``port: ${P}`` reads "expected an integer, got an empty string").
    """
    if "string" in kinds:
        return text
    if kinds & {"integer", "number"} and _INTEGER_RE.fullmatch(text):
        return int(text)
    if "number" in kinds and _NUMBER_RE.fullmatch(text):
        return float(text)
    if "boolean" in kinds and text.lower() in _BOOLEANS:
        return _BOOLEANS[text.lower()]
    return text

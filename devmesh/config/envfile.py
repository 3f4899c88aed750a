"""KEY=VALUE files: the ``.env`` beside devmesh.yaml and each service's ``env_file``.

The syntax is the common subset of docker compose and python-dotenv, so one file works
with both: blank lines and ``#`` comments, an optional ``export `` prefix, unquoted values
(trimmed; `` #`` starts a comment), single quotes (taken literally) and double quotes
(``\\n``, ``\\t``, ``\\"``, ``\\\\`` escapes). Values are NOT interpolated: a ``$`` in a
``.env`` is just a ``$``. A quoted value must close on its own line.
"""

from __future__ import annotations

import re
from pathlib import Path

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


class EnvFileError(ValueError):
    """A line of a KEY=VALUE file that cannot be read; line is 1-based."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


def parse(text: str, *, path: str = "<env>") -> dict[str, str]:
    """Parse the text of a KEY=VALUE file; later lines win.

    Raises EnvFileError naming the path and line of the first malformed line.
    """
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.rstrip()
        if not sep:
            raise EnvFileError(path, number, f"expected KEY=VALUE, got {stripped!r}")
        if not _KEY_RE.fullmatch(key):
            raise EnvFileError(
                path,
                number,
                f"invalid variable name {key!r} (expected letters, digits and _, "
                "not starting with a digit)",
            )
        out[key] = _value(value.lstrip(), path, number)
    return out


def _value(raw: str, path: str, number: int) -> str:
    if raw[:1] == "'":
        end = raw.find("'", 1)
        if end < 0:
            raise EnvFileError(path, number, "missing closing ' quote")
        _trailing(raw[end + 1 :], path, number)
        return raw[1:end]
    if raw[:1] == '"':
        chars: list[str] = []
        i = 1
        while i < len(raw):
            c = raw[i]
            if c == "\\" and i + 1 < len(raw):
                nxt = raw[i + 1]
                chars.append(_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if c == '"':
                _trailing(raw[i + 1 :], path, number)
                return "".join(chars)
            chars.append(c)
            i += 1
        raise EnvFileError(path, number, 'missing closing " quote')
    comment = re.search(r"\s#", raw)
    if comment:
        raw = raw[: comment.start()]
    return raw.strip()


def _trailing(rest: str, path: str, number: int) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise EnvFileError(path, number, f"unexpected text after the closing quote: {rest!r}")


def read(path: Path, *, display: str | None = None) -> dict[str, str]:
    """Read and parse a file. Raises OSError when it cannot be read, EnvFileError when
    a line is malformed (named by ``display``, default the path)."""
    shown = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EnvFileError(shown, 1, "not UTF-8 text") from None
    return parse(text, path=shown)

"""What ``devmesh config`` prints: the merged, interpolated document, secrets masked.

Why a module: the printed document must say what devmesh will run (every file merged,
every ``${VAR}`` filled) without putting secrets on a screen or in a CI log, and must read
back as the same project when saved (``devmesh config --show-secrets > all.yaml``).

What is masked, exactly (unless ``--show-secrets``):

- the text a variable gave a value, when the variable's name contains PASSWORD, PASSWD,
  SECRET, TOKEN, KEY or CREDENTIAL (any case) and its value is not empty:
  ``Bearer ${API_TOKEN}`` prints ``Bearer ***``; a default written in the file
  (``${DB_PASSWORD:-devpass}`` with the variable unset) is not a secret and is shown;
- the password of any URL in a string (``scheme://user:PASSWORD@host``), wherever it came
  from, unless it is a ``${NAME}`` left for the start of the service (``${PGPASSWORD}``).

Not masked: values written in the files themselves (whoever reads the output can read
the files), and env_file contents, which are not read in (``env_file`` is printed as
written, as the files say it).

Round trip: fields that are templates filled when a service starts (a service's
``command``, ``env``, ``health.command``) keep ``${PORT}``, ``${NAME_URL}`` and ``$$`` as
written; in every other string a ``$`` is printed ``$$``, so reading the output again does
not interpolate a value twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_WORDS: tuple[str, ...] = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
"""A variable whose name contains one of these (any case) holds a secret."""

_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)([^@\s/]+)(@)")
_TEMPLATE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")

Path = tuple[str | int, ...]


def is_secret_name(name: str) -> bool:
    """Whether a variable's name says its value is a secret (see SECRET_WORDS)."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def deferred(path: Path) -> bool:
    """Whether path is inside a service's command, env or health command: templates whose
    runtime names (``${PORT}``...) are filled when the service starts."""
    if len(path) < 3 or path[0] != "services":
        return False
    return path[2] in ("command", "env") or path[2:4] == ("health", "command")


def mask_url_passwords(text: str) -> str:
    """``postgres://app:s3cret@db/app`` -> ``postgres://app:***@db/app``."""

    def one(m: re.Match[str]) -> str:
        if _TEMPLATE.fullmatch(m.group(2)):
            return m.group(0)
        return m.group(1) + MASK + m.group(3)

    return _URL_PASSWORD.sub(one, text)


def document(
    merged: Mapping[str, Any], masked: Mapping[Path, str], *, show_secrets: bool
) -> dict[str, Any]:
    """The document to print (see the module docstring); ``masked`` maps each path whose
    value holds a secret variable's text to that value with the text as ***."""

    def walk(value: Any, path: Path) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if not show_secrets and path in masked:
            value = masked[path]
        if not isinstance(value, str):
            return value
        if not deferred(path):
            value = value.replace("$", "$$")
        return value if show_secrets else mask_url_passwords(value)

    out = walk(dict(merged), ())
    assert isinstance(out, dict)
    return out

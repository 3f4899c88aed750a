"""Find, read, interpolate and check a devmesh.yaml, and build the model from it.

This is the one door from a file on disk to ``model.Project``: the CLI's ``validate``,
``up`` and ``plan`` all come through here, so they agree on every problem. Steps, in order:
YAML with marks (syntax and duplicate keys), ``version:`` (an unsupported one stops
everything: the rest of the file may mean something else), ``${VAR}`` interpolation from
the environment and ``.env`` (environment wins), the JSON Schema, semantic checks, the
"not built yet" warnings (config/unbuilt.py), env_file reading. All steps after the
version run even when earlier ones found problems, so one run shows every problem.

Interpolation follows compose: it runs on each scalar value of the parsed document, so a
variable can never add keys or items, and an unset one is an empty string (with a
warning), never null. The result is text, converted only where the schema types the
field as a number or a boolean (``interpolate.cast``), whether the value was quoted or
not; positions stay those of the value in the file, and a malformed ``${`` is reported
at its own column when the scalar is written on one line.

YAML 1.1 choices, on purpose: ``restart: {policy: no}`` means the policy "no" (the raw text
is read, not the boolean); env values are taken as written when unquoted (``0755`` stays
"0755", ``yes`` stays "yes"), because an environment holds text. Everywhere else YAML
typing applies and the schema reports surprises (``policy: off`` -> got false).

What it does not check: that ``cwd`` exists or ports are free (facts of the machine when
the agent applies the project).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devmesh.config import (
    checks,
    dbchecks,
    envfile,
    marks,
    merge,
    report,
    schema,
    show,
    unbuilt,
)
from devmesh.core import interpolate, model

Problem = report.Problem
CONFIG_NAMES: tuple[str, ...] = ("devmesh.yaml", "devmesh.yml")
OVERRIDE_NAMES: tuple[str, ...] = ("devmesh.override.yaml", "devmesh.override.yml")
"""Merged on top of the devmesh.yaml found without -f, when present beside it (compose)."""
STDIN = "<stdin>"


class ConfigUnusable(Exception):
    """Base of the errors of devmesh.config: no usable configuration was obtained."""


class ConfigNotFound(ConfigUnusable):
    """No devmesh.yaml (or .yml) in the start folder or any of its parents."""

    def __init__(self, start: Path) -> None:
        super().__init__(
            f"no {' or '.join(CONFIG_NAMES)} in {start} or any parent folder; "
            "pass -f FILE (or -f - for stdin)"
        )
        self.start = start


class ConfigError(ConfigUnusable):
    """The file has problems; str() is every problem rendered, one per line, by position."""

    def __init__(
        self,
        problems: list[Problem],
        *,
        file: str = "",
        files: tuple[str, ...] = (),
        project: str | None = None,
        services: tuple[str, ...] = (),
    ) -> None:
        self.problems = report.sort(problems)
        super().__init__(report.render(self.problems))
        self.file = file
        self.files = files or ((file,) if file else ())
        """Every file read, in merge order (the first is ``file``)."""
        self.project = project
        """The project's name when the file got far enough to tell, else None."""
        self.services = services


@dataclass(frozen=True, slots=True)
class Loaded:
    project: model.Project
    warnings: list[Problem]
    document: dict[str, Any]
    """The checked document the model was built from: interpolated, env_file merged."""
    file: str = ""
    """The first file as shown in messages (the one that sets the project folder)."""
    files: tuple[str, ...] = ()
    """Every file merged, in order, as shown in messages."""
    merged: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The merged, interpolated document as written (env_file not read in): what
    ``devmesh config`` prints."""
    masked: dict[tuple[str | int, ...], str] = dataclasses.field(default_factory=dict)
    """Paths in ``merged`` whose value holds text of a secret-looking variable, with that
    text as *** (see config/show.py)."""


def find_config(start: Path) -> Path:
    """The nearest devmesh.yaml/devmesh.yml in start or a parent, as compose does.

    Raises ConfigNotFound.
    """
    start = _absolute(start)
    for folder in (start, *start.parents):
        for name in CONFIG_NAMES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    raise ConfigNotFound(start)


def project_name(folder: str) -> str:
    """A folder name made into a valid project name (lower-case, other chars -> '-')."""
    name = re.sub(r"[^a-z0-9-]", "-", folder.lower()).strip("-")
    name = name[:63].strip("-")
    return name or "default"


def display_path(path: Path, cwd: Path) -> str:
    """Relative to the cwd when inside it, else absolute: short and clickable."""
    rel = os.path.relpath(path, cwd)
    return str(path) if rel.startswith("..") else rel


def override_of(path: Path) -> Path | None:
    """The ``devmesh.override.yaml`` (or ``.yml``) beside ``path``, when there is one."""
    for name in OVERRIDE_NAMES:
        candidate = path.parent / name
        if candidate.is_file():
            return candidate
    return None


def config_files(files: Sequence[str] | None, start: Path | None = None) -> list[Path | str]:
    """The files a command reads, in merge order (compose's rule).

    With ``-f`` (``files``): exactly those, in order; ``-`` is stdin. Without: the
    devmesh.yaml found in ``start`` (default the cwd) or a parent, then the
    devmesh.override.yaml beside it when there is one. Raises ConfigNotFound.
    """
    if files:
        return [f if f in ("-", STDIN) else Path(f) for f in files]
    found = find_config(start or Path.cwd())
    override = override_of(found)
    return [found] if override is None else [found, override]


def load(
    path: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    text: str | None = None,
) -> Loaded:
    """Load one devmesh.yaml ("-" or "<stdin>" reads stdin, or ``text`` when given).

    ``environ`` defaults to os.environ; ``text`` replaces reading the file (its folder
    still anchors .env, env_file and cwd). Raises ConfigError with every problem.
    """
    return load_files([path], environ=environ, texts=None if text is None else [text])


def load_files(
    paths: Sequence[Path | str],
    *,
    environ: Mapping[str, str] | None = None,
    texts: Sequence[str | None] | None = None,
) -> Loaded:
    """Load several files merged in order (config/merge.py), as ``-f A -f B`` does.

    The project folder (which anchors .env, env_file, cwd, db.init and the default project
    name) is the first file's, as in compose. Every problem names the file, line and column
    of the value that causes it. Raises ConfigError with every problem.
    """
    if not paths:
        raise ValueError("load_files needs at least one file")
    env = os.environ if environ is None else environ
    cwd = Path.cwd()
    sources: list[_Source] = []
    problems: list[Problem] = []
    for i, path in enumerate(paths):
        text = texts[i] if texts is not None and i < len(texts) else None
        if str(path) in ("-", STDIN):
            if any(s.file == STDIN for s in sources):
                problems.append(Problem(STDIN, 0, 0, "", "stdin (-f -) can be given only once"))
                continue
            if text is None:
                text = sys.stdin.read()
            sources.append(_Source(STDIN, cwd, STDIN, text))
            continue
        absolute = _absolute(Path(path))
        file = display_path(absolute, cwd)
        if text is None:
            try:
                text = _read(absolute, file)
            except ConfigError as exc:
                problems += exc.problems
                continue
        sources.append(_Source(file, absolute.parent, str(absolute), text))
    if problems:
        shown = tuple(
            STDIN if str(p) in ("-", STDIN) else display_path(_absolute(Path(p)), cwd)
            for p in paths
        )
        raise ConfigError(problems, file=shown[0], files=shown)
    return _Load(sources, env).run()


@dataclass(frozen=True, slots=True)
class _Source:
    file: str
    """As shown in messages."""
    directory: Path
    source: str
    """The absolute path, or <stdin>."""
    text: str


def _read(path: Path, file: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        message = "file not found"
    except IsADirectoryError:
        message = "is a folder, not a file"
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        message = f"cannot read: {exc.strerror}"
    raise ConfigError([Problem(file, 0, 0, "", message)], file=file)


class _Load:
    """One load: the state the steps share (files, folder, problems found so far)."""

    def __init__(self, sources: list[_Source], environ: Mapping[str, str]) -> None:
        self.sources = sources
        self.file = sources[0].file
        """The first file: problems about the whole document are reported against it."""
        self.directory = sources[0].directory
        self.environ = environ
        self.problems: list[Problem] = []
        self.unset_seen: set[str] = set()
        self.uninterpolated: list[tuple[str | int, ...]] = []
        """Paths whose ${...} failed; the schema would only repeat the problem there."""
        self.interpolated: dict[str, str] = {}
        """Dotted path -> text as written, of each value a ${...} changed (for messages)."""
        self.masked: dict[tuple[str | int, ...], str] = {}
        """Path -> the value with the text of each secret-looking variable as ***."""
        self.lines: dict[str, list[str]] = {}
        """Each file's lines, by the name shown in messages."""

    def problem(self, pos: marks.Position, path: tuple[str | int, ...], message: str) -> None:
        self.problems.append(report.placed(self.file, pos, path, message))

    def fail(self, data: Any = None) -> ConfigError:
        return ConfigError(
            self.problems,
            file=self.file,
            files=tuple(s.file for s in self.sources),
            project=self.name(data),
            services=_names(data),
        )

    def name(self, data: Any) -> str | None:
        if not isinstance(data, dict):
            return None
        given = data.get("project")
        return given if isinstance(given, str) else project_name(self.directory.name)

    def parse(self) -> list[merge.Layer] | None:
        """Each file parsed, or None when one is not YAML or not a mapping of keys."""
        layers: list[merge.Layer] = []
        for index, src in enumerate(self.sources):
            self.lines[src.file] = src.text.splitlines()
            top = marks.Position(1, 1, src.file)
            try:
                parsed = marks.parse(src.text, file=src.file)
            except marks.YamlSyntaxError as exc:
                self.problem(
                    marks.Position(exc.line, exc.column, src.file),
                    (),
                    f"not valid YAML: {exc.problem}",
                )
                continue
            for path, pos in parsed.bad_keys:
                self.problem(pos, path, "keys must be plain names, not a list or a mapping")
            data = parsed.data
            if data is None and index > 0:
                data = {}  # an override file that is empty (all commented out) changes nothing
            if data is None:
                self.problem(top, (), "the file is empty; expected `version: 1`")
                continue
            if not isinstance(data, dict):
                what = "version, services, ..." if index == 0 else "services, ..."
                self.problem(
                    top,
                    (),
                    f"expected a mapping of keys ({what}) at the top of the file, "
                    f"got {schema.found(data)}",
                )
                continue
            layers.append(merge.Layer(data, parsed.marks, src.file))
        return layers if len(layers) == len(self.sources) else None

    def run(self) -> Loaded:
        layers = self.parse()
        if layers is None:
            raise self.fail()
        merged = merge.merge(layers)
        data, where = merged.data, merged.marks
        for path, first, again in where.duplicates:
            self.problem(
                again,
                path,
                f"duplicate key {path[-1]!r} (first at line {first.line}, column {first.column})",
            )
        supported = ", ".join(str(v) for v in model.SUPPORTED_VERSIONS)
        if "version" not in data:
            self.problem(
                marks.Position(1, 1),
                (),
                f"missing required key 'version' (supported versions: {supported}; "
                "start the file with `version: 1`)",
            )
        elif type(data["version"]) is not int or data["version"] not in model.SUPPORTED_VERSIONS:
            self.problem(
                where.value(("version",)),
                ("version",),
                f"unsupported version {schema.found(data['version'])}; "
                f"supported versions: {supported}",
            )
            raise self.fail(data)  # a later version may mean other keys: stop here
        self.problems += merge.partial_services(merged, self.sources[0].file)
        data = self.interpolate(data, where)
        self.problems += [
            self.explain(p)
            for p in schema.problems(data, where, self.file, skip=tuple(self.uninterpolated))
            if not (p.path == "" and p.message == "missing required key 'version'")
        ]
        self.problems += [
            self.explain(p) for p in checks.check(data, where, self.file, project=self.name(data))
        ]
        self.problems += dbchecks.check(data, where, self.file, self.directory)
        self.problems += unbuilt.warnings(data, where, self.file)
        document = self.merge_env_files(data, where)
        if any(p.is_error for p in self.problems):
            raise self.fail(data)
        name = self.name(data) or project_name(self.directory.name)
        try:
            project = model.from_document(
                _model_document(document, name),
                directory=str(self.directory),
                default_name=name,
                source=self.sources[0].source,
            )
        except (KeyError, ValueError, TypeError) as exc:  # a gap between schema and model
            self.problem(marks.Position(1, 1), (), f"internal error building the model: {exc!r}")
            raise self.fail(data) from exc
        return Loaded(
            project,
            report.sort(self.problems),
            document,
            self.file,
            files=tuple(s.file for s in self.sources),
            merged=data,
            masked=dict(self.masked),
        )

    # -- interpolation --------------------------------------------------------------------

    def interpolate(self, data: dict[str, Any], where: marks.Marks) -> dict[str, Any]:
        dotenv_path = self.directory / ".env"
        dotenv: dict[str, str] = {}
        if dotenv_path.is_file():
            shown = display_path(dotenv_path, Path.cwd())
            try:
                dotenv = envfile.read(dotenv_path, display=shown)
            except envfile.EnvFileError as exc:
                self.problems.append(Problem(exc.path, exc.line, 1, "", exc.message))
            except OSError as exc:
                self.problems.append(Problem(shown, 0, 0, "", f"cannot read: {exc.strerror}"))

        def lookup(name: str) -> str | None:
            return self.environ[name] if name in self.environ else dotenv.get(name)

        def masked(name: str) -> str | None:
            """As lookup, with a secret's non-empty text as *** (same defaults taken)."""
            value = lookup(name)
            return show.MASK if value and show.is_secret_name(name) else value

        services = checks.services_of(data)
        keeps = {
            name: interpolate.runtime_names(d for d, _, _ in checks.dependencies(service))
            | (interpolate.DB_NAMES if isinstance(service.get("db"), dict) else frozenset())
            for name, service in services.items()
        }

        def walk(value: Any, path: tuple[str | int, ...]) -> Any:
            if isinstance(value, dict):
                return {k: walk(v, (*path, k)) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v, (*path, i)) for i, v in enumerate(value)]
            style, raw = where.raw.get(path, ("'", ""))
            deferred = show.deferred(path)
            if len(path) == 4 and path[2] == "env" and style == "" and value is not None:
                value = raw  # env values as written: `0755` stays "0755"
            if path[-2:] == ("restart", "policy") and value is False and raw.lower() == "no":
                value = "no"
            if not isinstance(value, str) or "$" not in value:
                return value
            keep = keeps.get(str(path[1]), frozenset()) if deferred else frozenset()
            used: list[str] = []

            def seen(name: str) -> str | None:
                used.append(name)
                return lookup(name)

            try:
                expanded = interpolate.expand(
                    value,
                    seen,
                    keep=keep.__contains__,
                    keep_escapes=deferred,
                    on_unset=lambda name: self.unset(name, path, where),
                )
            except interpolate.InterpolationError as exc:
                self.problem(self.inside(where, path, value, exc.offset), path, exc.message)
                self.uninterpolated.append(path)
                return value
            if expanded == value:
                return value
            # As compose: the text a variable gave is a string, converted only for a field
            # typed as a number or a boolean, never re-read as YAML (see interpolate.cast).
            self.interpolated[report.dotted(path)] = value
            if any(show.is_secret_name(n) and lookup(n) for n in used):
                self.masked[path] = interpolate.expand(
                    value, masked, keep=keep.__contains__, keep_escapes=deferred
                )
            return interpolate.cast(expanded, schema.kinds_at(path))

        return walk(data, ())

    def inside(
        self, where: marks.Marks, path: tuple[str | int, ...], value: str, offset: int
    ) -> marks.Position:
        """The position of ``value[offset]`` in the file, when the scalar is written on one
        line without escapes before that offset; else the start of the value."""
        pos = where.value(path)
        style = where.raw.get(path, ("", ""))[0]
        lines = self.lines.get(pos.file or self.file, [])
        if pos.line > len(lines) or style not in ("", "'", '"'):
            return pos
        start = pos.column - 1 + (1 if style else 0)
        line = lines[pos.line - 1]
        if line[start : start + offset + 2] == value[: offset + 2]:
            return marks.Position(pos.line, start + offset + 1, pos.file)
        return pos

    def explain(self, p: Problem) -> Problem:
        """An error on a value that came from ``${...}`` says what was written there."""
        written = self.interpolated.get(p.path)
        if written is None or not p.is_error:
            return p
        return dataclasses.replace(p, message=f"{p.message} (from {written!r})")

    def unset(self, name: str, path: tuple[str | int, ...], where: marks.Marks) -> None:
        if name in self.unset_seen:
            return
        self.unset_seen.add(name)
        self.problems.append(
            report.placed(
                self.file,
                where.value(path),
                path,
                f"variable {name} is not set (in the environment or .env); using an empty string",
                report.WARNING,
            )
        )

    # -- env_file -------------------------------------------------------------------------

    def merge_env_files(self, data: dict[str, Any], where: marks.Marks) -> dict[str, Any]:
        """The document with each service's env_file contents merged under its env.

        env_file values are escaped ($ -> $$): env is a start-time template, and a value
        read from a file is text, never a template.
        """
        document = dict(data)
        services = checks.services_of(data)
        if not services:
            return document
        merged_services = dict(document["services"])
        for name, service in services.items():
            items = _env_files(service.get("env_file"), ("services", name, "env_file"))
            if not items:
                continue
            env: dict[str, Any] = {}
            for path, relative, required in items:
                full = self.directory / relative
                shown = display_path(_absolute(full), Path.cwd())
                pos = where.key(path) if path[-1] == "env_file" else where.value(path)
                if not full.exists() and not required:
                    continue  # compose: an optional env file that is absent is skipped
                if not full.is_file():
                    self.problem(
                        pos,
                        path,
                        f"env file {relative!r} not found (looked for {shown}); "
                        "write {path: FILE, required: false} for a file that may be absent",
                    )
                    continue
                try:
                    values = envfile.read(full, display=shown)
                except envfile.EnvFileError as exc:
                    self.problems.append(
                        Problem(exc.path, exc.line, 1, report.dotted(path), exc.message)
                    )
                    continue
                except OSError as exc:
                    self.problem(pos, path, f"cannot read env file {relative!r}: {exc.strerror}")
                    continue
                env.update({k: v.replace("$", "$$") for k, v in values.items()})
            own = service.get("env")
            if isinstance(own, dict):
                env.update(own)
            merged_services[name] = {**service, "env": env}
        document["services"] = merged_services
        return document


def _absolute(path: Path) -> Path:
    """Absolute, with .. folded, symlinks kept (they are what the user typed)."""
    return Path(os.path.normpath(Path.cwd() / path))


def _env_files(
    value: Any, path: tuple[str | int, ...]
) -> list[tuple[tuple[str | int, ...], str, bool]]:
    """(path for messages, file, required) of each well-formed entry of an env_file value.

    The three compose spellings: ``F``, ``[F, ...]`` and ``[{path: F, required: false}]``.
    """
    if isinstance(value, str) and value:
        return [(path, value, True)]
    if not isinstance(value, list):
        return []
    out: list[tuple[tuple[str | int, ...], str, bool]] = []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and entry:
            out.append(((*path, i), entry, True))
        elif isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
            required = entry.get("required", True)
            out.append(((*path, i, "path"), entry["path"], required is not False))
    return out


def _model_document(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The document for the model: a service's ``project:`` naming this very project is
    the default (None), so routing sees one spelling of "this project"."""
    services = checks.services_of(document)
    same = [n for n, s in services.items() if s.get("project") == name]
    if not same:
        return document
    out = {
        n: ({k: v for k, v in s.items() if k != "project"} if n in same else s)
        for n, s in document["services"].items()
    }
    return {**document, "services": out}


def _names(data: Any) -> tuple[str, ...]:
    return tuple(checks.services_of(data))

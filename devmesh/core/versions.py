"""Semver versions and npm-style ranges, so routing can ask "does this instance fit the caller?".

Services declare a semver ``version`` and their dependencies declare ranges in the syntax
every JavaScript developer already writes in package.json (``^2.1``, ``~1.2.3``, ``>=1 <3``,
``1.x || 2.x``, ``1.2 - 2.3.4``). Re-using that syntax, and npm's exact semantics, means a
team never has to learn a devmesh dialect.

Strategy: like node-semver, every range is desugared once, at parse time, into a union of
comparator sets (``>=2.1.0 <3.0.0-0``); matching is then plain comparison plus npm's
prerelease rule. The sugar table below is a transcription of node-semver 7's
``replaceCaret``/``replaceTilde``/``replaceXRange``/``hyphenReplace`` with
``includePrerelease`` off and ``loose`` off. Upper bounds carry ``-0`` (the lowest possible
prerelease) exactly as npm does, so ``<3.0.0-0`` excludes ``3.0.0-rc.1`` even when another
comparator of the same set names a 3.0.0 prerelease; explanations hide that ``-0`` because
a human reads ``<3.0.0`` the same way.

Not supported, on purpose: npm's ``loose`` mode and ``includePrerelease`` option.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import semver


class VersionError(ValueError):
    """A version or range text that cannot be parsed; the message names the bad text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Op(enum.Enum):
    """Comparison operators left after desugaring."""

    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "="


_NUM = r"0|[1-9]\d*"
_XR = rf"{_NUM}|[xX*]"
_IDENT = r"(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
_PRE = rf"{_IDENT}(?:\.{_IDENT})*"
_BUILD = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_PARTIAL = (
    rf"v?(?P<M>{_XR})(?:\.(?P<m>{_XR})(?:\.(?P<p>{_XR})"
    rf"(?:-(?P<pr>{_PRE}))?(?:\+{_BUILD})?)?)?"
)
_COMPARATOR_RE = re.compile(rf"(?P<op><=|>=|<|>|=|~>|~|\^)?{_PARTIAL}")
_HYPHEN_RE = re.compile(
    rf"^(?P<from>{_PARTIAL.replace('(?P<', '(?P<f')})\s+-\s+"
    rf"(?P<to>{_PARTIAL.replace('(?P<', '(?P<t')})$"
)
_OP_SPACE_RE = re.compile(r"(<=|>=|<|>|=|~>|~|\^)\s+(?=[v0-9xX*])")


def parse_version(text: str) -> semver.Version:
    """A full MAJOR.MINOR.PATCH version, with an optional leading ``v``.

    Raises VersionError for anything else, partial versions ("2.3") included: a running
    instance always has one exact version.
    """
    raw = text.strip()
    if raw.startswith("v"):
        raw = raw[1:]
    try:
        return semver.Version.parse(raw)
    except (ValueError, TypeError):
        raise VersionError(
            f"{text!r} is not a semver version (expected MAJOR.MINOR.PATCH, e.g. 2.3.1)"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Comparator:
    """One ``OP VERSION`` test; ``version`` keeps npm's ``-0`` upper-bound prereleases."""

    op: Op
    version: semver.Version

    def test(self, version: semver.Version) -> bool:
        c = version.compare(self.version)
        if self.op is Op.LT:
            return c < 0
        if self.op is Op.LE:
            return c <= 0
        if self.op is Op.GT:
            return c > 0
        if self.op is Op.GE:
            return c >= 0
        return c == 0

    def human(self) -> str:
        """The comparator as people write it: ``<3.0.0`` rather than npm's ``<3.0.0-0``."""
        v = self.version
        if self.op is Op.LT and v.prerelease == "0":
            v = v.replace(prerelease=None)
        return f"{self.op.value}{v}"

    def __str__(self) -> str:
        return f"{self.op.value}{self.version}"


ComparatorSet = tuple[Comparator, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Range:
    """A parsed range: a union (``||``) of comparator sets; an empty set matches any release."""

    text: str
    alternatives: tuple[ComparatorSet, ...]

    def contains(self, version: semver.Version | str) -> bool:
        """npm's ``satisfies``; raises VersionError when ``version`` is a malformed string."""
        v = parse_version(version) if isinstance(version, str) else version
        return any(_set_contains(s, v) for s in self.alternatives)

    def desugared(self) -> str:
        """The plain-comparator form shown to people: ``>=2.1.0 <3.0.0 || >=4.0.0``."""
        return " || ".join(" ".join(c.human() for c in s) or "*" for s in self.alternatives)

    def __str__(self) -> str:
        return self.text


def _set_contains(comparators: ComparatorSet, version: semver.Version) -> bool:
    """npm's testSet: every comparator passes, and a prerelease must be invited by name.

    A prerelease (3.0.0-rc.1) only matches when some comparator of the same set names a
    prerelease of the same [major, minor, patch]: asking for ``^2.1`` must never hand out
    an unstable 2.5.0-beta, while ``>=2.5.0-beta.1`` opts into that one release's betas.
    """
    if not all(c.test(version) for c in comparators):
        return False
    if not version.prerelease:
        return True
    return any(
        c.version.prerelease
        and (c.version.major, c.version.minor, c.version.patch)
        == (version.major, version.minor, version.patch)
        for c in comparators
    )


Parts = tuple[int | None, int | None, int | None]


def _parts(M: str | None, m: str | None, p: str | None) -> Parts:
    """Numbers of a partial version; None from the first wildcard or missing part on."""
    out: list[int | None] = []
    for part in (M, m, p):
        if part is None or part in ("x", "X", "*") or (out and out[-1] is None):
            out.append(None)
        else:
            out.append(int(part))
    return out[0], out[1], out[2]


def _ge(major: int, minor: int, patch: int, pre: str | None = None) -> Comparator:
    return Comparator(op=Op.GE, version=semver.Version(major, minor, patch, prerelease=pre))


def _lt0(major: int, minor: int, patch: int) -> Comparator:
    return Comparator(op=Op.LT, version=semver.Version(major, minor, patch, prerelease="0"))


def _caret(parts: Parts, pr: str | None) -> list[Comparator]:
    M, m, p = parts
    if M is None:
        return []
    if m is None:
        return [_ge(M, 0, 0), _lt0(M + 1, 0, 0)]
    if p is None:
        return [_ge(M, m, 0), _lt0(M, m + 1, 0) if M == 0 else _lt0(M + 1, 0, 0)]
    if M > 0:
        return [_ge(M, m, p, pr), _lt0(M + 1, 0, 0)]
    return [_ge(M, m, p, pr), _lt0(M, m, p + 1) if m == 0 else _lt0(M, m + 1, 0)]


def _tilde(parts: Parts, pr: str | None) -> list[Comparator]:
    M, m, p = parts
    if M is None:
        return []
    if m is None:
        return [_ge(M, 0, 0), _lt0(M + 1, 0, 0)]
    if p is None:
        return [_ge(M, m, 0), _lt0(M, m + 1, 0)]
    return [_ge(M, m, p, pr), _lt0(M, m + 1, 0)]


def _xrange(op: str, parts: Parts, pr: str | None) -> list[Comparator]:
    M, m, p = parts
    if M is None:
        # `>*` and `<*` allow nothing; `*`, `>=*`, `<=*`, `=*` forbid nothing.
        return [_lt0(0, 0, 0)] if op in (">", "<") else []
    if m is not None and p is not None:
        version = semver.Version(M, m, p, prerelease=pr)
        return [Comparator(op=Op(op or "="), version=version)]
    if op in ("", "="):
        return [_ge(M, 0, 0), _lt0(M + 1, 0, 0)] if m is None else [_ge(M, m, 0), _lt0(M, m + 1, 0)]
    if op == ">":  # >1 => >=2.0.0, >1.2 => >=1.3.0
        return [_ge(M + 1, 0, 0) if m is None else _ge(M, m + 1, 0)]
    if op == "<=":  # <=1.2 => <1.3.0-0: every 1.2.x passes
        return [_lt0(M + 1, 0, 0) if m is None else _lt0(M, m + 1, 0)]
    if op == "<":
        return [_lt0(M, m or 0, 0)]
    return [_ge(M, m or 0, 0)]


def _hyphen(g: dict[str, str | None]) -> list[Comparator]:
    out: list[Comparator] = []
    fM, fm, fp = _parts(g["fM"], g["fm"], g["fp"])
    if fM is not None:
        out.append(_ge(fM, fm or 0, fp or 0, g["fpr"] if fp is not None else None))
    tM, tm, tp = _parts(g["tM"], g["tm"], g["tp"])
    if tM is None:
        pass
    elif tm is None:
        out.append(_lt0(tM + 1, 0, 0))
    elif tp is None:
        out.append(_lt0(tM, tm + 1, 0))
    else:
        top = semver.Version(tM, tm, tp, prerelease=g["tpr"])
        out.append(Comparator(op=Op.LE, version=top))
    return out


def _parse_set(part: str, text: str) -> ComparatorSet:
    part = part.strip()
    hyphen = _HYPHEN_RE.match(part)
    if hyphen:
        return tuple(_hyphen(hyphen.groupdict()))
    out: list[Comparator] = []
    for token in _OP_SPACE_RE.sub(r"\1", part).split():
        m = _COMPARATOR_RE.fullmatch(token)
        if m is None:
            raise VersionError(f"invalid range {text!r}: unexpected {token!r}")
        op, parts, pr = m["op"] or "", _parts(m["M"], m["m"], m["p"]), m["pr"]
        if op == "^":
            out.extend(_caret(parts, pr))
        elif op in ("~", "~>"):
            out.extend(_tilde(parts, pr))
        else:
            out.extend(_xrange(op, parts, pr))
    return tuple(out)


def parse_range(text: str) -> Range:
    """Parse npm range syntax; raises VersionError naming the first token it cannot read.

    An empty text (or ``*``) matches every release, as in package.json.
    """
    alternatives = [_parse_set(part, text) for part in text.split("||")]
    if len(alternatives) > 1 and any(len(a) == 0 for a in alternatives):
        alternatives = [()]  # npm: an "any" alternative swallows the union
    return Range(text=text, alternatives=tuple(alternatives))


def satisfies(version: str, range_text: str) -> bool:
    """Whether ``version`` fits ``range_text``; raises VersionError when either is malformed."""
    return parse_range(range_text).contains(parse_version(version))


def compatible_explanation(version: str | semver.Version, range_text: str) -> str:
    """One sentence telling a human why an instance fits a caller's range or not.

    Raises VersionError when either text is malformed.
    """
    v = parse_version(version) if isinstance(version, str) else version
    r = parse_range(range_text)
    shown = range_text.strip() or "*"
    if r.contains(v):
        return f"{v} satisfies {shown}"
    reason = f"needs {r.desugared()}"
    release = v.replace(prerelease=None, build=None)
    if v.prerelease and r.contains(release):
        reason += f"; a prerelease only matches a range that names a {release} prerelease"
    return f"{v} is outside {shown} ({reason})"

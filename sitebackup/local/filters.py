"""Which paths a backup leaves out and a restore selects: gitignore-style patterns from options, files and
``.sitebackupignore``.

Pure logic, no walking: ``Filter.excluded(relpath, is_dir)`` answers for one '/'-separated path
relative to the source root, and ``scan.walk`` calls it so excluded directories are never entered.

Rules follow gitignore: blank lines and ``#`` comments are ignored, a trailing ``/`` matches only
directories, a pattern with a ``/`` elsewhere is anchored at the root, otherwise it matches a name
at any depth; ``*`` and ``?`` stop at ``/``, ``**`` crosses directories; ``!pattern`` re-includes;
the last matching rule wins. ``--include P`` is ``!P`` after every exclude rule. As in git, a path
inside an excluded directory cannot be re-included, because that directory is never read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IGNORE_FILE = ".sitebackupignore"


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = glob.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = glob[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif c == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def parse_rule(line: str) -> Rule | None:
    """One gitignore line as a rule, or None for blank lines and comments."""
    line = line.rstrip("\n\r")
    if not line.endswith("\\ "):
        line = line.rstrip(" ")
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    elif line.startswith("\\"):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    body = _glob_to_regex(line)
    regex = re.compile(("^" if anchored else "^(?:.*/)?") + body + "$", re.DOTALL)
    return Rule(regex=regex, negated=negated, dir_only=dir_only)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A ``find`` pattern as a regex of '/'-separated relative paths: without a '/' it matches a base name (at any
    depth, as ``find -name`` does), with one the whole path from the root; ``*`` and ``?`` stop at '/', ``**``
    crosses directories, ``[...]`` is a class."""
    anchored = "/" in pattern
    body = _glob_to_regex(pattern.strip("/") if anchored else pattern)
    return re.compile(("^" if anchored else "^(?:.*/)?") + body + "$", re.DOTALL)


def parse_lines(lines: list[str]) -> list[Rule]:
    return [rule for rule in map(parse_rule, lines) if rule is not None]


class Filter:
    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)
        self.rules = parse_lines(self.patterns)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        verdict = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                verdict = not rule.negated
        return verdict


def patterns_for(source: Path, *, excludes: tuple[str, ...] | list[str] = (), includes: tuple[str, ...] | list[str] = (),
                 exclude_from: tuple[Path, ...] | list[Path] = (), use_ignore_file: bool = True) -> list[str]:
    """The ordered pattern list for one backup: .sitebackupignore, --exclude-from files, --exclude, --include.

    Read once in the CLI process so the orchestration input carries plain strings and a resumed
    run keeps the filters it started with.
    """
    patterns: list[str] = []
    ignore_file = source / IGNORE_FILE
    if use_ignore_file and ignore_file.is_file():
        patterns.extend(ignore_file.read_text(encoding="utf-8", errors="replace").splitlines())
    for path in exclude_from:
        patterns.extend(Path(path).read_text(encoding="utf-8", errors="replace").splitlines())
    patterns.extend(excludes)
    patterns.extend("!" + p.lstrip("!") for p in includes)
    return [p for p in patterns if parse_rule(p) is not None]


def make_selector(include: list[str], exclude: list[str]) -> Callable[[str], bool]:
    """Whether a restore takes a path: it (or a directory above it) matches an --include pattern when any
    are given, and neither it nor a directory above it matches an --exclude pattern. Patterns are
    gitignore-style: without a '/' they match a name at any depth."""
    wanted, unwanted = Filter(include), Filter(exclude)

    def hit(flt: Filter, relpath: str) -> bool:
        parts = relpath.split("/")
        return any(flt.excluded("/".join(parts[:i]), i < len(parts)) for i in range(1, len(parts) + 1))

    return lambda relpath: (not wanted or hit(wanted, relpath)) and not (unwanted and hit(unwanted, relpath))

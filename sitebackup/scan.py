"""The file-system side: walking a source tree into entries, in a stable sorted order.

A walk yields what is to be backed up (regular files), what is skipped on purpose (symlinks,
FIFOs, sockets, devices) and what could not be read (reported as failures by path, never fatal).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileEntry:
    relpath: str  # '/'-separated, relative to the source root
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class Failed:
    relpath: str
    reason: str


Entry = FileEntry | Skipped | Failed


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (PEP 383)
        return False
    return True


def printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _special_kind(mode: int) -> str | None:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return None


def walk(root: Path, *, excluded: Callable[[str, bool], bool] | None = None) -> Iterator[Entry]:
    """Yield entries under *root* depth-first in sorted name order; symlinks are not followed.

    ``excluded(relpath, is_dir)`` lets callers drop paths (filters) before they are stat'ed further.
    """
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        dirpath, reldir = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Failed(reldir or ".", f"cannot read directory: {describe_os_error(exc)}")
            continue
        subdirs: list[tuple[str, str]] = []
        for child in children:
            rel = f"{reldir}/{child.name}" if reldir else child.name
            if not _is_utf8(child.name):
                # a blob name must be UTF-8; report the path readably rather than guess an encoding
                yield Failed(printable(rel), "file name is not valid UTF-8")
                continue
            try:
                if child.is_symlink():
                    if not (excluded and excluded(rel, False)):
                        yield Skipped(rel, "symlink (not followed)")
                    continue
                if child.is_dir(follow_symlinks=False):
                    if not (excluded and excluded(rel, True)):
                        subdirs.append((child.path, rel))
                    continue
                if excluded and excluded(rel, False):
                    continue
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                yield Failed(rel, describe_os_error(exc))
                continue
            special = _special_kind(st.st_mode)
            if special:
                yield Skipped(rel, special)
            else:
                yield FileEntry(rel, st.st_size, st.st_mtime_ns)
        # reversed so that popping from the stack visits directories in sorted order
        stack.extend(reversed(subdirs))

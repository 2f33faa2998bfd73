"""The file-system side: walking a source tree into entries, in a stable sorted order.

A walk yields what is to be backed up (regular files), what is skipped on purpose (symlinks,
FIFOs, sockets, devices) and what could not be read (reported as failures by path, never fatal).
It holds one directory listing and the stack of directories still to walk, never the tree: its
order (``walk_key``) is a function of the paths alone, so a record written in walk order can be
read beside the next walk in one pass (``local.incremental.Baseline``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from sitebackup.local.files import describe_os_error, inside
from sitebackup.model.work import FileRef


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class Failed:
    relpath: str
    reason: str


Entry = FileRef | Skipped | Failed


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


_NAME = attrgetter("name")


def walk_key(relpath: str) -> tuple[str, ...]:
    """Sorts relative paths in ``walk`` order: a directory's files by name, then its subdirectories by name,
    each whole before the next."""
    *dirs, name = relpath.split("/")
    # "1" before a directory name, "0" before the file name: a directory's files sort before its subdirectories
    return (*("1" + d for d in dirs), "0" + name)


def walk(root: Path, *, excluded: Callable[[str, bool], bool] | None = None,
         follow_symlinks: bool = False) -> Iterator[Entry]:
    """Yield entries under *root* depth-first in sorted name order.

    ``excluded(relpath, is_dir)`` lets callers drop paths (filters) before they are stat'ed further.
    Symlinks are skipped unless *follow_symlinks*; followed links never lead outside *root*, and a
    link back to a directory being walked (a loop) is skipped, so a walk always ends.
    """
    real_root = os.path.realpath(root)
    root_st = os.stat(root)
    # each pending directory carries the (st_dev, st_ino) of itself and its ancestors: the loop check
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (os.fspath(root), "", frozenset({(root_st.st_dev, root_st.st_ino)}))]
    while stack:
        dirpath, reldir, ancestors = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                children = sorted(it, key=_NAME)
        except OSError as exc:
            yield Failed(reldir or ".", f"cannot read directory: {describe_os_error(exc)}")
            continue
        subdirs: list[tuple[str, str, frozenset[tuple[int, int]]]] = []
        under = f"{reldir}/" if reldir else ""
        for child in children:
            name = child.name
            rel = under + name
            if not name.isascii() and not _is_utf8(name):
                # a blob name must be UTF-8; report the path readably rather than guess an encoding
                yield Failed(printable(rel), "file name is not valid UTF-8")
                continue
            try:
                if child.is_symlink():
                    if not follow_symlinks:
                        if not (excluded and excluded(rel, False)):
                            yield Skipped(rel, "symlink (not followed)")
                        continue
                    followed = _follow(child.path, rel, real_root, ancestors, excluded)
                    if isinstance(followed, (FileRef, Skipped)):
                        yield followed
                    elif followed is not None:
                        subdirs.append(followed)
                    continue
                if child.is_dir(follow_symlinks=False):
                    if not (excluded and excluded(rel, True)):
                        st = child.stat(follow_symlinks=False)
                        subdirs.append((child.path, rel, ancestors | {(st.st_dev, st.st_ino)}))
                    continue
                if excluded and excluded(rel, False):
                    continue
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                yield Failed(rel, describe_os_error(exc))
                continue
            if stat.S_ISREG(st.st_mode):
                yield FileRef(rel, st.st_size, st.st_mtime_ns)
            else:
                yield Skipped(rel, _special_kind(st.st_mode) or "not a regular file")
        # reversed so that popping from the stack visits directories in sorted order
        stack.extend(reversed(subdirs))


Pending = tuple[str, str, frozenset[tuple[int, int]]]  # a directory to walk: path, relpath, (dev, ino) of it and above


def _follow(path: str, rel: str, real_root: str, ancestors: frozenset[tuple[int, int]],
            excluded: Callable[[str, bool], bool] | None) -> FileRef | Skipped | Pending | None:
    """What a followed symlink is: a file entry, a directory to walk, a skip note, or None if excluded."""
    target = os.path.realpath(path)
    if not inside(target, real_root):
        return None if excluded and excluded(rel, False) else Skipped(rel, "symlink points outside the source")
    try:
        st = os.stat(path)
    except OSError:
        return None if excluded and excluded(rel, False) else Skipped(rel, "broken symlink")
    if stat.S_ISDIR(st.st_mode):
        if excluded and excluded(rel, True):
            return None
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            return Skipped(rel, "symlink loop (not followed)")
        return (path, rel, ancestors | {key})
    if excluded and excluded(rel, False):
        return None
    special = _special_kind(st.st_mode)
    return Skipped(rel, special) if special else FileRef(rel, st.st_size, st.st_mtime_ns)

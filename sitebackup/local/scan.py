"""The file-system side: walking a source tree into entries, in a stable sorted order.

A walk yields the tree: regular files to back up (with their mode, owner and hard link), and the
directories (the root first, as ``ROOT``) and symlinks as the record holds them (a symlink is recorded,
never followed, unless ``--follow-symlinks``); what is skipped on purpose (FIFOs, sockets, devices) and
what could not be read (reported as failures by path, never fatal). It holds one directory listing,
the stack of directories still to walk and the first path of each hard-linked file, never the tree:
its order (``walk_key``) is a function of the paths alone, so a record written in walk order can be
read beside the next walk in one pass (``local.incremental.Baseline``).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from sitebackup.local.files import describe_os_error, inside
from sitebackup.model.records import ROOT, FileEntry, Meta, target_text
from sitebackup.model.work import FileRef


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class Failed:
    relpath: str
    reason: str


# FileEntry: a directory or a symlink, recorded whole (it has no content to send)
Entry = FileRef | FileEntry | Skipped | Failed


class Owners:
    """The names of owners by id, looked up once each (``getpwuid`` reads the user database)."""

    def __init__(self) -> None:
        self._users: dict[int, str | None] = {}
        self._groups: dict[int, str | None] = {}

    def user(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def group(self, gid: int) -> str | None:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = None
        return self._groups[gid]


class _Tree:
    """What the walk records of an entry beside its path: mode, owner and names, hard links."""

    def __init__(self) -> None:
        self.owners = Owners()
        self.first_link: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a hard-linked file -> its first path
        # the Meta of each (st_mode, uid, gid) met, shared by the entries that are not hard links: a tree has few
        self._metas: dict[tuple[int, int, int], Meta] = {}

    def meta(self, st: os.stat_result, rel: str | None = None) -> Meta:
        """The metadata of *st*; with *rel*, a regular file's, which may be a hard link to one walked before."""
        link = None
        if rel is not None and st.st_nlink > 1:
            link = self.first_link.setdefault((st.st_dev, st.st_ino), rel)
            if link == rel:
                link = None
        if link is None:
            key = (st.st_mode, st.st_uid, st.st_gid)
            found = self._metas.get(key)
            if found is None:
                found = self._metas[key] = self._new_meta(st, None)
            return found
        return self._new_meta(st, link)

    def _new_meta(self, st: os.stat_result, link: str | None) -> Meta:
        return Meta(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, self.owners.user(st.st_uid),
                    self.owners.group(st.st_gid), link)

    def directory(self, rel: str, st: os.stat_result) -> FileEntry:
        return FileEntry(rel, mtime_ns=st.st_mtime_ns, kind="dir").take(self.meta(st))

    def symlink(self, rel: str, path: str, st: os.stat_result) -> FileEntry:
        # a symlink's own permission bits mean nothing on Linux and cannot be set: not recorded
        target = target_text(os.readlink(os.fsencode(path)))
        entry = FileEntry(rel, mtime_ns=st.st_mtime_ns, kind="symlink", target=target, uid=st.st_uid, gid=st.st_gid)
        entry.user, entry.group = self.owners.user(st.st_uid), self.owners.group(st.st_gid)
        return entry


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
    """Sorts relative paths in ``walk`` order: the root (``ROOT``) first, then a directory's files, symlinks and
    subdirectories' own entries by name, then its subdirectories' contents by name, each whole before the next."""
    if relpath == ROOT:
        return ()
    *dirs, name = relpath.split("/")
    # "1" before a directory name, "0" before the file name: a directory's files sort before its subdirectories
    return (*("1" + d for d in dirs), "0" + name)


def walk(root: Path, *, excluded: Callable[[str, bool], bool] | None = None,
         follow_symlinks: bool = False) -> Iterator[Entry]:
    """Yield the root's entry, then entries under *root* depth-first in sorted name order (``walk_key``).

    ``excluded(relpath, is_dir)`` lets callers drop paths (filters) before they are stat'ed further.
    Symlinks are recorded as symlinks unless *follow_symlinks*; followed links never lead outside *root*,
    and a link back to a directory being walked (a loop) is skipped, so a walk always ends.
    """
    real_root = os.path.realpath(root)
    root_st = os.stat(root)
    tree = _Tree()
    yield tree.directory(ROOT, root_st)
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
                            yield tree.symlink(rel, child.path, child.stat(follow_symlinks=False))
                        continue
                    followed = _follow(child.path, rel, real_root, ancestors, excluded, tree)
                    if isinstance(followed, (FileRef, Skipped)):
                        yield followed
                    elif followed is not None:
                        yield tree.directory(rel, followed[3])
                        subdirs.append(followed[:3])
                    continue
                if child.is_dir(follow_symlinks=False):
                    if not (excluded and excluded(rel, True)):
                        st = child.stat(follow_symlinks=False)
                        yield tree.directory(rel, st)
                        subdirs.append((child.path, rel, ancestors | {(st.st_dev, st.st_ino)}))
                    continue
                if excluded and excluded(rel, False):
                    continue
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                yield Failed(rel, describe_os_error(exc))
                continue
            if stat.S_ISREG(st.st_mode):
                yield FileRef(rel, st.st_size, st.st_mtime_ns, tree.meta(st, rel))
            else:
                yield Skipped(rel, _special_kind(st.st_mode) or "not a regular file")
        # reversed so that popping from the stack visits directories in sorted order
        stack.extend(reversed(subdirs))


# a directory a followed symlink leads to: path, relpath, (dev, ino) of it and above, and its stat
Followed = tuple[str, str, frozenset[tuple[int, int]], os.stat_result]


def _follow(path: str, rel: str, real_root: str, ancestors: frozenset[tuple[int, int]],
            excluded: Callable[[str, bool], bool] | None, tree: _Tree) -> FileRef | Skipped | Followed | None:
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
        return (path, rel, ancestors | {key}, st)
    if excluded and excluded(rel, False):
        return None
    special = _special_kind(st.st_mode)
    # a file reached through a link is recorded as a file of its own, never as a hard link to its target
    return Skipped(rel, special) if special else FileRef(rel, st.st_size, st.st_mtime_ns, tree.meta(st))

"""What changed between two runs' records, and what of an entry ``ls -l`` shows: pure logic.

Both records are in walk order (``local.scan.walk_key``), so one pass reads them side by side, a page of each
at a time (a sorted merge-join): a path only the first has was removed (``-``), one only the second has was
added (``+``), one both have changed its content (``M``: kind, size or MD5) or only its metadata (``m``:
mode, owner, symlink target, hard link, a file's modification time); unchanged entries yield nothing. Pages two
sealed records share hold the same entries in both, so callers leave them out of both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from sitebackup.local.scan import walk_key
from sitebackup.model.records import FileEntry, target_bytes

ADDED, REMOVED, MODIFIED, METADATA = "+", "-", "M", "m"


class Change(NamedTuple):
    marker: str  # ADDED, REMOVED, MODIFIED or METADATA
    path: str
    before: FileEntry | None
    after: FileEntry | None


class OutOfOrder(ValueError):
    """A record whose entries are not in walk order: it cannot be read beside another."""


def metadata(entry: FileEntry) -> tuple[object, ...]:
    """What of an entry is neither its content nor its path: a change of it alone is a metadata-only change. A
    directory's modification time is left out: it moves whenever an entry is added or removed, which shows."""
    return (None if entry.kind == "dir" else entry.mtime_ns, entry.mode, entry.uid, entry.gid, entry.user,
            entry.group, entry.target, entry.link)


def long_fields(entry: FileEntry) -> tuple[str, int | None, str | None, str | None, str | None]:
    """What ``ls -l`` shows beside the size and time: kind, permission bits (None: not recorded), owner and group
    (names, else numeric ids; None: not recorded), and a symlink's target (its bytes as the file system names
    them, read as text)."""
    owner = entry.user or (str(entry.uid) if entry.uid is not None else None)
    group = entry.group or (str(entry.gid) if entry.gid is not None else None)
    target = os.fsdecode(target_bytes(entry.target)) if entry.target is not None else None
    return entry.kind, entry.mode, owner, group, target


def compare(before: FileEntry, after: FileEntry) -> str | None:
    """``MODIFIED``, ``METADATA`` or None (the same) for two records of one path."""
    if before.kind != after.kind or before.md5 != after.md5 or before.size != after.size:
        return MODIFIED
    return METADATA if metadata(before) != metadata(after) else None


class _Side:
    """One record read in walk order; its head's key is computed when paths differ, and must grow."""

    def __init__(self, entries: Iterable[FileEntry]):
        self._entries = iter(entries)
        self._last: tuple[str, ...] = ()
        self.head: FileEntry | None = None
        self._key: tuple[str, ...] | None = None
        self.advance()

    def advance(self) -> None:
        self.head, self._key = next(self._entries, None), None

    def key(self) -> tuple[str, ...]:
        assert self.head is not None
        if self._key is None:
            self._key = walk_key(self.head.path)
            if self._key <= self._last:
                raise OutOfOrder(f"{self.head.path!r} comes after a path it sorts before")
            self._last = self._key
        return self._key


def changes(before: Iterable[FileEntry], after: Iterable[FileEntry]) -> Iterator[Change]:
    """The changes from *before* to *after*, two records in walk order, in that order; ``OutOfOrder`` when one is
    not (never a wrong answer)."""
    old, new = _Side(before), _Side(after)
    while old.head is not None or new.head is not None:
        if new.head is None or (old.head is not None and old.head.path != new.head.path and old.key() < new.key()):
            assert old.head is not None
            yield Change(REMOVED, old.head.path, old.head, None)
            old.advance()
        elif old.head is None or old.head.path != new.head.path:
            yield Change(ADDED, new.head.path, None, new.head)
            new.advance()
        else:
            marker = compare(old.head, new.head)
            if marker is not None:
                yield Change(marker, new.head.path, old.head, new.head)
            old.advance()
            new.advance()


class Totals(NamedTuple):
    added: int = 0
    removed: int = 0
    modified: int = 0
    metadata: int = 0


def count(found: Iterable[Change]) -> Totals:
    """How many changes of each kind."""
    tally = {ADDED: 0, REMOVED: 0, MODIFIED: 0, METADATA: 0}
    for change in found:
        tally[change.marker] += 1
    return Totals(tally[ADDED], tally[REMOVED], tally[MODIFIED], tally[METADATA])

"""Incremental runs: the one walk of a source compared with the baseline run's record.

The baseline is the newest completed backup of the same source and destination (found by the
commands layer), with what the job's runs cancelled since then recorded over it (``overlaid``); only
their ids travel in the orchestration input and the scan activity reads their records from the work
store. A file is unchanged when its size and modification time equal the recorded ones (``mtime``
mode), or, in ``checksum`` mode, when its content MD5 equals the recorded MD5 (``CHECK``: the caller
hashes it); ``force`` uploads everything. Mode, owner and hard link never decide an upload: the new
record takes what the walk found (``unchanged``), and a change of them, or of a symlink's
target, is counted (``metadata_change``) but sends nothing.

``compare`` is the walk both the backup's scan and ``--dry-run`` use. The record is read beside the
walk, never held whole: the scan writes its pages in walk order, so the record (its result pages in
page order) is in walk order too, and each walked path finds its record by advancing one cursor
(``Baseline``, a sorted merge-join). A record out of that order only costs uploads: a file whose
record is not found is sent again, and ``blob.upload.replace`` still keeps the content at its name
as a snapshot.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from sitebackup.local.filters import Filter
from sitebackup.local.scan import Failed, Skipped, walk, walk_key
from sitebackup.model.records import FileEntry, Meta
from sitebackup.model.work import FileRef

MODE_MTIME = "mtime"
MODE_CHECKSUM = "checksum"
MODE_FORCE = "force"

UPLOAD = "upload"
UNCHANGED = "unchanged"
CHECK = "check"  # same size, content must be hashed to tell


class Baseline:
    """The baseline run's record, looked up path by path in walk order while it is read page by page."""

    def __init__(self, records: Iterable[FileEntry], on_gone: Callable[[FileEntry], None] | None = None):
        self._records = iter(records)
        self._on_gone = on_gone
        self._head: FileEntry | None = None
        self._head_key: tuple[str, ...] | None = None  # computed only when a path does not match the head
        self._advance()

    def _advance(self) -> None:
        self._head = self._head_key = None
        for record in self._records:
            # stored, or not a file (a failed file holds nothing in the container): the fields, not the properties,
            # as this runs for every entry of the record
            if record.md5 is not None or record.kind != "file":
                self._head = record
                return

    def _key(self) -> tuple[str, ...]:
        assert self._head is not None
        if self._head_key is None:
            self._head_key = walk_key(self._head.path)
        return self._head_key

    def get(self, relpath: str) -> FileEntry | None:
        """The record of *relpath*, or None; paths must come in walk order (``local.scan.walk_key``)."""
        if self._head is None:
            return None
        if self._head.path != relpath:  # the common case (an unchanged tree) needs no key
            key = walk_key(relpath)
            while self._head is not None and self._key() < key:
                self._gone()
            if self._head is None or self._head.path != relpath:
                return None
        found = self._head
        self._advance()
        return found

    def _gone(self) -> None:
        """Pass the head by: no walked path is its path."""
        if self._on_gone is not None and self._head is not None:
            self._on_gone(self._head)
        self._advance()

    def drain(self) -> None:
        """Pass every record left by (the walk is over)."""
        while self._head is not None:
            self._gone()


def overlaid(records: Sequence[Iterable[FileEntry]]) -> Iterator[FileEntry]:
    """Several runs' records (each in walk order), the first first, as one record in walk order holding each
    path's entry from the first record that has it: cancelled runs over the baseline. One record passes through
    as it is (no generator between it and the walk that reads it entry by entry)."""
    if len(records) == 1:
        return iter(records[0])
    return _merged(records)


def _merged(records: Sequence[Iterable[FileEntry]]) -> Iterator[FileEntry]:
    def ranked(rank: int, record: Iterable[FileEntry]) -> Iterator[tuple[tuple[str, ...], int, int, FileEntry]]:
        for seq, entry in enumerate(record):
            yield walk_key(entry.path), rank, seq, entry

    last: str | None = None
    for _key, _rank, _seq, entry in heapq.merge(*(ranked(rank, record) for rank, record in enumerate(records))):
        if entry.path != last:
            last = entry.path
            yield entry


def decide(size: int, mtime_ns: int, previous: FileEntry | None, mode: str) -> str:
    if previous is None or mode == MODE_FORCE or previous.size != size:
        return UPLOAD
    if mode == MODE_CHECKSUM:
        return CHECK
    return UNCHANGED if previous.mtime_ns == mtime_ns else UPLOAD


class Compared(NamedTuple):
    """A walked file, what the comparison decided (``UPLOAD``, ``UNCHANGED`` or ``CHECK``) and the
    baseline's record of it."""

    file: FileRef
    decision: str
    previous: FileEntry | None


class Found(NamedTuple):
    """A walked directory or symlink (recorded as found: it has no content) and the baseline's record of it."""

    entry: FileEntry
    previous: FileEntry | None


def compare(source: Path, *, patterns: list[str], follow_symlinks: bool, baseline: Iterable[FileEntry],
            mode: str, on_gone: Callable[[FileEntry], None] | None = None) -> Iterator[Compared | Found | Skipped | Failed]:
    """Walk *source* through the filters, each entry compared with the *baseline* record as the walk goes;
    what is left out on purpose (``Skipped``) or cannot be read (``Failed``) comes in walk order too. With
    *on_gone*, each recorded entry the walk did not find (deleted, now excluded, or now of another kind: a file
    where a directory was) is handed to it, in walk order: the whole record is then read."""
    rules = Filter(patterns)
    previous = Baseline(baseline, on_gone)
    for entry in walk(source, excluded=rules.excluded if rules else None, follow_symlinks=follow_symlinks):
        if isinstance(entry, FileRef):
            before = previous.get(entry.path)
            if before is None:  # a new file
                yield Compared(entry, UPLOAD, None)
                continue
            if before.kind != "file":
                before = _same_kind(before, "file", on_gone)
            # the comparison of an unchanged file by size and time, inline: the case of most files of most runs
            yield Compared(entry, UNCHANGED if mode == MODE_MTIME and before is not None and before.size == entry.size
                           and before.mtime_ns == entry.mtime_ns else decide(entry.size, entry.mtime_ns, before, mode),
                           before)
        elif isinstance(entry, FileEntry):
            yield Found(entry, _same_kind(previous.get(entry.path), entry.kind, on_gone))
        else:
            if on_gone is not None:  # still there, said otherwise
                previous.get(entry.relpath)
            yield entry
    if on_gone is not None:
        previous.drain()


def _same_kind(before: FileEntry | None, kind: str,
               on_gone: Callable[[FileEntry], None] | None) -> FileEntry | None:
    """The baseline's record of a walked path when it is of the walked entry's *kind*; else it is gone."""
    if before is None or before.kind == kind:
        return before
    if on_gone is not None:
        on_gone(before)
    return None


def metadata_change(previous: FileEntry | None, meta: Meta | None = None,
                    entry: FileEntry | None = None) -> str | None:
    """What differs between the baseline's record of an entry and what the walk found (a file's *meta*, or a
    directory's or symlink's *entry*), in a few words; None when nothing does, or when the baseline recorded no
    metadata to compare with (a record of format 1). A directory's mtime is left out: it moves with its files."""
    if previous is None or (previous.mode is None and previous.uid is None):
        return None
    now = entry.meta if entry is not None else meta
    if now is None:
        return None
    changes = []
    if previous.mode != now.mode:
        changes.append(f"mode {_octal(previous.mode)} -> {_octal(now.mode)}")
    if (previous.uid, previous.gid) != (now.uid, now.gid):
        changes.append(f"owner {previous.uid}:{previous.gid} -> {now.uid}:{now.gid}")
    if previous.link != now.link:
        changes.append(f"hard link {previous.link or '-'} -> {now.link or '-'}")
    if entry is not None and previous.target != entry.target:
        changes.append("symlink target")
    return ", ".join(changes) or None


def _octal(mode: int | None) -> str:
    return "-" if mode is None else f"{mode:04o}"


def unchanged(previous: FileEntry, meta: Meta | None = None) -> tuple[FileEntry, bool]:
    """The new run's record of a file found unchanged: what the baseline recorded (its access tier too: an
    unchanged blob keeps the tier it was uploaded with), marked unchanged, with the mode, owner and hard link
    the walk found (*meta*; None: as recorded); and whether they differ from those recorded (``metadata_change``,
    counted). The baseline's entry is read for this file alone, so it is marked and reused rather than copied."""
    previous.unchanged = True
    previous.error = None  # a copy kept from before a failure: the file is that version again
    if meta is None or previous.meta == meta:  # what most files of most runs find: one comparison
        return previous, False
    changed = metadata_change(previous, meta) is not None
    return previous.take(meta), changed

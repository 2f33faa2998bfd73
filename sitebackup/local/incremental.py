"""Incremental runs: whether a file changed since the baseline run's record.

The baseline is the newest completed backup of the same source and destination (found by the
commands layer); only its id travels in the orchestration input and the scan activity reads its
record from the work store. A file is
unchanged when its size and modification time equal the recorded ones (``mtime`` mode), or, in
``checksum`` mode, when its content MD5 equals the recorded MD5; ``force`` uploads everything.

The record is read beside the walk, never held whole: the scan writes its pages in walk order, so
the record (its result pages in page order) is in walk order too, and each walked path finds its
record by advancing one cursor (``Baseline``, a sorted merge-join). A record out of that order only
costs uploads: a file whose record is not found is sent again, and ``blob.upload.replace`` still
keeps the content at its name as a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sitebackup.local.scan import walk_key

MODE_MTIME = "mtime"
MODE_CHECKSUM = "checksum"
MODE_FORCE = "force"
MATCH_KEYS = ("source", "container", "prefix")

# what a record of an uploaded or unchanged file holds (``blob.upload.Uploaded.record``, ``unchanged_record``)
RECORD_KEYS = frozenset(("path", "size", "mtime_ns", "md5", "tier", "etag", "unchanged"))

UPLOAD = "upload"
UNCHANGED = "unchanged"
CHECK = "check"  # same size, content must be hashed to tell


class Baseline:
    """The baseline run's record, looked up path by path in walk order while it is read page by page."""

    def __init__(self, records: Iterable[dict[str, Any]]):
        self._records = iter(records)
        self._head: dict[str, Any] | None = None
        self._head_key: tuple[str, ...] | None = None  # computed only when a path does not match the head
        self._advance()

    def _advance(self) -> None:
        self._head = self._head_key = None
        for record in self._records:
            # failed files hold nothing in the container
            if "error" not in record and "md5" in record:
                self._head = record
                return

    def _key(self) -> tuple[str, ...]:
        assert self._head is not None
        if self._head_key is None:
            self._head_key = walk_key(self._head["path"])
        return self._head_key

    def get(self, relpath: str) -> dict[str, Any] | None:
        """The record of *relpath*, or None; paths must come in walk order (``local.scan.walk_key``)."""
        if self._head is None:
            return None
        if self._head["path"] != relpath:  # the common case (an unchanged tree) needs no key
            key = walk_key(relpath)
            while self._head is not None and self._key() < key:
                self._advance()
            if self._head is None or self._head["path"] != relpath:
                return None
        found = self._head
        self._advance()
        return found


def decide(size: int, mtime_ns: int, previous: dict[str, Any] | None, mode: str) -> str:
    if previous is None or mode == MODE_FORCE or previous.get("size") != size:
        return UPLOAD
    if mode == MODE_CHECKSUM:
        return CHECK
    return UNCHANGED if previous.get("mtime_ns") == mtime_ns else UPLOAD


def unchanged_record(relpath: str, previous: dict[str, Any]) -> dict[str, Any]:
    """The new run's record of a skipped file: what the container holds, carried from the baseline
    (its access tier too: an unchanged blob keeps the tier it was uploaded with)."""
    if previous.keys() <= RECORD_KEYS and previous["path"] == relpath:
        # the baseline's record, read for this file alone: marked and reused rather than copied, which
        # halves the memory and CPU an unchanged page costs
        previous["unchanged"] = True
        return previous
    record = {"path": relpath, "size": previous["size"], "mtime_ns": previous["mtime_ns"], "md5": previous["md5"],
              "unchanged": True}
    if previous.get("tier"):
        record["tier"] = previous["tier"]
    if previous.get("etag"):
        record["etag"] = previous["etag"]
    return record

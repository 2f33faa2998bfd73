"""Incremental runs: whether a file changed since the baseline run's record.

The baseline is the newest completed backup of the same source and destination (found by the
commands layer); only its id travels in the orchestration input and the scan activity reads its
record from the work store. A file is
unchanged when its size and modification time equal the recorded ones (``mtime`` mode), or, in
``checksum`` mode, when its content MD5 equals the recorded MD5; ``force`` uploads everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MODE_MTIME = "mtime"
MODE_CHECKSUM = "checksum"
MODE_FORCE = "force"
MATCH_KEYS = ("source", "container", "prefix")

UPLOAD = "upload"
UNCHANGED = "unchanged"
CHECK = "check"  # same size, content must be hashed to tell


def baseline_index(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """path → record of every file the baseline run holds in the container (failed files excluded)."""
    return {r["path"]: r for r in records if "error" not in r and "md5" in r}


def decide(size: int, mtime_ns: int, previous: dict[str, Any] | None, mode: str) -> str:
    if previous is None or mode == MODE_FORCE or previous.get("size") != size:
        return UPLOAD
    if mode == MODE_CHECKSUM:
        return CHECK
    return UNCHANGED if previous.get("mtime_ns") == mtime_ns else UPLOAD


def unchanged_record(relpath: str, previous: dict[str, Any]) -> dict[str, Any]:
    """The new run's record of a skipped file: what the container holds, carried from the baseline
    (its access tier too: an unchanged blob keeps the tier it was uploaded with)."""
    record = {"path": relpath, "size": previous["size"], "mtime_ns": previous["mtime_ns"], "md5": previous["md5"],
              "unchanged": True}
    if previous.get("tier"):
        record["tier"] = previous["tier"]
    if previous.get("etag"):
        record["etag"] = previous["etag"]
    return record

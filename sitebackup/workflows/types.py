"""The typed shapes of everything that crosses a durable boundary: orchestration and activity inputs,
page items in the work store, and run summaries.

Each is a dataclass (or a named tuple for the page items, which are stored as compact JSON lists)
whose field names are the JSON keys on the wire, so runs recorded by an earlier version still load:
``from_dict`` ignores keys it does not know and fills in defaults for keys it does not find.
Inputs carry paths and options only: they are stored durably, so never a credential.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

from sitebackup.blob.upload import Held
from sitebackup.workflows.names import DEFAULT_WINDOW

MIB = 1024 * 1024
# On Azurite requests, not bytes, cost: 4 x 128 MiB files go up 7% faster in 32 MiB ranges than in
# 8 MiB ones, with less CPU and RSS (benchmarks/bench_upload.py --dataset large). Memory stays
# bounded by blocks.IN_MEMORY_BYTES whatever the size.
DEFAULT_BLOCK_SIZE = 32 * MIB


W = TypeVar("W", bound="Wire")


class Wire:
    """A dataclass read from and written to plain JSON objects."""

    nested: ClassVar[dict[str, type["Wire"]]] = {}  # fields that are Wire dataclasses themselves

    @classmethod
    def from_dict(cls: type[W], data: dict[str, Any] | None) -> W:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in (data or {}).items() if k in known}
        for name, kind in cls.nested.items():
            if name in values:
                values[name] = kind.from_dict(values[name] if isinstance(values[name], dict) else {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------- backup

@dataclass
class BackupOptions(Wire):
    concurrency: int = DEFAULT_WINDOW
    compare: str = "mtime"  # local.incremental.MODE_*
    patterns: list[str] = field(default_factory=list)  # gitignore-style, see local.filters
    follow_symlinks: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE  # files over blocks.threshold(this) go up as block ranges
    tier: str | None = None  # access tier set with every upload (blob.upload.ACCESS_TIERS); None: account default
    shared: bool = False  # workers on other hosts take pages too (a task hub): cut finer so that each gets some


@dataclass
class BackupInput(Wire):
    source: str
    container: str
    prefix: str = ""
    endpoint: str | None = None  # a label for messages and baseline matching, never a secret
    options: BackupOptions = field(default_factory=BackupOptions)
    baseline: str | None = None  # the run whose record decides what is unchanged
    state: dict[str, Any] | None = None  # counters carried across continue-as-new
    nested: ClassVar[dict[str, type[Wire]]] = {"options": BackupOptions}

    @property
    def destination(self) -> str:
        return f"{self.container}/{self.prefix}" if self.prefix else self.container

    def same_backup(self, other: "BackupInput") -> bool:
        """The same source to the same destination: one run at a time, and the baseline of the next."""
        return (self.source, self.container, self.prefix) == (other.source, other.container, other.prefix)


@dataclass
class ScanInput(Wire):
    source: str
    min_batches: int = 1
    baseline: str | None = None
    compare: str = "mtime"
    patterns: list[str] = field(default_factory=list)
    follow_symlinks: bool = False
    block_size: int | None = None


@dataclass
class CopyInput(Wire):
    source: str
    container: str
    prefix: str = ""
    page: int = 0  # < 0: the commit of the large file whose first range page is -1 - page
    md5: str | None = None  # for a commit: the whole file's MD5, hashed by its first range
    tier: str | None = None  # BackupOptions.tier
    blocks: list[str | None] | None = None  # for a commit: the id each range staged (blocks.content_block_id)
    digest: str | None = None  # for a commit: blocks.ids_digest of the ids the first range hashed with the MD5


class CopyItem(NamedTuple):
    """One file of a copy page: to upload, or (``previous`` set) in the baseline record, where
    ``check`` says its content must be hashed to tell whether it changed (``--checksum``).

    ``held`` is [Content-MD5, ETag] of what the baseline recorded at the name of a file to upload,
    so the copy keeps that content as a snapshot before replacing it (``blob.upload.replace``).
    """

    relpath: str
    size: int
    mtime_ns: int
    previous: dict[str, Any] | None = None
    check: bool = False
    held: list[Any] | None = None

    def to_json(self) -> list[Any]:
        if self.previous is None and self.held is None:
            return [self.relpath, self.size, self.mtime_ns]
        return list(self)

    def what_is_held(self) -> Held | None:
        """What the baseline recorded at this file's name, for ``blob.upload.replace``."""
        return Held(*self.held) if self.held else Held.of(self.previous)


@dataclass
class BlockRange(Wire):
    """A page holding one block range of a large file (``file`` = [relpath, size, mtime_ns])."""

    file: list[Any]
    range: int
    ranges: int
    block_size: int
    first_page: int
    failed: str | None = None  # on the first page, once a range failed: why (the commit reports it)
    held: list[Any] | None = None  # [Content-MD5, ETag] the baseline recorded at the file's name (CopyItem.held)

    @property
    def relpath(self) -> str:
        return self.file[0]

    @property
    def size(self) -> int:
        return self.file[1]

    @property
    def mtime_ns(self) -> int:
        return self.file[2]


# ----------------------------------------------------------------------------- restore

@dataclass
class RestoreOptions(Wire):
    concurrency: int = DEFAULT_WINDOW
    overwrite: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    shared: bool = False  # as BackupOptions.shared


@dataclass
class RestoreInput(Wire):
    dest: str
    container: str
    prefix: str = ""
    run_id: str | None = None  # a backup run's record, or (None) whatever the container holds under prefix
    endpoint: str | None = None
    options: RestoreOptions = field(default_factory=RestoreOptions)
    source: str = ""  # a label for `status` and `list`, which show every run's source
    state: dict[str, Any] | None = None
    # a backup after the run may have replaced its blobs (see PlanInput); False only for the newest run
    later_backups: bool = True
    nested: ClassVar[dict[str, type[Wire]]] = {"options": RestoreOptions}

    @property
    def source_label(self) -> str:
        where = f"{self.container}/{self.prefix}" if self.prefix else self.container
        return f"{where} (run {self.run_id})" if self.run_id else where

    def same_restore(self, other: "RestoreInput") -> bool:
        return (self.dest, self.container, self.prefix, self.run_id) == \
            (other.dest, other.container, other.prefix, other.run_id)


@dataclass
class PlanInput(Wire):
    container: str
    prefix: str = ""
    run_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    min_batches: int = 1
    # True: listings find each file's copy (current blob or snapshot) as the pages are planned; False (no
    # backup of these names since the run): the current blobs are read, and one found replaced is looked up alone
    later_backups: bool = True


@dataclass
class FetchInput(Wire):
    dest: str
    container: str
    page: int
    overwrite: bool = False


class FetchItem(NamedTuple):
    """One blob of a restore page: the current blob, or (``snapshot`` set) the snapshot holding the recorded version."""

    name: str
    relpath: str
    size: int
    md5: str | None
    mtime_ns: int | None
    snapshot: str | None = None

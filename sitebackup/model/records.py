"""What a backup run records of each file, and what a run's record as a whole says of the run.

A run's record is its ``FileEntry`` lines, written page by page as the copies finish, in walk order
(``local.scan.walk_key``): restore, verify, prune and the next run's incremental comparison read it.
Its JSON keys are the ones every earlier version wrote, so a record written before still loads
(tests/cli/test_model_schema.py pins them). Since format 2 an entry is a file, a directory or a symlink,
with its permission bits, owner, symlink target and hard link; a field left at its default is not written,
so an entry of format 1 loads as the plain file it was.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated

import msgspec

from sitebackup.model.codec import FORMAT_VERSION


def check_relpath(path: str) -> None:
    """Refuse a recorded path that could name something outside the tree it was recorded under: empty, absolute,
    with a NUL, an empty part, or a part "." or ".." (only a path starting with "." or holding "/." can have one,
    so most paths are judged by a few substring tests: this runs for every entry of every record read)."""
    if (not path or path[0] == "/" or path[-1] == "/" or "//" in path or "\x00" in path
            or ((path[0] == "." or "/." in path) and any(part in (".", "..") for part in path.split("/")))):
        raise ValueError(f"bad path {path!r}")


KINDS = ("file", "dir", "symlink")
ROOT = "."  # the path of the source root's own entry (a directory), the first of every record since format 2
MAX_TARGET_BYTES = 4095  # PATH_MAX less its NUL: no symlink target is longer
MAX_NAME_CHARS = 256  # a user or group name


def target_text(raw: bytes) -> str:
    """A symlink target (the bytes ``readlink`` gives) as a record holds it: the text itself when it is
    UTF-8, else NUL followed by the base64 of the bytes. No target contains a NUL byte, so the two forms
    never meet and every target round-trips exactly (``target_bytes``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\x00" + base64.b64encode(raw).decode("ascii")


def target_bytes(text: str) -> bytes:
    """The bytes of a recorded symlink target (``target_text``); ValueError when *text* is not one."""
    if text.startswith("\x00"):
        try:
            raw = base64.b64decode(text[1:], validate=True)
        except binascii.Error:
            raise ValueError("bad symlink target encoding") from None
    else:
        raw = text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    if not raw or b"\x00" in raw or len(raw) > MAX_TARGET_BYTES or target_text(raw) != text:
        raise ValueError(f"bad symlink target {text!r}")
    return raw


# bounds the decoder checks (in C) as it reads each entry of a record back; the values a walk records come from
# stat and the user database, within them
Mode = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
Id = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]


# gc=False: an entry holds strings and numbers only, so it is never part of a cycle; the collector need not track
# the hundreds of thousands a record holds
class FileEntry(msgspec.Struct, omit_defaults=True, gc=False):
    """One entry of a run's record: a file and the version of it the container holds for this run (or why it
    has none), a directory, or a symlink; with its metadata.

    ``md5`` and ``etag`` name the stored copy (the current blob while it still has that Content-MD5, else
    the snapshot a later run kept of it: ``blob.history.choose``); ``error`` says the run could not back
    the file up (then nothing of this run is stored for it); ``unchanged`` says the run found it as the
    run before recorded it and sent nothing.

    ``kind`` is "file", "dir" or "symlink"; a directory or symlink has no content (``md5`` None, size 0).
    ``mode`` is the permission bits (``st_mode & 0o7777``), ``uid``/``gid`` the owner's ids and ``user``/
    ``group`` their names where the source host had names for them; None where not recorded (format 1).
    ``target`` is a symlink's target as ``target_text`` encodes it. The source root itself is the directory
    entry ``ROOT`` ("."), first in the record. ``link`` marks a file as a hard link:
    the path of the first member of its group in walk order (as tar does); the entry still names its own
    stored copy. ``link`` is data from the container: restore checks it names a file of the same record.
    """

    path: str  # '/'-separated, relative to the source root
    size: int = 0
    mtime_ns: int = 0
    md5: str | None = None  # base64, as Azure reports Content-MD5
    tier: str | None = None  # the access tier the upload set; None: the account's default
    etag: str | None = None  # of the blob as the upload left it
    unchanged: bool = False
    error: str | None = None
    kind: str = "file"
    mode: Mode | None = None
    uid: Id | None = None
    gid: Id | None = None
    user: Name | None = None
    group: Name | None = None
    target: str | None = None
    link: str | None = None

    def __post_init__(self) -> None:
        # every entry of every record read back passes here: a plain file is judged with few calls
        if self.kind == "file":
            check_relpath(self.path)
            if self.target is not None:
                raise ValueError("a symlink and only a symlink has a target")
            if self.link is not None and not self.link:
                raise ValueError("bad hard link")
        else:
            self._check_not_file()
        # the bounds of the numbers and names are the decoder's (``Mode``, ``Id``, ``Name``); a NUL is not
        if (self.user is not None and "\x00" in self.user) or (self.group is not None and "\x00" in self.group):
            raise ValueError(f"bad user or group name {self.user!r}, {self.group!r}")

    def _check_not_file(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"bad kind {self.kind!r}")
        if self.path != ROOT or self.kind != "dir":
            check_relpath(self.path)
        if (self.target is not None) != (self.kind == "symlink"):
            raise ValueError("a symlink and only a symlink has a target")
        if self.target is not None:
            target_bytes(self.target)
        if self.md5 is not None or self.size or self.link is not None:
            raise ValueError(f"a {self.kind} has no content")

    @classmethod
    def failed(cls, path: str, error: str, last_good: FileEntry | None) -> FileEntry:
        """The record of a file that failed in a run: the copy of the last run that backed it up (stale), if any,
        so that restoring the run still gives a version of it."""
        if last_good is None or last_good.md5 is None:
            return cls(path, error=error)
        return msgspec.structs.replace(last_good, error=error, unchanged=False)

    @property
    def stored(self) -> bool:
        """Whether the container holds a copy of the file for this run: the version it uploaded or found
        unchanged, or, when the file failed in this run (``error``), the last good version an earlier run
        recorded (then the run's copy is stale)."""
        return self.md5 is not None

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def meta(self) -> Meta:
        return Meta(self.mode, self.uid, self.gid, self.user, self.group, self.link)

    def take(self, meta: Meta | None) -> FileEntry:
        """This entry, given *meta* (None: as it is). Changed in place: an entry read from a record is used once."""
        if meta is not None:
            self.mode, self.uid, self.gid, self.user, self.group, self.link = msgspec.structs.astuple(meta)
        return self


# gc=False as FileEntry's: numbers and strings only
class Meta(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True, gc=False):
    """What the walk found of a file beside its content (``FileEntry``'s fields of the same names), carried
    on work pages from the scan to the copy that records the file. Bounded as FileEntry's are: a work page
    decoded is checked by the decoder too, so an entry built from it holds no value a record could not."""

    mode: Mode | None = None
    uid: Id | None = None
    gid: Id | None = None
    user: Name | None = None
    group: Name | None = None
    link: str | None = None


class PriorCopy(msgspec.Struct, array_like=True, frozen=True):
    """What the baseline run recorded at a blob name (its Content-MD5 and, when recorded, its ETag): the
    content an upload over that name must keep as a snapshot unless it is the same (``blob.upload.replace``)."""

    md5: str
    etag: str | None = None

    @classmethod
    def of(cls, entry: FileEntry | None) -> PriorCopy | None:
        return cls(entry.md5, entry.etag) if entry is not None and entry.md5 else None


class RestoredFile(msgspec.Struct, omit_defaults=True):
    """One file of a restore's page journal: restored, skipped (why) or failed (why)."""

    path: str
    size: int = 0
    skipped: str | None = None
    error: str | None = None


class PruneMark(msgspec.Struct, kw_only=True):
    """The mark ``prune`` leaves on a run it drops, before anything of it is deleted: the journal a killed
    prune resumes from, then the tombstone that lets ``restore ID`` say the run was pruned."""

    at: str  # ISO 8601, UTC
    container: str = ""
    prefix: str = ""


class PageSeal(msgspec.Struct, array_like=True, frozen=True):
    """A page of a sealed record: its number in the run, and the SHA-256 (hex) and size of its bytes, which
    also name it in the container."""

    page: int
    sha256: str
    size: int


class ChangeCounts(msgspec.Struct, kw_only=True):
    """What a run's record changed from its baseline's (``sitebackup diff BASELINE RUN`` counts the same): entries
    added, removed, modified (content) and changed in their metadata only."""

    added: int = 0
    removed: int = 0
    modified: int = 0
    metadata: int = 0


class RunRecord(msgspec.Struct, kw_only=True):
    """The header of a backup run's record, sealed into the container once every page of it is there: which
    run, of which job, how it ended, and its pages. A run without one is unfinished. ``changes`` (from its
    ``baseline``, the job's run before it; None in headers sealed before they were counted) are counted as the
    run is sealed."""

    format: int = FORMAT_VERSION
    tool: str  # the sitebackup version that wrote it
    run_id: str
    job: str  # Job.id
    host: str
    source: str
    container: str
    prefix: str = ""
    started: str  # ISO 8601, UTC
    finished: str
    status: str = "COMPLETED"
    files: int = 0  # files in the record, failed ones too
    files_failed: int = 0  # files whose copy in the record is stale (the last good version) or missing
    bytes: int = 0  # bytes of the files the record holds
    pages: list[PageSeal] = msgspec.field(default_factory=list)
    baseline: str | None = None  # the run the changes are counted from; None: the job's first run
    changes: ChangeCounts | None = None


class CatalogEntry(msgspec.Struct, kw_only=True):
    """A sealed run as the container lists it (from its header's metadata, without reading the header)."""

    run_id: str
    job: str
    status: str
    started: str
    finished: str
    files: int = 0
    bytes: int = 0
    changes: ChangeCounts | None = None  # None: sealed before changes were counted


class Job(msgspec.Struct, kw_only=True):
    """A backup job: one source on one host into one container and prefix, or whatever ``--job NAME`` names
    (a source that moved to another host or path stays the same job)."""

    id: str
    name: str  # --job NAME, or host:source
    host: str
    source: str
    prefix: str = ""
    created: str = ""  # ISO 8601, UTC: when its first run started

    @classmethod
    def of(cls, *, host: str, source: str, prefix: str, name: str | None = None, created: str = "") -> Job:
        """The job of a backup: named by the user, else by where it reads and writes."""
        ident = f"job\0{name}" if name else f"path\0{host}\0{source}\0{prefix}"
        return cls(id=hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32],
                   name=name or f"{host}:{source}", host=host, source=source, prefix=prefix, created=created)

"""The values a run's work is made of: orchestration and activity inputs, work pages, page results, the
orchestration's carried state, its progress status and its summary.

Inputs carry paths and options only (they are stored durably: never a credential). Work pages are
written by the scan (backup) or the plan (restore) and read by one batch activity each; only page
numbers, counters, short capped lists and SHA-256 hashes of page indexes travel through the durable
history (``workflows.pages``: a batch reads only a page whose bytes match). Page items are JSON arrays
(``array_like``): a page of a million-file run holds thousands of them.

Both workflows share the page window (``workflows.window``) over their own counters, ``BackupCounts``
and ``RestoreCounts``, so their summaries keep their own words (``files_uploaded``, ``files_restored``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from sitebackup.model.codec import from_wire, to_wire
from sitebackup.model.records import ChangeCounts, FileEntry, Job, Meta, PriorCopy

MIB = 1024 * 1024
# On Azurite requests, not bytes, cost: large files go up faster in 32 MiB ranges than in 8 MiB ones, with
# less CPU and RSS (benchmarks/bench_upload.py --dataset large); memory stays bounded by
# workflows.blocks.IN_MEMORY_BYTES whatever the size.
DEFAULT_BLOCK_SIZE = 32 * MIB

# ----------------------------------------------------------------------------- options

DEFAULT_CONCURRENCY = 16  # --concurrency
# the most requests the asyncio loop's window grows to (blob.inflight) unless --max-inflight fixes it: enough for
# small files at a long round-trip time, each a pooled connection when the window is that wide; and at most
# GROWTH_BOUND times where it starts, so that a low --concurrency, asked for to spare a server, stays low
MOST_IN_FLIGHT = 256
GROWTH_BOUND = 8


class Concurrency(msgspec.Struct, frozen=True):
    """How much one process does at once, all derived from the one number a user sets (--concurrency):
    batch activities in flight, requests in flight on the asyncio loop (where its window starts, and the
    most it grows to unless --max-inflight fixes it), worker threads, and parallel transfers of one large file."""

    batches: int = DEFAULT_CONCURRENCY

    @property
    def requests(self) -> int:
        # two a batch: a page's small files keep the loop busy while the next page is read
        return 2 * self.batches

    @property
    def most_requests(self) -> int:
        return max(self.requests, min(MOST_IN_FLIGHT, GROWTH_BOUND * self.requests))

    @property
    def threads(self) -> int:
        # a thread per batch and some for orchestrator episodes, so uploads never starve replay
        return self.batches + 4

    @property
    def sealing(self) -> int:
        # record pages the synchronous client sends at once when a run seals without the loop (workflows.seal): each
        # is a connection of its own
        return max(1, self.batches // 2)

    @property
    def per_file(self) -> int:
        # parallel requests of one file moved in ranges by the synchronous client
        return 4



class UploadSpec(msgspec.Struct, kw_only=True, frozen=True):
    """What shapes every upload of a run, built once from the command line and read where an upload is
    made (``blob.upload``, ``workflows.blocks``): a new upload option is a field here, its click option,
    and the line that applies it."""

    block_size: int = DEFAULT_BLOCK_SIZE  # files over workflows.blocks.threshold(this) go up as block ranges
    tier: str | None = None  # access tier set with every upload (blob.upload.ACCESS_TIERS); None: account default


class BackupOptions(msgspec.Struct, kw_only=True):
    concurrency: int  # batch activities in flight
    compare: str = "mtime"  # local.incremental.MODE_*
    patterns: list[str] = msgspec.field(default_factory=list)  # gitignore-style, see local.filters
    follow_symlinks: bool = False
    upload: UploadSpec = msgspec.field(default_factory=UploadSpec)
    shared: bool = False  # workers on other hosts take pages too (a task hub): cut finer so that each gets some


class RestoreOptions(msgspec.Struct, kw_only=True):
    concurrency: int
    overwrite: bool = False
    owners: bool = True  # give files the owners the record names, when run as root (--no-owner: False)
    include: list[str] = msgspec.field(default_factory=list)
    exclude: list[str] = msgspec.field(default_factory=list)
    shared: bool = False  # as BackupOptions.shared


# ----------------------------------------------------------------------------- counters, progress, summary


class Listed(msgspec.Struct, omit_defaults=True):
    """A file named in a capped list of failures (``error``) or of files left out on purpose (``reason``)."""

    path: str
    error: str | None = None
    reason: str | None = None


class _Totals(msgspec.Struct, kw_only=True):
    """The counters both workflows keep: files and bytes found, files left out on purpose or failed; and the
    files and bytes copied, under the workflow's own word (``verb``: files_uploaded, files_restored)."""

    @property
    def files_copied(self) -> int:
        return int(getattr(self, f"files_{self.verb}"))

    @property
    def bytes_copied(self) -> int:
        return int(getattr(self, f"bytes_{self.verb}"))

    verb: ClassVar[str]
    files_total: int = 0
    bytes_total: int = 0
    files_skipped: int = 0
    files_failed: int = 0


class BackupCounts(_Totals, kw_only=True):
    """What a backup (or one of its pages) adds up to. An unchanged file is a skipped one too: skipped
    counts what was not uploaded on purpose, unchanged what of that the last run holds."""

    verb: ClassVar[str] = "uploaded"
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    files_unchanged: int = 0
    bytes_skipped: int = 0
    # entries recorded with another mode, owner or symlink target than the baseline's, and no content sent
    metadata_changed: int = 0
    dirs_total: int = 0  # directories recorded (the source root too)
    symlinks_total: int = 0  # symlinks recorded (not followed)

    @property
    def files_done(self) -> int:
        # unchanged files count as done so the bar reaches its total
        return self.files_uploaded + self.files_failed + self.files_unchanged

    @property
    def bytes_done(self) -> int:
        return self.bytes_uploaded + self.bytes_skipped


class RestoreCounts(_Totals, kw_only=True):
    """What a restore (or one of its pages) adds up to; ``files_done``/``bytes_done`` count every file
    dealt with (restored, skipped or failed), for the progress bar."""

    verb: ClassVar[str] = "restored"
    files_restored: int = 0
    bytes_restored: int = 0
    files_done: int = 0
    bytes_done: int = 0
    dirs_restored: int = 0  # given their recorded mode, owner and mtime (created when missing)
    symlinks_restored: int = 0
    # nothing a restore leaves out is "unchanged": an identical file found at DEST counts as skipped
    files_unchanged: ClassVar[int] = 0
    bytes_skipped: ClassVar[int] = 0


Counts = BackupCounts | RestoreCounts
C = TypeVar("C", bound=Counts)


def add_counts(total: C, more: C) -> None:
    """Add *more*'s counters into *total*."""
    for name in total.__struct_fields__:
        setattr(total, name, getattr(total, name) + getattr(more, name))


class Progress(msgspec.Struct, kw_only=True):
    """The orchestration's custom status: a fixed shape, small whatever the tree (the limit is 16 KB).

    A run parked until ``sitebackup resume`` (``phase`` is ``workflows.names.WAITING_PHASE``) says why
    (``error``, ``error_type``) and how many times it has waited (``waits``)."""

    phase: str
    error: str | None = None
    error_type: str | None = None
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    files_failed: int = 0
    files_skipped: int = 0
    files_unchanged: int = 0
    bytes_skipped: int = 0
    waits: int = 0

    @classmethod
    def of(cls, counts: Counts, phase: str) -> Progress:
        return cls(phase=phase, files_done=counts.files_done, files_total=counts.files_total,
                   bytes_done=counts.bytes_done, bytes_total=counts.bytes_total, files_failed=counts.files_failed,
                   files_skipped=counts.files_skipped, files_unchanged=counts.files_unchanged,
                   bytes_skipped=counts.bytes_skipped)


class Summary(msgspec.Struct, Generic[C], kw_only=True):
    """How a run ended: the orchestration's output (``counts``, where, how long, capped failure and skip
    lists), completed by the command that watched it with the run's id and durable status (and, when it
    did not complete, why). On the wire (the durable output, ``--json``) it is one flat object: the
    counters beside the other fields, as ``summary_to_wire`` writes it."""

    kind: str  # the orchestration's durable name (workflows.names)
    counts: C
    source: str = ""
    destination: str = ""
    duration_s: float = 0.0
    failures: list[Listed] = msgspec.field(default_factory=list)
    skipped: list[Listed] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)  # what the user should know of how it went
    instance_id: str = ""
    runtime_status: str = ""
    cancelled: bool = False  # `sitebackup cancel` ended it
    error: str | None = None
    error_type: str | None = None
    resumable: bool = False  # parked until `sitebackup resume`
    detached: bool = False  # --detach: scheduled, not watched
    changes: ChangeCounts | None = None  # a sealed backup's: what its record changed from its baseline's


def summary_to_wire(summary: Summary[Any]) -> dict[str, Any]:
    """The flat JSON object of a summary: its counters, then the other fields."""
    wire: dict[str, Any] = to_wire(summary)
    return {"instance_id": wire.pop("instance_id"), "kind": wire.pop("kind"),
            "runtime_status": wire.pop("runtime_status"), **wire.pop("counts"), **wire}


def summary_from_wire(raw: object, counts: type[C], what: str) -> Summary[C]:
    """A summary from its flat JSON object (the durable output of an orchestration)."""
    fields = raw if isinstance(raw, dict) else {}
    nested = {key: value for key, value in fields.items() if key not in counts.__struct_fields__}
    nested["counts"] = {key: fields[key] for key in counts.__struct_fields__ if key in fields}
    return from_wire(nested, generic(Summary, counts), what)


def generic(kind: type[Any], counts: type[C]) -> Any:
    """*kind* (a model type generic in its counters) over *counts*, as a type to decode into."""
    return kind[counts]


# ----------------------------------------------------------------------------- backup pages


class CopyItem(msgspec.Struct, array_like=True):
    """One file of a copy page, with what the baseline recorded of it (``previous``): a new file to upload; a
    ``changed`` one, uploaded over the baseline's copy (kept as a snapshot when the bytes differ, and recorded
    as the run's copy, stale, if the upload fails); one to hash to tell (``check``, ``--checksum``); else one
    recorded unchanged, as the baseline had it."""

    path: str
    size: int
    mtime_ns: int
    previous: FileEntry | None = None
    check: bool = False
    changed: bool = False
    meta: Meta | None = None  # what the walk found of its mode, owner and hard link, for its record

    @property
    def prior(self) -> PriorCopy | None:
        """What the baseline holds at the file's name, which an upload must keep unless it is the same bytes."""
        return PriorCopy.of(self.previous)


# gc=False: strings, numbers and a Meta, never a cycle; one per file walked, untracked by the collector
class FileRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A file as the scan saw it: path, size and modification time, and its mode, owner and hard link."""

    path: str
    size: int
    mtime_ns: int
    meta: Meta | None = None


class RangePage(msgspec.Struct, kw_only=True):
    """A page holding one block range of a large file (``workflows.blocks``): written once by the scan, never
    rewritten (its SHA-256 is in the page index)."""

    file: FileRef
    range: int
    ranges: int
    block_size: int
    first_page: int
    previous: FileEntry | None = None  # what the baseline recorded of the file (CopyItem.previous)


CopyPage = list[CopyItem] | RangePage


class PageIndex(msgspec.Struct, kw_only=True):
    """One chunk of a run's page index (``workflows.pages``): the SHA-256 (hex) of pages ``first`` on, in order;
    "" for a page number the first activity recorded itself and wrote no page for."""

    first: int
    pages: list[str]


class ScanInput(msgspec.Struct, kw_only=True):
    source: str
    container: str = ""  # where the baseline's sealed record is
    min_pages: int = msgspec.field(default=1, name="min_batches")
    baseline: str | None = None
    cancelled: list[str] = msgspec.field(default_factory=list)  # BackupInput.cancelled
    compare: str = "mtime"
    patterns: list[str] = msgspec.field(default_factory=list)
    follow_symlinks: bool = False
    upload: UploadSpec = msgspec.field(default_factory=UploadSpec)


class CommitOrder(msgspec.Struct, kw_only=True, frozen=True):
    """What a large file's commit is handed from its ranges' results (``workflows.blocks``): the id each range
    staged, and from the first range the file's MD5 and the digest of the block ids it hashed with it; or why a
    range failed (``failed``): the file is then reported failed, not committed."""

    md5: str | None = None
    blocks: list[str | None] | None = None
    digest: str | None = None
    failed: str | None = None


class CopyInput(msgspec.Struct, kw_only=True):
    """One copy activity: page ``page``, or (``commit`` set) the commit of the large file whose first range
    page is ``page``; ``index`` is the SHA-256 of the page index chunk that lists the page's own."""

    source: str
    container: str
    prefix: str = ""
    page: int = 0
    index: str = ""
    follow_symlinks: bool = False  # a file may be reached through a symlink that stays inside the source
    upload: UploadSpec = msgspec.field(default_factory=UploadSpec)
    commit: CommitOrder | None = None


class RangeReport(msgspec.Struct, kw_only=True):
    """What a range page's copy reports for its file's commit: which file, which range, the block id staged
    (None when it failed, and ``error`` says why); the first range also the file's MD5 and the digest of the
    block ids it hashed."""

    first_page: int
    ranges: int
    range: int = 0
    block_id: str | None = None
    md5: str | None = None
    digest: str | None = None
    sent: bool = False  # False: the service already held a block of that id (the same bytes)
    error: str | None = None


class PageResult(msgspec.Struct, Generic[C], kw_only=True):
    """What one batch activity reports: its counters, capped lists, and for a block range what its commit needs."""

    page: int
    counts: C
    failures: list[Listed] = msgspec.field(default_factory=list)
    skipped: list[Listed] = msgspec.field(default_factory=list)
    range: RangeReport | None = None
    commit: bool = False  # the result of a large file's commit (``CopyInput.commit``)
    cancelled: bool = False  # stopped by `sitebackup cancel` before it sent anything


class Span(msgspec.Struct, array_like=True):
    """Pages ``first`` to ``end - 1``."""

    first: int
    end: int


class Planned(msgspec.Struct, Generic[C], kw_only=True):
    """What the first activity (the scan, or restore's plan) reports: how many pages it wrote, which of them
    it recorded itself (``done``: nothing left to copy), the SHA-256 of each chunk of its page index
    (``index``, ``workflows.pages``), its counters and capped lists."""

    pages: int
    counts: C
    done: list[Span] = msgspec.field(default_factory=list)
    index: list[str] = msgspec.field(default_factory=list)
    failures: list[Listed] = msgspec.field(default_factory=list)
    skipped: list[Listed] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)  # what the user should know of how it went
    tree: list[Span] = msgspec.field(default_factory=list)  # restore: the tree pages (also in ``done``)


class SealInput(msgspec.Struct, kw_only=True):
    """The sealing of a backup's record, once its every page is done: what its header says of the run."""

    container: str
    prefix: str = ""
    source: str
    job: Job
    baseline: str | None = None  # its sealed pages need not be sent again
    started: str
    finished: str
    files: int = 0
    files_failed: int = 0
    bytes: int = 0


class Sealed(msgspec.Struct, kw_only=True):
    """What sealing did: the pages the record has, and how many of them the container did not hold yet."""

    pages: int
    sent: int
    changes: ChangeCounts | None = None  # what the header says the record changed (None: not counted)


# ----------------------------------------------------------------------------- restore pages


class FetchItem(msgspec.Struct, array_like=True):
    """One blob of a restore page: the current blob, or (``snapshot`` set) the snapshot holding the recorded version."""

    name: str
    path: str
    size: int
    md5: str | None
    mtime_ns: int | None
    snapshot: str | None = None
    meta: Meta | None = None  # the mode and owner the record names (None: the blob's mode metadata)


class PlanInput(msgspec.Struct, kw_only=True):
    container: str
    prefix: str = ""
    run_id: str | None = None
    options: RestoreOptions
    min_pages: int = msgspec.field(default=1, name="min_batches")
    # True: listings find each file's copy (current blob or snapshot) as the pages are planned; False (no
    # backup of these names since the run): the current blobs are read, and one found replaced is looked up alone
    later_backups: bool = True


class FetchInput(msgspec.Struct, kw_only=True):
    dest: str
    container: str
    page: int
    index: str = ""  # as CopyInput.index
    overwrite: bool = False
    owners: bool = True  # RestoreOptions.owners


class TreeInput(msgspec.Struct, kw_only=True):
    """The restore's last activity, once every file is written (``workflows.tree``): the hard links, symlinks
    and directories of the record, from the tree pages the plan wrote (``tree``, read with the page index)."""

    dest: str
    container: str
    prefix: str = ""
    tree: list[Span]
    index: list[str]
    overwrite: bool = False
    owners: bool = True
    root: bool = False  # DEST was created by this restore: the source root's mode, owner and mtime go to it


# ----------------------------------------------------------------------------- orchestrations


class Step(msgspec.Struct, array_like=True, frozen=True):
    """One activity of the page window: page ``page``'s batch, or (``commit``) the commit of the large file
    whose first range page it is, or (``seal``) the run's last step, once every page is done: the sealing of a
    backup's record, a restore's tree."""

    page: int
    commit: bool = False
    seal: bool = False


class LargeFile(msgspec.Struct, kw_only=True):
    """A large file whose ranges are in flight: how many are left, and what they reported for its commit."""

    ranges_left: int
    blocks: list[str | None]
    md5: str | None = None
    digest: str | None = None
    failed: str | None = None  # why a range failed (the first one reported)


class RunState(msgspec.Struct, Generic[C], kw_only=True):
    """What an orchestration carries across continue-as-new: its counters and lists, and where its page window is."""

    counts: C
    started_at: str  # ISO 8601, from the orchestration context's clock
    pages: int = 0
    next_page: int = 0
    done: list[Span] = msgspec.field(default_factory=list)  # pages the first activity recorded, dropped as passed
    tree: list[Span] = msgspec.field(default_factory=list)  # Planned.tree
    index: list[str] = msgspec.field(default_factory=list)  # Planned.index
    retry: list[Step] = msgspec.field(default_factory=list)  # steps to schedule before the next page
    failures: list[Listed] = msgspec.field(default_factory=list)
    skipped: list[Listed] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)
    waits: int = 0  # times the run has waited for `resume`
    large: dict[int, LargeFile] = msgspec.field(default_factory=dict)  # by first range page
    changes: ChangeCounts | None = None  # what sealing counted (``Sealed.changes``), for the summary


class BackupInput(msgspec.Struct, kw_only=True):
    source: str
    container: str
    prefix: str = ""
    endpoint: str | None = None  # a label for messages and baseline matching, never a secret
    options: BackupOptions
    job: Job | None = None  # None: a run of an earlier version, whose record is not sealed
    baseline: str | None = None  # the run whose record decides what is unchanged
    # runs of the job cancelled since the baseline, newest first: what their records hold counts as backed up, over
    # the baseline's, so the next run does not send it again
    cancelled: list[str] = msgspec.field(default_factory=list)
    state: RunState[BackupCounts] | None = None  # carried across continue-as-new

    @property
    def destination(self) -> str:
        return f"{self.container}/{self.prefix}" if self.prefix else self.container

    @property
    def label(self) -> RunLabel:
        return RunLabel(source=self.source, container=self.container, prefix=self.prefix, endpoint=self.endpoint)


class RestoreInput(msgspec.Struct, kw_only=True):
    dest: str
    container: str
    prefix: str = ""
    run_id: str | None = None  # a backup run's record, or (None) whatever the container holds under prefix
    endpoint: str | None = None
    options: RestoreOptions
    source: str = ""  # a label for `status` and `list`, which show every run's source
    state: RunState[RestoreCounts] | None = None
    # a backup after the run may have replaced its blobs (see PlanInput); False only for the newest run
    later_backups: bool = True
    dest_created: bool = False  # DEST did not exist: it gets the source root's recorded mode, owner and mtime

    @property
    def source_label(self) -> str:
        where = f"{self.container}/{self.prefix}" if self.prefix else self.container
        return f"{where} (run {self.run_id})" if self.run_id else where

    @property
    def label(self) -> RunLabel:
        return RunLabel(source=self.source, container=self.container, prefix=self.prefix, endpoint=self.endpoint,
                        dest=self.dest, run_id=self.run_id)


class RunLabel(msgspec.Struct, kw_only=True):
    """What commands read of any run's input to find, match and show it: where from and where to. Decoded
    without the run's options and carried state, whose shapes may be another version's."""

    source: str = ""  # a backup's source directory; a restore's label of what it restores
    container: str = ""
    prefix: str = ""
    endpoint: str | None = None
    dest: str | None = None  # a restore's destination directory
    run_id: str | None = None  # the backup run a restore restores
    job: Job | None = None  # a backup's job

    @property
    def destination(self) -> str:
        if self.dest is not None:
            return self.dest
        return f"{self.container}/{self.prefix}" if self.prefix else self.container

    def same_backup(self, other: RunLabel) -> bool:
        """The same source to the same destination: one run at a time, and the baseline of the next."""
        return (self.source, self.container, self.prefix) == (other.source, other.container, other.prefix)

    def same_restore(self, other: RunLabel) -> bool:
        return (self.dest, self.container, self.prefix, self.run_id) == \
            (other.dest, other.container, other.prefix, other.run_id)

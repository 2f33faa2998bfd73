"""What commands hand to printers and to ``--json``: a run starting, a run's status and list row, and the
reports of verify, prune, purge and a backup's dry run.

Their field names are the keys of the JSON objects ``--json`` prints (``codec.to_wire``), which scripts read.
"""

from __future__ import annotations

import msgspec

from sitebackup.model.records import ChangeCounts
from sitebackup.model.work import Progress


class RunStart(msgspec.Struct, kw_only=True):
    """A run a command starts, resumes or attaches to: the first event of ``--json``."""

    instance_id: str
    source: str
    destination: str
    endpoint: str | None = None
    resumed: bool = False
    attached: bool = False  # another live process hosts it: this one only shows its progress
    finished: bool = False  # it had finished already: shown, not run again
    action: str = "Backing up"  # how the bar names what it does


class Failure(msgspec.Struct):
    """Why a run failed, as the durable runtime recorded it (redacted)."""

    type: str
    message: str


class RunInfo(msgspec.Struct, kw_only=True):
    """Everything ``status`` shows of a run."""

    instance_id: str
    kind: str
    runtime_status: str
    source: str | None
    destination: str | None
    endpoint: str | None
    custom_status: Progress | None
    output: object  # the orchestration's output as stored: a summary's flat object, or what `cancel` left
    created_at: str
    last_updated_at: str
    last_progress_at: str
    idle_s: float | None = None  # unfinished runs: how long since their last progress
    duration_s: float
    stalled: bool | None = None
    worker_attached: bool | None = None
    failure: Failure | None = None


class RunRow(msgspec.Struct, kw_only=True):
    """One line of ``list``."""

    instance_id: str
    job: str | None = None  # the backup's job name
    kind: str
    runtime_status: str
    restorable: str | None  # backups: yes, partial, pruned or no
    source: str | None
    destination: str | None
    files: int
    files_total: int
    bytes: int
    created_at: str
    duration_s: float
    worker_attached: bool | None
    changes: ChangeCounts | None = None  # from the run before it of its job; None: not known here


class RunDetail(msgspec.Struct, kw_only=True):
    """``list --container NAME RUN``: a sealed run in full, as its header says (its pages counted, not listed)."""

    run_id: str
    job: str
    job_name: str | None
    host: str
    source: str
    container: str
    prefix: str
    started: str
    finished: str
    status: str
    files: int
    files_failed: int
    bytes: int
    pages: int
    baseline: str | None
    changes: ChangeCounts | None
    tool: str
    format: int


class Mismatch(msgspec.Struct):
    """A file of a run whose stored copy (or, with --local, whose source file) does not match the record."""

    path: str
    blob: str
    problem: str


class VerifyReport(msgspec.Struct, kw_only=True):
    run_id: str
    container: str
    prefix: str
    source: str
    local: bool
    download: bool
    files_checked: int
    files_ok: int
    files_mismatched: int
    files_not_backed_up: int
    tree_checked: int = 0  # directories and symlinks of the record compared with the source (--local)
    tree_mismatched: int = 0


class KeptRun(msgspec.Struct, kw_only=True):
    instance_id: str
    created_at: str
    reasons: list[str]


class RemovedRun(msgspec.Struct, kw_only=True):
    instance_id: str
    created_at: str
    reason: str


class PruneReport(msgspec.Struct, kw_only=True):
    container: str
    prefix: str
    dry_run: bool
    kept: list[KeptRun]
    removed: list[RemovedRun]
    unfinished: list[str]
    blobs_removed: int
    snapshots_removed: int
    bytes_removed: int
    notes: list[str] = msgspec.field(default_factory=list)  # what the user should know of how it went


class PurgeReport(msgspec.Struct, kw_only=True):
    purged: list[str]  # run ids
    records_kept: bool  # under a task hub without storage credentials, the records in the containers stay
    backups_kept: list[str]  # completed backups, left to `prune`


class DryRunItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of a backup's ``--dry-run``: what a run would do with it (upload, unchanged, skip, fail, or
    metadata: record its new mode, owner or symlink target, sending no content; ``reason`` says what changed), or
    that it is gone from the source since the last run (delete: the next run's record leaves it out)."""

    action: str
    path: str
    size: int | None = None
    reason: str | None = None
    error: str | None = None
    kind: str = "file"  # a directory ("dir") or a symlink ("symlink") has no size
    changed: bool = False  # an upload of a file the last run recorded with other content (size, time or MD5)


class DryRunTotals(msgspec.Struct, kw_only=True):
    """What a backup's ``--dry-run`` found in all."""

    dry_run: bool = True
    source: str
    destination: str
    files_to_upload: int = 0
    bytes_to_upload: int = 0
    baseline: str | None  # the run compared with; None: every file would be uploaded
    files_unchanged: int = 0
    bytes_skipped: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_changed: int = 0  # of files_to_upload: those the last run recorded otherwise (the rest are new)
    files_deleted: int = 0  # in the last run's record, gone from the source
    bytes_deleted: int = 0
    dirs_deleted: int = 0  # directories and symlinks in the last run's record gone from the source
    symlinks_deleted: int = 0
    metadata_changed: int = 0  # entries whose mode, owner or symlink target would be recorded anew


class ListingSummary(msgspec.Struct, kw_only=True):
    """What ``ls`` listed of a run."""

    run_id: str
    entries: int = 0
    bytes: int = 0


class DiffSummary(msgspec.Struct, kw_only=True):
    """What ``diff`` found changed from one run to another."""

    run_a: str
    run_b: str
    added: int = 0
    removed: int = 0
    modified: int = 0
    metadata: int = 0


class FindSummary(msgspec.Struct, kw_only=True):
    """What ``find`` searched and found."""

    patterns: list[str]
    runs_searched: int = 0
    runs_matched: int = 0
    matches: int = 0


class RestorePlan(msgspec.Struct, kw_only=True):
    """What a ``restore --dry-run`` found: the entries (files, directories, symlinks) the restore would create,
    replace, leave as they are (identical), leave out (not backed up by the run) and fail on, and their bytes."""

    dry_run: bool = True
    run_id: str | None  # None: whatever the container holds under the prefix
    source: str
    dest: str
    overwrite: bool = False
    entries_to_create: int = 0
    bytes_to_create: int = 0
    entries_to_replace: int = 0
    bytes_to_replace: int = 0
    entries_identical: int = 0
    bytes_identical: int = 0
    entries_skipped: int = 0
    entries_failed: int = 0


class RunStats(msgspec.Struct, kw_only=True):
    """A sealed run as ``stats`` counts it: files and bytes as recorded, and what it changed from its job's run
    before it (None: sealed before changes were counted)."""

    run_id: str
    job: str | None
    started: str
    files: int
    bytes: int
    changes: ChangeCounts | None = None


class StoredStats(msgspec.Struct, kw_only=True):
    """What the container stores: copies of backed-up files (current blobs and snapshots, each once however many
    runs reference it) and the records beside them (under ``.sitebackup/``)."""

    blobs: int = 0
    snapshots: int = 0
    bytes: int = 0
    record_blobs: int = 0
    record_bytes: int = 0
    missing: int = 0  # a run's files whose recorded version no copy holds (pruned, or overwritten)


class PruneEstimate(msgspec.Struct, kw_only=True):
    """What ``prune`` with the given keep rules would free (its dry run)."""

    runs: int
    blobs: int
    snapshots: int
    bytes: int


class StatsReport(msgspec.Struct, kw_only=True):
    """What ``stats`` reports of a container (every sealed run, newest first) or of one run."""

    container: str
    prefix: str | None = None
    jobs: int = 0
    runs: list[RunStats] = msgspec.field(default_factory=list)
    stored: StoredStats
    prune: PruneEstimate | None = None

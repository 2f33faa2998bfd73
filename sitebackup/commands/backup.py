"""The backup command (the default one): its click definition, its request built from the options,
pre-flight of the destination, schedule or re-attach, host the worker and watch; or, with ``--dry-run``,
the scan and the comparison alone (``plan_backup``).

``expand_prefix`` runs once in the CLI process, so every page of one run (and its resume) uses the
same expanded prefix; filters are read once too, so a resumed run keeps those it started with.
"""

from __future__ import annotations

import functools
import socket
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from durabletask import client as dt_client

from sitebackup.blob.clients import NOT_CONFIGURED, StorageSettings, connect, make_service_client
from sitebackup.blob.lock import JobLock, job_lock, lock_client
from sitebackup.blob.naming import backup_prefix, overlaps, validate_container_name
from sitebackup.blob.records import ContainerRecords, run_entries
from sitebackup.blob.upload import ACCESS_TIERS
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.catalog import parse_utc
from sitebackup.commands.hosting import (
    POLL_SECONDS,
    activity_deps,
    attach_and_watch,
    claim_of,
    exit_code_for,
    find_unfinished,
    get_run,
    host_and_watch,
    last_progress,
    new_instance_id,
    release_run,
    run_label,
    stalled_for,
)
from sitebackup.commands.options import (
    Command,
    Output,
    bwlimit_option,
    complete_dirs,
    concurrency_option,
    debug_option,
    destination_label,
    lock_wait_option,
    log_file_option,
    max_inflight_option,
    metrics_option,
    output_options,
    stall_after_option,
    start_metrics,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import Runtime, open_backend, open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import EXIT_FILES_FAILED, AlreadyRunningError, InputError, StalledError, exit_codes_help
from sitebackup.local import filters, incremental
from sitebackup.local.files import describe_os_error, file_md5_b64
from sitebackup.local.incremental import Compared, Found
from sitebackup.local.scan import Skipped
from sitebackup.model.codec import to_wire
from sitebackup.model.records import CatalogEntry, FileEntry, Job
from sitebackup.model.reports import DryRunItem, DryRunTotals, RunStart
from sitebackup.model.work import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONCURRENCY,
    MIB,
    BackupCounts,
    BackupInput,
    BackupOptions,
    Concurrency,
    Summary,
    UploadSpec,
    summary_to_wire,
)
from sitebackup.ui import render
from sitebackup.ui.logfile import LogPrinter
from sitebackup.ui.printers import Printer, human_duration, make_printer
from sitebackup.workflows.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from sitebackup.workflows.names import BACKUP_ORCHESTRATION

TEMPLATE_HELP = "use {date}, {time} or {hostname}"
T = TypeVar("T")


@dataclass
class BackupRequest:
    source: Path
    container: str
    prefix: str = ""
    concurrency: int = DEFAULT_CONCURRENCY
    state_dir: Path = field(default_factory=Path)
    compare: str = incremental.MODE_MTIME  # or checksum / force
    patterns: list[str] = field(default_factory=list)  # gitignore-style, see local.filters
    follow_symlinks: bool = False
    no_wait: bool = False
    upload: UploadSpec = field(default_factory=UploadSpec)
    stall_after: timedelta | None = None  # a live run idle for longer is stalled; None: never judged
    job_name: str | None = None  # --job NAME; None: the job is this host, source and prefix
    lock_wait: timedelta | None = None  # how long to wait for the job's lock held by another process; None: not

    @property
    def job(self) -> Job:
        return Job.of(host=short_hostname(), source=str(self.source), prefix=self.prefix, name=self.job_name,
                      created=datetime.now(timezone.utc).isoformat())

    def orchestration_input(self, endpoint: str | None) -> BackupInput:
        return BackupInput(source=str(self.source), container=self.container, prefix=self.prefix, endpoint=endpoint,
                           options=BackupOptions(concurrency=self.concurrency, compare=self.compare,
                                                 patterns=self.patterns, follow_symlinks=self.follow_symlinks,
                                                 upload=self.upload), job=self.job)


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def expand_prefix(template: str | None, now: datetime | None = None, hostname: str | None = None) -> str:
    """``{date}`` → YYYY-MM-DD, ``{time}`` → HHMMSS (local time), ``{hostname}`` → short host name; ``{{``
    and ``}}`` are braces. Only these plain fields: no attribute, index, conversion or format spec."""
    if not template or "{" not in template:
        return template or ""
    now = now or datetime.now()
    values = {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S"),
              "hostname": hostname or short_hostname()}
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid --prefix template {template!r}: {TEMPLATE_HELP} ({exc})") from None
    expanded = []
    for literal, name, spec, conversion in parts:
        expanded.append(literal)
        if name is None:
            continue
        if name not in values or spec or conversion:
            raise InputError(f"invalid --prefix template {template!r}: {TEMPLATE_HELP}, without attributes, "
                             "indexes, conversions or format specs")
        expanded.append(values[name])
    return "".join(expanded)


@dataclass(frozen=True)
class Selection:
    """What a backup compares and leaves out: --checksum, --force, --exclude, --include, --exclude-from,
    --no-ignore-file, --follow-symlinks."""

    checksum: bool = False
    force: bool = False
    excludes: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    exclude_from: tuple[Path, ...] = ()
    no_ignore_file: bool = False
    follow_symlinks: bool = False


def build_request(source: str | Path, container: str, prefix: str | None, *, state_dir: Path,
                  concurrency: int, upload: UploadSpec | None = None, selection: Selection | None = None,
                  no_wait: bool = False, stall_after: timedelta | None = None,
                  job_name: str | None = None, lock_wait: timedelta | None = None) -> BackupRequest:
    """Validate the backup's options into a request: source, destination, comparison, filters."""
    selection = selection or Selection()
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"source {str(source)!r} does not exist")
    if not path.is_dir():
        raise InputError(f"source {str(source)!r} is not a directory")
    if concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if selection.checksum and selection.force:
        raise InputError("--checksum and --force exclude each other")
    mode = incremental.MODE_FORCE if selection.force else incremental.MODE_CHECKSUM if selection.checksum \
        else incremental.MODE_MTIME
    try:
        patterns = filters.patterns_for(path, excludes=selection.excludes, includes=selection.includes,
                                        exclude_from=selection.exclude_from,
                                        use_ignore_file=not selection.no_ignore_file)
    except OSError as exc:
        raise InputError(f"cannot read filter file {exc.filename}: {exc.strerror}") from None
    return BackupRequest(source=path.resolve(), container=validate_container_name(container),
                         prefix=backup_prefix(expand_prefix(prefix)), concurrency=concurrency,
                         state_dir=state_dir, compare=mode, patterns=patterns,
                         follow_symlinks=selection.follow_symlinks, no_wait=no_wait, upload=upload or UploadSpec(),
                         stall_after=stall_after, job_name=_job_name(job_name), lock_wait=lock_wait)


def _job_name(name: str | None) -> str | None:
    if name is not None and (not name.strip() or len(name) > 200 or not name.isprintable()):
        raise InputError("--job NAME: give a name of printable characters, at most 200")
    return name


# (start, id) of the completed and of the cancelled backups of a source and destination this state directory knows
RecordedRuns = tuple[list[tuple[datetime, str]], list[tuple[datetime, str]]]


def find_baseline(inp: BackupInput, work: WorkStore, sealed: list[CatalogEntry], recorded: RecordedRuns) -> str | None:
    """The newest completed backup of the job: of its runs sealed in the container (*sealed*), and of the runs
    of the same source and destination (and endpoint) this state directory knows (*recorded*) whose record
    remains (and that no prune is dropping); with ``cancelled_since`` the runs cancelled after it, in ``inp``."""
    completed, cancelled = recorded

    def kept(run_id: str) -> bool:
        return work.has_results(run_id) and work.pruned(run_id) is None

    newest = max(((parse_utc(entry.started), entry.run_id) for entry in sealed), default=None)
    # the newest of this state directory's completed runs whose record it keeps: the others need not be looked at
    local = next((run for run in sorted(completed, reverse=True) if kept(run[1])), None)
    if local is not None and (newest is None or local > newest):
        newest = local
    inp.cancelled = [run_id for started, run_id in sorted(cancelled, reverse=True)
                     if (newest is None or started > newest[0]) and kept(run_id)]
    return newest[1] if newest else None


def recorded_runs(client: dt_client.TaskHubGrpcClient, inp: BackupInput) -> RecordedRuns:
    """(start, id) of the backups of the same source and destination (and endpoint) this state directory knows:
    the completed ones and the cancelled ones, from one query."""
    completed, terminated = dt_client.OrchestrationStatus.COMPLETED, dt_client.OrchestrationStatus.TERMINATED
    query = dt_client.OrchestrationQuery(runtime_status=[completed, terminated], fetch_inputs_and_outputs=True)
    found: dict[dt_client.OrchestrationStatus, list[tuple[datetime, str]]] = {completed: [], terminated: []}
    for state in client.get_all_orchestration_states(query):
        other = run_label(state) if state.name == BACKUP_ORCHESTRATION else None
        if other is None or not inp.label.same_backup(other) or state.runtime_status not in found:
            continue
        if other.endpoint and inp.endpoint and other.endpoint != inp.endpoint:
            continue
        found[state.runtime_status].append((parse_utc(state.created_at.isoformat()), state.instance_id))
    return found[completed], found[terminated]


def settle_job(records: ContainerRecords, request: BackupRequest) -> Job:
    """The job this backup belongs to. ``--job NAME`` names a job the container may hold already (made on another
    host or from another path: the source moved); without it the job is this host, source and prefix. A job may
    not write where another job of the container writes: its prefix overlapping another job's is refused,
    naming that job, unless ``--job`` names that very job."""
    job = request.job
    # without --job the job is this one whatever the container says of it: its own descriptor need not be read
    jobs = records.jobs(but=job.id if request.job_name is None else None)
    if request.job_name is not None:
        job = next((other for other in jobs if other.name == request.job_name), job)
    for other in jobs:
        if other.id != job.id and overlaps(other.prefix, job.prefix):
            last = max((entry.started for entry in records.catalog() if entry.job == other.id), default="none")
            where = f"prefix {job.prefix!r}" if job.prefix else "the container's root (no --prefix)"
            raise InputError(f"{where} of container {request.container!r} is backed up by another job: "
                             f"{other.name} (host {other.host}, source {other.source}, last run {last[:19]}); "
                             "choose another --prefix, or give --job with that job's name if this is the same "
                             "job (the source moved)")
    return job


def find_unfinished_backup(client: dt_client.TaskHubGrpcClient, inp: BackupInput) -> str | None:
    return find_unfinished(client, BACKUP_ORCHESTRATION, inp.label.same_backup)


def run_backup(request: BackupRequest, settings: StorageSettings, printer: Printer, *,
               taskhub: TaskHubSettings | None = None, local_worker: bool = True,
               detach: bool = False) -> Summary[Any]:
    """Schedule or resume, then host a worker and watch (or only watch, or with *detach* only schedule).

    The process that schedules or resumes the run holds its job's lock in the container until it stops
    watching: the whole run when it hosts or watches it (``--no-local-worker``), the scheduling alone with
    *detach*. A process that attaches to a run another process of this state directory hosts takes the lock
    only if it takes the run over."""
    settings.require()
    # one quick client for the job's lock, which first asks the container whose job this is while the pre-flight
    # and the backend's start go on (known before the lock is taken): one client, so a token credential fetches one
    # token for both
    with lock_client(settings, request.container) as locks:
        settled = _in_background(functools.partial(settle_job, ContainerRecords(locks), request))
        endpoint = connect(settings, request.container)
        inp = request.orchestration_input(endpoint)
        inp.options.shared = taskhub is not None
        lock = RunLock.for_backup(request.state_dir, inp.source, inp.container, inp.prefix)
        with open_backend(request.state_dir, taskhub) as runtime:
            inp.job = job = settled.result()
            with job_lock(locks, job, "backup") as held:
                return _run_locked(request, settings, printer, inp, job, endpoint, runtime, lock, held,
                                   local_worker=local_worker, detach=detach)


def _in_background(work: Callable[[], T]) -> Future[T]:
    """*work* run on a daemon thread (a process that ends meanwhile, the pre-flight having failed, does not wait for
    it): its result, or what it raised, for whoever waits on it."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="sitebackup-job", daemon=True).start()
    return future


def _run_locked(request: BackupRequest, settings: StorageSettings, printer: Printer, inp: BackupInput, job: Job,
                endpoint: str, runtime: Runtime, lock: RunLock, job_lock: JobLock, *, local_worker: bool,
                detach: bool) -> Summary[Any]:
    """``run_backup`` once the backend runs and the job is known (its lock not taken yet)."""
    try:
        deps = activity_deps(settings, Concurrency(request.concurrency), runtime, job_lock)
        with runtime.connected() as client:
            instance_id, live = claim_or_find(client, runtime, inp, lock)
            warning = check_live_run(client, instance_id, request) if live and instance_id else None
            resumed = instance_id is not None
            run_id = instance_id or new_instance_id()
            # this process schedules or resumes the run: the job's lock first, its holder named beside the catalog's read
            if not live:
                job_lock.acquire(request.lock_wait, run=run_id, claim=claim_of(lock), name_later=True)
            cached: list[str] = []  # this state directory's copies of runs sealed already: let go once this run is
            if instance_id is None:
                # the job's sealed runs, read under its lock; with --force too: the baseline says what each
                # name holds, to keep as a snapshot
                records = deps.records(inp.container)
                listed = _in_background(lambda: [entry for entry in records.catalog() if entry.job == job.id])
                recorded = recorded_runs(client, inp)  # asked of the backend while the container lists
                sealed = listed.result()
                if sealed:  # most likely the baseline: its header is read while the run is scheduled, for its scan
                    records.prefetch(max(sealed, key=lambda entry: parse_utc(entry.started)).run_id)
                inp.baseline = find_baseline(inp, deps.work, sealed, recorded)
                if not inp.options.shared:
                    cached = sealed_copies(recorded, sealed)
            job_lock.named()  # before anything of the run can change the container
            if instance_id is None:
                instance_id = client.schedule_new_orchestration(BACKUP_ORCHESTRATION, input=to_wire(inp),
                                                                instance_id=run_id)
        printer.start(RunStart(instance_id=instance_id, source=inp.source, destination=inp.destination,
                               endpoint=endpoint, resumed=resumed, attached=live))
        if warning is not None:
            printer.message(warning)
        if detach:
            return Summary(kind=BACKUP_ORCHESTRATION, counts=BackupCounts(), instance_id=instance_id,
                           runtime_status="SCHEDULED", detached=True)
        if live and local_worker:
            return attach_and_watch(runtime, deps, instance_id, printer, lock, job_lock)
        summary = host_and_watch(runtime, deps, instance_id, printer, local_worker=local_worker,
                                 on_poll=job_lock.check)
        if summary.runtime_status == "COMPLETED":
            let_go(deps.work, cached)
        return summary
    finally:
        release_run(runtime, lock, job_lock)


def sealed_copies(recorded: RecordedRuns, sealed: list[CatalogEntry]) -> list[str]:
    """The completed runs of this job whose records this state directory holds and the container holds sealed:
    once a newer run is sealed, the container's copy is all that restore, verify and browsing need of them (and
    the newer run is the next baseline), so the state directory need not keep a copy of every run it made."""
    in_container = {entry.run_id for entry in sealed}
    completed, _cancelled = recorded  # a cancelled run is never sealed: its pages here are its only record
    return [run_id for _started, run_id in completed if run_id in in_container]


def let_go(work: WorkStore, run_ids: list[str]) -> None:
    """Remove this state directory's copies of *run_ids* (``sealed_copies``), but not a run a prune is removing:
    that prune's mark stays for it to finish. A copy that cannot be removed now is left for the next run."""
    for run_id in run_ids:
        if work.has_results(run_id) and work.pruned(run_id) is None:
            work.remove(run_id)


def check_live_run(client: dt_client.TaskHubGrpcClient, instance_id: str, request: BackupRequest) -> str | None:
    """Before attaching to a run another process hosts: with --no-wait refuse (AlreadyRunningError, or
    StalledError when it has made no progress for ``stall_after``); else a warning if it looks stalled."""
    state = get_run(client, instance_id)
    stall_after = request.stall_after
    idle = stalled_for(state, stall_after) if stall_after is not None else None
    if idle is None or stall_after is None:
        if request.no_wait:
            raise AlreadyRunningError(f"the same backup is already running as {instance_id}; follow it with: "
                                      f"sitebackup status {instance_id} --watch", instance_id)
        return None
    since = last_progress(state).isoformat(timespec="seconds")
    what = (f"the same backup is running as {instance_id} but has made no progress for {human_duration(idle)} "
            f"(since {since}, over --stall-after {human_duration(stall_after)})")
    if request.no_wait:
        raise StalledError(f"{what}: is its process hung? stop it, or cancel the run: sitebackup cancel {instance_id}",
                           instance_id)
    return f"warning: {what}; attaching anyway"


def claim_or_find(client: dt_client.TaskHubGrpcClient, runtime: Runtime, inp: BackupInput,
                  lock: RunLock) -> tuple[str | None, bool]:
    """(unfinished instance id or None, whether a live process works on it).

    Holding *lock* makes this process the one that schedules or resumes; when another live
    process holds it, wait until that process has scheduled its instance (or let go).
    """
    while True:
        owner = lock.try_acquire()
        instance_id = find_unfinished_backup(client, inp)
        if owner:
            # another kind of process (a worker, a dying one whose leases still run) may hold the work
            return instance_id, bool(instance_id and runtime.worker_attached(instance_id))
        if instance_id is not None:
            return instance_id, True
        time.sleep(POLL_SECONDS)


# --dry-run: the scan and the incremental comparison, run locally; nothing is written. No orchestration is
# scheduled and the container is neither created nor listed: the walk and the comparison with the baseline
# run's record (found through the durable client of the selected backend, read from its work store) answer
# what a real run would upload and skip. Under the scheduler that record is read from the container's
# reserved .sitebackup/work/ prefix. Each file's line goes out as the walk reaches it and the record is read
# beside the walk, so nothing is kept per file.


def plan_backup(request: BackupRequest, settings: StorageSettings, taskhub: TaskHubSettings | None,
                on_item: Callable[[DryRunItem], None]) -> DryRunTotals:
    """Walk and compare, handing each file's line to *on_item* as the walk goes; return the totals."""
    if taskhub is not None and not settings.configured and request.compare != incremental.MODE_FORCE:
        raise InputError("--dry-run with --taskhub reads the last run's record from the container: " + NOT_CONFIGURED)
    endpoint = None
    service = None
    if settings.configured:
        # the label matches the baseline's endpoint; only the scheduler's work store sends requests
        service, endpoint = make_service_client(settings, quick=True)
    try:
        inp = request.orchestration_input(endpoint)
        records: Iterable[FileEntry] = ()
        baseline = None
        if request.compare != incremental.MODE_FORCE:
            container = ContainerRecords(service.get_container_client(inp.container)) if service else None
            with open_client(request.state_dir, taskhub) as (runtime, client):
                work = runtime.work_store(service)
                job = request.job.id
                sealed = [entry for entry in container.catalog() if entry.job == job] if container else []
                baseline = find_baseline(inp, work, sealed, recorded_runs(client, inp))
            # what the runs cancelled since recorded counts over it, as in the scan (``workflows.copy``)
            sources = [run_entries(None, work, run_id) for run_id in inp.cancelled]
            if baseline:
                sources.append(run_entries(container, work, baseline))
            if sources:
                records = incremental.overlaid(sources)
        totals = DryRunTotals(source=str(request.source), destination=inp.destination, baseline=baseline)
        _walk(request, records, totals, on_item)
    finally:
        if service is not None:
            service.close()
    return totals


def _walk(request: BackupRequest, records: Iterable[FileEntry], totals: DryRunTotals,
          on_item: Callable[[DryRunItem], None]) -> None:
    skipped = 0

    def gone(entry: FileEntry) -> None:
        if entry.kind == "dir":
            totals.dirs_deleted += 1
        elif entry.kind == "symlink":
            totals.symlinks_deleted += 1
        else:
            totals.files_deleted += 1
            totals.bytes_deleted += entry.size
        on_item(DryRunItem(action="delete", path=entry.path, kind=entry.kind,
                           size=entry.size if entry.is_file else None))

    for found in incremental.compare(request.source, patterns=request.patterns,
                                     follow_symlinks=request.follow_symlinks, baseline=records, mode=request.compare,
                                     on_gone=gone):
        if isinstance(found, Found):  # a directory or symlink: listed only when what is recorded of it changes
            change = incremental.metadata_change(found.previous, entry=found.entry)
            if change is None:
                continue
            item = DryRunItem(action="metadata", path=found.entry.path, kind=found.entry.kind, reason=change)
            totals.metadata_changed += 1
        elif isinstance(found, Compared):
            file = found.file
            try:
                action = _action(request, found)
            except OSError as exc:
                item = DryRunItem(action="fail", path=file.path, error=describe_os_error(exc))
                totals.files_failed += 1
            else:
                before = found.previous
                # with --force a file the last run recorded as it is goes up again, unchanged
                changed = action == "upload" and before is not None and (
                    found.decision != incremental.UPLOAD or
                    incremental.decide(file.size, file.mtime_ns, before, incremental.MODE_MTIME) == incremental.UPLOAD)
                item = DryRunItem(action=action, path=file.path, size=file.size, changed=changed)
                if action == "upload":
                    totals.files_to_upload += 1
                    totals.bytes_to_upload += file.size
                    totals.files_changed += changed
                else:  # an unchanged file is a skipped one too: not uploaded on purpose
                    totals.files_unchanged += 1
                    totals.bytes_skipped += file.size
                    change = incremental.metadata_change(found.previous, file.meta)
                    if change is not None:  # its content stays: the record takes its new mode or owner
                        item = DryRunItem(action="metadata", path=file.path, size=file.size, reason=change)
                        totals.metadata_changed += 1
        elif isinstance(found, Skipped):
            item = DryRunItem(action="skip", path=found.relpath, reason=found.reason)
            skipped += 1
        else:
            item = DryRunItem(action="fail", path=found.relpath, error=found.reason)
            totals.files_failed += 1
        on_item(item)
    totals.files_skipped = skipped + totals.files_unchanged


def _action(request: BackupRequest, found: Compared) -> str:
    if found.decision == incremental.CHECK:
        assert found.previous is not None
        same = file_md5_b64(request.source / found.file.path) == found.previous.md5
        return "unchanged" if same else "upload"
    return "unchanged" if found.decision == incremental.UNCHANGED else "upload"


def selection_options(command: Callable[..., None]) -> Callable[..., None]:
    """What a backup compares and leaves out, as one ``selection: Selection``."""

    @functools.wraps(command)
    def with_selection(*, checksum: bool, force: bool, excludes: tuple[str, ...], includes: tuple[str, ...],
                       exclude_from: tuple[Path, ...], no_ignore_file: bool, follow_symlinks: bool,
                       **params: Any) -> None:
        command(selection=Selection(checksum=checksum, force=force, excludes=excludes, includes=includes,
                                    exclude_from=exclude_from, no_ignore_file=no_ignore_file,
                                    follow_symlinks=follow_symlinks), **params)

    options = [
        click.option("--checksum", is_flag=True,
                     help="Compare content MD5 with the last run instead of size and modification time."),
        click.option("--force", is_flag=True, help="Upload every file, changed or not."),
        click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
                     help="Leave out paths matching a gitignore-style PATTERN (repeatable): '*.tmp', 'cache/'."),
        click.option("--include", "includes", multiple=True, metavar="PATTERN",
                     help="Keep paths matching PATTERN although an exclude matched (repeatable)."),
        click.option("--exclude-from", multiple=True, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Read exclude patterns from FILE, gitignore syntax (repeatable)."),
        click.option("--no-ignore-file", is_flag=True, help="Do not read SOURCE/.sitebackupignore."),
        click.option("--follow-symlinks", is_flag=True,
                     help="Back up what symlinks inside SOURCE point to instead of recording the links (loops are skipped)."),
    ]
    for option in reversed(options):
        with_selection = option(with_selection)
    return with_selection


def upload_options(command: Callable[..., None]) -> Callable[..., None]:
    """What shapes every upload of the run (``model.work.UploadSpec``), as one ``upload: UploadSpec``."""

    @functools.wraps(command)
    def with_upload(*, block_size: int, tier: str | None, **params: Any) -> None:
        # the --tier choice as the service spells it (Hot, Cool, Cold, Archive, Smart)
        spelled = next((t for t in ACCESS_TIERS if tier and t.lower() == tier.lower()), None)
        command(upload=UploadSpec(block_size=block_size * MIB, tier=spelled), **params)

    options = [
        click.option("--block-size", type=click.IntRange(min=MIN_BLOCK_SIZE // MIB, max=MAX_BLOCK_SIZE // MIB),
                     default=DEFAULT_BLOCK_SIZE // MIB, show_default=True, metavar="MIB",
                     help="Files over 4x this many MiB (at most 32 MiB) go up as parallel, resumable block ranges "
                          "of this size."),
        click.option("--tier", type=click.Choice([t.lower() for t in ACCESS_TIERS], case_sensitive=False),
                     help="Access tier set with every upload (default: the account's); archive blobs cannot be "
                          "read or replaced until rehydrated."),
    ]
    for option in reversed(options):
        with_upload = option(with_upload)
    return with_upload


@click.command("backup", cls=Command, epilog=exit_codes_help())
@click.argument("source", type=click.Path(path_type=Path), shell_complete=complete_dirs)
@click.option("--container", "-c", required=True, help="Destination container (created if missing).")
@click.option("--prefix", default="", help="Blob name prefix, e.g. nightly/web → nightly/web/css/site.css.")
@click.option("--job", "job_name", metavar="NAME",
              help="Name this backup's job (default: this host, SOURCE and --prefix); the name of a job the "
                   "container holds continues that job, e.g. after the source moved to another host.")
@storage_options
@bwlimit_option
@max_inflight_option
@concurrency_option("Bound on parallel upload batches; small-file requests in flight start at twice it and adapt "
                    "up to 8 times that (--max-inflight fixes them).")
@upload_options
@output_options
@selection_options
@click.option("--dry-run", is_flag=True,
              help="Scan and compare only: list what would be uploaded (new or changed), recorded anew (mode, owner "
                   "or link target alone changed), skipped or left out as deleted since the last run, with counts; "
                   "write nothing.")
@click.option("--verbose", "-v", is_flag=True, help="With --dry-run, list the unchanged files too.")
@click.option("--no-wait", is_flag=True,
              help="If the same backup is already running, print its id and exit 4 instead of attaching "
                   "(6 if it has made no progress for --stall-after).")
@stall_after_option
@lock_wait_option
@log_file_option
@taskhub_option
@click.option("--no-local-worker", is_flag=True,
              help="Schedule and watch only; `sitebackup worker` processes do the work.")
@click.option("--detach", is_flag=True, help="Print the run id (with --json the start event) and exit 0 at once.")
@metrics_option
@state_dir_option
@debug_option
def command(source: Path, container: str, prefix: str, job_name: str | None, storage: StorageSettings, concurrency: int,
            upload: UploadSpec, output: Output, selection: Selection, dry_run: bool, verbose: bool, no_wait: bool,
            stall_after: timedelta, lock_wait: timedelta | None, log_file: Path | None, taskhub: TaskHubSettings | None,
            no_local_worker: bool, detach: bool, metrics_file: Path | None, state_dir: Path) -> None:
    """Back up SOURCE to a container (the default command).

    Every file becomes a blob named by its path relative to SOURCE.

    Re-running the same command while an earlier run of the same source and destination is
    unfinished resumes that run.

    \b
    Examples:
      sitebackup backup ./site --container backups
      sitebackup backup ./site -c backups --prefix nightly/web --concurrency 32
      sitebackup backup ./site -c backups --connection-string UseDevelopmentStorage=true
    """
    if verbose and not dry_run:
        raise click.UsageError("--verbose goes with --dry-run")
    if metrics_file is not None and (dry_run or detach):
        raise click.UsageError("--metrics-file describes a finished run: not with --dry-run or --detach")
    # labelled as written on the command line: a {date} prefix stays one job, not a new series a day
    metrics = start_metrics(metrics_file, "backup", str(source.expanduser().resolve()),
                            destination_label(container, prefix))
    request = build_request(source, container, prefix, state_dir=state_dir, concurrency=concurrency, upload=upload,
                            selection=selection, no_wait=no_wait, stall_after=stall_after, job_name=job_name,
                            lock_wait=lock_wait)
    if dry_run:
        with render.DryRunLines(output.json, output.quiet, unchanged=verbose) as lines:
            plan = plan_backup(request, storage, taskhub, lines.add)
        render.dry_run_totals(plan, output.json, output.quiet)
        sys.exit(EXIT_FILES_FAILED if plan.files_failed else 0)
    printer: Printer = make_printer(json_output=output.json, quiet=output.quiet or (detach and not output.json))
    if log_file is not None:
        printer = LogPrinter(printer, log_file)
    summary = run_backup(request, storage, printer, taskhub=taskhub, local_worker=not no_local_worker, detach=detach)
    if metrics is not None:
        metrics.summary = summary_to_wire(summary)
    if detach and not output.json:
        click.echo(summary.instance_id)
    sys.exit(exit_code_for(summary))

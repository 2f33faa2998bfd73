"""What every command that runs or watches a run shares: finding an unfinished run, hosting a worker,
watching custom status into a printer, telling a stalled run from a live one, turning an instance's
state into a summary and an exit code, and ending the process once a command is done.

Commands never print: they hand data to a ``ui.printers.Printer``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

from durabletask import client as dt_client

from sitebackup.blob import bwlimit
from sitebackup.blob.asyncget import AsyncGetter
from sitebackup.blob.asyncput import AsyncPutter
from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.blob.errors import redact
from sitebackup.blob.inflight import process_window
from sitebackup.blob.lock import Claim, JobLock, host_name, job_lock, lock_client
from sitebackup.blob.workstore import WorkStore
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import Runtime
from sitebackup.errors import (
    EXIT_CANCELLED,
    EXIT_DESTINATION,
    EXIT_FILES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    SiteBackupError,
)
from sitebackup.model.codec import DamagedData, from_wire
from sitebackup.model.records import Job
from sitebackup.model.work import (
    BackupCounts,
    BackupInput,
    Concurrency,
    Progress,
    RestoreCounts,
    RunLabel,
    Summary,
    summary_from_wire,
)
from sitebackup.ui.printers import Printer
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION, RESUME_EVENT, WAITING_PHASE

# what is watched from elsewhere (`status --watch`, a run hosted by another process or by the scheduler's
# workers) is polled: each read is a request the serving process (or the scheduler) answers, so twice a
# second at most, after a quick start so that a small run is seen done within the first polls
POLL_SECONDS = 0.5
FIRST_POLL_SECONDS = 0.02  # doubling up to POLL_SECONDS
# Set by the first Ctrl-C or SIGTERM (``cli.stoppable``) besides the KeyboardInterrupt it raises: a watch acts on
# it at its next poll even when a library that the main thread was in at that instant swallowed the exception
STOP_REQUESTED = threading.Event()
# A run hosted by this process's embedded backend is read again as soon as that backend changes it (an
# episode: new counters, or the end), and otherwise only this often, for what other processes change
# (a cancel, a peer's worker): no reads while nothing moves.
IDLE_READ_SECONDS = 1.0
TERMINAL = {
    dt_client.OrchestrationStatus.COMPLETED,
    dt_client.OrchestrationStatus.FAILED,
    dt_client.OrchestrationStatus.TERMINATED,
}
UNFINISHED = [
    dt_client.OrchestrationStatus.RUNNING,
    dt_client.OrchestrationStatus.PENDING,
    dt_client.OrchestrationStatus.SUSPENDED,
]
# One word for a run that `sitebackup cancel` ended, in every output and in --json: the durable runtime's own
# word for it is TERMINATED (docs/troubleshooting.md, "Statuses").
CANCELLED = "CANCELLED"
ENV_STALL_AFTER = "SITEBACKUP_STALL_AFTER"
DEFAULT_STALL_AFTER = "1h"  # a live run without progress for this long is reported stalled (--stall-after)


class Interrupted(SiteBackupError):
    exit_code = EXIT_INTERRUPTED

    def __init__(self, instance_id: str):
        super().__init__(f"interrupted; the run is saved, resume with: sitebackup resume {instance_id}")
        self.instance_id = instance_id


def status_name(status: dt_client.OrchestrationStatus) -> str:
    """A run's status as every command shows it: the durable runtime's name, but CANCELLED for TERMINATED."""
    return CANCELLED if status == dt_client.OrchestrationStatus.TERMINATED else status.name


def parse_status(name: str) -> dt_client.OrchestrationStatus:
    """The durable status a name shown by ``status_name`` stands for (TERMINATED, the runtime's word, too)."""
    name = name.upper()
    return dt_client.OrchestrationStatus.TERMINATED if name == CANCELLED else dt_client.OrchestrationStatus[name]


def new_instance_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def find_unfinished(client: dt_client.TaskHubGrpcClient, name: str,
                    same: Callable[[RunLabel], bool]) -> str | None:
    """The id of an unfinished run of orchestration *name* whose input is the *same* run, if any."""
    query = dt_client.OrchestrationQuery(runtime_status=UNFINISHED, fetch_inputs_and_outputs=True)
    for state in client.get_all_orchestration_states(query):
        if state.name == name and (label := run_label(state)) is not None and same(label):
            return state.instance_id
    return None


def run_label(state: dt_client.OrchestrationState) -> RunLabel | None:
    """Where the run reads from and writes to, from its input; None when its input is no run's: a row may
    hold anything (or the marker of a payload too large to return), and one odd row must not break commands
    about the others."""
    try:
        raw = state.get_input() if state.serialized_input else None
        return from_wire(raw, RunLabel, "a run's input") if isinstance(raw, dict) else None
    except (ValueError, DamagedData):
        return None


def get_run(client: dt_client.TaskHubGrpcClient, instance_id: str) -> dt_client.OrchestrationState:
    state = client.get_orchestration_state(instance_id, fetch_payloads=True)
    if state is None:
        raise InputError(f"no run with id {instance_id!r} in this state directory or task hub")
    return state


def backup_run_label(client: dt_client.TaskHubGrpcClient, run_id: str, work: WorkStore | None = None) -> RunLabel:
    """Where backup *run_id* read from and wrote to; an InputError naming the prune when *work* holds the run's
    pruned mark."""
    mark = work.pruned(run_id) if work is not None else None
    if mark is not None:
        raise InputError(f"run {run_id!r} was pruned on {mark.at[:19]} (sitebackup prune): "
                         "its record and the file versions only it needed are gone")
    state = get_run(client, run_id)
    label = run_label(state) if state.name == BACKUP_ORCHESTRATION else None
    if label is None:
        raise InputError(f"run {run_id!r} is not a backup")
    return label


@dataclass(frozen=True)
class BackupRun:
    instance_id: str
    created_at: datetime  # UTC
    status: dt_client.OrchestrationStatus
    label: RunLabel

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def backup_runs(client: dt_client.TaskHubGrpcClient, container: str, endpoint: str | None) -> list[BackupRun]:
    """Every backup run to *container* this backend knows, oldest first; runs recorded with another endpoint
    wrote to another account's container of that name and are left out."""
    query = dt_client.OrchestrationQuery(fetch_inputs_and_outputs=True)
    runs = []
    for state in client.get_all_orchestration_states(query):
        label = run_label(state) if state.name == BACKUP_ORCHESTRATION else None
        if label is None or label.container != container or (label.endpoint and endpoint
                                                              and label.endpoint != endpoint):
            continue
        created = state.created_at if state.created_at.tzinfo else state.created_at.replace(tzinfo=timezone.utc)
        runs.append(BackupRun(state.instance_id, created, state.runtime_status, label))
    return sorted(runs, key=lambda run: run.created_at)


def progress_of(state: dt_client.OrchestrationState) -> Progress | None:
    """The run's last custom status, when it is one of ours."""
    raw = state.get_custom_status() if state.serialized_custom_status else None
    try:
        return from_wire(raw, Progress, "a run's progress") if isinstance(raw, dict) else None
    except DamagedData:
        return None


def summarize(state: dt_client.OrchestrationState) -> Summary[Any]:
    """How the run ended (or stands), whatever its fate: for printers and --json."""
    output = state.get_output() if state.serialized_output else None
    kind = state.name
    summary: Summary[Any]
    if isinstance(output, dict) and "files_total" in output:  # a summary, not what `cancel` left
        counts_type = RestoreCounts if kind == RESTORE_ORCHESTRATION else BackupCounts
        summary = summary_from_wire(output, counts_type, f"the summary of run {state.instance_id}")
    else:
        # no summary (yet): the counters come from the last custom status
        summary = Summary(kind=kind, counts=_counts_from(kind, progress_of(state)))
        summary.duration_s = round((state.last_updated_at - state.created_at).total_seconds(), 3)
    summary.kind, summary.instance_id, summary.runtime_status = kind, state.instance_id, status_name(state.runtime_status)
    if state.runtime_status == dt_client.OrchestrationStatus.TERMINATED:
        summary.cancelled = True  # `sitebackup cancel` is what terminates a run
    if state.failure_details is not None:
        summary.error = redact(state.failure_details.message)
        summary.error_type = state.failure_details.error_type
    waiting = waiting_status(state)
    if waiting is not None:
        summary.runtime_status, summary.resumable = "WAITING", True
        summary.error_type = waiting.error_type or ""
        summary.error = (f"{redact(waiting.error or '')}; the run is saved, resume with: "
                         f"sitebackup resume {state.instance_id}")
    return summary


def _counts_from(kind: str, status: Progress | None) -> BackupCounts | RestoreCounts:
    """A run's counters as its last progress status shows them: files done = uploaded + failed + unchanged for a
    backup, restored + failed + skipped for a restore."""
    s = status or Progress(phase="")
    if kind == RESTORE_ORCHESTRATION:
        return RestoreCounts(files_total=s.files_total, bytes_total=s.bytes_total, files_failed=s.files_failed,
                             files_skipped=s.files_skipped, files_done=s.files_done, bytes_done=s.bytes_done,
                             files_restored=s.files_done - s.files_failed - s.files_skipped,
                             bytes_restored=s.bytes_done - s.bytes_skipped)
    return BackupCounts(files_total=s.files_total, bytes_total=s.bytes_total, files_failed=s.files_failed,
                        files_skipped=s.files_skipped, files_unchanged=s.files_unchanged,
                        bytes_skipped=s.bytes_skipped,
                        files_uploaded=s.files_done - s.files_failed - s.files_unchanged,
                        bytes_uploaded=s.bytes_done - s.bytes_skipped)


def waiting_status(state: dt_client.OrchestrationState) -> Progress | None:
    """The custom status of a run parked until `resume` (see workflows.window), else None."""
    if state.runtime_status in TERMINAL:
        return None
    status = progress_of(state)
    return status if status is not None and status.phase == WAITING_PHASE else None


def last_progress(state: dt_client.OrchestrationState) -> datetime:
    """When the run last moved: the backend's last update of the instance (an episode applied, with
    its new custom status, or an event queued for it, such as an activity's result), in UTC."""
    stamp = state.last_updated_at
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def stalled_for(state: dt_client.OrchestrationState, stall_after: timedelta,
                now: datetime | None = None) -> timedelta | None:
    """How long an unfinished run has gone without progress, when that is longer than *stall_after*.

    A run parked until `resume` (destination failure) is waiting, not stalled."""
    if state.runtime_status in TERMINAL or waiting_status(state) is not None:
        return None
    idle = (now or datetime.now(timezone.utc)) - last_progress(state)
    return idle if idle > stall_after else None


def release_waiting(client: dt_client.TaskHubGrpcClient, instance_id: str) -> int | None:
    """Wake a run parked by a destination failure; returns the wait it released (to ignore), if any."""
    state = client.get_orchestration_state(instance_id)
    waiting = waiting_status(state) if state is not None else None
    if waiting is None:
        return None
    client.raise_orchestration_event(instance_id, RESUME_EVENT)
    return waiting.waits


def exit_code_for(summary: Summary[Any]) -> int:
    """The exit code of a command that ran or watched a run, from its summary."""
    if summary.detached:
        return EXIT_OK
    if summary.runtime_status == "COMPLETED":
        return EXIT_FILES_FAILED if summary.counts.files_failed else EXIT_OK
    if summary.cancelled:
        return EXIT_CANCELLED
    if summary.resumable or "DestinationError" in (summary.error_type or ""):
        return EXIT_DESTINATION
    return EXIT_FILES_FAILED


def watch(client: dt_client.TaskHubGrpcClient, instance_id: str, printer: Printer,
          on_poll: Callable[[], None] | None = None, *, stop_when_waiting: bool = True,
          released: int | None = None, runtime: Runtime | None = None) -> dt_client.OrchestrationState:
    """Feed the printer from custom status until the instance reaches a terminal state
    (or, with *stop_when_waiting*, parks waiting for `resume`; wait number *released* is one we woke).

    With the *runtime* whose embedded backend serves the run, the status is read when that backend
    changed it (``IDLE_READ_SECONDS`` at the latest), else polled."""
    delay = FIRST_POLL_SECONDS
    version = runtime.status_version(instance_id) if runtime is not None else None
    while True:
        if STOP_REQUESTED.is_set():
            raise KeyboardInterrupt
        if on_poll is not None:
            on_poll()
        state = client.get_orchestration_state(instance_id)
        if state is None:
            raise InputError(f"no run with id {instance_id!r}")
        status = progress_of(state)
        if status is not None:
            printer.progress(status)
        if state.runtime_status in TERMINAL:
            return state
        if stop_when_waiting:
            waiting = waiting_status(state)
            if waiting is not None and waiting.waits != released:
                return state
        if runtime is not None and version is not None:
            version = runtime.wait_status(instance_id, version, IDLE_READ_SECONDS)
        else:
            time.sleep(delay)
            delay = min(2 * delay, POLL_SECONDS)


def host_and_watch(runtime: Runtime, deps: ActivityDeps, instance_id: str,
                   printer: Printer, *, local_worker: bool = True,
                   on_poll: Callable[[], None] | None = None) -> Summary[Any]:
    """Run a worker in this process until *instance_id* finishes; Ctrl-C leaves it resumable.

    Without *local_worker* only watch: `sitebackup worker` processes elsewhere do the work.
    A state directory that stops taking writes (disk full) ends the watch with ``StateFullError``, a job lock
    *on_poll* finds lost with ``LockLost``."""

    def poll() -> None:
        runtime.check(instance_id)
        if on_poll is not None:
            on_poll()

    try:
        with runtime.connected() as client:
            released = release_waiting(client, instance_id)
            if local_worker:
                note = orphans_note(runtime, client, instance_id)
                if note is not None:
                    printer.message(note)
                runtime.start_worker(deps, run=instance_id)
            state = watch(client, instance_id, printer, on_poll=poll, stop_when_waiting=True, released=released,
                          runtime=runtime)
    except KeyboardInterrupt:
        printer.close()
        stop_now(runtime)
        raise Interrupted(instance_id) from None
    except SiteBackupError:  # a full state directory, a lost lock: the run stops here, saved
        printer.close()
        raise
    summary = summarize(state)
    printer.finish(summary)
    return summary


def orphans_note(runtime: Runtime, client: dt_client.TaskHubGrpcClient, instance_id: str) -> str | None:
    """One line naming the other unfinished runs of this state directory that no process works on (their process
    was killed), which this process leaves alone (``Runtime.start_worker``); None when there are none (or under
    the scheduler, which cannot tell). Asked before this process's own worker attaches."""
    if runtime.backend is None:
        return None
    query = dt_client.OrchestrationQuery(runtime_status=UNFINISHED)
    orphans = [state.instance_id for state in client.get_all_orchestration_states(query)
               if state.instance_id != instance_id and runtime.worker_attached(state.instance_id) is False]
    if not orphans:
        return None
    shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
    return (f"note: left for their own commands: {len(orphans)} unfinished run(s) no process works on ({shown}); "
            "each resumes with the next backup of its job, or: sitebackup resume ID")


def stop_now(runtime: Runtime) -> None:
    """Ctrl-C or SIGTERM: transfers waiting on --bwlimit end, the batches in flight are cut short and not recorded
    (they run again on resume), and the workers get a bounded time to end (``Runtime.interrupt``)."""
    bwlimit.stop_waits()
    runtime.interrupt()
    runtime.stop_workers()


def attach_and_watch(runtime: Runtime, deps: ActivityDeps, instance_id: str,
                     printer: Printer, lock: RunLock, job_lock: JobLock | None = None) -> Summary[Any]:
    """Show a run another live process hosts, without a worker of our own (no double work);
    host it ourselves only once no live process works on it any more (and, for a backup, once this
    process holds the job's lock in the container, which a dead host's lease gives up within a minute)."""
    hosting: list[bool] = []

    def take_over_if_orphaned() -> None:
        if hosting:
            if job_lock is not None:
                job_lock.check()
            return
        if lock.try_acquire() and not runtime.worker_attached(instance_id) and \
                (job_lock is None or job_lock.poll(run=instance_id, claim=claim_of(lock))):
            runtime.start_worker(deps, run=instance_id)
            hosting.append(True)

    return host_and_watch(runtime, deps, instance_id, printer, local_worker=False,
                          on_poll=take_over_if_orphaned)


class CancelCheck:
    """Answers "was this run cancelled?" from the backend: asked between files, so the answer is cached,
    and asked again once this process's backend applied a change to the run or after *interval*; with *fresh*
    (before a block range, which takes far longer than the question) asked again every time. A cancel of a run
    whose orchestration is idle is applied by the cancelling process's backend, which this one does not hear of."""

    def __init__(self, runtime: Runtime, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.checked: dict[str, tuple[float, int | None, bool]] = {}
        self.client: dt_client.TaskHubGrpcClient | None = None

    def __call__(self, run_id: str, fresh: bool = False) -> bool:
        if self.runtime.stopping.is_set():  # the process stops at once: as good as cancelled, for this process
            return True
        with self.lock:
            at, version, answer = self.checked.get(run_id, (float("-inf"), None, False))
            now = self.runtime.status_version(run_id)
            if answer or (not fresh and self.clock() - at < self.interval and now == version):
                return answer
            if self.client is None:
                # asked on the upload loop's thread too: a backend going away must answer at once, not after retries
                self.client = self.runtime.client(patient=False)
            try:
                state = self.client.get_orchestration_state(run_id, fetch_payloads=False)
            except Exception:  # backend going away: keep uploading, the lease decides
                return False
            answer = state is not None and state.runtime_status == dt_client.OrchestrationStatus.TERMINATED
            self.checked[run_id] = (self.clock(), now, answer)
            return answer


@contextmanager
def backup_job_lock(settings: StorageSettings, inp: BackupInput) -> Iterator[JobLock]:
    """The container lock of the job of a backup run this process may host, not taken yet: the caller takes it
    once it is going to schedule or host the run, and lets it go with ``release_run``. A run of an earlier
    version, without a job, is locked as the job its source and prefix make on this host."""
    job = inp.job or Job.of(host=host_name(), source=inp.source, prefix=inp.prefix)
    with lock_client(settings, inp.container) as client, job_lock(client, job, "backup") as lock:
        yield lock


def claim_of(lock: RunLock) -> Claim:
    """How the job lock of a run whose run lock this process holds is tied to it (``blob.lock.Claim``)."""
    return Claim(token=lock.token, ended=lock.previous)


def release_run(runtime: Runtime, lock: RunLock, job_lock: JobLock | None) -> None:
    """Let a run go, in this order: this process's workers stop, the job's lock in the container goes, then the
    run lock of the state directory, so that the process of this state directory that takes the run over or
    starts the next run finds the job's lock free."""
    runtime.stop_workers()
    if job_lock is not None:
        job_lock.release()
    lock.release()


def activity_deps(settings: StorageSettings, concurrency: Concurrency, runtime: Runtime,
                  job_lock: JobLock | None = None) -> ActivityDeps:
    """What this process's activities work with: its own storage credentials, the runtime's work store, and
    how much to do at once; they stop starting once the state directory fails or the *job_lock* this process
    took is lost."""
    service, label = make_service_client(settings)
    deps = ActivityDeps(container_client=service.get_container_client, work=runtime.work_store(service),
                        endpoint=label, concurrency=concurrency)
    start, ceiling = process_window(concurrency.requests, concurrency.most_requests)
    putter = AsyncPutter(settings, in_flight=start, most_in_flight=ceiling)
    putter.start()  # its client is made while the runtime starts the run, ready for the first page
    deps.put_many = putter.put_many
    deps.put_new = putter.put_new  # the seal's record pages, on the connections the uploads left open
    deps.get_many = AsyncGetter(putter).get_many  # the same loop, connection pool and window
    deps.held = putter.held  # and the same window for the requests of large files, sent from activity threads
    deps.cancelled = CancelCheck(runtime)
    deps.stopping = runtime.stopping.is_set
    deps.halted = runtime.fault if job_lock is None else lambda: runtime.fault() or job_lock.lost()
    return deps


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM, so the main thread of a long-running command (worker, serve) can
    stop cleanly and exit 0."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def end_process(code: int) -> NoReturn:
    """Exit with *code* once the command is done, without the interpreter's teardown.

    Freeing every object of a heap that holds gRPC, protobuf and both Azure SDKs costs about 0.2 s of CPU at
    each exit (measured: a third of a one-file backup's cost above a plain uploader) and writes nothing: by
    now the state database is closed and the run's records committed. Exit handlers still run (the
    ``--log-file`` flush, the aio session's close) and stdout/stderr are flushed, with the interpreter's own
    exit status 120 when that fails (a full disk under a redirected summary); while a non-daemon thread still
    runs, the normal exit is taken, which waits for it; not after a stop (exit 130), which has given its workers
    their bounded time (``stop_now``) already."""
    main = threading.main_thread()
    if code != EXIT_INTERRUPTED and any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:
            continue
        try:
            stream.flush()
        except OSError:
            code = 120
    os._exit(code)

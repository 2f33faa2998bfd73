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
from pathlib import Path
from typing import Any, NoReturn

from durabletask import client as dt_client

from sitebackup.blob.asyncget import AsyncGetter
from sitebackup.blob.asyncput import AsyncPutter
from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.blob.errors import redact
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
    StateFullError,
)
from sitebackup.ui.printers import Printer
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION, RESUME_EVENT, WAITING_PHASE
from sitebackup.workflows.types import BackupInput

# what is watched from elsewhere (`status --watch`, a run hosted by another process or by the scheduler's
# workers) is polled: each read is a request the serving process (or the scheduler) answers, so twice a
# second at most, after a quick start so that a small run is seen done within the first polls
POLL_SECONDS = 0.5
FIRST_POLL_SECONDS = 0.02  # doubling up to POLL_SECONDS
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
ENV_STALL_AFTER = "SITEBACKUP_STALL_AFTER"
DEFAULT_STALL_AFTER = "1h"  # a live run without progress for this long is reported stalled (--stall-after)


class Interrupted(SiteBackupError):
    exit_code = EXIT_INTERRUPTED

    def __init__(self, instance_id: str):
        super().__init__(f"interrupted; the run is saved, resume with: sitebackup resume {instance_id}")
        self.instance_id = instance_id


def new_instance_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def find_unfinished(client: dt_client.TaskHubGrpcClient, name: str,
                    same: Callable[[dict[str, Any]], bool]) -> str | None:
    """The id of an unfinished run of orchestration *name* whose input is the *same* run, if any."""
    query = dt_client.OrchestrationQuery(runtime_status=UNFINISHED, fetch_inputs_and_outputs=True)
    for state in client.get_all_orchestration_states(query):
        if state.name == name and (raw := run_input(state)) and same(raw):
            return state.instance_id
    return None


def run_input(state: dt_client.OrchestrationState) -> dict[str, Any]:
    """The run's input when it is a JSON object, else {}: a row may hold anything (or the marker of a
    payload too large to return), and one odd row must not break commands about the others."""
    try:
        raw = state.get_input() if state.serialized_input else None
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) else {}


def get_run(client: dt_client.TaskHubGrpcClient, instance_id: str) -> dt_client.OrchestrationState:
    state = client.get_orchestration_state(instance_id, fetch_payloads=True)
    if state is None:
        raise InputError(f"no run with id {instance_id!r} in this state directory or task hub")
    return state


def backup_run_input(client: dt_client.TaskHubGrpcClient, run_id: str, work: WorkStore | None = None) -> BackupInput:
    """The orchestration input of backup *run_id*: its source, container and prefix; an InputError naming
    the prune when *work* holds the run's pruned mark."""
    mark = work.pruned(run_id) if work is not None else None
    if mark is not None:
        raise InputError(f"run {run_id!r} was pruned on {mark.get('at', '?')[:19]} (sitebackup prune): "
                         "its record and the file versions only it needed are gone")
    state = get_run(client, run_id)
    if state.name != BACKUP_ORCHESTRATION or not state.serialized_input:
        raise InputError(f"run {run_id!r} is not a backup")
    return BackupInput.from_dict(state.get_input())


@dataclass(frozen=True)
class BackupRun:
    instance_id: str
    created_at: datetime  # UTC
    status: dt_client.OrchestrationStatus
    inp: BackupInput

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def backup_runs(client: dt_client.TaskHubGrpcClient, container: str, endpoint: str | None) -> list[BackupRun]:
    """Every backup run to *container* this backend knows, oldest first; runs recorded with another endpoint
    wrote to another account's container of that name and are left out."""
    query = dt_client.OrchestrationQuery(fetch_inputs_and_outputs=True)
    runs = []
    for state in client.get_all_orchestration_states(query):
        if state.name != BACKUP_ORCHESTRATION or not state.serialized_input:
            continue
        inp = BackupInput.from_dict(state.get_input())
        if inp.container != container or (inp.endpoint and endpoint and inp.endpoint != endpoint):
            continue
        created = state.created_at if state.created_at.tzinfo else state.created_at.replace(tzinfo=timezone.utc)
        runs.append(BackupRun(state.instance_id, created, state.runtime_status, inp))
    return sorted(runs, key=lambda run: run.created_at)


def summarize(state: dt_client.OrchestrationState) -> dict[str, Any]:
    """One flat dict for printers and --json, whatever the instance's fate."""
    output = state.get_output() if state.serialized_output else None
    kind = state.name
    verb = "restored" if kind == RESTORE_ORCHESTRATION else "uploaded"
    summary: dict[str, Any] = {
        "instance_id": state.instance_id, "kind": kind, "runtime_status": state.runtime_status.name,
        "files_total": 0, f"files_{verb}": 0, "files_skipped": 0, "files_failed": 0,
        "bytes_total": 0, f"bytes_{verb}": 0, "duration_s": 0.0,
    }
    if isinstance(output, dict):  # a summary, or what `cancel` left ({"cancelled": true})
        summary.update(output)
    if not isinstance(output, dict) or "files_total" not in output:
        # no summary (yet): the counters come from the last custom status
        status = state.get_custom_status() if state.serialized_custom_status else None
        if isinstance(status, dict):
            unchanged, skipped_bytes = status.get("files_unchanged", 0), status.get("bytes_skipped", 0)
            summary.update({key: status.get(key, 0) for key in ("files_total", "bytes_total", "files_failed",
                                                                  "files_skipped")})
            # files done = uploaded + failed + unchanged for a backup, restored + failed + skipped for a restore
            not_done = unchanged if kind == BACKUP_ORCHESTRATION else summary["files_skipped"]
            summary.update({f"bytes_{verb}": status.get("bytes_done", 0) - skipped_bytes,
                            f"files_{verb}": status.get("files_done", 0) - summary["files_failed"] - not_done})
            if kind == BACKUP_ORCHESTRATION:
                summary.update(files_unchanged=unchanged, bytes_skipped=skipped_bytes)
        summary["duration_s"] = round((state.last_updated_at - state.created_at).total_seconds(), 3)
    if state.runtime_status == dt_client.OrchestrationStatus.TERMINATED:
        summary["cancelled"] = True  # `sitebackup cancel` is what terminates a run
    if state.failure_details is not None:
        summary["error"] = redact(state.failure_details.message)
        summary["error_type"] = state.failure_details.error_type
    waiting = waiting_status(state)
    if waiting is not None:
        summary.update(runtime_status="WAITING", resumable=True, error_type=waiting.get("error_type", ""),
                       error=f"{redact(waiting.get('error', ''))}; the run is saved, resume with: "
                             f"sitebackup resume {state.instance_id}")
    return summary


def waiting_status(state: dt_client.OrchestrationState) -> dict[str, Any] | None:
    """The custom status of a run parked until `resume` (see workflows.window), else None."""
    if state.runtime_status in TERMINAL or not state.serialized_custom_status:
        return None
    status = state.get_custom_status()
    return status if isinstance(status, dict) and status.get("phase") == WAITING_PHASE else None


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
    return waiting.get("waits")


def exit_code_for(summary: dict[str, Any]) -> int:
    """The exit code of a command that ran or watched a run, from its summary."""
    if summary.get("detached"):
        return EXIT_OK
    if summary["runtime_status"] == "COMPLETED":
        return EXIT_FILES_FAILED if summary.get("files_failed") else EXIT_OK
    if summary.get("cancelled"):
        return EXIT_CANCELLED
    if summary.get("resumable") or "DestinationError" in (summary.get("error_type") or ""):
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
        if on_poll is not None:
            on_poll()
        state = client.get_orchestration_state(instance_id)
        if state is None:
            raise InputError(f"no run with id {instance_id!r}")
        if state.serialized_custom_status:
            status = state.get_custom_status()
            if isinstance(status, dict):
                printer.progress(status)
        if state.runtime_status in TERMINAL:
            return state
        if stop_when_waiting:
            waiting = waiting_status(state)
            if waiting is not None and waiting.get("waits") != released:
                return state
        if runtime is not None and version is not None:
            version = runtime.wait_status(instance_id, version, IDLE_READ_SECONDS)
        else:
            time.sleep(delay)
            delay = min(2 * delay, POLL_SECONDS)


def host_and_watch(runtime: Runtime, deps: ActivityDeps, concurrency: int, instance_id: str,
                   printer: Printer, *, local_worker: bool = True,
                   on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run a worker in this process until *instance_id* finishes; Ctrl-C leaves it resumable.

    Without *local_worker* only watch: `sitebackup worker` processes elsewhere do the work.
    A state directory that stops taking writes (disk full) ends the watch with ``StateFullError``."""

    def poll() -> None:
        runtime.check(instance_id)
        if on_poll is not None:
            on_poll()

    try:
        with runtime.connected() as client:
            released = release_waiting(client, instance_id)
            if local_worker:
                runtime.start_worker(deps, concurrency)
            state = watch(client, instance_id, printer, on_poll=poll, stop_when_waiting=True, released=released,
                          runtime=runtime)
    except KeyboardInterrupt:
        printer.close()
        runtime.stop_workers()
        raise Interrupted(instance_id) from None
    except StateFullError:
        printer.close()
        raise
    summary = summarize(state)
    printer.finish(summary)
    return summary


def attach_and_watch(runtime: Runtime, deps: ActivityDeps, concurrency: int, instance_id: str,
                     printer: Printer, lock: RunLock) -> dict[str, Any]:
    """Show a run another live process hosts, without a worker of our own (no double work);
    host it ourselves only once no live process works on it any more."""
    hosting: list[bool] = []

    def take_over_if_orphaned() -> None:
        if not hosting and lock.try_acquire() and not runtime.worker_attached(instance_id):
            runtime.start_worker(deps, concurrency)
            hosting.append(True)

    return host_and_watch(runtime, deps, concurrency, instance_id, printer, local_worker=False,
                          on_poll=take_over_if_orphaned)


class CancelCheck:
    """Answers "was this run cancelled?" from the backend: asked between files, so the answer is cached,
    and asked again once this process's backend applied a change to the run or after *interval*."""

    def __init__(self, runtime: Runtime, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.checked: dict[str, tuple[float, int | None, bool]] = {}
        self.client: dt_client.TaskHubGrpcClient | None = None

    def __call__(self, run_id: str) -> bool:
        with self.lock:
            at, version, answer = self.checked.get(run_id, (float("-inf"), None, False))
            now = self.runtime.status_version(run_id)
            if answer or (self.clock() - at < self.interval and now == version):
                return answer
            if self.client is None:
                self.client = self.runtime.client()
            try:
                state = self.client.get_orchestration_state(run_id, fetch_payloads=False)
            except Exception:  # backend going away: keep uploading, the lease decides
                return False
            answer = state is not None and state.runtime_status == dt_client.OrchestrationStatus.TERMINATED
            self.checked[run_id] = (self.clock(), now, answer)
            return answer


def activity_deps(settings: StorageSettings, state_dir: Path, concurrency: int, runtime: Runtime) -> ActivityDeps:
    """What this process's activities work with: its own storage credentials and the runtime's work store."""
    service, label = make_service_client(settings, pool_size=2 * concurrency + 8)
    deps = ActivityDeps(container_client=service.get_container_client, work=runtime.work_store(service),
                        endpoint=label)
    putter = AsyncPutter(settings, in_flight=2 * concurrency)
    putter.start()  # its client is made while the runtime starts the run, ready for the first page
    deps.put_many = putter.put_many
    deps.get_many = AsyncGetter(putter).get_many  # the same loop, connection pool and window
    deps.cancelled = CancelCheck(runtime)
    deps.halted = runtime.fault
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
    runs, the normal exit is taken, which waits for it."""
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
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

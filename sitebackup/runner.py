"""Running a backup: validate, pre-flight the destination, schedule or re-attach, host the worker, watch.

The CLI calls one function here per command and renders what it returns; this module never
prints directly, it hands data to a ``Printer``.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from durabletask import client as dt_client

from sitebackup import blocks, incremental, storage
from sitebackup.activities import ActivityDeps
from sitebackup.asyncput import AsyncPutter
from sitebackup.errors import (
    EXIT_DESTINATION,
    EXIT_FILES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AlreadyRunningError,
    InputError,
    SiteBackupError,
)
from sitebackup.orchestrations import BACKUP_ORCHESTRATION, DEFAULT_WINDOW, RESUME_EVENT, WAITING_PHASE, destination_label
from sitebackup.progress import Printer
from sitebackup.runlock import RunLock
from sitebackup.runtime import Runtime, open_backend
from sitebackup.taskhub import TaskHubSettings
from sitebackup.workstore import WorkStore

# polls are cheap local RPCs; a short period ends the run sooner after its last activity
POLL_SECONDS = 0.1
FIRST_POLL_SECONDS = 0.02  # doubling up to POLL_SECONDS: a small run is done within the first polls
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


class Interrupted(SiteBackupError):
    exit_code = EXIT_INTERRUPTED

    def __init__(self, instance_id: str):
        super().__init__(f"interrupted; the backup is saved, resume with: sitebackup resume {instance_id}")
        self.instance_id = instance_id


@dataclass
class BackupRequest:
    source: Path
    container: str
    prefix: str = ""
    concurrency: int = DEFAULT_WINDOW
    state_dir: Path = field(default_factory=Path)
    compare: str = incremental.MODE_MTIME  # or checksum / force
    patterns: list[str] = field(default_factory=list)  # gitignore-style, see filters.py
    follow_symlinks: bool = False
    no_wait: bool = False
    block_size: int = blocks.DEFAULT_BLOCK_SIZE  # files over blocks.threshold(this) go up as block ranges

    def orchestration_input(self, endpoint: str) -> dict[str, Any]:
        # paths and options only: this is stored durably, so never a credential
        return {"source": str(self.source), "container": self.container, "prefix": self.prefix,
                "endpoint": endpoint, "options": {"concurrency": self.concurrency, "compare": self.compare,
                                                  "patterns": self.patterns,
                                                  "follow_symlinks": self.follow_symlinks,
                                                  "block_size": self.block_size}}


def validate_request(source: str | Path, container: str, prefix: str | None, concurrency: int,
                     state_dir: Path) -> BackupRequest:
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"source {str(source)!r} does not exist")
    if not path.is_dir():
        raise InputError(f"source {str(source)!r} is not a directory")
    if concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    return BackupRequest(source=path.resolve(), container=storage.validate_container_name(container),
                         prefix=storage.normalize_prefix(prefix), concurrency=concurrency, state_dir=state_dir)


def new_instance_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def find_unfinished(client: dt_client.TaskHubGrpcClient, inp: dict[str, Any]) -> str | None:
    """The id of an unfinished backup of the same source to the same destination, if any."""
    query = dt_client.OrchestrationQuery(runtime_status=UNFINISHED, fetch_inputs_and_outputs=True)
    for state in client.get_all_orchestration_states(query):
        if state.name != BACKUP_ORCHESTRATION or not state.serialized_input:
            continue
        other = state.get_input() or {}
        if all(other.get(k) == inp[k] for k in ("source", "container", "prefix")):
            return state.instance_id
    return None


def summarize(state: dt_client.OrchestrationState) -> dict[str, Any]:
    """One flat dict for printers and --json, whatever the instance's fate."""
    output = state.get_output() if state.serialized_output else None
    summary: dict[str, Any] = {
        "instance_id": state.instance_id,
        "runtime_status": state.runtime_status.name,
        "files_total": 0, "files_uploaded": 0, "files_skipped": 0, "files_failed": 0,
        "bytes_total": 0, "bytes_uploaded": 0, "duration_s": 0.0,
    }
    if isinstance(output, dict):
        summary.update(output)
    else:
        status = state.get_custom_status() if state.serialized_custom_status else None
        if isinstance(status, dict):
            summary.update(files_total=status.get("files_total", 0), bytes_total=status.get("bytes_total", 0),
                           files_failed=status.get("files_failed", 0), files_skipped=status.get("files_skipped", 0),
                           files_unchanged=status.get("files_unchanged", 0),
                           bytes_skipped=status.get("bytes_skipped", 0),
                           bytes_uploaded=status.get("bytes_done", 0) - status.get("bytes_skipped", 0),
                           files_uploaded=status.get("files_done", 0) - status.get("files_failed", 0)
                           - status.get("files_unchanged", 0))
        summary["duration_s"] = round((state.last_updated_at - state.created_at).total_seconds(), 3)
    if state.failure_details is not None:
        summary["error"] = storage.redact(state.failure_details.message)
        summary["error_type"] = state.failure_details.error_type
    waiting = waiting_status(state)
    if waiting is not None:
        summary.update(runtime_status="WAITING", resumable=True, error_type=waiting.get("error_type", ""),
                       error=f"{storage.redact(waiting.get('error', ''))}; the run is saved, resume with: "
                             f"sitebackup resume {state.instance_id}")
    return summary


def waiting_status(state: dt_client.OrchestrationState) -> dict[str, Any] | None:
    """The custom status of a run parked until `resume` (see orchestrations.WAITING_PHASE), else None."""
    if state.runtime_status in TERMINAL or not state.serialized_custom_status:
        return None
    status = state.get_custom_status()
    return status if isinstance(status, dict) and status.get("phase") == WAITING_PHASE else None


def release_waiting(client: dt_client.TaskHubGrpcClient, instance_id: str) -> int | None:
    """Wake a run parked by a destination failure; returns the wait it released (to ignore), if any."""
    state = client.get_orchestration_state(instance_id)
    waiting = waiting_status(state) if state is not None else None
    if waiting is None:
        return None
    client.raise_orchestration_event(instance_id, RESUME_EVENT)
    return waiting.get("waits")


def exit_code_for(summary: dict[str, Any]) -> int:
    if summary.get("detached"):
        return EXIT_OK
    if summary["runtime_status"] == "COMPLETED":
        return EXIT_FILES_FAILED if summary.get("files_failed") else EXIT_OK
    if "DestinationError" in (summary.get("error_type") or "") or "DestinationError" in (summary.get("error") or ""):
        return EXIT_DESTINATION
    if summary.get("resumable"):
        return EXIT_DESTINATION
    return EXIT_FILES_FAILED


def watch(client: dt_client.TaskHubGrpcClient, instance_id: str, printer: Printer,
          on_poll: Callable[[], None] | None = None, *, stop_when_waiting: bool = True,
          released: int | None = None) -> dt_client.OrchestrationState:
    """Feed the printer from custom status until the instance reaches a terminal state
    (or, with *stop_when_waiting*, parks waiting for `resume`; wait number *released* is one we woke)."""
    delay = FIRST_POLL_SECONDS
    while True:
        if on_poll is not None:
            on_poll()
        state = client.get_orchestration_state(instance_id)
        if state is None:
            raise InputError(f"no backup with id {instance_id!r}")
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
        time.sleep(delay)
        delay = min(2 * delay, POLL_SECONDS)


def host_and_watch(runtime: Runtime, deps: ActivityDeps, concurrency: int, instance_id: str,
                   printer: Printer, *, local_worker: bool = True,
                   on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run a worker in this process until *instance_id* finishes; Ctrl-C leaves it resumable.

    Without *local_worker* only watch: `sitebackup worker` processes elsewhere do the work."""
    client = runtime.client()
    try:
        released = release_waiting(client, instance_id)
        if local_worker:
            runtime.start_worker(deps, concurrency)
        state = watch(client, instance_id, printer, on_poll=on_poll, stop_when_waiting=True, released=released)
    except KeyboardInterrupt:
        printer.close()
        runtime.stop_workers()
        raise Interrupted(instance_id) from None
    finally:
        client.close()
    summary = summarize(state)
    printer.finish(summary)
    return summary


class CancelCheck:
    """Answers "was this run cancelled?" from the backend, asking at most once a second per run."""

    def __init__(self, runtime: Runtime, interval: float = 1.0):
        self.runtime = runtime
        self.interval = interval
        self.lock = threading.Lock()
        self.checked: dict[str, tuple[float, bool]] = {}
        self.client: dt_client.TaskHubGrpcClient | None = None

    def __call__(self, run_id: str) -> bool:
        with self.lock:
            at, answer = self.checked.get(run_id, (0.0, False))
            if answer or time.monotonic() - at < self.interval:
                return answer
            if self.client is None:
                self.client = self.runtime.client()
            try:
                state = self.client.get_orchestration_state(run_id, fetch_payloads=False)
            except Exception:  # backend going away: keep uploading, the lease decides
                return False
            answer = state is not None and state.runtime_status == dt_client.OrchestrationStatus.TERMINATED
            self.checked[run_id] = (time.monotonic(), answer)
            return answer


def activity_deps(settings: storage.StorageSettings, state_dir: Path, concurrency: int,
                  runtime: Runtime | None = None) -> ActivityDeps:
    service, label = storage.make_service_client(settings, pool_size=2 * concurrency + 8)
    work = runtime.work_store(service) if runtime is not None else WorkStore(state_dir / "work")
    deps = ActivityDeps(container_client=service.get_container_client, work=work, endpoint=label)
    deps.put_many = AsyncPutter(settings, in_flight=2 * concurrency).put_many
    if runtime is not None:
        deps.cancelled = CancelCheck(runtime)
    return deps


def run_backup(request: BackupRequest, settings: storage.StorageSettings, printer: Printer, *,
               taskhub: TaskHubSettings | None = None, local_worker: bool = True,
               detach: bool = False) -> dict[str, Any]:
    """Schedule or resume, then host a worker and watch (or only watch, or with *detach* only schedule)."""
    if not settings.configured:
        raise InputError(storage.NOT_CONFIGURED)
    endpoint = storage.connect(settings, request.container)
    inp = request.orchestration_input(endpoint)
    lock = RunLock.for_backup(request.state_dir, inp)
    with open_backend(request.state_dir, taskhub) as runtime:
        client = runtime.client()
        try:
            instance_id, live = claim_or_find(client, runtime, inp, lock)
            if live and request.no_wait:
                lock.release()
                raise AlreadyRunningError(f"the same backup is already running as {instance_id}", instance_id)
            resumed = instance_id is not None
            if instance_id is None:
                work = activity_deps(settings, request.state_dir, request.concurrency, runtime).work
                inp["baseline"] = (None if request.compare == incremental.MODE_FORCE else
                                   incremental.find_baseline(client, inp, work, BACKUP_ORCHESTRATION))
                instance_id = client.schedule_new_orchestration(BACKUP_ORCHESTRATION, input=inp,
                                                                instance_id=new_instance_id())
        finally:
            client.close()
        try:
            printer.start({"instance_id": instance_id, "source": inp["source"],
                           "destination": destination_label(inp), "endpoint": endpoint, "resumed": resumed,
                           "attached": live})
            if detach:
                return {"instance_id": instance_id, "runtime_status": "SCHEDULED", "detached": True}
            deps = activity_deps(settings, request.state_dir, request.concurrency, runtime)
            if live and local_worker:
                return attach_and_watch(runtime, deps, request.concurrency, instance_id, printer, lock)
            return host_and_watch(runtime, deps, request.concurrency, instance_id, printer, local_worker=local_worker)
        finally:
            lock.release()


def claim_or_find(client: dt_client.TaskHubGrpcClient, runtime: Runtime, inp: dict[str, Any],
                  lock: RunLock) -> tuple[str | None, bool]:
    """(unfinished instance id or None, whether a live process works on it).

    Holding *lock* makes this process the one that schedules or resumes; when another live
    process holds it, wait until that process has scheduled its instance (or let go).
    """
    while True:
        owner = lock.try_acquire()
        instance_id = find_unfinished(client, inp)
        if owner:
            # another kind of process (a worker, a dying one whose leases still run) may hold the work
            return instance_id, bool(instance_id and runtime.worker_attached(instance_id))
        if instance_id is not None:
            return instance_id, True
        time.sleep(POLL_SECONDS)


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

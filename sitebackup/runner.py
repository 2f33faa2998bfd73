"""Running a backup: validate, pre-flight the destination, schedule or re-attach, host the worker, watch.

The CLI calls one function here per command and renders what it returns; this module never
prints directly, it hands data to a ``Printer``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from durabletask import client as dt_client

from sitebackup import storage
from sitebackup.activities import ActivityDeps
from sitebackup.errors import (
    EXIT_DESTINATION,
    EXIT_FILES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    SiteBackupError,
)
from sitebackup.orchestrations import BACKUP_ORCHESTRATION, DEFAULT_WINDOW, destination_label
from sitebackup.progress import Printer
from sitebackup.runtime import Runtime, open_backend
from sitebackup.workstore import WorkStore

POLL_SECONDS = 0.25
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

    def orchestration_input(self, endpoint: str) -> dict[str, Any]:
        # paths and options only: this is stored durably, so never a credential
        return {"source": str(self.source), "container": self.container, "prefix": self.prefix,
                "endpoint": endpoint, "options": {"concurrency": self.concurrency}}


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
                           bytes_uploaded=status.get("bytes_done", 0),
                           files_uploaded=status.get("files_done", 0) - status.get("files_failed", 0))
        summary["duration_s"] = round((state.last_updated_at - state.created_at).total_seconds(), 3)
    if state.failure_details is not None:
        summary["error"] = storage.redact(state.failure_details.message)
        summary["error_type"] = state.failure_details.error_type
    return summary


def exit_code_for(summary: dict[str, Any]) -> int:
    if summary["runtime_status"] == "COMPLETED":
        return EXIT_FILES_FAILED if summary.get("files_failed") else EXIT_OK
    if "DestinationError" in (summary.get("error_type") or "") or "DestinationError" in (summary.get("error") or ""):
        return EXIT_DESTINATION
    return EXIT_FILES_FAILED


def watch(client: dt_client.TaskHubGrpcClient, instance_id: str, printer: Printer) -> dt_client.OrchestrationState:
    """Feed the printer from custom status until the instance reaches a terminal state."""
    while True:
        state = client.get_orchestration_state(instance_id)
        if state is None:
            raise InputError(f"no backup with id {instance_id!r}")
        if state.serialized_custom_status:
            status = state.get_custom_status()
            if isinstance(status, dict):
                printer.progress(status)
        if state.runtime_status in TERMINAL:
            return state
        time.sleep(POLL_SECONDS)


def host_and_watch(runtime: Runtime, deps: ActivityDeps, concurrency: int, instance_id: str,
                   printer: Printer) -> dict[str, Any]:
    """Run a worker in this process until *instance_id* finishes; Ctrl-C leaves it resumable."""
    client = runtime.client()
    try:
        runtime.start_worker(deps, concurrency)
        state = watch(client, instance_id, printer)
    except KeyboardInterrupt:
        printer.close()
        runtime.stop_workers()
        raise Interrupted(instance_id) from None
    finally:
        client.close()
    summary = summarize(state)
    printer.finish(summary)
    return summary


def activity_deps(settings: storage.StorageSettings, state_dir: Path, concurrency: int) -> ActivityDeps:
    service, label = storage.make_service_client(settings, pool_size=2 * concurrency + 8)
    return ActivityDeps(container_client=service.get_container_client, work=WorkStore(state_dir / "work"),
                        endpoint=label)


def run_backup(request: BackupRequest, settings: storage.StorageSettings, printer: Printer) -> dict[str, Any]:
    if not settings.configured:
        raise InputError(storage.NOT_CONFIGURED)
    endpoint = storage.connect(settings, request.container)
    inp = request.orchestration_input(endpoint)
    with open_backend(request.state_dir) as runtime:
        client = runtime.client()
        try:
            instance_id = find_unfinished(client, inp)
            resumed = instance_id is not None
            if instance_id is None:
                instance_id = client.schedule_new_orchestration(BACKUP_ORCHESTRATION, input=inp,
                                                                instance_id=new_instance_id())
        finally:
            client.close()
        printer.start({"instance_id": instance_id, "source": inp["source"], "destination": destination_label(inp),
                       "endpoint": endpoint, "resumed": resumed})
        return host_and_watch(runtime, activity_deps(settings, request.state_dir, request.concurrency), request.concurrency,
                              instance_id, printer)

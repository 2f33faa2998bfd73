"""Managing recorded runs from any terminal: status, list, resume, cancel and purge.

Each function opens the durable backend (the state directory's embedded one, or the Durable Task
Scheduler task hub given as *taskhub*), asks the standard durabletask client, and returns plain
data for the CLI to render.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, connect, make_service_client
from sitebackup.blob.errors import redact
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.hosting import (
    TERMINAL,
    UNFINISHED,
    activity_deps,
    attach_and_watch,
    get_run,
    host_and_watch,
    last_progress,
    progress_of,
    run_label,
    stalled_for,
    summarize,
    watch,
)
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import Runtime, open_backend, open_client, peek_run_ids
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError
from sitebackup.model.codec import DamagedData, from_wire
from sitebackup.model.reports import Failure, PurgeReport, RunInfo, RunRow, RunStart
from sitebackup.model.work import BackupInput, Concurrency, RestoreInput, Summary
from sitebackup.ui.printers import Printer
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise InputError(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30d, 12h, 90s")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


# which runs each command can take, for shell completion
RUNS_FOR = {
    "any": ((), ()),
    "unfinished": ((BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION), tuple(s.value for s in UNFINISHED)),
    "backups": ((BACKUP_ORCHESTRATION,), (dt_client.OrchestrationStatus.COMPLETED.value,)),
}


def complete_run_ids(state_dir: Path, prefix: str, runs: str) -> list[str]:
    """Ids of the state directory's *runs* (a ``RUNS_FOR`` key) starting with *prefix*, newest first."""
    names, statuses = RUNS_FOR[runs]
    return peek_run_ids(state_dir, prefix, names=names, statuses=statuses)


def describe(runtime: Runtime, state: dt_client.OrchestrationState,
             stall_after: timedelta | None = None) -> RunInfo:
    """Everything ``status`` shows; an unfinished run idle for longer than *stall_after* is ``stalled``."""
    label = run_label(state)
    info = RunInfo(
        instance_id=state.instance_id,
        kind=state.name,
        runtime_status=state.runtime_status.name,
        source=label.source if label else None,
        # a restore's destination is its directory; a backup's is its container and prefix
        destination=label.destination if label else None,
        endpoint=label.endpoint if label else None,
        custom_status=progress_of(state),
        output=state.get_output() if state.serialized_output else None,
        created_at=state.created_at.isoformat(),
        last_updated_at=state.last_updated_at.isoformat(),
        duration_s=round((state.last_updated_at - state.created_at).total_seconds(), 3),
        last_progress_at=last_progress(state).isoformat(),
    )
    if state.failure_details is not None:
        info.failure = Failure(state.failure_details.error_type, redact(state.failure_details.message))
    if state.runtime_status not in TERMINAL:
        info.worker_attached = runtime.worker_attached(state.instance_id)
        now = datetime.now(timezone.utc)
        info.idle_s = round((now - last_progress(state)).total_seconds(), 1)
        if stall_after is not None:
            info.stalled = stalled_for(state, stall_after, now) is not None
    return info


def status(state_dir: Path, instance_id: str, taskhub: TaskHubSettings | None = None,
           stall_after: timedelta | None = None) -> RunInfo:
    with open_client(state_dir, taskhub) as (runtime, client):
        return describe(runtime, get_run(client, instance_id), stall_after)


def watch_status(state_dir: Path, instance_id: str, printer: Printer,
                 taskhub: TaskHubSettings | None = None) -> Summary[Any]:
    """Draw progress until the run finishes, whoever works on it."""
    with open_client(state_dir, taskhub) as (_runtime, client):
        get_run(client, instance_id)
        summary = summarize(watch(client, instance_id, printer))
    printer.finish(summary)
    return summary


def list_runs(state_dir: Path, *, statuses: list[str] | None = None, limit: int = 20,
              taskhub: TaskHubSettings | None = None) -> list[RunRow]:
    wanted = [dt_client.OrchestrationStatus[s.upper()] for s in statuses] if statuses else None
    with open_client(state_dir, taskhub) as (runtime, client):
        # under the scheduler records are blobs, and `list` takes no storage credentials: status alone answers
        work = runtime.work_store(None) if taskhub is None else None
        query = dt_client.OrchestrationQuery(runtime_status=wanted, fetch_inputs_and_outputs=True)
        states = client.get_all_orchestration_states(query)
        states.sort(key=lambda s: s.created_at, reverse=True)
        rows = []
        for state in states[:limit]:
            info = describe(runtime, state)
            # a summary holds the counters; a cancelled or live run's output does not: its last status shows
            # how far it got
            ended = isinstance(info.output, dict) and "files_total" in info.output
            counts = summarize(state).counts
            progress = info.custom_status
            rows.append(RunRow(
                instance_id=info.instance_id, kind=info.kind, runtime_status=info.runtime_status,
                restorable=restorable(state, work), source=info.source, destination=info.destination,
                files=counts.files_copied if ended or progress is None else progress.files_done,
                files_total=counts.files_total,
                bytes=counts.bytes_copied if ended or progress is None else progress.bytes_done,
                created_at=info.created_at, duration_s=info.duration_s, worker_attached=info.worker_attached))
        return rows


def restorable(state: dt_client.OrchestrationState, work: WorkStore | None) -> str | None:
    """Whether ``restore ID`` can bring a backup run back: "yes" (completed, kept by every prune so far),
    "partial" (failed or cancelled: the files it recorded), "pruned" (a prune is removing it), "no"
    (unfinished, or its record is gone); None for a restore."""
    if state.name != BACKUP_ORCHESTRATION:
        return None
    if work is not None and work.pruned(state.instance_id) is not None:
        return "pruned"
    if state.runtime_status not in TERMINAL or (work is not None and not work.has_results(state.instance_id)
                                                and state.runtime_status != dt_client.OrchestrationStatus.COMPLETED):
        return "no"
    return "yes" if state.runtime_status == dt_client.OrchestrationStatus.COMPLETED else "partial"


def resume(state_dir: Path, instance_id: str, settings: StorageSettings, printer: Printer,
           taskhub: TaskHubSettings | None = None) -> Summary[Any]:
    """Host a worker until *instance_id* finishes (or just watch, if a live process already works on it).

    Under the scheduler nobody can tell whether workers are attached, so this host always joins in:
    the scheduler hands each work item to one worker, so joining never doubles work."""
    with open_backend(state_dir, taskhub) as runtime:
        with runtime.connected() as client:
            state = get_run(client, instance_id)
        info = describe(runtime, state)
        printer.start(RunStart(instance_id=instance_id, source=info.source or "", destination=info.destination or "",
                               endpoint=info.endpoint, resumed=True))
        if state.runtime_status in TERMINAL:
            summary = summarize(state)
            printer.finish(summary)
            return summary
        inp = _run_input(state)
        connect(settings.require(), inp.container)
        deps = activity_deps(settings, Concurrency(inp.options.concurrency), runtime)
        # a restore's "source" is its label: the lock key stays distinct from every backup's
        lock = RunLock.for_backup(state_dir, inp.source, inp.container, inp.prefix)
        try:
            if lock.try_acquire() and not runtime.worker_attached(instance_id):
                return host_and_watch(runtime, deps, instance_id, printer)
            # a live process hosts it (or a dead one's leases have not run out yet): watch, and
            # take over once nobody works on it
            printer.message("another process is working on this run; showing its progress")
            return attach_and_watch(runtime, deps, instance_id, printer, lock)
        finally:
            lock.release()


def _run_input(state: dt_client.OrchestrationState) -> BackupInput | RestoreInput:
    """The whole input of an unfinished run, to host it."""
    kind = BackupInput if state.name == BACKUP_ORCHESTRATION else RestoreInput
    try:
        raw = state.get_input() if state.serialized_input else None
        if raw is None:
            raise ValueError("no input")
        return from_wire(raw, kind, f"the input of run {state.instance_id}")
    except (ValueError, DamagedData):
        raise InputError(f"run {state.instance_id!r} has no input sitebackup can resume") from None


def cancel(state_dir: Path, instance_id: str, taskhub: TaskHubSettings | None = None) -> str:
    """Terminate the run; returns its status before cancelling."""
    with open_client(state_dir, taskhub) as (_runtime, client):
        state = get_run(client, instance_id)
        if state.runtime_status not in TERMINAL:
            client.terminate_orchestration(instance_id, output={"cancelled": True}, recursive=True)
        return state.runtime_status.name


def purge(state_dir: Path, older_than: timedelta, taskhub: TaskHubSettings | None = None,
          settings: StorageSettings | None = None) -> PurgeReport:
    """Remove finished runs created before now - *older_than*, with their run records; completed backups
    are left to ``prune``, whose keep rules decide how long they stay restorable.

    Under the scheduler the records are blobs in each run's container, removed only when *settings*
    reach the storage account; ``records_kept`` says when they were left in place."""
    cutoff = datetime.now(timezone.utc) - older_than
    with open_backend(state_dir, taskhub) as runtime:
        service = None
        if taskhub is not None and settings is not None and settings.configured:
            service, _label = make_service_client(settings)
        client = runtime.client()
        try:
            query = dt_client.OrchestrationQuery(created_time_to=cutoff, runtime_status=list(TERMINAL))
            states = client.get_all_orchestration_states(query)
            backups = [s.instance_id for s in states if s.name == BACKUP_ORCHESTRATION
                       and s.runtime_status == dt_client.OrchestrationStatus.COMPLETED]
            ids = [s.instance_id for s in states if s.instance_id not in backups]
            work = runtime.work_store(service) if taskhub is None or service is not None else None
            for instance_id in ids:
                if work is not None:
                    # before the purge: the blob store finds the container through the run's input
                    try:
                        work.remove(instance_id)
                    except ResourceNotFoundError:  # the container itself is gone
                        pass
                client.purge_orchestration(instance_id, recursive=True)
            return PurgeReport(purged=ids, records_kept=work is None, backups_kept=backups)
        finally:
            client.close()
            if service is not None:
                service.close()

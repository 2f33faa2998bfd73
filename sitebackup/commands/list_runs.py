"""The list command: recent runs of the state directory or task hub, newest first, and whether each backup
can still be restored."""

from __future__ import annotations

import json
from pathlib import Path

import click
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.naming import normalize_prefix, validate_container_name
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.catalog import of_prefix, parse_utc, sealed_runs
from sitebackup.commands.hosting import TERMINAL, parse_status, run_label, summarize
from sitebackup.commands.options import (
    Command,
    debug_option,
    json_option,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.commands.status import describe
from sitebackup.durable.runtime import open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import RunRow
from sitebackup.ui import render
from sitebackup.workflows.names import BACKUP_ORCHESTRATION


def list_runs(state_dir: Path, *, statuses: list[str] | None = None, limit: int = 20,
              taskhub: TaskHubSettings | None = None) -> list[RunRow]:
    wanted = [parse_status(s) for s in statuses] if statuses else None
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
            label = run_label(state)
            rows.append(RunRow(
                instance_id=info.instance_id, job=label.job.name if label and label.job else None, kind=info.kind,
                runtime_status=info.runtime_status,
                restorable=restorable(state, work), source=info.source, destination=info.destination,
                files=counts.files_copied if ended or progress is None else progress.files_done,
                files_total=counts.files_total,
                bytes=counts.bytes_copied if ended or progress is None else progress.bytes_done,
                created_at=info.created_at, duration_s=info.duration_s, worker_attached=info.worker_attached))
        return rows


def list_sealed(settings: StorageSettings, container: str, *, prefix: str | None, job: str | None,
                limit: int) -> list[RunRow]:
    """The runs sealed in *container* (only those into *prefix*, or of the job named *job*), newest first, read
    from the container alone: what a new machine sees."""
    check_container(settings, container)
    with service_client(settings) as (service, _label):
        # the runs read their jobs lazily, so the rows are made while the client is open
        runs = sealed_runs(service.get_container_client(container))
        if prefix is not None:
            runs = of_prefix(runs, prefix)
        if job is not None:
            runs = [run for run in runs if run.job is not None and job in (run.job.name, run.job.id)]
        rows = []
        for run in reversed(runs[-limit:]):
            entry, finished = run.entry, parse_utc(run.entry.finished)
            where = f"{container}/{run.prefix}" if run.prefix else container
            rows.append(RunRow(
                instance_id=run.run_id, job=run.job.name if run.job else None, kind=BACKUP_ORCHESTRATION,
                runtime_status=entry.status, restorable="yes", source=run.job.source if run.job else None,
                destination=where, files=entry.files, files_total=entry.files, bytes=entry.bytes,
                created_at=run.started.isoformat(), duration_s=round((finished - run.started).total_seconds(), 3),
                worker_attached=None))
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


@click.command("list", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["RUNNING", "COMPLETED", "FAILED", "CANCELLED", "PENDING", "SUSPENDED"],
                                case_sensitive=False),
              help="Only runs with this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest runs to show.")
@click.option("--container", "-c", help="List the runs sealed in this container (a new machine needs only this "
                                       "and the credentials), not those of the state directory.")
@click.option("--prefix", help="With --container: only runs into this prefix.")
@click.option("--job", metavar="NAME", help="With --container: only runs of this job.")
@json_option("Print a JSON array.")
@storage_options
@taskhub_option
@state_dir_option
@debug_option
def command(statuses: tuple[str, ...], limit: int, container: str | None, prefix: str | None, job: str | None,
            json_output: bool, storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """List recent runs, newest first.

    Without --container, the runs of this state directory (or task hub), whatever their state; with
    --container, the backup runs sealed in that container, whichever machine made them.

    \b
    Examples:
      sitebackup list
      sitebackup list --status RUNNING --status FAILED --limit 5
      sitebackup list --container backups --job web01:/var/www
    """
    if container is None and (prefix is not None or job is not None):
        raise click.UsageError("--prefix and --job go with --container")
    if container is not None:
        if statuses:
            raise click.UsageError("--status goes without --container: a container holds completed runs only")
        rows = list_sealed(storage, validate_container_name(container), limit=limit, job=job,
                           prefix=normalize_prefix(prefix) if prefix is not None else None)
    else:
        rows = list_runs(state_dir, statuses=list(statuses), limit=limit, taskhub=taskhub)
    if json_output:
        click.echo(json.dumps(to_wire(rows)))
    else:
        render.runs_table(rows)

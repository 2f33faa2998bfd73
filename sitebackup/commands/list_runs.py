"""The list command: recent runs of the state directory or task hub (or sealed in a container), newest first,
whether each backup can still be restored and what it changed, filtered by job, host, start time and status;
or one run in full."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.naming import normalize_prefix, validate_container_name
from sitebackup.blob.records import ContainerRecords
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.catalog import of_prefix, parse_utc, sealed_runs
from sitebackup.commands.hosting import TERMINAL, parse_status, run_label, status_name, summarize
from sitebackup.commands.options import Command, catalog_options, complete_runs, job_option, json_option
from sitebackup.commands.runref import resolve_run, select_jobs
from sitebackup.commands.status import describe, status
from sitebackup.commands.times import parse_time
from sitebackup.durable.runtime import open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError, exit_codes_help
from sitebackup.model.codec import to_wire
from sitebackup.model.records import Job
from sitebackup.model.reports import RunDetail, RunRow
from sitebackup.ui import render
from sitebackup.workflows.names import BACKUP_ORCHESTRATION


@dataclass(frozen=True)
class RunFilter:
    """Which runs ``list`` shows: of a job (name, id or source), from a host, started since a time, in a state."""

    job: str | None = None
    host: str | None = None
    since: datetime | None = None
    statuses: tuple[str, ...] = ()

    def jobs(self, keys: Iterable[str], job_of: Callable[[str], Job | None], where: str) -> set[str] | None:
        """The job ids *job* names among *keys* (None: every job)."""
        return None if self.job is None else select_jobs(self.job, keys, job_of, where)

    def takes(self, job: Job | None, started: datetime, status: str) -> bool:
        return (self.host is None or (job is not None and job.host == self.host)) and \
            (self.since is None or started >= self.since) and \
            (not self.statuses or status.upper() in self.statuses)


def list_runs(state_dir: Path, *, statuses: list[str] | None = None, limit: int = 20,
              taskhub: TaskHubSettings | None = None, where: RunFilter = RunFilter()) -> list[RunRow]:
    wanted = [parse_status(s) for s in statuses] if statuses else None
    with open_client(state_dir, taskhub) as (runtime, client):
        # under the scheduler records are blobs, and `list` takes no storage credentials: status alone answers
        work = runtime.work_store(None) if taskhub is None else None
        query = dt_client.OrchestrationQuery(runtime_status=wanted, fetch_inputs_and_outputs=True,
                                             created_time_from=where.since)
        states = client.get_all_orchestration_states(query)
        states.sort(key=lambda s: s.created_at, reverse=True)
        labels = {state.instance_id: run_label(state) for state in states}
        jobs = {label.job.id: label.job for label in labels.values() if label is not None and label.job is not None}
        named = where.jobs(jobs, jobs.get, "in this state directory or task hub")
        rows: list[RunRow] = []
        for state in states:
            label = labels[state.instance_id]
            job = label.job if label is not None else None
            if (named is not None and (job is None or job.id not in named)) or \
                    not where.takes(job, _utc(state.created_at), status_name(state.runtime_status)):
                continue
            if len(rows) == limit:
                break
            info = describe(runtime, state)
            # a summary holds the counters; a cancelled or live run's output does not: its last status shows
            # how far it got
            ended = isinstance(info.output, dict) and "files_total" in info.output
            summary = summarize(state)
            counts = summary.counts
            progress = info.custom_status
            rows.append(RunRow(
                instance_id=info.instance_id, job=job.name if job else None, kind=info.kind,
                runtime_status=info.runtime_status,
                restorable=restorable(state, work), source=info.source, destination=info.destination,
                files=counts.files_copied if ended or progress is None else progress.files_done,
                files_total=counts.files_total,
                bytes=counts.bytes_copied if ended or progress is None else progress.bytes_done,
                created_at=info.created_at, duration_s=info.duration_s, worker_attached=info.worker_attached,
                changes=summary.changes))
        return rows


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def list_sealed(settings: StorageSettings, container: str, *, prefix: str | None, job: str | None = None,
                limit: int, where: RunFilter | None = None) -> list[RunRow]:
    """The runs sealed in *container* (only those into *prefix*, and those *where* takes), newest first, read
    from the container alone: what a new machine sees."""
    where = where or RunFilter(job=job)
    check_container(settings, container)
    with service_client(settings) as (service, _label):
        # the runs read their jobs lazily, so the rows are made while the client is open
        runs = sealed_runs(service.get_container_client(container))
        if prefix is not None:
            runs = of_prefix(runs, prefix)
        named = where.jobs({run.entry.job for run in runs}, runs[0].jobs.get, f"in container {container!r}") \
            if runs else None
        runs = [run for run in runs if (named is None or run.entry.job in named)
                and where.takes(run.job if where.host else None, run.started, run.entry.status)]
        rows = []
        for run in reversed(runs[-limit:]):
            entry, finished = run.entry, parse_utc(run.entry.finished)
            where_to = f"{container}/{run.prefix}" if run.prefix else container
            rows.append(RunRow(
                instance_id=run.run_id, job=run.job.name if run.job else None, kind=BACKUP_ORCHESTRATION,
                runtime_status=entry.status, restorable="yes", source=run.job.source if run.job else None,
                destination=where_to, files=entry.files, files_total=entry.files, bytes=entry.bytes,
                created_at=run.started.isoformat(), duration_s=round((finished - run.started).total_seconds(), 3),
                worker_attached=None, changes=entry.changes))
        return rows


def sealed_detail(settings: StorageSettings, container: str, run_ref: str, job: str | None) -> RunDetail:
    """One run sealed in *container* (a run reference), in full."""
    check_container(settings, container)
    with service_client(settings) as (service, _label):
        client = service.get_container_client(container)
        runs = sealed_runs(client)
        run_id = resolve_run(run_ref, sealed=runs, container=container, job=job)
        header = ContainerRecords(client).header(run_id)
        if header is None:  # pruned since the listing
            raise InputError(f"no run with id {run_id!r} in container {container!r}")
        described = runs[0].jobs.get(header.job) if runs else None
        return RunDetail(run_id=header.run_id, job=header.job, job_name=described.name if described else None,
                         host=header.host, source=header.source, container=header.container, prefix=header.prefix,
                         started=header.started, finished=header.finished, status=header.status, files=header.files,
                         files_failed=header.files_failed, bytes=header.bytes, pages=len(header.pages),
                         baseline=header.baseline, changes=header.changes, tool=header.tool, format=header.format)


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
@click.argument("run_ref", metavar="[RUN]", required=False, shell_complete=complete_runs("any"))
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["RUNNING", "COMPLETED", "FAILED", "CANCELLED", "PENDING", "SUSPENDED"],
                                case_sensitive=False),
              help="Only runs with this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest runs to show.")
@click.option("--container", "-c", help="List the runs sealed in this container (a new machine needs only this "
                                       "and the credentials), not those of the state directory.")
@click.option("--prefix", help="With --container: only runs into this prefix.")
@job_option("Only runs of this job: its name, id or source directory (with RUN: the job `latest` means).")
@click.option("--host", help="Only runs of jobs on this host (its short name).")
@click.option("--since", metavar="TIME", help="Only runs started at or after TIME (ISO date and time, local unless it "
                                              "names an offset; a date alone is its start; yesterday; 3 days ago).")
@json_option("Print a JSON array (with RUN: one object).")
@catalog_options
def command(run_ref: str | None, statuses: tuple[str, ...], limit: int, container: str | None, prefix: str | None,
            job: str | None, host: str | None, since: str | None, json_output: bool, storage: StorageSettings,
            taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """List recent runs, newest first, or show one run in full.

    Without --container, the runs of this state directory (or task hub), whatever their state; with
    --container, the backup runs sealed in that container, whichever machine made them. A backup's
    row says what it added, changed and removed since its job's run before it. RUN (a run id, a unique prefix
    of one, or `latest`) shows that run in full: with --container its sealed header, else its
    status.

    \b
    Examples:
      sitebackup list
      sitebackup list --status RUNNING --status FAILED --limit 5
      sitebackup list --container backups --job web01:/var/www --since "7 days ago"
      sitebackup list --container backups latest
    """
    if container is None and prefix is not None:
        raise click.UsageError("--prefix goes with --container")
    if run_ref is not None:
        if statuses or prefix is not None or host is not None or since is not None:
            raise click.UsageError("RUN goes without --status, --prefix, --host and --since: it names one run")
        if container is not None:
            detail = sealed_detail(storage, validate_container_name(container), run_ref, job)
            click.echo(json.dumps(to_wire(detail)) if json_output else render.run_detail(detail))
            return
        info = status(state_dir, run_ref, taskhub)
        click.echo(json.dumps(to_wire(info)) if json_output else render.status_text(info))
        return
    where = RunFilter(job=job, host=host, since=parse_time(since, end_of_day=False) if since else None,
                      statuses=tuple(s.upper() for s in statuses))
    if container is not None:
        rows = list_sealed(storage, validate_container_name(container), limit=limit, where=where,
                           prefix=normalize_prefix(prefix) if prefix is not None else None)
    else:
        rows = list_runs(state_dir, statuses=list(statuses), limit=limit, taskhub=taskhub, where=where)
    if json_output:
        click.echo(json.dumps(to_wire(rows)))
    else:
        render.runs_table(rows)

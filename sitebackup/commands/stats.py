"""The stats command: what a container's backup holds and costs, or one run's share of it.

Of a container: its sealed runs (newest first) with their files and bytes as recorded and what each changed
from its job's run before it (counted when it was sealed: read from the catalog's listing, no record read),
what the container stores (one listing: current blobs and snapshots, each copy once however many runs
reference it, and the records beside them), and with --keep-* rules what ``prune`` would free (its dry run).
Of a run: the same for it alone, its stored copies found beside its record (``blob.history.CopyLookup``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.blob.history import CopyLookup, choose, list_copies
from sitebackup.blob.naming import RESERVED_PREFIX, blob_name, normalize_prefix, validate_container_name
from sitebackup.commands.browsing import Browse, browsing
from sitebackup.commands.catalog import of_prefix
from sitebackup.commands.options import LATEST_JOB_HELP, Command, catalog_options, complete_runs, job_option, json_option
from sitebackup.commands.prune import keep_options, prune_request, run_prune
from sitebackup.commands.retention import Policy
from sitebackup.commands.runref import select_jobs
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import PruneEstimate, RunStats, StatsReport, StoredStats
from sitebackup.ui import render


def container_stats(browse: Browse, prefix: str | None, job: str | None) -> StatsReport:
    """The container's sealed runs (into *prefix*, of *job*, when given) and what it stores (under *prefix*)."""
    assert browse.container is not None and browse.sealed is not None
    runs = browse.sealed if prefix is None else of_prefix(browse.sealed, prefix)
    if job is not None and runs:
        named = select_jobs(job, {run.entry.job for run in runs}, runs[0].jobs.get, f"in container {browse.container!r}")
        runs = [run for run in runs if run.entry.job in named]
    container = browse.service.get_container_client(browse.container)
    stored = StoredStats()
    for copy in list_copies(container, prefix or ""):
        stored.blobs += copy.snapshot is None
        stored.snapshots += copy.snapshot is not None
        stored.bytes += copy.size
    for blob in container.list_blobs(name_starts_with=RESERVED_PREFIX):
        stored.record_blobs += 1
        stored.record_bytes += blob.size
    rows = [RunStats(run_id=run.run_id, job=run.job.name if run.job else None, started=run.entry.started,
                     files=run.entry.files, bytes=run.entry.bytes, changes=run.entry.changes) for run in reversed(runs)]
    return StatsReport(container=browse.container, prefix=prefix, jobs=len({run.entry.job for run in runs}), runs=rows,
                       stored=stored)


def run_stats(browse: Browse, run_ref: str) -> StatsReport:
    """One run: as recorded, and the copies holding the versions it recorded (each once)."""
    run = browse.open(run_ref)
    lookup = CopyLookup(run.container, run.label.prefix)
    stored = StoredStats()
    files = size = 0
    for entry in browse.entries(run):
        if entry.kind != "file":
            continue
        files += 1
        size += entry.size
        if not entry.stored:
            continue
        copy = choose(lookup.copies(blob_name(run.label.prefix, entry.path)), entry.md5)
        if copy is None:
            stored.missing += 1
            continue
        stored.blobs += copy.snapshot is None
        stored.snapshots += copy.snapshot is not None
        stored.bytes += copy.size
    header = run.header
    job = header.job if header is not None else None
    described = browse.sealed[0].jobs.get(job) if browse.sealed and job else None
    row = RunStats(run_id=run.run_id, job=described.name if described else job,
                   started=header.started if header is not None else "", files=files, bytes=size,
                   changes=header.changes if header is not None else None)
    return StatsReport(container=run.container.container_name, prefix=run.label.prefix, jobs=1, runs=[row],
                       stored=stored)


def estimate_prune(settings: StorageSettings, container: str, prefix: str | None, policy: Policy, state_dir: Path,
                   taskhub: TaskHubSettings | None) -> PruneEstimate:
    """What ``prune --dry-run`` with *policy* reports it would free."""
    report = run_prune(prune_request(container, prefix or "", policy, dry_run=True, state_dir=state_dir),
                       settings, taskhub)
    return PruneEstimate(runs=len(report.removed), blobs=report.blobs_removed, snapshots=report.snapshots_removed,
                         bytes=report.bytes_removed)


@click.command("stats", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.argument("run_ref", metavar="[RUN]", required=False, shell_complete=complete_runs("backups"))
@click.option("--container", "-c", help="The container to count (all a new machine needs); with RUN, where its "
                                       "sealed record is.")
@click.option("--prefix", help="Without RUN: only runs into this prefix, and the copies under it.")
@job_option("Without RUN: only runs of this job. With RUN: " + LATEST_JOB_HELP)
@keep_options
@json_option("Print one JSON object.")
@catalog_options
def command(run_ref: str | None, container: str | None, prefix: str | None, job: str | None, policy: Policy,
            json_output: bool, storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Count what a container's backups hold and store, or one run's.

    Of a container: its runs (newest first: files and bytes as recorded, and the entries each
    added, changed and removed since its job's run before it), the bytes stored (current blobs and
    snapshots, a copy counted once however many runs reference it; the records apart), and with
    --keep-* rules what `prune` with them would free. Of RUN: the same for it alone, with the
    copies holding the versions it recorded.

    \b
    Examples:
      sitebackup stats -c backups
      sitebackup stats -c backups --keep-daily 7 --keep-weekly 4
      sitebackup stats latest -c backups --json
    """
    if run_ref is None and container is None:
        raise click.UsageError("give RUN, or --container NAME")
    if run_ref is not None and (prefix is not None or not policy.empty()):
        raise click.UsageError("--prefix and --keep-* go without RUN: they count a container")
    name = validate_container_name(container) if container else None
    norm = normalize_prefix(prefix) if prefix is not None else None
    with browsing(storage, state_dir, taskhub, name, job if run_ref is not None else None) as browse:
        report = run_stats(browse, run_ref) if run_ref is not None else container_stats(browse, norm, job)
    if not policy.empty():
        assert name is not None
        report.prune = estimate_prune(storage, name, norm, policy, state_dir, taskhub)
    if json_output:
        click.echo(json.dumps(to_wire(report)))
    else:
        render.stats_report(report)

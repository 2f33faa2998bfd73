"""The worker command: work on backups scheduled elsewhere (any backup on the task hub), until SIGINT or
SIGTERM stops it cleanly, or its state directory stops taking writes (disk full: ``StateFullError``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.commands.hosting import activity_deps, stop_on_signals
from sitebackup.commands.options import (
    Command,
    bwlimit_option,
    concurrency_option,
    debug_option,
    max_inflight_option,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help
from sitebackup.model.work import BackupCounts, Concurrency, PageResult


def run_worker(settings: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path,
               concurrency: int, on_batch: Callable[[str, PageResult[BackupCounts]], None],
               on_started: Callable[[], None]) -> None:
    """Work on every backup the backend hands out until stopped; no scheduling, no watching."""
    settings.require()
    with stop_on_signals() as stop, open_backend(state_dir, taskhub) as runtime:
        runtime.check_access()
        deps = activity_deps(settings, Concurrency(concurrency), runtime)
        deps.on_batch = on_batch
        runtime.start_worker(deps)
        on_started()
        while not stop.wait(1.0):
            runtime.check()
        # open_backend's exit stops the worker, which first finishes the work items it holds


@click.command("worker", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70))
@storage_options
@bwlimit_option
@max_inflight_option
@taskhub_option
@concurrency_option("Bound on parallel uploads in this worker.")
@state_dir_option
@debug_option
def command(storage: StorageSettings, taskhub: TaskHubSettings | None, concurrency: int, state_dir: Path) -> None:
    """Run a worker only: work on backups scheduled elsewhere.

    Runs until Ctrl-C or SIGTERM (clean stop, exit 0). Prints one line per finished batch.
    Storage credentials come from this worker's own options or environment. Every worker must
    see the source tree at the same path.

    \b
    Examples:
      sitebackup worker --taskhub "Endpoint=https://NAME.REGION.durabletask.io;TaskHub=backups;Authentication=ManagedIdentity"
      DURABLE_TASK_SCHEDULER_CONNECTION_STRING=... sitebackup worker --concurrency 32
    """

    def on_batch(instance_id: str, result: PageResult[BackupCounts]) -> None:
        counts = result.counts
        click.echo(f"batch {instance_id} page {result.page}: {counts.files_uploaded} files uploaded, "
                   f"{counts.bytes_uploaded} bytes, {counts.files_failed} failed")

    def on_started() -> None:
        click.echo(f"sitebackup: worker started on {taskhub.label if taskhub else 'the embedded backend'}", err=True)

    run_worker(storage, taskhub, state_dir, concurrency, on_batch, on_started)
    click.echo("sitebackup: worker stopped", err=True)

"""The purge command: remove finished runs older than an age, with their run records; completed backups
are left to ``prune``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
from azure.core.exceptions import ResourceNotFoundError
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.commands.hosting import TERMINAL
from sitebackup.commands.options import (
    Command,
    debug_option,
    parse_age,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help
from sitebackup.model.reports import PurgeReport
from sitebackup.workflows.names import BACKUP_ORCHESTRATION


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


@click.command("purge", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.option("--older-than", required=True, metavar="AGE", help="Age such as 30d, 12h or 2w.")
@taskhub_option
@storage_options
@state_dir_option
@debug_option
def command(older_than: str, taskhub: TaskHubSettings | None, storage: StorageSettings, state_dir: Path) -> None:
    """Remove finished runs older than AGE; completed backups are left to prune.

    Their history and run records go with them: restores, and failed or cancelled backups. Completed
    backups stay until `sitebackup prune` drops them, so that purge never makes a run prune keeps
    unrestorable. With --taskhub the run records are blobs under .sitebackup/work/ in each run's
    container: they are removed only when storage credentials (options or environment) are given,
    and kept otherwise.

    \b
    Example:
      sitebackup purge --older-than 30d
    """
    result = purge(state_dir, parse_age(older_than), taskhub, storage)
    click.echo(f"purged {len(result.purged)} finished run(s) older than {older_than}")
    if result.backups_kept:
        click.echo(f"kept {len(result.backups_kept)} completed backup run(s): `sitebackup prune` decides how long "
                   "backups stay restorable")
    if result.records_kept and result.purged:
        click.echo("run records under .sitebackup/work/ in their containers were kept: "
                   "give storage credentials to remove them too", err=True)

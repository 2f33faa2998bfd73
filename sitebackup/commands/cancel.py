"""The cancel command: terminate a run; what it wrote stays."""

from __future__ import annotations

from pathlib import Path

import click

from sitebackup.commands.hosting import TERMINAL, UNFINISHED, get_run, status_name
from sitebackup.commands.options import Command, complete_runs, debug_option, state_dir_option, taskhub_option
from sitebackup.commands.runref import resolve_run
from sitebackup.commands.status import FINISHED
from sitebackup.durable.runtime import open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help


def cancel(state_dir: Path, instance_id: str, taskhub: TaskHubSettings | None = None) -> tuple[str, str]:
    """Terminate the run (a run reference: ``commands.runref``); returns its id and its status before cancelling."""
    with open_client(state_dir, taskhub) as (_runtime, client):
        state = get_run(client, resolve_run(instance_id, client=client, backups=False, latest=UNFINISHED))
        if state.runtime_status not in TERMINAL:
            client.terminate_orchestration(state.instance_id, output={"cancelled": True}, recursive=True)
        return state.instance_id, status_name(state.runtime_status)


@click.command("cancel", cls=Command, epilog=exit_codes_help(0, 2, 5, 70, 130))
@click.argument("instance_id", shell_complete=complete_runs("unfinished"))
@taskhub_option
@state_dir_option
@debug_option
def command(instance_id: str, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Cancel a run.

    Uploads stop at the next file boundary (a large file at its next block range); blobs already
    written stay.

    \b
    Example:
      sitebackup cancel 20261127T225602-0dcb81
    """
    instance_id, before = cancel(state_dir, instance_id, taskhub)
    if before in FINISHED:
        click.echo(f"{instance_id} had already finished ({before}); nothing to cancel")
    else:
        click.echo(f"{instance_id} cancelled (was {before})")

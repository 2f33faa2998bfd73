"""The status command: a run's status, progress and summary from any terminal (``describe``, which
``list`` and ``resume`` share), or its live progress until it finishes (``--watch``)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
from durabletask import client as dt_client

from sitebackup.blob.errors import redact
from sitebackup.commands.hosting import (
    TERMINAL,
    exit_code_for,
    get_run,
    last_progress,
    progress_of,
    run_label,
    stalled_for,
    status_name,
    summarize,
    watch,
)
from sitebackup.commands.options import (
    Command,
    complete_runs,
    debug_option,
    json_option,
    stall_after_option,
    state_dir_option,
    taskhub_option,
)
from sitebackup.commands.runref import resolve_run
from sitebackup.durable.runtime import Runtime, open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import exit_codes_help
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import Failure, RunInfo, RunStart
from sitebackup.model.work import Summary
from sitebackup.ui import render
from sitebackup.ui.printers import KINDS, Printer, make_printer

FINISHED = {status_name(status) for status in TERMINAL}


def describe(runtime: Runtime, state: dt_client.OrchestrationState,
             stall_after: timedelta | None = None) -> RunInfo:
    """Everything ``status`` shows; an unfinished run idle for longer than *stall_after* is ``stalled``."""
    label = run_label(state)
    info = RunInfo(
        instance_id=state.instance_id,
        kind=state.name,
        runtime_status=status_name(state.runtime_status),
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


def start_of(info: RunInfo, *, resumed: bool = False, attached: bool = False) -> RunStart:
    """The start event of a run a command resumes or shows (``describe``): whether it had finished, and what the
    bar calls it."""
    return RunStart(instance_id=info.instance_id, source=info.source or "", destination=info.destination or "",
                    endpoint=info.endpoint, resumed=resumed, attached=attached,
                    finished=info.runtime_status in FINISHED,
                    action="Restoring" if KINDS.get(info.kind) == "restore" else "Backing up")


def status(state_dir: Path, instance_id: str, taskhub: TaskHubSettings | None = None,
           stall_after: timedelta | None = None) -> RunInfo:
    """The run *instance_id* (a run reference: ``commands.runref``) as ``describe`` tells it."""
    with open_client(state_dir, taskhub) as (runtime, client):
        return describe(runtime, get_run(client, resolve_run(instance_id, client=client, backups=False, latest=None)),
                        stall_after)


def watch_status(state_dir: Path, instance_id: str, printer: Printer,
                 taskhub: TaskHubSettings | None = None) -> Summary[Any]:
    """Draw progress, as the run's own command does, until the run finishes (or waits for `resume`), whoever works
    on it (a run reference: ``commands.runref``)."""
    with open_client(state_dir, taskhub) as (runtime, client):
        run = get_run(client, resolve_run(instance_id, client=client, backups=False, latest=None))
        printer.start(start_of(describe(runtime, run), attached=True))
        try:
            state = watch(client, run.instance_id, printer)
        except KeyboardInterrupt:  # the watcher stops; the run goes on
            printer.close()
            raise
    summary = summarize(state)
    printer.finish(summary)
    return summary


@click.command("status", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 5, 7, 70, 130))
@click.argument("instance_id", shell_complete=complete_runs("any"))
@json_option("Print one JSON object.")
@click.option("--watch", is_flag=True, help="Draw the live progress bar until the run finishes.")
@stall_after_option
@taskhub_option
@state_dir_option
@debug_option
def command(instance_id: str, json_output: bool, watch: bool, stall_after: timedelta,
            taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Show a run's status, progress and summary.

    Works from any terminal, while the run is live or after it ended.

    \b
    Examples:
      sitebackup status 20261127T225602-0dcb81
      sitebackup status 20261127T225602-0dcb81 --json
      sitebackup status 20261127T225602-0dcb81 --watch
    """
    if watch:
        summary = watch_status(state_dir, instance_id, make_printer(json_output=json_output), taskhub)
        sys.exit(exit_code_for(summary))
    info = status(state_dir, instance_id, taskhub, stall_after)
    if json_output:
        click.echo(json.dumps(to_wire(info)))
    else:
        click.echo(render.status_text(info))

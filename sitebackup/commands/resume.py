"""The resume command: host a worker until an unfinished backup or restore finishes (or watch the process
that already works on it), with this invocation's storage credentials."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, connect
from sitebackup.commands.hosting import (
    TERMINAL,
    UNFINISHED,
    activity_deps,
    attach_and_watch,
    backup_job_lock,
    claim_of,
    exit_code_for,
    get_run,
    host_and_watch,
    release_run,
    summarize,
)
from sitebackup.commands.options import (
    Command,
    Output,
    bwlimit_option,
    complete_runs,
    debug_option,
    max_inflight_option,
    output_options,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.commands.runref import resolve_run
from sitebackup.commands.status import describe, start_of
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import (
    InputError,
    exit_codes_help,
)
from sitebackup.model.codec import DamagedData, from_wire
from sitebackup.model.work import BackupInput, Concurrency, RestoreInput, Summary
from sitebackup.ui.printers import Printer, make_printer
from sitebackup.workflows.names import BACKUP_ORCHESTRATION


def resume(state_dir: Path, instance_id: str, settings: StorageSettings, printer: Printer,
           taskhub: TaskHubSettings | None = None) -> Summary[Any]:
    """Host a worker until *instance_id* finishes (or just watch, if a live process already works on it).

    Under the scheduler nobody can tell whether workers are attached, so this host always joins in:
    the scheduler hands each work item to one worker, so joining never doubles work. A backup run is
    hosted only under its job's lock in the container (``LockedError`` while another process holds it)."""
    with open_backend(state_dir, taskhub) as runtime:
        with runtime.connected() as client:
            state = get_run(client, resolve_run(instance_id, client=client, backups=False, latest=UNFINISHED))
        instance_id = state.instance_id
        printer.start(start_of(describe(runtime, state), resumed=True))
        if state.runtime_status in TERMINAL:
            summary = summarize(state)
            printer.finish(summary)
            return summary
        inp = _run_input(state)
        connect(settings.require(), inp.container)
        # a backup's job lock in the container; a restore changes nothing there
        with backup_job_lock(settings, inp) if isinstance(inp, BackupInput) else nullcontext() as job_lock:
            deps = activity_deps(settings, Concurrency(inp.options.concurrency), runtime, job_lock)
            # a restore's "source" is its label: the lock key stays distinct from every backup's
            lock = RunLock.for_backup(state_dir, inp.source, inp.container, inp.prefix)
            try:
                if lock.try_acquire() and not runtime.worker_attached(instance_id):
                    if job_lock is not None:
                        job_lock.acquire(run=instance_id, claim=claim_of(lock))
                    return host_and_watch(runtime, deps, instance_id, printer,
                                          on_poll=job_lock.check if job_lock is not None else None)
                # a live process hosts it (or a dead one's leases have not run out yet): watch, and
                # take over once nobody works on it
                printer.message("another process is working on this run; showing its progress")
                return attach_and_watch(runtime, deps, instance_id, printer, lock, job_lock)
            finally:
                release_run(runtime, lock, job_lock)


def _run_input(state: dt_client.OrchestrationState) -> BackupInput | RestoreInput:
    """The whole input of an unfinished run, to host it."""
    what = f"the input of run {state.instance_id}"
    try:
        raw = state.get_input() if state.serialized_input else None
        if raw is None:
            raise ValueError("no input")
        if state.name == BACKUP_ORCHESTRATION:
            return from_wire(raw, BackupInput, what)
        return from_wire(raw, RestoreInput, what)
    except (ValueError, DamagedData):
        raise InputError(f"run {state.instance_id!r} has no input sitebackup can resume") from None


@click.command("resume", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 4, 5, 7, 70, 130))
@click.argument("instance_id", shell_complete=complete_runs("unfinished"))
@storage_options
@bwlimit_option
@max_inflight_option
@output_options
@taskhub_option
@state_dir_option
@debug_option
def command(instance_id: str, storage: StorageSettings, output: Output, taskhub: TaskHubSettings | None,
            state_dir: Path) -> None:
    """Continue an unfinished run until it finishes.

    Same progress, summary and exit codes as the original command. Storage credentials come
    from this invocation (options or environment), never from the saved run. A backup run
    takes its job's lock in the container first: exit 4 while another backup or prune of the
    job holds it.

    \b
    Example:
      sitebackup resume 20261127T225602-0dcb81
    """
    summary = resume(state_dir, instance_id, storage, make_printer(json_output=output.json, quiet=output.quiet),
                     taskhub)
    sys.exit(exit_code_for(summary))

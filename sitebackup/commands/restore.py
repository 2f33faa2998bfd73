"""The restore command: its click definition, validation, pre-flight of the container, schedule (or
re-attach to) a ``RestoreSiteContent`` run and host its worker until it finishes.

``--as-of TIME`` picks the run to restore: the latest completed backup of the container and prefix
started at or before TIME, then restored as by its id. ``--prefix`` takes the backup's ``{hostname}``;
``{date}`` and ``{time}`` name when a backup ran, which ``--as-of`` says.

A restore that finds nothing to restore (a wrong prefix, an empty container, filters that leave nothing)
is an input error, naming the container and prefix it looked in, never "0 files" and exit 0.
"""

from __future__ import annotations

import string
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container
from sitebackup.blob.naming import normalize_prefix, overlaps, validate_container_name
from sitebackup.blob.records import ContainerRecords
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.catalog import (
    SealedRun,
    known_backup,
    of_prefix,
    overlapping,
    recorded_run,
    sealed_runs,
    where_to_look,
)
from sitebackup.commands.hosting import (
    activity_deps,
    backup_runs,
    exit_code_for,
    find_unfinished,
    host_and_watch,
    new_instance_id,
)
from sitebackup.commands.options import (
    Command,
    Output,
    bwlimit_option,
    complete_dirs,
    complete_runs,
    concurrency_option,
    debug_option,
    destination_label,
    metrics_option,
    output_options,
    start_metrics,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError, exit_codes_help
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import RunStart
from sitebackup.model.work import (
    DEFAULT_CONCURRENCY,
    Concurrency,
    RestoreInput,
    RestoreOptions,
    Summary,
    summary_to_wire,
)
from sitebackup.ui.printers import Printer, make_printer
from sitebackup.workflows.names import RESTORE_ORCHESTRATION


@dataclass
class RestoreRequest:
    dest: Path
    run_id: str | None = None
    container: str | None = None
    prefix: str = ""
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overwrite: bool = False
    owners: bool = True  # --no-owner: False
    concurrency: int = DEFAULT_CONCURRENCY
    state_dir: Path = field(default_factory=Path)
    as_of: datetime | None = None  # with container: restore the latest completed run started at or before it


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date and time (``2026-03-01``, ``2026-03-01T03:00``, ``2026-03-01 03:00:00+01:00``),
    local time unless it names an offset; a date alone is its midnight."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"invalid time {text!r}: use a date or a date and time, e.g. 2026-03-01 or "
                         "2026-03-01T03:00") from None
    return when if when.tzinfo is not None else when.astimezone()


def restore_prefix(template: str | None) -> str:
    """--prefix of a restore: ``{hostname}`` expanded as the backup expanded it; ``{date}`` and ``{time}`` are
    refused, pointing to --as-of (a restore of "today's" prefix would find the backup of another day)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template or "") if name is not None}
    except ValueError:
        fields = set()  # expand_prefix names what is wrong with it
    if fields & {"date", "time"}:
        raise InputError(f"invalid restore --prefix {template!r}: {{date}} and {{time}} are not expanded on restore; "
                         "give the prefix the backup wrote, or --as-of TIME to restore the backup of that time")
    return normalize_prefix(expand_prefix(template))


def nothing_restored(summary: Summary[Any], made_dest: bool = False) -> bool:
    """Whether a completed restore found nothing at all to restore (as opposed to files skipped or failed): no
    file, no symlink, no directory but DEST itself (the record's root, given its metadata when the restore
    made DEST: *made_dest*)."""
    counts = summary.counts
    return summary.runtime_status == "COMPLETED" and not counts.files_total and not counts.files_skipped and \
        not counts.symlinks_restored and counts.dirs_restored <= made_dest


def nothing_message(request: RestoreRequest) -> str:
    """The one line of a restore that found nothing: which container, prefix (and run) it looked in."""
    where = f"container {request.container!r}" + (f", prefix {request.prefix!r}" if request.prefix else "")
    found = f"run {request.run_id} ({where}) recorded no file" if request.run_id else f"{where} holds no file"
    filters = " that --include/--exclude select" if request.include or request.exclude else ""
    return f"nothing to restore: {found}{filters}; check --container and --prefix (sitebackup list --container " \
           f"{request.container} shows its runs)"


def validate_restore(dest: str | Path, *, run_id: str | None, container: str | None, prefix: str | None,
                     include: list[str], exclude: list[str], overwrite: bool, concurrency: int,
                     state_dir: Path, as_of: str | None = None, owners: bool = True) -> RestoreRequest:
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"destination {str(dest)!r} is not a directory")
    if run_id is None and container is None:
        raise InputError("give a run ID, or --container NAME")
    if run_id is not None and prefix:
        raise InputError("--prefix goes with --container; a run ID already knows its prefix")
    if run_id is not None and as_of:
        raise InputError("--as-of goes with --container; a run ID already names the run")
    return RestoreRequest(dest=path.resolve(), run_id=run_id,
                          container=validate_container_name(container) if container else None,
                          prefix=restore_prefix(prefix), include=list(include), exclude=list(exclude),
                          overwrite=overwrite, owners=owners, concurrency=concurrency, state_dir=state_dir,
                          as_of=parse_time(as_of) if as_of else None)


def run_as_of(client: dt_client.TaskHubGrpcClient, work: WorkStore, sealed: list[SealedRun], container: str,
              prefix: str, endpoint: str, as_of: datetime) -> str:
    """The latest completed backup of *container*/*prefix* started at or before *as_of* that no prune dropped: of
    the container's sealed runs, or (none sealed) of the runs this state directory knows."""
    found = [run.run_id for run in of_prefix(sealed, prefix) if run.started <= as_of]
    if found:
        return found[-1]
    runs = [run for run in backup_runs(client, container, endpoint)
            if run.label.prefix == prefix and run.status == dt_client.OrchestrationStatus.COMPLETED
            and run.created_at <= as_of and work.pruned(run.instance_id) is None]
    if not runs:
        where = f"{container}/{prefix}" if prefix else container
        raise InputError(f"no completed backup of {where} started at or before {as_of.isoformat(timespec='seconds')} "
                         "in the container, this state directory or task hub")
    return runs[-1].instance_id


def later_backups(client: dt_client.TaskHubGrpcClient, sealed: list[SealedRun], run_id: str, container: str,
                  prefix: str, endpoint: str) -> bool:
    """Whether a backup of names the run's overlap started after it or has not finished, as the container's
    catalog and this backend know: only such a run (or another tool) can have replaced the blobs the run
    wrote. A run neither knows: True."""
    started = next((run.started for run in sealed if run.run_id == run_id), None)
    local = backup_runs(client, container, endpoint)
    if started is None:
        started = next((run.created_at for run in local if run.instance_id == run_id), None)
    if started is None:
        return True
    later = [run for run in sealed if run.run_id != run_id and run.started > started]
    return bool(overlapping(later, prefix)) or \
        any(other.instance_id != run_id and overlaps(prefix, other.label.prefix)
            and (other.created_at > started or not other.finished) for other in local)


def run_restore(request: RestoreRequest, settings: StorageSettings, printer: Printer,
                taskhub: TaskHubSettings | None = None) -> Summary[Any]:
    """Schedule (or re-attach to) a restore and host its worker until it finishes.

    A run is found in the container's catalog of sealed records (``--container``), or through this state
    directory; under the scheduler (*taskhub*) any worker on the task hub may take download batches, so DEST
    must be a path every worker sees, like a backup's source."""
    settings.require()
    with open_backend(request.state_dir, taskhub) as runtime:
        deps = activity_deps(settings, Concurrency(request.concurrency), runtime)
        with runtime.connected() as client:
            container, prefix = request.container or "", request.prefix
            if request.run_id:
                known = known_backup(client, deps.work, request.run_id)
                container = where_to_look(request.run_id, known, request.container, deps.work)
            # first: under the scheduler the run record itself is read from the container
            endpoint = check_container(settings, container)
            records = ContainerRecords(deps.container_client(container))
            sealed = sealed_runs(deps.container_client(container))
            if request.as_of is not None:
                request.run_id = run_as_of(client, deps.work, sealed, container, prefix, endpoint, request.as_of)
            if request.run_id:
                known = known_backup(client, deps.work, request.run_id)
                prefix = recorded_run(records, deps.work, request.run_id, known).prefix
            created = not request.dest.exists()
            request.container, request.prefix = container, prefix  # what the run looks in, named if it finds nothing
            request.dest.mkdir(parents=True, exist_ok=True)
            later = later_backups(client, sealed, request.run_id, container, prefix, endpoint) if request.run_id \
                else True
            inp = RestoreInput(dest=str(request.dest), container=container, prefix=prefix, run_id=request.run_id,
                               endpoint=endpoint, later_backups=later, dest_created=created, options=RestoreOptions(
                                   concurrency=request.concurrency, overwrite=request.overwrite,
                                   owners=request.owners, include=request.include, exclude=request.exclude,
                                   shared=taskhub is not None))
            inp.source = inp.source_label
            instance_id = find_unfinished(client, RESTORE_ORCHESTRATION, inp.label.same_restore)
            resumed = instance_id is not None
            if instance_id is None:
                instance_id = client.schedule_new_orchestration(RESTORE_ORCHESTRATION, input=to_wire(inp),
                                                                instance_id=new_instance_id())
        printer.start(RunStart(instance_id=instance_id, source=inp.source, destination=inp.dest,
                               endpoint=endpoint, resumed=resumed, action="Restoring"))
        return host_and_watch(runtime, deps, instance_id, printer)


def complete_restore_args(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``restore [ID] DEST``: a backup run id first (unless --container), then DEST."""
    if ctx.params.get("container") or ctx.params.get("args"):
        return complete_dirs(ctx, param, incomplete)
    return complete_runs("backups")(ctx, param, incomplete)


@click.command("restore", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 5, 7, 70, 130))
@click.argument("args", nargs=-1, required=True, metavar="[ID] DEST", shell_complete=complete_restore_args)
@click.option("--container", "-c",
              help="The container to restore from: with ID, the run's sealed record is read from it (all a new "
                   "machine needs); without ID, whatever is under --prefix now, or the run --as-of names.")
@click.option("--prefix", default="", help="With --container: only blobs under this prefix, which is stripped; "
                                          "{hostname} is expanded as by backup (for {date} or {time}, use --as-of).")
@click.option("--as-of", metavar="TIME",
              help="With --container: the tree the latest completed backup of the container and prefix started at "
                   "or before TIME recorded (ISO date or date and time, local unless an offset is given).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Only paths matching this glob (repeatable); a pattern without '/' matches any path component.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out paths matching this glob (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace existing files that differ (identical ones are always skipped).")
@click.option("--no-owner", is_flag=True,
              help="Leave what is restored to the user running the restore (as root, owners are restored by default).")
@storage_options
@bwlimit_option
@concurrency_option("Bound on parallel download batches.")
@output_options
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def command(args: tuple[str, ...], container: str | None, prefix: str, as_of: str | None, include: tuple[str, ...],
            exclude: tuple[str, ...], overwrite: bool, no_owner: bool, storage: StorageSettings, concurrency: int,
            output: Output,
            metrics_file: Path | None, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Restore a backup run, or a container's blobs, into DEST.

    With ID, restores exactly the files that backup run recorded, in the versions it recorded
    (from blob snapshots where later runs replaced them); with --container (and --prefix) and
    --as-of TIME, the same for the latest completed run at or before TIME; with --container
    alone, whatever is stored there now. The run's record is read from the container (sealed
    there by the backup), so a new machine needs only the credentials and --container.

    A run restores the tree it recorded: files with their mode (exactly, whatever the umask),
    owner and modification time, hard links, symlinks (their targets as recorded, never
    followed), directories (empty ones too) with their mode, owner and mtime, and DEST itself
    as the source root when the restore creates it. Owners need root (--no-owner to skip);
    setuid, setgid and sticky bits come back only with them. --container alone restores what
    the blobs carry: files, with the mode of their metadata masked by the umask.

    An existing file is skipped when identical (same size and MD5) and otherwise left alone
    and reported unless --overwrite. Names that would escape DEST (absolute, '..' or empty
    segments, NUL, backslash) are refused and reported; no symlink under DEST is followed.
    Re-running the same command after an interruption resumes the restore. A restore that
    finds nothing to restore (wrong --container or --prefix, filters that leave nothing) exits
    2, naming where it looked.

    \b
    Examples:
      sitebackup restore 20261127T225602-0dcb81 ./restored
      sitebackup restore 20261127T225602-0dcb81 ./restored --include 'css/*' --exclude '*.log'
      sitebackup restore 20261127T225602-0dcb81 ./restored --container backups
      sitebackup restore --container backups --prefix nightly/web ./restored --overwrite
      sitebackup restore --container backups --as-of 2026-03-01T03:00 ./restored
    """
    if len(args) not in (1, 2) or (len(args) == 1 and not container):
        raise click.UsageError("give ID DEST, or --container NAME [ID] DEST")
    run_id = args[0] if len(args) == 2 else None
    metrics = start_metrics(metrics_file, "restore", destination_label(container, prefix) if not run_id else run_id,
                            str(Path(args[-1]).expanduser().resolve()))
    request = validate_restore(
        args[-1], run_id=run_id, container=container, prefix=prefix, include=list(include),
        exclude=list(exclude), overwrite=overwrite, concurrency=concurrency, state_dir=state_dir, as_of=as_of,
        owners=not no_owner)
    made_dest = not request.dest.exists()
    summary = run_restore(request, storage, make_printer(json_output=output.json, quiet=output.quiet), taskhub)
    if metrics is not None:
        metrics.summary = summary_to_wire(summary)
    if nothing_restored(summary, made_dest):
        raise InputError(nothing_message(request))
    sys.exit(exit_code_for(summary))

"""The restore command: its click definition, validation, pre-flight of the container, schedule (or
re-attach to) a ``RestoreSiteContent`` run and host its worker until it finishes.

``--as-of TIME`` picks the run to restore: the latest completed backup of the container and prefix
started at or before TIME (``commands.times``), then restored as by its id; ID is a run reference
(``commands.runref``). ``--prefix`` takes the backup's ``{hostname}``; ``{date}`` and ``{time}`` name when a
backup ran, which ``--as-of`` says. ``--dry-run`` plans the restore here, writing nothing (``plan_restore``).

A restore that finds nothing to restore (a wrong prefix, an empty container, filters that leave nothing)
is an input error, naming the container and prefix it looked in, never "0 files" and exit 0; so is a dry
run that would find nothing.
"""

from __future__ import annotations

import os
import stat
import string
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from azure.storage.blob import ContainerClient
from click.shell_completion import CompletionItem
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container
from sitebackup.blob.naming import is_reserved, normalize_prefix, overlaps, unescape_name, validate_container_name
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.browsing import browsing
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
    LATEST_JOB_HELP,
    Command,
    Output,
    bwlimit_option,
    complete_dirs,
    complete_runs,
    concurrency_option,
    debug_option,
    destination_label,
    job_option,
    max_inflight_option,
    metrics_option,
    output_options,
    start_metrics,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.commands.runref import resolve_run
from sitebackup.commands.times import parse_time
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import EXIT_FILES_FAILED, InputError, exit_codes_help
from sitebackup.local.dest import DestDir, UnsafeName, safe_relpath
from sitebackup.local.files import b64, describe_os_error
from sitebackup.local.filters import make_selector
from sitebackup.model.codec import to_wire
from sitebackup.model.records import ROOT
from sitebackup.model.reports import DryRunItem, RestorePlan, RunStart
from sitebackup.model.work import (
    DEFAULT_CONCURRENCY,
    Concurrency,
    RestoreInput,
    RestoreOptions,
    Summary,
    summary_to_wire,
)
from sitebackup.ui import render
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
    job: str | None = None  # the job `latest` means
    dry_run: bool = False


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
                     state_dir: Path, as_of: str | None = None, owners: bool = True, job: str | None = None,
                     dry_run: bool = False) -> RestoreRequest:
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
                          as_of=parse_time(as_of, end_of_day=True) if as_of else None, job=job, dry_run=dry_run)


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
            # first: under the scheduler the run record itself is read from the container
            endpoint = check_container(settings, container) if request.container else ""
            sealed = sealed_runs(deps.container_client(container)) if request.container else None
            if request.run_id:
                request.run_id = resolve_run(request.run_id, client=client, sealed=sealed,
                                             container=request.container, job=request.job)
                known = known_backup(client, deps.work, request.run_id)
                container = where_to_look(request.run_id, known, request.container, deps.work)
            if sealed is None or container != request.container:
                endpoint = check_container(settings, container)
                sealed = sealed_runs(deps.container_client(container))
            records = deps.records(container)  # the header read here is the plan's: not read twice
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


@dataclass(frozen=True)
class _Wanted:
    """A file a restore would write: its path under DEST, what the run recorded of it (or the blob holds), and why
    it has no copy to restore (None: it has one)."""

    path: str
    size: int
    md5: str | None
    kind: str = "file"
    missing: str | None = None


def plan_restore(request: RestoreRequest, settings: StorageSettings, taskhub: TaskHubSettings | None,
                 on_item: Callable[[DryRunItem], None]) -> RestorePlan:
    """``--dry-run``: what the restore would create, replace, leave as it is (identical) or fail on, each file handed
    to *on_item* as the run's record (or the container's listing) is read beside DEST as it is now. Nothing is
    written: not the run, not DEST (it is not even made). A plan with nothing to restore (no entry but DEST
    itself) is the restore's input error (``nothing_message``), as the restore would end."""
    with browsing(settings, request.state_dir, taskhub, request.container, request.job) as browse:
        run_id = request.run_id
        if request.as_of is not None:
            assert request.container is not None and browse.sealed is not None
            run_id = run_as_of(browse.client, browse.work, browse.sealed, request.container, request.prefix,
                               browse.label, request.as_of)
        if run_id:
            run = browse.open(run_id)
            # what the restore would look in, named if it finds nothing
            request.run_id, request.container = run.run_id, run.container.container_name
            request.prefix = run.label.prefix
            wanted: Iterator[_Wanted] = (
                _Wanted(e.path, e.size, e.md5, e.kind,
                        None if e.stored or not e.is_file else e.error or "no copy recorded")
                for e in browse.entries(run))
            plan = RestorePlan(run_id=run.run_id, source=f"run {run.run_id}", dest=str(request.dest),
                               overwrite=request.overwrite)
        else:
            assert request.container is not None
            wanted = _listed(browse.service.get_container_client(request.container), request.prefix)
            plan = RestorePlan(run_id=None, source=destination_label(request.container, request.prefix),
                               dest=str(request.dest), overwrite=request.overwrite)
        selected = make_selector(request.include, request.exclude)
        dest = DestDir(request.dest)
        anything = False
        for item in wanted:
            found = _planned(dest, item, request.overwrite) if selected(item.path) else None
            if found is None:
                continue
            anything = anything or item.path != ROOT
            if found.action == "create":
                plan.entries_to_create += 1
                plan.bytes_to_create += item.size
            elif found.action == "replace":
                plan.entries_to_replace += 1
                plan.bytes_to_replace += item.size
            elif found.action == "identical":
                plan.entries_identical += 1
                plan.bytes_identical += item.size
            elif found.action == "skip":
                plan.entries_skipped += 1
            else:
                plan.entries_failed += 1
            on_item(found)
    if not anything:
        raise InputError(nothing_message(request))
    return plan


def _listed(container: ContainerClient, prefix: str) -> Iterator[_Wanted]:
    """What a restore of the container (under *prefix*) without a run reads: every blob there now."""
    start = f"{prefix}/" if prefix else None
    for blob in container.list_blobs(name_starts_with=start):
        if not is_reserved(blob.name):
            # the file's own name, control characters and all, as the restore names it (``workflows.fetch``)
            yield _Wanted(unescape_name(blob.name[len(start or ""):]), blob.size,
                          b64(blob.content_settings.content_md5))


def _planned(dest: DestDir, item: _Wanted, overwrite: bool) -> DryRunItem:
    """What the restore would do with *item* at DEST, found as the restore itself decides it, reading only."""
    if item.missing is not None:
        return DryRunItem(action="skip", path=item.path, reason=f"not backed up by the run: {item.missing}")
    try:
        if item.path == ROOT:  # DEST itself
            exists = os.path.isdir(dest.root) and not os.path.islink(dest.root)
            return DryRunItem(action="identical", path=item.path, reason="dir exists") if exists else \
                DryRunItem(action="create", path=item.path, size=0, reason="dir")
        safe_relpath(item.path)
        st = dest.lstat(item.path)
        if st is None:
            return DryRunItem(action="create", path=item.path, size=item.size,
                              reason=None if item.kind == "file" else item.kind)
        if item.kind != "file":  # a directory or symlink already there is kept
            if stat.S_ISDIR(st.st_mode) if item.kind == "dir" else stat.S_ISLNK(st.st_mode):
                return DryRunItem(action="identical", path=item.path, reason=f"{item.kind} exists")
            return DryRunItem(action="fail", path=item.path, error=f"destination exists and is not a {item.kind}")
        if not stat.S_ISREG(st.st_mode):
            return DryRunItem(action="fail", path=item.path, error="destination exists and is not a regular file")
        if item.md5 and st.st_size == item.size and dest.md5_b64(item.path) == item.md5:
            return DryRunItem(action="identical", path=item.path, reason="identical file exists")
    except (UnsafeName, ValueError) as exc:
        return DryRunItem(action="fail", path=item.path, error=f"refused: {exc}")
    except OSError as exc:
        return DryRunItem(action="fail", path=item.path, error=describe_os_error(exc))
    if not overwrite:
        return DryRunItem(action="fail", path=item.path, error="destination exists and differs (use --overwrite)")
    return DryRunItem(action="replace", path=item.path, size=item.size)


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
                   "or before TIME recorded (ISO date and time, local unless an offset is given; a date alone is "
                   "the end of that day; yesterday; 36h ago, 3 days ago).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Only paths matching this glob (repeatable); a pattern without '/' matches any path component.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out paths matching this glob (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace existing files that differ (identical ones are always skipped).")
@click.option("--no-owner", is_flag=True,
              help="Leave what is restored to the user running the restore (as root, owners are restored by default).")
@click.option("--dry-run", is_flag=True, help="List what would be created, replaced and left as it is (identical), "
                                             "with counts and bytes; write nothing, not even DEST.")
@job_option(LATEST_JOB_HELP)
@storage_options
@bwlimit_option
@max_inflight_option
@concurrency_option("Bound on parallel download batches.")
@output_options
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def command(args: tuple[str, ...], container: str | None, prefix: str, as_of: str | None, include: tuple[str, ...],
            exclude: tuple[str, ...], overwrite: bool, no_owner: bool, dry_run: bool, job: str | None,
            storage: StorageSettings, concurrency: int, output: Output, metrics_file: Path | None,
            taskhub: TaskHubSettings | None, state_dir: Path) -> None:
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
    2, naming where it looked. --dry-run lists what would be created, replaced or left as it
    is, and writes nothing.

    ID is a run id, a unique prefix of one (4 characters at least), or `latest`. --as-of takes an
    ISO date and time (local unless it names an offset), a date alone (the end of that day),
    `yesterday`, or a time ago (`36h ago`, `3 days ago`).

    \b
    Examples:
      sitebackup restore 20261127T225602-0dcb81 ./restored
      sitebackup restore latest ./restored --dry-run
      sitebackup restore 20261127T225602-0dcb81 ./restored --include 'css/*' --exclude '*.log'
      sitebackup restore 20261127T225602-0dcb81 ./restored --container backups
      sitebackup restore --container backups --prefix nightly/web ./restored --overwrite
      sitebackup restore --container backups --as-of 2026-03-01T03:00 ./restored
      sitebackup restore --container backups --as-of "2 days ago" ./restored
    """
    if len(args) not in (1, 2) or (len(args) == 1 and not container):
        raise click.UsageError("give ID DEST, or --container NAME [ID] DEST")
    run_id = args[0] if len(args) == 2 else None
    if metrics_file is not None and dry_run:
        raise click.UsageError("--metrics-file describes a finished restore: not with --dry-run")
    metrics = start_metrics(metrics_file, "restore", destination_label(container, prefix) if not run_id else run_id,
                            str(Path(args[-1]).expanduser().resolve()))
    request = validate_restore(
        args[-1], run_id=run_id, container=container, prefix=prefix, include=list(include),
        exclude=list(exclude), overwrite=overwrite, concurrency=concurrency, state_dir=state_dir, as_of=as_of,
        owners=not no_owner, job=job, dry_run=dry_run)
    if dry_run:
        with render.DryRunLines(output.json, output.quiet) as lines:
            plan = plan_restore(request, storage, taskhub, lines.add)
        render.restore_plan(plan, output.json, output.quiet)
        sys.exit(EXIT_FILES_FAILED if plan.entries_failed else 0)
    made_dest = not request.dest.exists()
    summary = run_restore(request, storage, make_printer(json_output=output.json, quiet=output.quiet), taskhub)
    if metrics is not None:
        metrics.summary = summary_to_wire(summary)
    if nothing_restored(summary, made_dest):
        raise InputError(nothing_message(request))
    sys.exit(exit_code_for(summary))

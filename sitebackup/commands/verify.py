"""The verify command, its click definition and its check: every file a backup run recorded has a stored
copy with the recorded size, Content-MD5 and access tier: the copy ``restore ID`` would read (the current
blob, or the snapshot holding that version).

A read-only check, so listings read beside the record (``history.CopyLookup``) and a plain thread pool
rather than an orchestration. ``local`` also compares the source tree on disk: each file's content, mode,
owner and hard link, and each directory and symlink the record holds (kind, mode, owner, symlink target);
``download`` re-hashes that copy's content instead of trusting its Content-MD5.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import click
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import ARCHIVED, classify, is_archived, one_line
from sitebackup.blob.history import Copy, CopyLookup, choose, copy_client
from sitebackup.blob.naming import blob_name, validate_container_name
from sitebackup.blob.records import ContainerRecords, HeaderCache, run_entries
from sitebackup.commands.catalog import known_backup, recorded_run, sealed_runs, where_to_look
from sitebackup.commands.options import (
    LATEST_JOB_HELP,
    Command,
    complete_runs,
    debug_option,
    destination_label,
    job_option,
    json_option,
    metrics_option,
    start_metrics,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.commands.runref import resolve_run
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import (
    EXIT_FILES_FAILED,
    DestinationError,
    InputError,
    exit_codes_help,
)
from sitebackup.local.files import b64, file_md5_b64
from sitebackup.model.codec import to_wire
from sitebackup.model.records import FileEntry, target_bytes
from sitebackup.model.reports import Mismatch, VerifyReport
from sitebackup.model.work import Concurrency
from sitebackup.ui.escape import printable

CHECKS = Concurrency()  # blobs checked at once
IN_FLIGHT_PER_THREAD = 4


def blob_problem(container: ContainerClient, copies: list[Copy], rec: FileEntry, download: bool) -> str | None:
    """Why no copy among *copies* (a blob name's) holds the version *rec* recorded, in one line; None when one
    does (``download``: its content hashed, not its Content-MD5 trusted)."""
    if not copies:
        return "blob missing"
    copy = choose(copies, rec.md5)
    if copy is None:
        return "no copy with the recorded Content-MD5 (the blob was overwritten, or the version pruned)"
    if copy.size != rec.size:
        return f"blob size {copy.size} != recorded {rec.size}"
    tier = getattr(copy.tier, "value", copy.tier)
    if rec.tier and tier != rec.tier:
        return f"blob tier {tier} != recorded {rec.tier}"
    if download:
        digest = hashlib.md5()
        try:
            for chunk in copy_client(container, copy).download_blob(decompress=False).chunks():
                digest.update(chunk)
        except ResourceNotFoundError:
            return "blob missing"
        if b64(digest.digest()) != rec.md5:
            return "blob content does not match the recorded MD5"
    return None


def _local_problem(source: Path, rec: FileEntry) -> str | None:
    path = os.path.join(source, rec.path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "local file missing"
    except OSError as exc:
        return f"local file unreadable: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "local entry is not a regular file"
    if st.st_size != rec.size:
        return f"local size {st.st_size} != recorded {rec.size}"
    try:
        if file_md5_b64(path) != rec.md5:
            return "local content differs from the recorded MD5"
    except OSError as exc:
        return f"local file unreadable: {exc.strerror}"
    if rec.link is not None:
        try:
            first = os.lstat(os.path.join(source, rec.link))
        except OSError:
            first = None
        if first is None or (first.st_dev, first.st_ino) != (st.st_dev, st.st_ino):
            return f"local file is not a hard link to {rec.link}"
    return _metadata_problem(st, rec)


def _local_tree_problem(source: Path, rec: FileEntry) -> str | None:
    """What differs between a directory or symlink the record holds and the source tree's entry at its path."""
    path = os.path.join(source, rec.path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"local {rec.kind} missing"
    except OSError as exc:
        return f"local {rec.kind} unreadable: {exc.strerror}"
    if rec.kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return "local entry is not a directory"
    if rec.kind == "symlink":
        if not stat.S_ISLNK(st.st_mode):
            return "local entry is not a symlink"
        if os.readlink(os.fsencode(path)) != target_bytes(rec.target or ""):
            return "local symlink target differs from the recorded one"
    return _metadata_problem(st, rec)


def _metadata_problem(st: os.stat_result, rec: FileEntry) -> str | None:
    if rec.mode is not None and stat.S_IMODE(st.st_mode) != rec.mode:
        return f"local mode {stat.S_IMODE(st.st_mode):04o} != recorded {rec.mode:04o}"
    if rec.uid is not None and (st.st_uid, st.st_gid) != (rec.uid, rec.gid):
        return f"local owner {st.st_uid}:{st.st_gid} != recorded {rec.uid}:{rec.gid}"
    return None


def verify_run(state_dir: Path, run_id: str, settings: StorageSettings, on_mismatch: Callable[[Mismatch], None],
               *, local: bool = False, download: bool = False, taskhub: TaskHubSettings | None = None,
               container_name: str | None = None, on_note: Callable[[str], None] = lambda note: None,
               of_job: str | None = None) -> VerifyReport:
    """Check the run's record (*run_id* a run reference: ``commands.runref``; *of_job* the job ``latest`` means) as
    it is read: memory holds the files in flight and what the lookup of recorded
    versions holds (``history.CopyLookup``), not the record nor its mismatches: each goes to *on_mismatch* as
    it is found, in record order."""
    settings.require()
    with open_backend(state_dir, taskhub) as runtime, \
            service_client(settings) as (service, label):
        work = runtime.work_store(service)
        if container_name:  # first: under the scheduler the run record itself is read from the container
            check_container(settings, container_name)
        with runtime.connected() as client:
            run_id = resolve_run(run_id, client=client, container=container_name, job=of_job,
                                 sealed=sealed_runs(service.get_container_client(container_name))
                                 if container_name else None)
            known = known_backup(client, work, run_id)
        where = where_to_look(run_id, known, container_name, work)
        if where != container_name:
            check_container(settings, where)
        sealed = ContainerRecords(service.get_container_client(where), HeaderCache())  # its header read once
        inp = recorded_run(sealed, work, run_id, known)
        records = run_entries(sealed, work, run_id, on_note)
        first = next(records, None)
        if first is None:
            raise InputError(f"run {run_id!r} recorded no files (nothing was copied, or it was purged)")
        container = service.get_container_client(inp.container)
        lookup = CopyLookup(container, inp.prefix)
        counts = {"checked": 0, "not_backed_up": 0, "mismatched": 0, "tree": 0, "tree_mismatched": 0}

        def looked_up() -> Iterator[tuple[FileEntry, str, list[Copy]]]:
            for rec in itertools.chain([first], records):
                if not rec.is_file:  # a directory or symlink: nothing stored, its metadata checked with --local
                    if local:
                        counts["tree"] += 1
                        yield rec, "", []
                    continue
                if not rec.stored:
                    counts["not_backed_up"] += 1
                    continue
                counts["checked"] += 1
                name = blob_name(inp.prefix, rec.path)
                try:
                    copies = lookup.copies(name)
                except Exception as exc:
                    raise classify(exc, label) or DestinationError(
                        f"cannot list {inp.container!r}: {one_line(exc)}") from None
                yield rec, name, copies

        def check(rec: FileEntry, name: str, copies: list[Copy]) -> Mismatch | None:
            if not rec.is_file:
                problem = _local_tree_problem(Path(inp.source), rec)
                return None if problem is None else Mismatch(rec.path, name, problem)
            try:
                problem = blob_problem(container, copies, rec, download)
            except Exception as exc:
                fatal = classify(exc, label)
                if fatal is not None:
                    raise fatal from None
                problem = f"cannot check blob: {ARCHIVED if is_archived(exc) else one_line(exc)}"
            if problem is None and local:
                problem = _local_problem(Path(inp.source), rec)
            return None if problem is None else Mismatch(rec.path, name, problem)

        def take(future: Future[Mismatch | None]) -> None:
            mismatch = future.result()
            if mismatch is not None:
                counts["mismatched" if mismatch.blob else "tree_mismatched"] += 1
                on_mismatch(mismatch)

        with ThreadPoolExecutor(max_workers=CHECKS.batches) as pool:
            # checks in flight are bounded, their results taken in record order
            in_flight: deque[Future[Mismatch | None]] = deque()
            for job in looked_up():
                in_flight.append(pool.submit(check, *job))
                while in_flight and (len(in_flight) > IN_FLIGHT_PER_THREAD * CHECKS.batches or in_flight[0].done()):
                    take(in_flight.popleft())
            while in_flight:
                take(in_flight.popleft())
    return VerifyReport(run_id=run_id, container=inp.container, prefix=inp.prefix, source=inp.source, local=local,
                        download=download, files_checked=counts["checked"],
                        files_ok=counts["checked"] - counts["mismatched"], files_mismatched=counts["mismatched"],
                        files_not_backed_up=counts["not_backed_up"], tree_checked=counts["tree"],
                        tree_mismatched=counts["tree_mismatched"])


@click.command("verify", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 5, 70, 130))
@click.argument("instance_id", metavar="ID", shell_complete=complete_runs("backups"))
@click.option("--local", is_flag=True, help="Also compare with the source tree on disk: files' size, MD5, mode, owner "
                                            "and hard links; directories and symlinks (mode, owner, target).")
@click.option("--download", is_flag=True, help="Re-hash blob content instead of trusting its Content-MD5.")
@click.option("--container", "-c", help="Read the run's sealed record from this container (a run this state "
                                       "directory does not know: a new machine needs only this).")
@job_option(LATEST_JOB_HELP)
@storage_options
@json_option("Print one JSON object with counts and mismatches.")
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def command(instance_id: str, local: bool, download: bool, container: str | None, job: str | None,
            storage: StorageSettings, json_output: bool,
            metrics_file: Path | None, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Check that a backup run's blobs are intact.

    Every blob the run recorded must be present, with the same size and Content-MD5 (and the
    access tier the run set with --tier). ID is a run id, a unique prefix of one (4 characters
    at least), or `latest`.

    \b
    Examples:
      sitebackup verify 20261127T225602-0dcb81
      sitebackup verify 20261127T225602-0dcb81 --local --download --json
      sitebackup verify 20261127T225602-0dcb81 --container backups
    """
    # until the run is found, its id stands for the job; then the backup job it verifies does
    metrics = start_metrics(metrics_file, "verify", instance_id, "")
    mismatches: list[Mismatch] = []

    def listed(m: Mismatch) -> None:
        click.echo(printable(f"MISMATCH {m.path}: {m.problem}"), err=True)

    # listed as found (a run of a million changed files lists them all without holding them); --json's one
    # object carries them in a list
    report = verify_run(state_dir, instance_id, storage, mismatches.append if json_output else listed, local=local,
                        download=download, taskhub=taskhub,
                        container_name=validate_container_name(container) if container else None,
                        on_note=lambda note: click.echo(printable(f"sitebackup: note: {note}"), err=True), of_job=job)
    if metrics is not None:
        metrics.source, metrics.destination = report.source, destination_label(report.container, report.prefix)
        metrics.summary = to_wire(report)
    if json_output:
        click.echo(json.dumps({**to_wire(report), "mismatches": to_wire(mismatches)}))
    else:
        click.echo(f"{report.run_id}: {report.files_ok}/{report.files_checked} blobs match, "
                   f"{report.files_mismatched} mismatched, {report.files_not_backed_up} not backed up by the run"
                   + (f"; {report.tree_checked - report.tree_mismatched}/{report.tree_checked} directories and "
                      "symlinks match" if local else ""))
    sys.exit(EXIT_FILES_FAILED if report.files_mismatched or report.tree_mismatched else 0)

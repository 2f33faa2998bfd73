"""The prune command, its click definition and its work: keep rules over the completed backup runs of one
destination (container and prefix), then remove what only the dropped runs needed.

Copies are referenced by blob name and Content-MD5 from run records. A copy (the current blob or a
snapshot) is removed when no remaining run references its name with its MD5: not a kept run, not an
unfinished one, not a run to another prefix whose names overlap. Only names some run known to this
backend wrote are touched, so blobs another state directory or another tool put in the container
stay. Failed and cancelled runs of the destination are dropped: like restic's interrupted backups,
they are not snapshots anyone keeps. Before it reads any record, prune takes the lock in the container
(``blob.lock``) of every job whose prefix overlaps the pruned one and holds them until it is done, so no
backup of those jobs, from any host or state directory, runs meanwhile; a backup of the container that a
live process of this state directory is running makes it refuse too (it would race the uploads). A dry run
changes nothing and takes no lock.

The order makes a prune killed at any point, then run again, finish the job with kept runs intact:
decide; mark every dropped run pruned (the journal: a marked run stays dropped whatever the next
attempt's rules say); delete the copies; remove the dropped runs' records, keeping their marks as
tombstones; purge their durable history last.

Memory does not grow with the number of names: what the runs recorded goes to a temporary database in
the state directory, read beside the container's listing (both in name order), and each name's copies
to remove are counted (the dry run's report) or deleted as the listing reaches them.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import itertools
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContainerClient
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import classify, one_line
from sitebackup.blob.history import Copy, copy_client, list_copies
from sitebackup.blob.lock import Claim, HeldLocks, prefix_locks
from sitebackup.blob.naming import blob_name, normalize_prefix, overlaps, validate_container_name
from sitebackup.blob.records import ContainerRecords, run_entries
from sitebackup.blob.workstore import BlobWorkStore, WorkStore
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.catalog import SealedRun, overlapping, sealed_runs
from sitebackup.commands.hosting import backup_runs, claim_of
from sitebackup.commands.options import (
    Command,
    F,
    debug_option,
    destination_label,
    json_option,
    lock_wait_option,
    metrics_option,
    parse_age,
    start_metrics,
    state_dir_option,
    storage_options,
    taskhub_option,
)
from sitebackup.commands.retention import Policy, apply_policy
from sitebackup.durable.backend.statedir import prepare
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import Runtime, open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import (
    AlreadyRunningError,
    DestinationError,
    InputError,
    StateFullError,
    exit_codes_help,
    write_fault,
)
from sitebackup.model.codec import DamagedData, to_wire
from sitebackup.model.records import PruneMark
from sitebackup.model.reports import KeptRun, PruneReport, RemovedRun
from sitebackup.model.work import Concurrency
from sitebackup.ui import render

DELETES = Concurrency()  # deletes at once
IN_FLIGHT = 16 * DELETES.batches  # deletes handed to the pool and not done: the listing waits for them
SCRATCH = ".prune-"  # the temporary database's name in the state directory: .prune-XXXXXXXX.db
SCHEMA = "CREATE TABLE needed (name TEXT NOT NULL, md5 TEXT NOT NULL, PRIMARY KEY (name, md5)) WITHOUT ROWID"
INCOMPLETE = "failed or cancelled"
EARLIER_PRUNE = "dropped by an earlier prune that did not finish"


@dataclass
class PruneRequest:
    container: str
    prefix: str
    policy: Policy
    dry_run: bool = False
    state_dir: Path = field(default_factory=Path)
    lock_wait: timedelta | None = None  # how long to wait for the jobs' locks held by other processes; None: not


def prune_request(container: str, prefix: str | None, policy: Policy, *, dry_run: bool,
                  state_dir: Path, lock_wait: timedelta | None = None) -> PruneRequest:
    if policy.empty():
        raise InputError("give at least one --keep-* rule (the newest run is always kept; nothing else would be)")
    return PruneRequest(container=validate_container_name(container), prefix=normalize_prefix(expand_prefix(prefix)),
                        policy=policy, dry_run=dry_run, state_dir=state_dir, lock_wait=lock_wait)


def unneeded(copies: list[Copy], needed: set[str]) -> list[Copy]:
    """The copies of one blob name that no remaining run needs, given the Content-MD5s they reference there.

    A needed version keeps one copy: the current blob if it holds it, else the newest snapshot that
    does. The current blob goes only when no snapshot stays (a blob cannot lose its base and keep
    snapshots): until then it is kept, unreferenced.
    """
    base = next((c for c in copies if c.snapshot is None), None)
    held = {base.md5} if base is not None and base.md5 in needed else set()
    snapshot_kept = False
    drop = []
    for copy in sorted((c for c in copies if c.snapshot is not None), key=lambda c: c.snapshot or "", reverse=True):
        if copy.md5 in needed and copy.md5 not in held:
            held.add(copy.md5)
            snapshot_kept = True
        else:
            drop.append(copy)
    if base is not None and base.md5 not in needed and not snapshot_kept:
        drop.append(base)
    return drop


@dataclass(frozen=True)
class PruneRun:
    """A backup run prune decides about: sealed in the container, or known to this backend (unfinished, failed,
    cancelled, or completed by an earlier version and never sealed)."""

    run_id: str
    started: datetime
    prefix: str
    job: str  # the keep rules apply per job
    sealed: bool
    finished: bool = True
    completed: bool = True


def _runs(client: dt_client.TaskHubGrpcClient, sealed: list[SealedRun], container: str, endpoint: str,
          prefix: str) -> list[PruneRun]:
    """Every run whose names can be the names of a run into *prefix*, sealed or known here, oldest first."""
    runs = {run.run_id: PruneRun(run.run_id, run.started, run.prefix or "", run.entry.job, sealed=True)
            for run in overlapping(sealed, prefix)}
    for local in backup_runs(client, container, endpoint):
        if local.instance_id in runs or not overlaps(prefix, local.label.prefix):
            continue
        job = local.label.job.id if local.label.job else f"{local.label.source}\0{local.label.prefix}"
        runs[local.instance_id] = PruneRun(local.instance_id, local.created_at, local.label.prefix, job, sealed=False,
                                           finished=local.finished,
                                           completed=local.status == dt_client.OrchestrationStatus.COMPLETED)
    return sorted(runs.values(), key=lambda run: run.started)


def run_prune(request: PruneRequest, settings: StorageSettings, taskhub: TaskHubSettings | None = None
              ) -> PruneReport:
    endpoint = check_container(settings.require(), request.container)
    # the locks before any record is read, held until the last record is removed
    with _job_locks(request, settings) as locks, open_backend(request.state_dir, taskhub) as runtime, \
            service_client(settings) as (service, label):
        container = service.get_container_client(request.container)
        records = ContainerRecords(container)
        # under the scheduler the records live in this container: no need to look it up per run
        work = runtime.work_store(service) if taskhub is None else BlobWorkStore(lambda _run_id: container)
        with runtime.connected() as client:
            runs = _runs(client, sealed_runs(container), request.container, endpoint, request.prefix)
            _refuse_if_live(runtime, runs)
            kept, dropped = _decide(request, runs, records, work)
            remaining = [run for run in runs if run.run_id not in dropped]
            freed = Freed()
            unsure: list[str] = []  # the records of remaining runs that cannot be read whole
            lost: list[str] = []  # those of dropped runs
            with _needed(request.state_dir, records, work, remaining, [run for run in runs if run.run_id in dropped],
                         label, unsure, lost) as needed:
                # a remaining run whose record is damaged may need any copy: then none is removed
                unreferenced = freed.count(iter(()) if unsure else _sweep(container, request.prefix, needed, label))
                notes = [f"{why}: no copy was removed, as that run may need any of them (see sitebackup check)"
                         for why in unsure]
                notes += [f"{why}: the copies only that run held are left in place" for why in lost]
                if request.dry_run:
                    collections.deque(unreferenced, maxlen=0)
                    return _report(request, runs, kept, dropped, freed, notes)
                mark = PruneMark(at=datetime.now(timezone.utc).isoformat(), container=request.container,
                                 prefix=request.prefix)
                locks.check()
                for run in runs:  # the journal a killed prune resumes from, and the tombstones after
                    if run.run_id in dropped:
                        records.mark_pruned(run.run_id, mark)
                        if work.pruned(run.run_id) is None:
                            work.mark_pruned(run.run_id, mark)
                delete_copies(container, _while_held(locks, unreferenced), label)
            locks.check()
            _forget(client, records, work, runs, dropped)
    return _report(request, runs, kept, dropped, freed, notes)


def _forget(client: dt_client.TaskHubGrpcClient, records: ContainerRecords, work: WorkStore, runs: list[PruneRun],
            dropped: dict[str, str]) -> None:
    """Once their copies are gone: the dropped runs' sealed headers, the record pages no remaining run of their
    job names, their pages and history here. Their tombstones stay."""
    jobs = {run.job for run in runs if run.run_id in dropped and run.sealed}
    for run in runs:
        if run.run_id in dropped:
            records.remove_run(run.run_id)
            work.remove(run.run_id, keep_mark=True)
            client.purge_orchestration(run.run_id, recursive=True)
    for job in jobs:
        pages: set[str] = set()
        for entry in records.catalog():
            header = records.header(entry.run_id) if entry.job == job else None
            if header is not None:
                pages.update(seal.sha256 for seal in header.pages)
        records.remove_pages_but(job, pages)


@contextmanager
def _job_locks(request: PruneRequest, settings: StorageSettings) -> Iterator[HeldLocks]:
    """The container locks of the jobs this prune changes (``blob.lock.prefix_locks``), taken under a run lock of
    this state directory that ties them to it (``blob.lock.Claim``): a prune killed while it held them and run
    again from here takes them at once, and finishes its job. A dry run changes nothing and takes none."""
    if request.dry_run:
        yield HeldLocks([])
        return
    prepare(request.state_dir)  # owner-only, before the run lock's file is made in it
    local = RunLock.for_prune(request.state_dir, request.container, request.prefix)
    try:
        try:
            claim = claim_of(local) if local.try_acquire() else Claim()
        except OSError:  # a state directory that takes no file: the locks of a killed prune lapse instead
            claim = Claim()
        with prefix_locks(settings, request.container, request.prefix, "prune", request.lock_wait, claim) as locks:
            yield locks
    finally:
        local.release()


def _while_held(locks: HeldLocks, groups: Iterable[list[Copy]]) -> Iterator[list[Copy]]:
    """*groups*, each once the locks are checked: a prune whose lock lapsed stops before its next delete."""
    for group in groups:
        locks.check()
        yield group


def _refuse_if_live(runtime: Runtime, runs: list[PruneRun]) -> None:
    for run in runs:
        # the scheduler cannot tell whether a worker holds a run (None): assume one does
        if not run.finished and runtime.worker_attached(run.run_id) is not False:
            raise AlreadyRunningError(f"backup {run.run_id} into {run.prefix or 'the container root'} is running: "
                                      "prune after it has finished (or cancel it)", run.run_id)


def _decide(request: PruneRequest, runs: list[PruneRun], records: ContainerRecords,
            work: WorkStore) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(kept run id -> why, dropped run id -> why) among the finished runs into exactly this prefix, the keep rules
    applied to each job's runs apart."""
    mine = [run for run in runs if run.prefix == request.prefix and run.finished]
    kept: dict[str, list[str]] = {}
    dropped: dict[str, str] = {}
    by_job: dict[str, list[tuple[str, datetime]]] = {}
    for run in mine:
        if work.pruned(run.run_id) is not None or (run.sealed and records.pruned(run.run_id) is not None):
            dropped[run.run_id] = EARLIER_PRUNE
        elif not run.completed:
            dropped[run.run_id] = INCOMPLETE
        else:
            by_job.setdefault(run.job, []).append((run.run_id, run.started))
    for candidates in by_job.values():
        decision = apply_policy(candidates, request.policy)
        kept.update(decision.keep)
        dropped.update((run_id, "not kept by any rule") for run_id in decision.drop)
    return kept, dropped


def _records(records: ContainerRecords, work: WorkStore, runs: Iterable[PruneRun],
             damaged: list[str]) -> Iterable[tuple[str, str]]:
    """(blob name, Content-MD5) of every copy the runs' records name; a page sealed runs share is read once. A
    record that cannot be read whole is named in *damaged*, and the other runs go on."""
    seen: set[str] = set()
    for run in runs:
        try:
            for entry in run_entries(records if run.sealed else None, work, run.run_id, seen=seen):
                if entry.md5 is not None:
                    try:
                        yield blob_name(run.prefix, entry.path), entry.md5
                    except ValueError:  # a name no blob can have: nothing stored under it
                        continue
        except DamagedData as exc:
            damaged.append(str(exc))


@contextmanager
def _needed(state_dir: Path, records: ContainerRecords, work: WorkStore, remaining: list[PruneRun],
            dropped: list[PruneRun], label: str, unsure: list[str], lost: list[str]) -> Iterator[sqlite3.Connection]:
    """A temporary database of what the runs recorded (``scratch_database``): (name, MD5) of every file the
    remaining runs need, and (name, "") of a name only the dropped runs wrote."""
    with scratch_database(state_dir, SCHEMA) as db:
        try:
            with db:
                db.executemany("INSERT OR IGNORE INTO needed VALUES (?, ?)", _records(records, work, remaining, unsure))
                db.executemany("INSERT INTO needed SELECT ?1, '' WHERE NOT EXISTS "
                               "(SELECT 1 FROM needed WHERE name = ?1)",
                               ((name,) for name, _ in _records(records, work, dropped, lost)))
        except Exception as exc:
            raise state_full(state_dir, exc) or classify(exc, label) or \
                DestinationError(f"cannot read the records of the runs: {one_line(exc)}") from None
        yield db


@contextmanager
def scratch_database(state_dir: Path, schema: str, stem: str = SCRATCH) -> Iterator[sqlite3.Connection]:
    """A temporary database in *state_dir* made with *schema* (a script), locked while this process lives and
    removed on the way out, as are the ones of killed processes named *stem*...: a command's working set of
    names on disk, so its memory does not grow with them. It holds names and hashes, no secrets."""
    prepare(state_dir)  # under the scheduler nothing else has made it
    _remove_stale(state_dir, stem)
    try:
        fd, path = _scratch(state_dir, stem)
    except OSError as exc:
        raise (state_full(state_dir, exc) or exc) from None
    db = None
    try:
        try:
            db = sqlite3.connect(path)
            # a scratch file nobody reads after a crash: no journal, no fsync
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.executescript(schema)
        except Exception as exc:
            raise (state_full(state_dir, exc) or exc) from None
        yield db
    finally:
        if db is not None:
            db.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _scratch(state_dir: Path, stem: str) -> tuple[int, str]:
    """A new owner-only file for the temporary database, and a descriptor holding its lock while its process lives."""
    while True:
        fd, path = tempfile.mkstemp(prefix=stem, suffix=".db", dir=state_dir)  # 0600, O_EXCL
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return fd, path
        os.close(fd)  # taken for a killed process's and removed before it was locked: another name


def _remove_stale(state_dir: Path, stem: str) -> None:
    """Remove the temporary databases of processes that were killed (nothing holds their lock): they can be large."""
    for path in state_dir.glob(f"{stem}*.db"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:  # a live process's
            pass
        finally:
            os.close(fd)


def state_full(state_dir: Path, exc: BaseException) -> StateFullError | None:
    """The one-line error when *exc* says the state directory cannot be written (full, read-only)."""
    cause = write_fault(exc)
    return StateFullError(state_dir, cause, kept="nothing was removed") if cause else None


def needed_beside(groups: Iterable[tuple[str, list[Copy]]], needed: sqlite3.Connection
                  ) -> Iterator[tuple[list[Copy], set[str]]]:
    """Each listed name in the *needed* table, with its copies and the MD5s remaining runs reference there.

    Azure lists names in UTF-8 byte order, which is the table's (SQLite compares TEXT with memcmp) and
    Python's (code points): one pass reads the table beside the listing. A name listed after a greater one
    (the orders disagree) is looked up alone: a disagreement costs a query, never a wrong answer.
    """
    rows = needed.execute("SELECT name, md5 FROM needed ORDER BY name")
    row = next(rows, None)
    last = ""  # the greatest name listed so far: the table is read up to it
    for name, copies in groups:
        if name < last:
            md5s = [md5 for (md5,) in needed.execute("SELECT md5 FROM needed WHERE name = ?", (name,))]
        else:
            last = name
            while row is not None and row[0] < name:
                row = next(rows, None)
            md5s = []
            while row is not None and row[0] == name:
                md5s.append(row[1])
                row = next(rows, None)
        if md5s:
            yield copies, {md5 for md5 in md5s if md5}


def _sweep(container: ContainerClient, prefix: str, needed: sqlite3.Connection, label: str) -> Iterator[list[Copy]]:
    """Per name runs here wrote, as the container lists it, the copies no remaining run references (``unneeded``)."""
    for copies, md5s in needed_beside(listed_names(container, prefix, label), needed):
        unreferenced = unneeded(copies, md5s)
        if unreferenced:
            yield unreferenced


def listed_names(container: ContainerClient, prefix: str, label: str) -> Iterator[tuple[str, list[Copy]]]:
    """Each blob name under *prefix* (sitebackup's reserved names left out) with its copies, as the container
    lists them."""
    # a name's copies are listed together, whatever the service's order among them
    return ((name, list(copies)) for name, copies in itertools.groupby(_listing(container, prefix, label),
                                                                       key=lambda c: c.name))


def _listing(container: ContainerClient, prefix: str, label: str) -> Iterator[Copy]:
    try:
        yield from list_copies(container, prefix)
    except Exception as exc:
        raise classify(exc, label) or DestinationError(f"cannot list {container.container_name!r}: {one_line(exc)}") \
            from None


@dataclass
class Freed:
    """What the copies to delete add up to: the report's counts, kept as the listing goes."""

    blobs: int = 0
    snapshots: int = 0
    bytes: int = 0

    def count(self, groups: Iterable[list[Copy]]) -> Iterator[list[Copy]]:
        for unreferenced in groups:
            for copy in unreferenced:
                self.blobs += copy.snapshot is None
                self.snapshots += copy.snapshot is not None
                self.bytes += copy.size
            yield unreferenced


def delete_copies(container: ContainerClient, groups: Iterable[list[Copy]], label: str) -> None:
    """Delete each name's unreferenced copies as the listing yields them, IN_FLIGHT at most waiting on the pool.

    A current blob goes with its snapshots, only while it is what was listed (its ETag); one a backup replaced
    since keeps its new content, and the snapshots listed go one by one. The first failure stops the pass."""
    slots = threading.Semaphore(IN_FLIGHT)
    failed: list[BaseException] = []

    def done(future: Future[None]) -> None:
        error = future.exception()
        if error is not None:
            failed.append(error)
        slots.release()

    with ThreadPoolExecutor(max_workers=DELETES.batches) as pool:
        for copy, snapshots in itertools.chain.from_iterable(map(_deletes, groups)):
            slots.acquire()
            if failed:
                break
            pool.submit(_delete_copy, container, copy, snapshots, label).add_done_callback(done)
    if failed:
        raise failed[0]


def _deletes(unreferenced: list[Copy]) -> list[tuple[Copy, list[Copy]]]:
    """The deletes of one name's unreferenced copies: its base (with the snapshots to delete if the base changed),
    or else each snapshot. Snapshots of a base that goes are deleted with it."""
    base = next((c for c in unreferenced if c.snapshot is None), None)
    snapshots = [c for c in unreferenced if c.snapshot is not None]
    return [(base, snapshots)] if base is not None else [(c, []) for c in snapshots]


def _delete_copy(container: ContainerClient, copy: Copy, snapshots: list[Copy], label: str) -> None:
    try:
        if copy.snapshot is not None:
            copy_client(container, copy).delete_blob()
            return
        try:
            container.get_blob_client(copy.name).delete_blob(delete_snapshots="include", etag=copy.etag,
                                                             match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            for snapshot in snapshots:
                _delete_copy(container, snapshot, [], label)
    except ResourceNotFoundError:  # gone already: an earlier attempt deleted it
        pass
    except Exception as exc:
        raise classify(exc, label) or DestinationError(f"cannot delete {copy.name!r}: {one_line(exc)}") from None


def _report(request: PruneRequest, runs: list[PruneRun], kept: dict[str, list[str]], dropped: dict[str, str],
            freed: Freed, notes: list[str]) -> PruneReport:
    created = {run.run_id: run.started.isoformat() for run in runs}
    return PruneReport(
        container=request.container, prefix=request.prefix, dry_run=request.dry_run,
        kept=[KeptRun(instance_id=run_id, created_at=created[run_id], reasons=why) for run_id, why in kept.items()],
        removed=[RemovedRun(instance_id=run_id, created_at=created[run_id], reason=why)
                 for run_id, why in sorted(dropped.items(), key=lambda item: created[item[0]], reverse=True)],
        unfinished=[run.run_id for run in runs if not run.finished and run.prefix == request.prefix],
        blobs_removed=freed.blobs, snapshots_removed=freed.snapshots, bytes_removed=freed.bytes, notes=notes)


def keep_options(command: Callable[..., None]) -> Callable[..., None]:
    """The --keep-* rules as one ``policy: Policy``."""

    @functools.wraps(command)
    def with_policy(*, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
                    keep_within: str | None, **params: Any) -> None:
        command(policy=Policy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                              monthly=keep_monthly, within=parse_age(keep_within) if keep_within else None), **params)

    def keep_count(name: str, what: str) -> Callable[[F], F]:
        return click.option(f"--keep-{name}", type=click.IntRange(min=0), default=0, metavar="N",
                            help=f"Keep the newest run of each of the last N {what} that have runs.")

    options = [
        click.option("--keep-last", type=click.IntRange(min=0), default=0, metavar="N", help="Keep the N newest runs."),
        keep_count("hourly", "hours"),
        keep_count("daily", "days"),
        keep_count("weekly", "weeks"),
        keep_count("monthly", "months"),
        click.option("--keep-within", metavar="DURATION",
                     help="Keep every run started less than DURATION (30d, 12h, 2w) before the newest run."),
    ]
    for option in reversed(options):
        with_policy = option(with_policy)
    return with_policy


@click.command("prune", cls=Command, epilog=exit_codes_help(0, 2, 3, 4, 5, 70, 130))
@click.option("--container", "-c", required=True, help="The destination whose backup runs to prune.")
@click.option("--prefix", default="", help="The destination's blob name prefix, as given to the backups "
                                           "({hostname}, {date} and {time} expanded the same way).")
@keep_options
@click.option("--dry-run", is_flag=True, help="List the runs, blobs and bytes that would be removed; remove nothing.")
@json_option("Print one JSON object.")
@lock_wait_option
@storage_options
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def command(container: str, prefix: str, policy: Policy, dry_run: bool, json_output: bool, lock_wait: timedelta | None,
            storage: StorageSettings, metrics_file: Path | None, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Forget old backup runs of a destination and free what only they kept.

    Keep rules as restic's forget: a run any rule keeps is kept, the newest completed run always
    is, unfinished runs are never touched, failed and cancelled runs are dropped. Dropped runs lose
    their record and history; every blob and snapshot no remaining run references goes.

    A prune that is interrupted finishes its job when run again. It holds the lock of every job
    whose prefix overlaps the pruned one: while a backup or prune of one of them runs, it exits 4
    at once, or waits up to --lock-wait (a dry run takes no lock).

    \b
    Examples:
      sitebackup prune -c backups --prefix web --keep-daily 7 --keep-weekly 4 --keep-monthly 12
      sitebackup prune -c backups --keep-last 3 --dry-run
      sitebackup prune -c backups --keep-daily 7 --lock-wait 2h
      sitebackup prune -c backups --keep-daily 7 --metrics-file /var/lib/node_exporter/prune.prom
    """
    if metrics_file is not None and dry_run:
        raise click.UsageError("--metrics-file describes a finished prune: not with --dry-run")
    metrics = start_metrics(metrics_file, "prune", "", destination_label(container, prefix))
    request = prune_request(container, prefix, policy, dry_run=dry_run, state_dir=state_dir, lock_wait=lock_wait)
    report = run_prune(request, storage, taskhub)
    if metrics is not None:
        metrics.summary = {"runs_kept": len(report.kept), "runs_removed": len(report.removed),
                           "blobs_removed": report.blobs_removed, "snapshots_removed": report.snapshots_removed,
                           "bytes_removed": report.bytes_removed}
    if json_output:
        click.echo(json.dumps(to_wire(report)))
    else:
        render.prune_report(report)

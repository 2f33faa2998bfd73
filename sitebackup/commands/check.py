"""The check command, its click definition and its work (restic's ``check``): whether the backup a container
holds is whole, read from the container alone.

Every sealed run (``blob.records``): its header decodes, and each page its seal names is there with that
SHA-256 and size and decodes. Every copy a run references (a stored file's blob name and Content-MD5) is
in the container with that Content-MD5 and size; with --read-data its content is downloaded and hashed.
It also names headers the catalog cannot list, and, as information, runs a prune dropped without
finishing and record pages no header names.

Read-only: nothing in the container changes, and the state directory gets only prune's temporary
database (``prune.scratch_database``), removed on the way out. What the runs reference goes there as
(name, MD5), once however many runs share it, and is read beside one listing of the container with
snapshots (``prune.needed_beside``): memory does not grow with the names, and each copy is checked, or
downloaded, once. A record page several runs of one prefix share (an unchanged tree) is read once too.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from os.path import commonprefix
from pathlib import Path
from typing import TypeVar

import click
import msgspec
from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import ARCHIVED, classify, is_archived, one_line
from sitebackup.blob.history import Copy, choose
from sitebackup.blob.naming import blob_name, normalize_prefix, overlaps, validate_container_name
from sitebackup.blob.records import PRUNED, RECORDS, RUNS, ContainerRecords
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.options import (
    Command,
    debug_option,
    json_option,
    state_dir_option,
    storage_options,
)
from sitebackup.commands.prune import listed_names, needed_beside, scratch_database, state_full
from sitebackup.commands.verify import CHECKS, IN_FLIGHT_PER_THREAD, blob_problem
from sitebackup.errors import EXIT_FILES_FAILED, DestinationError, exit_codes_help
from sitebackup.model.codec import DamagedData, decode, to_wire
from sitebackup.model.records import FileEntry, RunRecord
from sitebackup.ui.escape import printable

T = TypeVar("T")
R = TypeVar("R")

SCRATCH = ".check-"  # the temporary database's name in the state directory: .check-XXXXXXXX.db
# needed: each copy a run references, with the size and the run and path it is named by (the first run read:
# runs are read newest first); listed: the names the container's listing held; named: every page a header
# names; read: the pages whose entries are in needed, per prefix (a page's names depend on its run's prefix)
SCHEMA = """
CREATE TABLE needed (name TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL, run TEXT NOT NULL,
                     path TEXT NOT NULL, PRIMARY KEY (name, md5)) WITHOUT ROWID;
CREATE TABLE listed (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE named (sha256 TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE read (sha256 TEXT NOT NULL, prefix TEXT NOT NULL, PRIMARY KEY (sha256, prefix)) WITHOUT ROWID;
"""
DAMAGED, MISSING, UNLISTED = "DAMAGED", "MISSING", "UNLISTED"


@dataclass
class CheckRequest:
    container: str
    prefix: str
    read_data: bool = False
    state_dir: Path = field(default_factory=Path)


def check_request(container: str, prefix: str | None, *, read_data: bool, state_dir: Path) -> CheckRequest:
    return CheckRequest(container=validate_container_name(container), prefix=normalize_prefix(expand_prefix(prefix)),
                        read_data=read_data, state_dir=state_dir)


class Problem(msgspec.Struct, omit_defaults=True):
    """Something of the backup that is damaged, missing or unlisted: what, and why."""

    kind: str  # DAMAGED, MISSING or UNLISTED
    what: str  # "record page 3 of run ID", "css/site.css (run ID)"
    reason: str
    run: str | None = None
    page: int | None = None
    path: str | None = None  # a file's path in its run
    blob: str | None = None  # and its blob name

    def line(self) -> str:
        return printable(f"{self.kind} {self.what}: {self.reason}")


class CheckReport(msgspec.Struct, kw_only=True):
    container: str
    prefix: str
    read_data: bool
    runs_checked: int = 0
    pages_checked: int = 0  # the pages the checked runs' seals name (a page two runs share counts twice)
    copies_checked: int = 0  # distinct (blob name, Content-MD5) the checked runs reference
    problems_found: int = 0
    unfinished_prunes: list[str] = msgspec.field(default_factory=list)  # dropped runs whose header remains
    unreferenced_pages: int = 0  # record pages no header names


@dataclass(frozen=True)
class Needed:
    """A copy runs reference, as the temporary database holds it."""

    name: str
    md5: str
    size: int
    run: str
    path: str


def run_check(request: CheckRequest, settings: StorageSettings, on_problem: Callable[[Problem], None]) -> CheckReport:
    """Check the container's sealed runs and the copies they reference; each problem goes to *on_problem* as it
    is found."""
    check_container(settings.require(), request.container)
    report = CheckReport(container=request.container, prefix=request.prefix, read_data=request.read_data)

    def found(problem: Problem) -> None:
        report.problems_found += 1
        on_problem(problem)

    with service_client(settings) as (service, label), \
            scratch_database(request.state_dir, SCHEMA, SCRATCH) as db:
        container = service.get_container_client(request.container)
        try:
            records = ContainerRecords(container)
            prefixes = _check_runs(records, db, request.prefix, report, found)
            if prefixes:
                # one listing for every run checked: the deepest prefix their names are all under
                root = "/".join(commonprefix([prefix.split("/") if prefix else [] for prefix in prefixes]))
                _check_copies(container, db, root, request.read_data, label, report, found)
            # pages are kept per job: JOB/SHA256
            report.unreferenced_pages = sum(
                db.execute("SELECT 1 FROM named WHERE sha256 = ?", (name.rpartition("/")[2],)).fetchone() is None
                for name in records.listed(RECORDS))
        except (AzureError, sqlite3.Error) as exc:
            raise state_full(request.state_dir, exc) or classify(exc, label) or \
                DestinationError(f"cannot check {request.container!r} at {label}: {one_line(exc)}") from None
    return report


def _check_runs(records: ContainerRecords, db: sqlite3.Connection, prefix: str, report: CheckReport,
                found: Callable[[Problem], None]) -> set[str]:
    """Read every header, newest run first (those the catalog cannot list last), and the pages of the runs to
    check into *db*; the prefixes of those runs."""
    run_ids = list(records.listed(RUNS))
    # listed after the headers: a run sealed since is not checked, one pruned since has no header to read
    started = {entry.run_id: entry.started for entry in records.catalog()}
    run_ids.sort(key=lambda run_id: (started.get(run_id, ""), run_id), reverse=True)
    tombstones = set(records.listed(PRUNED))
    prefixes: set[str] = set()
    for run_id in run_ids:
        what = f"the sealed record of run {run_id}"
        try:
            header = records.header(run_id)
        except DamagedData as exc:
            found(Problem(DAMAGED, f"header of run {run_id}", _reason(exc, what), run=run_id))
            continue
        if header is None:  # removed since it was listed
            continue
        with db:
            db.executemany("INSERT OR IGNORE INTO named VALUES (?)", ((seal.sha256,) for seal in header.pages))
        if not overlaps(prefix, header.prefix):
            continue
        if run_id in tombstones:
            report.unfinished_prunes.append(run_id)
            continue
        report.runs_checked += 1
        if run_id not in started:
            found(Problem(UNLISTED, f"run {run_id}", "its header's metadata does not give its job, status, start and "
                          "finish: list, restore --as-of and prune do not see the run", run=run_id))
        prefixes.add(header.prefix)
        for seal in header.pages:
            report.pages_checked += 1
            if db.execute("SELECT 1 FROM read WHERE sha256 = ? AND prefix = ?", (seal.sha256, header.prefix)
                          ).fetchone() is not None:
                continue  # another run of this prefix has the same page: its entries are in
            what = f"record page {seal.page} of run {run_id}"
            try:
                entries = decode(records.page(header, seal), list[FileEntry], what)
            except DamagedData as exc:
                found(Problem(DAMAGED, what, _reason(exc, what), run=run_id, page=seal.page))
                continue
            with db:
                db.executemany("INSERT OR IGNORE INTO needed VALUES (?, ?, ?, ?, ?)", _rows(header, entries))
                db.execute("INSERT INTO read VALUES (?, ?)", (seal.sha256, header.prefix))
    return prefixes


def _reason(exc: DamagedData, what: str) -> str:
    """Why *what* is damaged, from the message that names it."""
    return str(exc).removeprefix(f"{what} ").removeprefix("is damaged: ").removeprefix("is ")


def _rows(header: RunRecord, entries: list[FileEntry]) -> Iterator[tuple[str, str, int, str, str]]:
    for entry in entries:
        if entry.md5 is None:
            continue
        try:
            name = blob_name(header.prefix, entry.path)
        except ValueError:  # a name no blob can have: nothing stored under it
            continue
        yield name, entry.md5, entry.size, header.run_id, entry.path


def _check_copies(container: ContainerClient, db: sqlite3.Connection, root: str, read_data: bool, label: str,
                  report: CheckReport, found: Callable[[Problem], None]) -> None:
    """Check each copy in *db* against the container's listing under *root*."""

    def check(item: tuple[Needed, list[Copy]]) -> Problem | None:
        need, copies = item
        try:
            problem = blob_problem(container, copies, FileEntry(need.path, size=need.size, md5=need.md5), read_data)
        except AzureError as exc:
            fatal = classify(exc, label)
            if fatal is not None:
                raise fatal from None
            problem = f"cannot read it: {ARCHIVED if is_archived(exc) else one_line(exc)}"
        if problem is None:
            return None
        return Problem(MISSING if choose(copies, need.md5) is None else DAMAGED, f"{need.path} (run {need.run})",
                       problem, run=need.run, path=need.path, blob=need.name)

    items = _beside_listing(container, db, root, label)
    # without --read-data a check is a comparison: no request, no thread
    for problem in _in_order(check, items, CHECKS.batches) if read_data else map(check, items):
        report.copies_checked += 1
        if problem is not None:
            found(problem)


def _beside_listing(container: ContainerClient, db: sqlite3.Connection, root: str, label: str
                    ) -> Iterator[tuple[Needed, list[Copy]]]:
    """Each copy in *db* with the copies the container holds of its name: those it lists first, in name order,
    then those whose name it does not list at all."""
    for copies, md5s in needed_beside(listed_names(container, root, label), db):
        name = copies[0].name
        db.execute("INSERT OR IGNORE INTO listed VALUES (?)", (name,))
        for md5 in sorted(md5s):
            size, run, path = db.execute("SELECT size, run, path FROM needed WHERE name = ? AND md5 = ?",
                                         (name, md5)).fetchone()
            yield Needed(name, md5, size, run, path), copies
    for row in db.execute("SELECT name, md5, size, run, path FROM needed WHERE name NOT IN (SELECT name FROM listed) "
                          "ORDER BY name, md5"):
        yield Needed(*row), []


def _in_order(work: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """*work* of each item on a pool of *threads*, a few items a thread handed out at most, in the items' order."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        in_flight: deque[Future[R]] = deque()
        for item in items:
            in_flight.append(pool.submit(work, item))
            while len(in_flight) > IN_FLIGHT_PER_THREAD * threads or (in_flight and in_flight[0].done()):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def summary(report: CheckReport) -> str:
    read = ", contents read" if report.read_data else ""
    problems = f"{report.problems_found} problem{'s' if report.problems_found != 1 else ''}" \
        if report.problems_found else "no problems"
    return printable(f"{report.container}: {report.runs_checked} runs, {report.pages_checked} record pages and "
                     f"{report.copies_checked} copies checked{read}: {problems}")


def notes(report: CheckReport) -> Iterator[str]:
    """The information lines: nothing wrong with what can be restored, something to finish or clean."""
    for run_id in report.unfinished_prunes:
        yield printable(f"NOTE run {run_id}: dropped by a prune that did not finish (its header remains), so not "
                        "checked: run that prune again to finish it")
    if report.unreferenced_pages:
        yield (f"NOTE {report.unreferenced_pages} record pages under {RECORDS} are named by no header: a backup "
               "that has not sealed its run (yet), or a prune that did not finish, leaves them; not an error")


@click.command("check", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 5, 70, 130))
@click.option("--container", "-c", required=True, help="The container whose backup to check.")
@click.option("--prefix", default="", help="Only the runs whose prefix overlaps this one ({hostname}, {date} and "
                                           "{time} expanded as for a backup).")
@click.option("--read-data", is_flag=True, help="Download every referenced copy once and hash it, instead of "
                                                "trusting its Content-MD5.")
@json_option("Print one JSON object with counts and problems.")
@storage_options
@state_dir_option
@debug_option
def command(container: str, prefix: str, read_data: bool, json_output: bool, storage: StorageSettings,
            state_dir: Path) -> None:
    """Check that a container's backup is whole: sealed records and their copies.

    Every sealed run's header and record pages must be there and match their SHA-256; every copy a run
    references must be there with its recorded Content-MD5 and size (--read-data: its content hashed).
    Problems are listed on stderr as found, one line each; notes (nothing wrong) and a summary on
    stdout. Reads only: nothing is written to the container (a temporary database in the state
    directory holds the names, and goes).

    \b
    Examples:
      sitebackup check -c backups
      sitebackup check -c backups --prefix web --read-data --json
    """
    request = check_request(container, prefix, read_data=read_data, state_dir=state_dir)
    problems: list[Problem] = []

    def listed(problem: Problem) -> None:
        click.echo(problem.line(), err=True)

    # listed as found (a container of a million missing copies lists them all without holding them); --json's one
    # object carries them in a list
    report = run_check(request, storage, problems.append if json_output else listed)
    if json_output:
        click.echo(json.dumps({**to_wire(report), "problems": to_wire(problems)}))
    else:
        # information on stdout with the summary: a crontab line that drops stdout mails problems only
        for note in notes(report):
            click.echo(note)
        click.echo(summary(report))
    sys.exit(EXIT_FILES_FAILED if report.problems_found else 0)

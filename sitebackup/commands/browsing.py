"""What the commands that look inside a backup share (ls, diff, find, cat, stats, restore --dry-run): runs found
by reference (``runref``) and opened for reading from the container's sealed records, which is all a new
machine needs (or, for a run never sealed, from this state directory), their pages read one at a time, and
the PATH arguments that choose subtrees.

Memory holds a few pages of a record (the one read and the next ones downloading), never the run, and every
page is checked against its seal before it is decoded (``blob.records``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
from azure.storage.blob import BlobServiceClient, ContainerClient
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import classify, one_line
from sitebackup.blob.records import READ_AHEAD, ContainerRecords, HeaderCache, sha256_hex
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.catalog import SealedRun, known_backup, recorded_header, sealed_runs, where_to_look
from sitebackup.commands.runref import resolve_run
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import EXIT_OK, DestinationError, InputError, SiteBackupError
from sitebackup.model.codec import decode
from sitebackup.model.records import FileEntry, RunRecord
from sitebackup.model.work import RunLabel
from sitebackup.ui.escape import printable


@dataclass(frozen=True)
class OpenedRun:
    """A backup run whose record can be read: where it read from and wrote to, and its sealed header (None: a
    run never sealed, its record in this state directory)."""

    run_id: str
    label: RunLabel
    header: RunRecord | None
    records: ContainerRecords

    @property
    def container(self) -> ContainerClient:
        return self.records.container


@dataclass
class Browse:
    """Runs of a container (``--container``) or of this state directory, opened by reference, and read."""

    client: dt_client.TaskHubGrpcClient
    service: BlobServiceClient
    label: str  # the endpoint, for messages
    work: WorkStore
    container: str | None  # --container
    sealed: list[SealedRun] | None  # its catalog
    job: str | None  # --job: which job `latest` means
    on_note: Callable[[str], None]

    def resolve(self, ref: str) -> str:
        return resolve_run(ref, client=self.client, sealed=self.sealed, container=self.container, job=self.job)

    def open(self, ref: str) -> OpenedRun:
        """The run *ref* names (a run reference), its header read: from --container, or the container this state
        directory knows it went to."""
        run_id = self.resolve(ref)
        known = known_backup(self.client, self.work, run_id)
        where = where_to_look(run_id, known, self.container, self.work)
        records = ContainerRecords(self.service.get_container_client(where), HeaderCache())
        label, header = recorded_header(records, self.work, run_id, known)
        return OpenedRun(run_id, label, header, records)

    def pages(self, run: OpenedRun, seen: set[str] | None = None) -> Generator[tuple[str, list[FileEntry]], None, None]:
        """The run's record a page at a time, each with its SHA-256, checked against its seal; with *seen*, pages
        whose SHA-256 is in it are left out and those read are added. A page this state directory holds intact is
        read from it; the next ``READ_AHEAD`` pages are downloaded while one is decoded and used."""
        if run.header is None:
            for page, data in self.work.result_pages(run.run_id):
                digest = sha256_hex(data)
                if seen is None or digest not in seen:
                    if seen is not None:
                        seen.add(digest)
                    yield digest, decode(data, list[FileEntry], f"record page {page} of run {run.run_id}")
            return
        def damaged(page: int) -> None:
            self.on_note(f"record page {page} of run {run.run_id} in the state directory is damaged: "
                         "its sealed copy in the container is read instead")

        for seal, entries in run.records.pages(run.header, cached=self.work.result_pages(run.run_id),
                                               on_damaged=damaged, seen=seen, ahead=READ_AHEAD):
            yield seal.sha256, entries

    def entries(self, run: OpenedRun, seen: set[str] | None = None) -> Iterator[FileEntry]:
        for _digest, entries in self.pages(run, seen):
            yield from entries




def note(text: str) -> None:
    click.echo(printable(f"sitebackup: note: {text}"), err=True)


@contextlib.contextmanager
def browsing(settings: StorageSettings, state_dir: Path, taskhub: TaskHubSettings | None, container: str | None,
             job: str | None = None, on_note: Callable[[str], None] = note) -> Iterator[Browse]:
    """A ``Browse`` for the duration of the block: this state directory's backend (which knows runs never sealed,
    and where its runs went), a blob client, and with *container* its catalog of sealed runs. Failures of the
    blob service become one-line errors."""
    settings.require()
    with open_backend(state_dir, taskhub) as runtime, service_client(settings) as (service, label):
        try:
            sealed = None
            if container is not None:
                check_container(settings, container)
                sealed = sealed_runs(service.get_container_client(container))
            with runtime.connected() as client:
                yield Browse(client, service, label, runtime.work_store(service), container, sealed, job, on_note)
        except SiteBackupError:
            raise
        except BrokenPipeError:  # the reader went away (`| head`): it read what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except Exception as exc:
            fatal = classify(exc, label)
            if fatal is None and type(exc).__module__.startswith("azure."):
                fatal = DestinationError(f"cannot read the records at {label}: {one_line(exc)}")
            if fatal is None:
                raise
            raise fatal from None


def normalize_paths(paths: tuple[str, ...] | list[str]) -> list[str]:
    """PATH arguments as record paths: relative to the source root, '/'-separated, no leading './' or trailing
    '/'; '' (or '.', or '/') stands for the whole tree."""
    found = []
    for path in paths:
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise InputError(f"PATH {path!r}: give a path relative to the backed-up tree, without '..'")
        found.append("/".join(parts))
    return found


class Subtrees:
    """Which record paths the PATH arguments choose (all when none), and which PATH chose nothing."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.all = not paths or "" in paths
        self.hit: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return self.chooses(path)

    def chooses(self, path: str) -> bool:
        """Whether a PATH chooses *path* (noting which did)."""
        if self.all:
            return True
        for root in self.paths:
            if path == root or (path.startswith(root) and path[len(root):len(root) + 1] == "/"):
                self.hit.add(root)
                return True
        return False

    def missing(self) -> list[str]:
        return [] if self.all else [path for path in self.paths if path not in self.hit]

"""What commands know of a container's backup runs: its catalog of sealed records (``blob.records``), read
from the container itself, so that a new machine with only the credentials and the container name can list,
restore, verify and prune; the state directory adds the runs it made that were never sealed (unfinished,
or made by an earlier version).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from azure.storage.blob import ContainerClient
from durabletask import client as dt_client

from sitebackup.blob.naming import overlaps
from sitebackup.blob.records import ContainerRecords
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.hosting import backup_run_label
from sitebackup.errors import InputError
from sitebackup.model.records import CatalogEntry, Job, PruneMark, RunRecord
from sitebackup.model.work import RunLabel


class Jobs:
    """The container's jobs by id, read the first time one is asked for (a listing, and a read per job)."""

    def __init__(self, records: ContainerRecords):
        self.records = records
        self._by_id: dict[str, Job] | None = None

    def get(self, job_id: str) -> Job | None:
        if self._by_id is None:
            self._by_id = {job.id: job for job in self.records.jobs()}
        return self._by_id.get(job_id)


@dataclass(frozen=True)
class SealedRun:
    """A run the container's catalog lists; its job is read when asked for (None: its descriptor is missing)."""

    entry: CatalogEntry
    jobs: Jobs

    @property
    def job(self) -> Job | None:
        return self.jobs.get(self.entry.job)

    @property
    def run_id(self) -> str:
        return self.entry.run_id

    @property
    def started(self) -> datetime:
        return parse_utc(self.entry.started)

    @property
    def prefix(self) -> str | None:
        return self.job.prefix if self.job is not None else None


def parse_utc(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def sealed_runs(container: ContainerClient) -> list[SealedRun]:
    """Every sealed run of the container, oldest first: a listing of the headers (the jobs are read only when a
    run's job is asked for)."""
    records = ContainerRecords(container)
    jobs = Jobs(records)
    return sorted((SealedRun(entry, jobs) for entry in records.catalog()), key=lambda run: run.started)


def of_prefix(runs: list[SealedRun], prefix: str) -> list[SealedRun]:
    """The runs into exactly *prefix*."""
    return [run for run in runs if run.prefix == prefix]


def overlapping(runs: list[SealedRun], prefix: str) -> list[SealedRun]:
    """The runs whose names can be the names of a run into *prefix* (a run whose job is unknown counts)."""
    return [run for run in runs if run.prefix is None or overlaps(prefix, run.prefix)]


def known_backup(client: dt_client.TaskHubGrpcClient, work: WorkStore, run_id: str) -> RunLabel | None:
    """Where backup *run_id* went as this backend knows it; None when it does not know the run."""
    if client.get_orchestration_state(run_id) is None:
        return None
    return backup_run_label(client, run_id, work)


def where_to_look(run_id: str, known: RunLabel | None, container: str | None, work: WorkStore) -> str:
    """The container holding *run_id*'s record: the one this backend knows it went to, else --container."""
    if known is not None:
        return known.container
    mark = work.pruned(run_id)
    if mark is not None:  # this state directory pruned it (and purged its history)
        raise _pruned(run_id, mark)
    if not container:
        raise InputError(f"no run with id {run_id!r} in this state directory or task hub: give --container NAME "
                         "to read its record from the container")
    return container


def recorded_run(records: ContainerRecords, work: WorkStore, run_id: str, known: RunLabel | None) -> RunLabel:
    """Where the run read from and wrote to, once it is certain its record exists: sealed in the container, or
    (a run never sealed) in this state directory; a clear error for a run pruned, never sealed or empty."""
    return recorded_header(records, work, run_id, known)[0]


def recorded_header(records: ContainerRecords, work: WorkStore, run_id: str,
                    known: RunLabel | None) -> tuple[RunLabel, RunRecord | None]:
    """``recorded_run``, and the run's sealed header (None: a run never sealed, its record in this state
    directory)."""
    # the header is read while the tombstone is asked for (with *records*' header cache): two round trips to a far
    # container, not one after the other
    records.prefetch(run_id)
    mark = records.pruned(run_id) or work.pruned(run_id)
    if mark is not None:
        raise _pruned(run_id, mark)
    header = records.header(run_id)
    if header is not None:
        return RunLabel(source=header.source, container=header.container, prefix=header.prefix), header
    if known is None:
        raise InputError(f"run {run_id!r} has no sealed record in container {records.container.container_name!r} "
                         "(it did not finish, or another container holds it)")
    if next(iter(work.iter_results(run_id)), None) is None:
        raise InputError(f"run {run_id!r} recorded no files (nothing was copied, or it was purged)")
    return known, None


def _pruned(run_id: str, mark: PruneMark) -> InputError:
    return InputError(f"run {run_id!r} was pruned on {mark.at[:19]} (sitebackup prune): "
                      "its record and the file versions only it needed are gone")

"""Run references: what every command that takes a run id accepts in its place, resolved here and nowhere else.

A reference is a run id, a unique prefix of one (at least ``MIN_PREFIX`` characters), or ``latest``: the newest
run of the job ``--job`` names (by name, id or source directory), or of the only job there is. A prefix more
than one run starts with is refused (exit 2) naming them. Runs come from the container's catalog of sealed
records, from this state directory (or task hub), or both (``resolve_run``); ``resolve`` decides, pure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from durabletask import client as dt_client

from sitebackup.blob.lock import host_name
from sitebackup.commands.catalog import SealedRun
from sitebackup.commands.hosting import run_label
from sitebackup.commands.options import LATEST
from sitebackup.errors import InputError
from sitebackup.model.records import Job
from sitebackup.workflows.names import BACKUP_ORCHESTRATION

MIN_PREFIX = 4
SHOWN = 10  # candidates an error names


class NoSuchRun(InputError):
    """No run has this id, nor an id it starts."""


@dataclass(frozen=True)
class Candidate:
    """A run a reference may name: its id, when it started, and its job (an id, or what stands for the job of a
    run recorded without one)."""

    run_id: str
    started: datetime
    job: str


def resolve(ref: str, runs: Sequence[Candidate], *, job: str | None = None,
            job_of: Callable[[str], Job | None] = lambda _job: None, where: str = "here") -> str:
    """The run id *ref* names among *runs*; an ``InputError`` (exit 2) saying why none or which several.

    *job* (``--job``) chooses the job ``latest`` means: a job's name, its id, or the source it backs up (of this
    host first); *job_of* describes a job id; *where* says in messages where the runs were looked for."""
    if ref == LATEST:
        return _latest(runs, job, job_of, where)
    if any(run.run_id == ref for run in runs):
        return ref
    if len(ref) < MIN_PREFIX:
        raise InputError(f"no run with id {ref!r} {where} (a prefix of a run id needs at least {MIN_PREFIX} "
                         "characters)")
    found = sorted({run.run_id: run for run in runs if run.run_id.startswith(ref)}.values(),
                   key=lambda run: run.started, reverse=True)
    if not found:
        raise NoSuchRun(f"no run with id {ref!r} {where}")
    if len(found) > 1:
        raise InputError(f"run id prefix {ref!r} is ambiguous: {len(found)} runs {where} start with it: "
                         + _named(found) + "; type more of the id")
    return found[0].run_id


def _latest(runs: Sequence[Candidate], job: str | None, job_of: Callable[[str], Job | None], where: str) -> str:
    mine = list(runs) if job is None else _of_job(runs, job, job_of, where)
    if not mine:
        raise InputError(f"no completed backup {where}" + (f" of job {job!r}" if job else "") + ": no run is latest")
    jobs = {run.job for run in mine}
    if len(jobs) > 1:
        newest = {}
        for run in sorted(mine, key=lambda run: run.started):
            newest[run.job] = run
        shown = "; ".join(f"{_job_name(j, job_of)} (latest {run.run_id})" for j, run in newest.items())
        raise InputError(f"`latest` is ambiguous: {len(jobs)} jobs have runs {where}: {shown}; give --job NAME")
    return max(mine, key=lambda run: run.started).run_id


def _of_job(runs: Sequence[Candidate], job: str, job_of: Callable[[str], Job | None], where: str) -> list[Candidate]:
    named = select_jobs(job, {run.job for run in runs}, job_of, where)
    return [run for run in runs if run.job in named]


def select_jobs(job: str, keys: Iterable[str], job_of: Callable[[str], Job | None], where: str) -> set[str]:
    """The one job (of those whose ids are *keys*) that ``--job`` *job* names: by name or id, else by the directory
    it backs up, this host's first; none when it names none; refused when it names several."""
    described = {key: job_of(key) for key in set(keys)}
    named = {key for key, found in described.items()
             if key == job or (found is not None and job in (found.name, found.id))}
    if not named:
        source = os.path.abspath(os.path.expanduser(job))
        named = {key for key, found in described.items() if found is not None and found.source == source}
        here = {key for key in named if (found := described[key]) is not None and found.host == host_name()}
        named = here or named
    if len(named) > 1:
        shown = ", ".join(sorted(_job_name(key, job_of) for key in named))
        raise InputError(f"--job {job!r} names {len(named)} jobs {where}: {shown}; give one's name or id")
    return named


def _job_name(job: str, job_of: Callable[[str], Job | None]) -> str:
    found = job_of(job)
    return found.name if found is not None else job


def _named(runs: Sequence[Candidate]) -> str:
    shown = ", ".join(f"{run.run_id} ({run.started.isoformat(timespec='seconds')})" for run in runs[:SHOWN])
    return shown + (f" and {len(runs) - SHOWN} more" if len(runs) > SHOWN else "")


def from_catalog(runs: Iterable[SealedRun]) -> list[Candidate]:
    return [Candidate(run.run_id, run.started, run.entry.job) for run in runs]


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


COMPLETED = [dt_client.OrchestrationStatus.COMPLETED]


def from_backend(client: dt_client.TaskHubGrpcClient, ref: str, *, backups: bool, container: str | None = None,
                 latest: list[dt_client.OrchestrationStatus] | None = COMPLETED
                 ) -> tuple[list[Candidate], dict[str, Job]]:
    """The runs of this state directory (or task hub) *ref* may name, and their jobs: those whose id starts with
    it (backups only, when *backups*), or for ``latest`` the backups in one of the states *latest* (None: any);
    into *container* only, when given."""
    newest = ref == LATEST
    query = dt_client.OrchestrationQuery(
        instance_id_prefix=None if newest else ref, fetch_inputs_and_outputs=newest or container is not None,
        runtime_status=latest if newest else None)
    runs, jobs = [], {}
    for state in client.get_all_orchestration_states(query):
        if (backups or newest) and state.name != BACKUP_ORCHESTRATION:
            continue
        label = run_label(state) if newest or container is not None else None
        if container is not None and (label is None or label.container != container):
            continue
        key = state.instance_id
        if label is not None:
            if label.job is not None:
                key = label.job.id
                jobs[key] = label.job
            else:  # recorded by a version without jobs: its source and destination stand for one
                key = f"{label.source}\0{label.container}\0{label.prefix}"
                jobs[key] = Job(id=key, name=label.source, host="", source=label.source, prefix=label.prefix)
        runs.append(Candidate(state.instance_id, _utc(state.created_at), key))
    return runs, jobs


def resolve_run(ref: str, *, client: dt_client.TaskHubGrpcClient | None = None,
                sealed: list[SealedRun] | None = None, container: str | None = None, job: str | None = None,
                backups: bool = True, latest: list[dt_client.OrchestrationStatus] | None = COMPLETED) -> str:
    """The run id *ref* names: among the container's sealed runs (*sealed*, the catalog of *container*) and the
    runs of this state directory or task hub (*client*: backups only when *backups*); ``latest`` among the sealed
    runs when given, else among the backups of the state directory in one of the states *latest* (None: any).
    A whole run id either knows is taken as it is, and so is one neither knows, for the command to say why (a
    run pruned, never sealed, or in another container)."""
    if ref != LATEST and ((sealed is not None and any(run.run_id == ref for run in sealed))
                          or (client is not None and client.get_orchestration_state(ref) is not None)):
        return ref
    runs: list[Candidate] = []
    jobs: dict[str, Job] = {}
    places = []
    if sealed is not None:
        runs += from_catalog(sealed)
        places.append(f"container {container!r}")
    if client is not None and (ref != LATEST or sealed is None):
        places.append("this state directory or task hub")
        if len(ref) >= MIN_PREFIX:
            local, jobs = from_backend(client, ref, backups=backups, container=container, latest=latest)
            runs += local
    catalog_jobs = sealed[0].jobs if sealed else None

    def job_of(key: str) -> Job | None:
        return jobs[key] if key in jobs else catalog_jobs.get(key) if catalog_jobs is not None else None

    try:
        return resolve(ref, runs, job=job, job_of=job_of, where="in " + " or ".join(places))
    except NoSuchRun:  # as typed: what reads the run says why it is not there (pruned, never sealed, elsewhere)
        return ref

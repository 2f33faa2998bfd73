"""The prune command: keep rules over the completed backup runs of one destination (container and prefix),
then remove what only the dropped runs needed.

Copies are referenced by blob name and Content-MD5 from run records. A copy (the current blob or a
snapshot) is removed when no remaining run references its name with its MD5: not a kept run, not an
unfinished one, not a run to another prefix whose names overlap. Only names some run known to this
backend wrote are touched, so blobs another state directory or another tool put in the container
stay. Failed and cancelled runs of the destination are dropped: like restic's interrupted backups,
they are not snapshots anyone keeps. A backup of the container that a live process is running makes
prune refuse (it would race the uploads).

The order makes a prune killed at any point, then run again, finish the job with kept runs intact:
decide; mark every dropped run pruned (the journal: a marked run stays dropped whatever the next
attempt's rules say); delete the copies; remove the dropped runs' records, keeping their marks as
tombstones; purge their durable history last.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContainerClient
from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import classify, one_line
from sitebackup.blob.history import Copy, copy_client, list_copies
from sitebackup.blob.naming import blob_name, normalize_prefix, overlaps, validate_container_name
from sitebackup.blob.workstore import BlobWorkStore, WorkStore
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.hosting import BackupRun, backup_runs
from sitebackup.commands.retention import Policy, apply_policy
from sitebackup.durable.runtime import Runtime, open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import AlreadyRunningError, DestinationError, InputError

DELETE_THREADS = 16
INCOMPLETE = "failed or cancelled"
EARLIER_PRUNE = "dropped by an earlier prune that did not finish"


@dataclass
class PruneRequest:
    container: str
    prefix: str
    policy: Policy
    dry_run: bool = False
    state_dir: Path = field(default_factory=Path)


def prune_request(container: str, prefix: str | None, policy: Policy, *, dry_run: bool,
                  state_dir: Path) -> PruneRequest:
    if policy.empty():
        raise InputError("give at least one --keep-* rule (the newest run is always kept; nothing else would be)")
    return PruneRequest(container=validate_container_name(container), prefix=normalize_prefix(expand_prefix(prefix)),
                        policy=policy, dry_run=dry_run, state_dir=state_dir)


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


def run_prune(request: PruneRequest, settings: StorageSettings, taskhub: TaskHubSettings | None = None
              ) -> dict[str, Any]:
    endpoint = check_container(settings.require(), request.container)
    with open_backend(request.state_dir, taskhub) as runtime, \
            service_client(settings, pool_size=DELETE_THREADS + 4) as (service, label):
        container = service.get_container_client(request.container)
        # under the scheduler the records live in this container: no need to look it up per run
        work = runtime.work_store(service) if taskhub is None else BlobWorkStore(lambda _run_id: container)
        with runtime.connected() as client:
            runs = [run for run in backup_runs(client, request.container, endpoint)
                    if overlaps(request.prefix, run.inp.prefix)]
            _refuse_if_live(runtime, runs)
            kept, dropped = _decide(request, runs, work)
            try:
                doomed = _sweep_plan(container, request.prefix, [run for run in runs if run.instance_id not in dropped],
                                     [run for run in runs if run.instance_id in dropped], work)
            except Exception as exc:
                raise classify(exc, label) or DestinationError(f"cannot list {request.container!r}: {one_line(exc)}") \
                    from None
            report = _report(request, runs, kept, dropped, doomed)
            if request.dry_run:
                return report
            at = datetime.now(timezone.utc).isoformat()
            for run_id in dropped:
                if work.pruned(run_id) is None:
                    work.mark_pruned(run_id, {"at": at, "container": request.container, "prefix": request.prefix})
            _delete(container, doomed, label)
            for run_id in dropped:
                work.remove(run_id, keep_mark=True)
                client.purge_orchestration(run_id, recursive=True)
    return report


def _refuse_if_live(runtime: Runtime, runs: list[BackupRun]) -> None:
    for run in runs:
        # the scheduler cannot tell whether a worker holds a run (None): assume one does
        if not run.finished and runtime.worker_attached(run.instance_id) is not False:
            raise AlreadyRunningError(f"backup {run.instance_id} of {run.inp.destination} is running: prune after it "
                                      "has finished (or cancel it)", run.instance_id)


def _decide(request: PruneRequest, runs: list[BackupRun], work: WorkStore) -> tuple[dict[str, list[str]],
                                                                                     dict[str, str]]:
    """(kept run id -> why, dropped run id -> why) among the runs of exactly this destination."""
    mine = [run for run in runs if run.inp.prefix == request.prefix and run.finished]
    dropped: dict[str, str] = {}
    candidates = []
    for run in mine:
        if work.pruned(run.instance_id) is not None:
            dropped[run.instance_id] = EARLIER_PRUNE
        elif run.status != dt_client.OrchestrationStatus.COMPLETED:
            dropped[run.instance_id] = INCOMPLETE
        else:
            candidates.append((run.instance_id, run.created_at))
    decision = apply_policy(candidates, request.policy)
    dropped.update((run_id, "not kept by any rule") for run_id in decision.drop)
    return decision.keep, dropped


def _records(work: WorkStore, runs: Iterable[BackupRun]) -> Iterable[tuple[str, str]]:
    """(blob name, Content-MD5) of every file the runs recorded as backed up."""
    for run in runs:
        for rec in work.iter_results(run.instance_id):
            if "error" not in rec and rec.get("md5"):
                try:
                    yield blob_name(run.inp.prefix, rec["path"]), rec["md5"]
                except ValueError:  # a name no blob can have: nothing stored under it
                    continue


def _sweep_plan(container: ContainerClient, prefix: str, remaining: list[BackupRun], dropped: list[BackupRun],
                work: WorkStore) -> list[Copy]:
    """The copies to delete: of the names runs here wrote, those no remaining run references (``unneeded``)."""
    needed: dict[str, set[str]] = {}
    for name, md5 in _records(work, (run for run in remaining if work.pruned(run.instance_id) is None)):
        needed.setdefault(name, set()).add(md5)
    for name, _md5 in _records(work, dropped):
        needed.setdefault(name, set())
    doomed: list[Copy] = []
    # a name's copies are listed together, whatever the service's order among them
    for name, copies in itertools.groupby(list_copies(container, prefix), key=lambda c: c.name):
        if name in needed:
            doomed.extend(unneeded(list(copies), needed[name]))
    return doomed


def _delete(container: ContainerClient, doomed: list[Copy], label: str) -> None:
    """Delete the copies: a current blob with its snapshots, only while it is what was listed (its ETag);
    one a backup replaced since keeps its new content, and the snapshots listed go one by one."""
    bases = {c.name for c in doomed if c.snapshot is None}

    def delete(copy: Copy) -> None:
        try:
            if copy.snapshot is not None:
                copy_client(container, copy).delete_blob()
                return
            try:
                container.get_blob_client(copy.name).delete_blob(delete_snapshots="include", etag=copy.etag,
                                                                 match_condition=MatchConditions.IfNotModified)
            except ResourceModifiedError:
                for snapshot in (c for c in doomed if c.name == copy.name and c.snapshot is not None):
                    delete(snapshot)
        except ResourceNotFoundError:  # gone already: an earlier attempt deleted it
            pass
        except Exception as exc:
            raise classify(exc, label) or DestinationError(f"cannot delete {copy.name!r}: {one_line(exc)}") from None

    # snapshots of a base that goes are deleted with it
    todo = [c for c in doomed if c.snapshot is None or c.name not in bases]
    with ThreadPoolExecutor(max_workers=DELETE_THREADS) as pool:
        list(pool.map(delete, todo))


def _report(request: PruneRequest, runs: list[BackupRun], kept: dict[str, list[str]], dropped: dict[str, str],
            doomed: list[Copy]) -> dict[str, Any]:
    created = {run.instance_id: run.created_at.isoformat() for run in runs}
    return {
        "container": request.container, "prefix": request.prefix, "dry_run": request.dry_run,
        "kept": [{"instance_id": run_id, "created_at": created[run_id], "reasons": why}
                 for run_id, why in kept.items()],
        "removed": [{"instance_id": run_id, "created_at": created[run_id], "reason": why}
                    for run_id, why in sorted(dropped.items(), key=lambda item: created[item[0]], reverse=True)],
        "unfinished": [run.instance_id for run in runs if not run.finished and run.inp.prefix == request.prefix],
        "blobs_removed": sum(1 for c in doomed if c.snapshot is None),
        "snapshots_removed": sum(1 for c in doomed if c.snapshot is not None),
        "bytes_removed": sum(c.size for c in doomed),
    }

"""``--dry-run``: the scan and the incremental comparison of a backup, run locally; nothing is written.

No orchestration is scheduled and the container is neither created nor listed: the walk and the
comparison with the baseline run's record (found through the durable client of the selected
backend, read from its work store) answer what a real run would upload and skip. Under the
scheduler that record is read from the container's reserved ``.sitebackup/work/`` prefix.
Each file's line goes out as the walk reaches it and the record is read beside the walk, so
nothing is kept per file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sitebackup.blob.clients import NOT_CONFIGURED, StorageSettings, make_service_client
from sitebackup.commands.backup import BackupRequest, find_baseline
from sitebackup.durable.runtime import open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError
from sitebackup.local import incremental
from sitebackup.local.files import describe_os_error, file_md5_b64
from sitebackup.local.filters import Filter
from sitebackup.local.scan import FileEntry, Skipped, walk


def plan_backup(request: BackupRequest, settings: StorageSettings, taskhub: TaskHubSettings | None,
                on_item: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Walk and compare, handing each file's line to *on_item* as the walk goes; return the totals."""
    if taskhub is not None and not settings.configured and request.compare != incremental.MODE_FORCE:
        raise InputError("--dry-run with --taskhub reads the last run's record from the container: " + NOT_CONFIGURED)
    endpoint = None
    service = None
    if settings.configured:
        # the label matches the baseline's endpoint; only the scheduler's work store sends requests
        service, endpoint = make_service_client(settings, quick=True)
    try:
        inp = request.orchestration_input(endpoint)
        records: Iterable[dict[str, Any]] = ()
        baseline = None
        if request.compare != incremental.MODE_FORCE:
            with open_client(request.state_dir, taskhub) as (runtime, client):
                work = runtime.work_store(service)
                baseline = find_baseline(client, inp, work)
            if baseline:
                records = work.iter_results(baseline)
        totals = _walk(request, incremental.Baseline(records), on_item)
    finally:
        if service is not None:
            service.close()
    return {"dry_run": True, "source": str(request.source), "destination": inp.destination, "baseline": baseline,
            **totals}


def _walk(request: BackupRequest, previous: incremental.Baseline,
          on_item: Callable[[dict[str, Any]], None]) -> dict[str, int]:
    upload = upload_bytes = unchanged = unchanged_bytes = skipped = failed = 0
    rules = Filter(request.patterns)
    for entry in walk(request.source, excluded=rules.excluded if rules else None,
                      follow_symlinks=request.follow_symlinks):
        if type(entry) is FileEntry:
            try:
                action = _action(request.source, entry, previous.get(entry.relpath), request.compare)
            except OSError as exc:
                item = {"action": "fail", "path": entry.relpath, "error": describe_os_error(exc)}
                failed += 1
            else:
                item = {"action": action, "path": entry.relpath, "size": entry.size}
                if action == "upload":
                    upload += 1
                    upload_bytes += entry.size
                else:  # an unchanged file is a skipped one too: not uploaded on purpose
                    unchanged += 1
                    unchanged_bytes += entry.size
        elif isinstance(entry, Skipped):
            item = {"action": "skip", "path": entry.relpath, "reason": entry.reason}
            skipped += 1
        else:
            item = {"action": "fail", "path": entry.relpath, "error": entry.reason}
            failed += 1
        on_item(item)
    return {"files_to_upload": upload, "bytes_to_upload": upload_bytes, "files_unchanged": unchanged,
            "bytes_skipped": unchanged_bytes, "files_skipped": skipped + unchanged, "files_failed": failed}


def _action(source: Path, entry: FileEntry, previous: dict[str, Any] | None, mode: str) -> str:
    decision = incremental.decide(entry.size, entry.mtime_ns, previous, mode)
    if decision == incremental.CHECK:
        assert previous is not None
        same = file_md5_b64(source / entry.relpath) == previous.get("md5")
        return "unchanged" if same else "upload"
    return "unchanged" if decision == incremental.UNCHANGED else "upload"

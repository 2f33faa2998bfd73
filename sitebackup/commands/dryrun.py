"""``--dry-run``: the scan and the incremental comparison of a backup, run locally; nothing is written.

No orchestration is scheduled and the container is neither created nor listed: the walk and the
comparison with the baseline run's record (found through the durable client of the selected
backend, read from its work store) answer what a real run would upload and skip. Under the
scheduler that record is read from the container's reserved ``.sitebackup/work/`` prefix.
"""

from __future__ import annotations

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
from sitebackup.local.scan import Failed, FileEntry, Skipped, walk


def plan_backup(request: BackupRequest, settings: StorageSettings,
                taskhub: TaskHubSettings | None = None) -> dict[str, Any]:
    if taskhub is not None and not settings.configured and request.compare != incremental.MODE_FORCE:
        raise InputError("--dry-run with --taskhub reads the last run's record from the container: " + NOT_CONFIGURED)
    endpoint = None
    service = None
    if settings.configured:
        # the label matches the baseline's endpoint; only the scheduler's work store sends requests
        service, endpoint = make_service_client(settings, quick=True)
    try:
        inp = request.orchestration_input(endpoint)
        previous: dict[str, dict[str, Any]] = {}
        baseline = None
        if request.compare != incremental.MODE_FORCE:
            with open_client(request.state_dir, taskhub) as (runtime, client):
                work = runtime.work_store(service)
                baseline = find_baseline(client, inp, work)
                if baseline:
                    previous = incremental.baseline_index(work.iter_results(baseline))
    finally:
        if service is not None:
            service.close()
    rules = Filter(request.patterns)
    items: list[dict[str, Any]] = []
    for entry in walk(request.source, excluded=rules.excluded if rules else None,
                      follow_symlinks=request.follow_symlinks):
        if isinstance(entry, FileEntry):
            try:
                action = _action(request.source, entry, previous.get(entry.relpath), request.compare)
            except OSError as exc:
                items.append({"action": "fail", "path": entry.relpath, "error": describe_os_error(exc)})
                continue
            items.append({"action": action, "path": entry.relpath, "size": entry.size})
        elif isinstance(entry, Skipped):
            items.append({"action": "skip", "path": entry.relpath, "reason": entry.reason})
        elif isinstance(entry, Failed):
            items.append({"action": "fail", "path": entry.relpath, "error": entry.reason})
    upload = [i for i in items if i["action"] == "upload"]
    unchanged = [i for i in items if i["action"] == "unchanged"]
    return {
        "dry_run": True, "source": str(request.source), "destination": inp.destination,
        "baseline": baseline, "items": items,
        "files_to_upload": len(upload), "bytes_to_upload": sum(i["size"] for i in upload),
        "files_unchanged": len(unchanged), "bytes_skipped": sum(i["size"] for i in unchanged),
        "files_skipped": len(unchanged) + sum(1 for i in items if i["action"] == "skip"),
        "files_failed": sum(1 for i in items if i["action"] == "fail"),
    }


def _action(source: Path, entry: FileEntry, previous: dict[str, Any] | None, mode: str) -> str:
    decision = incremental.decide(entry.size, entry.mtime_ns, previous, mode)
    if decision == incremental.CHECK:
        assert previous is not None
        same = file_md5_b64(source / entry.relpath) == previous.get("md5")
        return "unchanged" if same else "upload"
    return "unchanged" if decision == incremental.UNCHANGED else "upload"

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

from sitebackup.blob.clients import NOT_CONFIGURED, StorageSettings, make_service_client
from sitebackup.commands.backup import BackupRequest, find_baseline
from sitebackup.durable.runtime import open_client
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError
from sitebackup.local import incremental
from sitebackup.local.files import describe_os_error, file_md5_b64
from sitebackup.local.incremental import Compared
from sitebackup.local.scan import Skipped
from sitebackup.model.records import FileEntry
from sitebackup.model.reports import DryRunItem, DryRunTotals


def plan_backup(request: BackupRequest, settings: StorageSettings, taskhub: TaskHubSettings | None,
                on_item: Callable[[DryRunItem], None]) -> DryRunTotals:
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
        records: Iterable[FileEntry] = ()
        baseline = None
        if request.compare != incremental.MODE_FORCE:
            with open_client(request.state_dir, taskhub) as (runtime, client):
                work = runtime.work_store(service)
                baseline = find_baseline(client, inp, work)
            if baseline:
                records = work.iter_results(baseline)
        totals = DryRunTotals(source=str(request.source), destination=inp.destination, baseline=baseline)
        _walk(request, records, totals, on_item)
    finally:
        if service is not None:
            service.close()
    return totals


def _walk(request: BackupRequest, records: Iterable[FileEntry], totals: DryRunTotals,
          on_item: Callable[[DryRunItem], None]) -> None:
    skipped = 0
    for found in incremental.compare(request.source, patterns=request.patterns,
                                     follow_symlinks=request.follow_symlinks, baseline=records, mode=request.compare):
        if isinstance(found, Compared):
            file = found.file
            try:
                action = _action(request, found)
            except OSError as exc:
                item = DryRunItem(action="fail", path=file.path, error=describe_os_error(exc))
                totals.files_failed += 1
            else:
                item = DryRunItem(action=action, path=file.path, size=file.size)
                if action == "upload":
                    totals.files_to_upload += 1
                    totals.bytes_to_upload += file.size
                else:  # an unchanged file is a skipped one too: not uploaded on purpose
                    totals.files_unchanged += 1
                    totals.bytes_skipped += file.size
        elif isinstance(found, Skipped):
            item = DryRunItem(action="skip", path=found.relpath, reason=found.reason)
            skipped += 1
        else:
            item = DryRunItem(action="fail", path=found.relpath, error=found.reason)
            totals.files_failed += 1
        on_item(item)
    totals.files_skipped = skipped + totals.files_unchanged


def _action(request: BackupRequest, found: Compared) -> str:
    if found.decision == incremental.CHECK:
        assert found.previous is not None
        same = file_md5_b64(request.source / found.file.path) == found.previous.md5
        return "unchanged" if same else "upload"
    return "unchanged" if found.decision == incremental.UNCHANGED else "upload"

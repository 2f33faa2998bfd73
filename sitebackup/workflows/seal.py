"""The backup's last activity: sealing the run's record into its container (``blob.records``).

Once every page is done, the run's result pages (its record) are copied, as the bytes the work store holds,
to the container's ``.sitebackup/records/`` under their SHA-256, skipping those the baseline's sealed record
already names (an unchanged tree sends no page), and the header naming every page with its hash and size
goes last. The job's descriptor is written by the run that takes the job's lock first and by a run with no
sealed baseline; a run whose baseline is sealed knows it is there.
"""

from __future__ import annotations

from typing import Any

from durabletask import task

from sitebackup import __version__
from sitebackup.blob.records import ContainerRecords, sha256_hex
from sitebackup.model.codec import DamagedData, from_wire, to_wire
from sitebackup.model.records import PageSeal, RunRecord
from sitebackup.model.work import Sealed, SealInput
from sitebackup.workflows.activity import ActivityDeps, activity
from sitebackup.workflows.names import SEAL_RECORD


def seal_record(deps: ActivityDeps, run_id: str, inp: SealInput) -> Sealed:
    """Copy the run's record pages the container does not hold, then write its header."""
    records = ContainerRecords(deps.container_client(inp.container))
    held: set[str] = set()
    baseline = None
    if inp.baseline:
        try:
            baseline = records.header(inp.baseline)
        except DamagedData:  # its pages are sent again: a damaged header is never trusted for what is held
            baseline = None
        held = {seal.sha256 for seal in baseline.pages} if baseline is not None else set()
    pages: list[PageSeal] = []
    sent = 0
    for page, data in deps.work.result_pages(run_id):
        digest = sha256_hex(data)
        if digest not in held:
            records.put_page(inp.job.id, data)
            held.add(digest)
            sent += 1
        pages.append(PageSeal(page, digest, len(data)))
    if baseline is None:  # a run of the job sealed before wrote its descriptor (it is written once, never changed)
        records.put_job(inp.job)
    records.seal(RunRecord(tool=__version__, run_id=run_id, job=inp.job.id, host=inp.job.host, source=inp.source,
                           container=inp.container, prefix=inp.prefix, started=inp.started, finished=inp.finished,
                           files=inp.files, files_failed=inp.files_failed, bytes=inp.bytes, pages=pages))
    return Sealed(pages=len(pages), sent=sent)


def build_seal_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    def seal(ctx: task.ActivityContext, raw: object) -> Any:
        return to_wire(seal_record(deps, ctx.orchestration_id, from_wire(raw, SealInput, "the input of a seal")))

    return [activity(SEAL_RECORD, seal)]

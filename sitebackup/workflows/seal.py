"""The backup's last activity: sealing the run's record into its container (``blob.records``).

Once every page is done, the run's result pages (its record) are copied, as the bytes the work store holds,
to the container's ``.sitebackup/records/`` under their SHA-256, a window of them at once: on the process's loop
(``ActivityDeps.put_new``), whose connections the uploads left open and idle, as many as its window starts with
(``Concurrency.requests``), or else by threads of the synchronous client (``Concurrency.sealing``). Those the
baseline's sealed record already names are skipped (an unchanged tree sends no page), and the header naming
every page with its hash and size goes last. The job's descriptor is written by the run that takes the job's
lock first and by a run with no sealed baseline; a run whose baseline is sealed knows it is there.

The header also counts what the run changed from its baseline (``local.changes``, as ``sitebackup diff``
does), so that ``list`` shows it from the listing alone: the two records are read side by side, leaving out
the pages they share (an unchanged tree reads none).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from durabletask import task

from sitebackup import __version__
from sitebackup.blob.records import ContainerRecords, page_name, sha256_hex
from sitebackup.local.changes import OutOfOrder, changes, count
from sitebackup.model.codec import DamagedData, decode, from_wire, to_wire
from sitebackup.model.records import ChangeCounts, FileEntry, PageSeal, RunRecord
from sitebackup.model.work import Sealed, SealInput
from sitebackup.workflows.activity import ActivityDeps, activity
from sitebackup.workflows.names import SEAL_RECORD


def seal_record(deps: ActivityDeps, run_id: str, inp: SealInput) -> Sealed:
    """Copy the run's record pages the container does not hold, then write its header."""
    records = deps.records(inp.container)  # the baseline's header as the scan read it, when this process ran it
    held: set[str] = set()
    baseline: RunRecord | None = None
    damaged = False
    if inp.baseline:
        try:
            baseline = records.header(inp.baseline)
        except DamagedData:  # its pages are sent again: a damaged header is never trusted for what is held
            damaged = True
        held = {seal.sha256 for seal in baseline.pages} if baseline is not None else set()
    pages: list[PageSeal] = []
    sent = 0
    put_new = deps.put_new
    # the pages go up together, a window of them at a time (one round trip each would add up over a long
    # path), each held in memory until it is sent; the header waits for every one of them
    window = deps.concurrency.sealing if put_new is None else deps.concurrency.requests
    with ThreadPoolExecutor(max_workers=deps.concurrency.sealing, thread_name_prefix="sitebackup-seal") as pool:
        going: set[Future[Any]] = set()
        if baseline is None:  # a run of the job sealed before wrote its descriptor (it is written once, never changed)
            going.add(pool.submit(records.put_job, inp.job))
        for page, data in deps.work.result_pages(run_id):
            digest = sha256_hex(data)
            if digest not in held:
                if len(going) >= window:
                    done, going = wait(going, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                going.add(pool.submit(records.put_page, inp.job.id, data) if put_new is None
                          else put_new(inp.container, page_name(inp.job.id, digest), data))
                held.add(digest)
                sent += 1
            pages.append(PageSeal(page, digest, len(data)))
        for future in going:
            future.result()
    changes = None if damaged else count_changes(deps, records, run_id, inp.baseline, baseline, pages)
    records.seal(RunRecord(tool=__version__, run_id=run_id, job=inp.job.id, host=inp.job.host, source=inp.source,
                           container=inp.container, prefix=inp.prefix, started=inp.started, finished=inp.finished,
                           files=inp.files, files_failed=inp.files_failed, bytes=inp.bytes, pages=pages,
                           baseline=inp.baseline, changes=changes))
    return Sealed(pages=len(pages), sent=sent, changes=changes)


def count_changes(deps: ActivityDeps, records: ContainerRecords, run_id: str, baseline_id: str | None,
                  baseline: RunRecord | None, mine: list[PageSeal]) -> ChangeCounts | None:
    """What the run's record (its result pages, as *mine* seals them) changed from its baseline's: the
    baseline's sealed *baseline* header, or (a run never sealed) its pages in the work store; None when the
    baseline cannot be read whole or either record is out of walk order (nothing is guessed)."""
    if baseline_id is not None and baseline is None and not deps.work.has_results(baseline_id):
        return None
    digests = {seal.page: seal.sha256 for seal in mine}
    theirs = {seal.sha256 for seal in baseline.pages} if baseline is not None else set()
    if baseline is not None and theirs == set(digests.values()):
        return ChangeCounts()  # the same pages (an unchanged tree): nothing to read
    shared = theirs & set(digests.values())
    # the pages both records hold are left out: the hashes sealed a moment ago tell which, without hashing again
    after = (entry for page, data in deps.work.result_pages(run_id) if digests.get(page) not in shared
             for entry in decode(data, list[FileEntry], f"record page {page} of run {run_id}"))
    try:
        if baseline_id is None:
            before: Iterable[FileEntry] = ()
        elif baseline is not None:
            before = records.entries(baseline, cached=deps.work.result_pages(baseline_id), seen=set(shared))
        else:
            before = deps.work.iter_results(baseline_id)
        totals = count(changes(before, after))
    except (DamagedData, OutOfOrder):
        return None
    return ChangeCounts(added=totals.added, removed=totals.removed, modified=totals.modified,
                        metadata=totals.metadata)


def build_seal_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    def seal(ctx: task.ActivityContext, raw: object) -> Any:
        return to_wire(seal_record(deps, ctx.orchestration_id, from_wire(raw, SealInput, "the input of a seal")))

    return [activity(SEAL_RECORD, seal)]

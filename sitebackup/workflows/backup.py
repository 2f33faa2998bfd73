"""The ``BackupSiteContent`` orchestration: deterministic workflow code, no I/O, no clocks, no randomness.

Scan once, then keep a bounded window of copy-batch activities in flight (``window.run_page_window``),
publishing a small counter dict as custom status after every completion. Every
``PAGES_PER_GENERATION`` pages the orchestration continues as new with its counters, so one
instance's history stays bounded whatever the size of the tree.

A copy batch that still fails after its retry policy (the destination is down, credentials expired)
never fails the instance: the run waits in ``WAITING_PHASE`` until ``sitebackup resume``.
"""

from __future__ import annotations

from typing import Any

from durabletask import task

from sitebackup.model.codec import from_wire, to_wire
from sitebackup.model.work import BackupCounts, BackupInput, CopyInput, ScanInput, Sealed, SealInput, Step
from sitebackup.workflows import blocks
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, COPY_BATCH, SCAN_TREE, SEAL_RECORD, batch_retry
from sitebackup.workflows.pages import chunk_hash
from sitebackup.workflows.window import batch_result, begin, min_pages, run_and_summarize, tally, utc_now


def backup_site_content(ctx: task.OrchestrationContext, raw: object) -> Any:
    inp = from_wire(raw, BackupInput, "the input of a backup run")
    options = inp.options
    window = max(1, options.concurrency)
    state = yield from begin(ctx, inp.state, BackupCounts, "scanning", SCAN_TREE, ScanInput(
        source=inp.source, container=inp.container, min_pages=min_pages(window, options.shared),
        baseline=inp.baseline, cancelled=inp.cancelled,
        compare=options.compare, patterns=options.patterns, follow_symlinks=options.follow_symlinks,
        upload=options.upload))

    def schedule(step: Step) -> task.Task[Any]:
        if step.seal:
            assert inp.job is not None
            return ctx.call_activity(SEAL_RECORD, retry_policy=batch_retry(), input=to_wire(SealInput(
                container=inp.container, prefix=inp.prefix, source=inp.source, job=inp.job, baseline=inp.baseline,
                started=state.started_at, finished=utc_now(ctx).isoformat(),
                files=state.counts.files_total, files_failed=state.counts.files_failed,
                bytes=state.counts.bytes_total)))
        return ctx.call_activity(COPY_BATCH, retry_policy=batch_retry(), input=to_wire(CopyInput(
            source=inp.source, container=inp.container, prefix=inp.prefix, page=step.page,
            index=chunk_hash(state.index, step.page), follow_symlinks=options.follow_symlinks, upload=options.upload,
            commit=blocks.commit_order(state, step.page) if step.commit else None)))

    def on_result(step: Step, raw_result: Any) -> None:
        if step.seal:  # what the record changed goes into the summary, for `list`
            state.changes = from_wire(raw_result, Sealed, "what sealing did").changes
            return
        result = batch_result(raw_result, BackupCounts)
        if result.range is not None:  # a range of a large file: after its last one, commit it (workflows.blocks)
            commit = blocks.count_range(state, result.range)
            if commit is not None:
                state.retry.insert(0, commit)
        elif result.commit:  # what its ranges reported has served
            state.large.pop(result.page, None)
        tally(state, result.counts, result.failures, result.skipped)

    # the record is sealed into the container once every page is done (a run of an earlier version: not at all)
    last = (Step(0, seal=True), "sealing") if inp.job is not None else None
    return (yield from run_and_summarize(ctx, inp, state, window, schedule, on_result, "uploading",
                                         BACKUP_ORCHESTRATION, inp.source, inp.destination, last))


# the worker registers orchestrators under fn.__name__: pin it to the durable name
backup_site_content.__name__ = BACKUP_ORCHESTRATION

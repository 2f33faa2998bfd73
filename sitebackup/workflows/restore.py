"""The ``RestoreSiteContent`` orchestration: the backup's shape in reverse, deterministic, no I/O.

One planning activity writes the blobs to fetch as numbered pages into the work store (from a backup
run's record, or from a container listing), then the shared page window keeps a bounded window of
download-batch activities in flight and continues as new every ``PAGES_PER_GENERATION`` pages.
A batch that keeps failing (the blob service is down) parks the run in ``WAITING_PHASE`` until
``resume`` or a re-run of the same command. Once every file is written, a run whose record has a tree (its
plan wrote tree pages) ends with one ``RESTORE_TREE`` activity: hard links, symlinks, then directories.
"""

from __future__ import annotations

from typing import Any

from durabletask import task

from sitebackup.model.codec import from_wire, to_wire
from sitebackup.model.work import FetchInput, PlanInput, RestoreCounts, RestoreInput, Step, TreeInput
from sitebackup.workflows.names import PLAN_RESTORE, RESTORE_BATCH, RESTORE_ORCHESTRATION, RESTORE_TREE, batch_retry
from sitebackup.workflows.pages import chunk_hash
from sitebackup.workflows.window import batch_result, begin, min_pages, run_and_summarize, tally


def restore_site_content(ctx: task.OrchestrationContext, raw: object) -> Any:
    inp = from_wire(raw, RestoreInput, "the input of a restore run")
    window = max(1, inp.options.concurrency)
    state = yield from begin(ctx, inp.state, RestoreCounts, "planning", PLAN_RESTORE, PlanInput(
        container=inp.container, prefix=inp.prefix, run_id=inp.run_id, options=inp.options,
        min_pages=min_pages(window, inp.options.shared), later_backups=inp.later_backups))

    def schedule(step: Step) -> task.Task[Any]:
        if step.seal:
            return ctx.call_activity(RESTORE_TREE, retry_policy=batch_retry(), input=to_wire(TreeInput(
                dest=inp.dest, container=inp.container, prefix=inp.prefix, tree=state.tree, index=state.index,
                overwrite=inp.options.overwrite, owners=inp.options.owners, root=inp.dest_created)))
        return ctx.call_activity(RESTORE_BATCH, retry_policy=batch_retry(), input=to_wire(FetchInput(
            dest=inp.dest, container=inp.container, page=step.page, index=chunk_hash(state.index, step.page),
            overwrite=inp.options.overwrite, owners=inp.options.owners)))

    def on_result(_step: Step, raw_result: Any) -> None:
        result = batch_result(raw_result, RestoreCounts)
        tally(state, result.counts, result.failures, result.skipped)

    last = (Step(0, seal=True), "finishing") if state.tree else None
    return (yield from run_and_summarize(ctx, inp, state, window, schedule, on_result, "restoring",
                                         RESTORE_ORCHESTRATION, inp.source_label, inp.dest, last))


restore_site_content.__name__ = RESTORE_ORCHESTRATION

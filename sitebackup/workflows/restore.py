"""The ``RestoreSiteContent`` orchestration: the backup's shape in reverse, deterministic, no I/O.

One planning activity writes the blobs to fetch as numbered pages into the work store (from a backup
run's record, or from a container listing), then the shared page window keeps a bounded window of
download-batch activities in flight and continues as new every ``PAGES_PER_GENERATION`` pages.
A batch that keeps failing (the blob service is down) parks the run in ``WAITING_PHASE`` until
``resume`` or a re-run of the same command.
"""

from __future__ import annotations

from typing import Any

from durabletask import task

from sitebackup.workflows.names import BATCH_RETRY, PLAN_RESTORE, RESTORE_BATCH, RESTORE_ORCHESTRATION
from sitebackup.workflows.types import FetchInput, PlanInput, RestoreInput
from sitebackup.workflows.window import Tally, min_pages

TALLY = Tally(
    kind=RESTORE_ORCHESTRATION,
    counters=("files_total", "files_restored", "files_skipped", "files_failed", "bytes_total", "bytes_restored",
              "files_done", "bytes_done"),
    files_done=("files_done",),
    bytes_done=("bytes_done",),
    hidden=("files_done", "bytes_done"),
)


def restore_site_content(ctx: task.OrchestrationContext, raw: dict[str, Any]) -> Any:
    inp = RestoreInput.from_dict(raw)
    window = max(1, inp.options.concurrency)
    state = yield from TALLY.begin(ctx, inp.state, "planning", PLAN_RESTORE, PlanInput(
        container=inp.container, prefix=inp.prefix, run_id=inp.run_id, options=inp.options.to_dict(),
        min_batches=min_pages(window, inp.options.shared), later_backups=inp.later_backups))

    def schedule(page: int) -> task.Task[Any]:
        return ctx.call_activity(RESTORE_BATCH, retry_policy=BATCH_RETRY, input=FetchInput(
            dest=inp.dest, container=inp.container, page=page, overwrite=inp.options.overwrite))

    return (yield from TALLY.run(ctx, raw, state, window, schedule, lambda result: TALLY.add(state, result),
                                 "restoring", inp.source_label, inp.dest))


restore_site_content.__name__ = RESTORE_ORCHESTRATION

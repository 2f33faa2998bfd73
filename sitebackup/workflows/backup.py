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

from sitebackup.workflows import blocks
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, BATCH_RETRY, COPY_BATCH, SCAN_TREE
from sitebackup.workflows.types import BackupInput, CopyInput, ScanInput
from sitebackup.workflows.window import Tally, min_pages

TALLY = Tally(
    kind=BACKUP_ORCHESTRATION,
    counters=("files_total", "files_uploaded", "files_skipped", "files_failed", "bytes_total", "bytes_uploaded",
              "files_unchanged", "bytes_skipped"),
    # unchanged files count as done so the bar reaches its total; summaries separate them again
    files_done=("files_uploaded", "files_failed", "files_unchanged"),
    bytes_done=("bytes_uploaded", "bytes_skipped"),
)


def backup_site_content(ctx: task.OrchestrationContext, raw: dict[str, Any]) -> Any:
    inp = BackupInput.from_dict(raw)
    options = inp.options
    window = max(1, options.concurrency)
    state = yield from TALLY.begin(ctx, inp.state, "scanning", SCAN_TREE, ScanInput(
        source=inp.source, min_batches=min_pages(window, options.shared), baseline=inp.baseline, compare=options.compare,
        patterns=options.patterns, follow_symlinks=options.follow_symlinks, block_size=options.block_size))

    def schedule(page: int) -> task.Task[Any]:
        large = state.get("large", {}).get(str(blocks.commit_task(page)), {}) if page < 0 else {}
        return ctx.call_activity(COPY_BATCH, retry_policy=BATCH_RETRY, input=CopyInput(
            source=inp.source, container=inp.container, prefix=inp.prefix, page=page, md5=large.get("md5"),
            blocks=large.get("ids"), digest=large.get("digest"), tier=options.tier))

    def on_result(result: dict[str, Any]) -> None:
        if "blocks" in result:  # a range of a large file: after its last one, commit it (workflows.blocks)
            blocks.note_range(state, result)
            commit = blocks.count_range(state, result["blocks"])
            if commit is not None:
                state["retry_pages"].insert(0, commit)
        elif result["page"] < 0:  # a commit: what its ranges reported has served
            state.get("large", {}).pop(str(blocks.commit_task(result["page"])), None)
        TALLY.add(state, result)

    return (yield from TALLY.run(ctx, raw, state, window, schedule, on_result, "uploading",
                                 inp.source, inp.destination))


# the worker registers orchestrators under fn.__name__: pin it to the durable name
backup_site_content.__name__ = BACKUP_ORCHESTRATION

"""The backup's activities, all its I/O: scanning the tree into pages, and copying one page per call.

A page of small files goes up through the process's asyncio uploader (``ActivityDeps.put_many``);
files the baseline holds unchanged are recorded without a read or a request; a page of a large
file's block range goes to ``blocks``. A file replacing content the baseline recorded keeps that
content as a blob snapshot first (``blob.upload.replace``), so every earlier run stays restorable.
Every page ends with its result records written to the work store: together they are the run's
record, which restore, verify, prune and the next run read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from azure.storage.blob import ContainerClient
from durabletask import task

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import backup_blob_name
from sitebackup.blob.upload import SINGLE_PUT_BYTES, Held, Uploaded, upload_file
from sitebackup.blob.workstore import WorkStore
from sitebackup.local import incremental
from sitebackup.local.files import FileChangedError, file_md5_b64
from sitebackup.local.filters import Filter
from sitebackup.local.scan import Failed, FileEntry, Skipped, walk
from sitebackup.workflows import blocks
from sitebackup.workflows.activity import ActivityDeps, activity
from sitebackup.workflows.names import COPY_BATCH, MAX_DONE_RANGES, SCAN_TREE
from sitebackup.workflows.types import DEFAULT_BLOCK_SIZE, BlockRange, CopyInput, CopyItem, ScanInput
from sitebackup.workflows.window import Listed, stream_pages


def scan_source(work: WorkStore, run_id: str, source: Path, *, min_batches: int, baseline: str | None = None,
                mode: str = incremental.MODE_MTIME, patterns: list[str] | None = None,
                follow_symlinks: bool = False, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """Walk *source* into pages of ``CopyItem`` (new, changed and unchanged files) and block ranges.

    Pages are written as the walk goes, in walk order, and the baseline record is read beside it
    (``incremental.Baseline``): memory holds a page and a directory listing, not the tree. The
    results the copies write per page are then in walk order too: the next run's baseline. A page of
    unchanged files only is recorded here, as its copy would record it (``done``: its number is in
    the result's ``done`` ranges, which the orchestration skips), so an unchanged tree costs no copy.
    """
    # run again after a kill, a scan starts over: no result of an earlier attempt may join the record
    work.remove(run_id)
    skipped, failures = Listed(), Listed()
    totals = {"files": 0, "bytes": 0, "unchanged": 0, "unchanged_bytes": 0}
    done: list[list[int]] = []  # [first, last + 1] of the pages recorded here
    rules = Filter(patterns or [])
    # with --force too: what the baseline recorded at a name is kept as a snapshot before it is replaced
    previous = incremental.Baseline(work.iter_results(baseline) if baseline else ())
    large_above = blocks.threshold(block_size)

    def items() -> Iterator[CopyItem | dict[str, Any]]:
        """What each file needs: a ``CopyItem``, or for an unchanged file its record, ready as it is."""
        for e in walk(source, excluded=rules.excluded if rules else None, follow_symlinks=follow_symlinks):
            if type(e) is not FileEntry:
                if isinstance(e, Skipped):
                    skipped.add({"path": e.relpath, "reason": e.reason})
                elif isinstance(e, Failed):
                    failures.add({"path": e.relpath, "error": e.reason})
                continue
            totals["files"] += 1
            totals["bytes"] += e.size
            before = previous.get(e.relpath)
            decision = incremental.decide(e.size, e.mtime_ns, before, mode)
            if decision == incremental.UNCHANGED:
                yield incremental.unchanged_record(e.relpath, before)
            elif decision == incremental.CHECK:  # --checksum: hashed whole by the copy, never in ranges
                yield CopyItem(e.relpath, e.size, e.mtime_ns, before, True)
            else:
                yield CopyItem(e.relpath, e.size, e.mtime_ns, held=[before["md5"], before.get("etag")] if before else None)

    def large(item: CopyItem | dict[str, Any]) -> bool:
        return type(item) is CopyItem and item.previous is None and item.size > large_above

    def light(item: CopyItem | dict[str, Any]) -> bool:
        return type(item) is dict

    def as_row(item: CopyItem | dict[str, Any]) -> list[Any]:
        if type(item) is dict:
            return CopyItem(item["path"], item["size"], item["mtime_ns"], item).to_json()
        return item.to_json()

    n_pages = 0
    for batch in stream_pages(items(), lambda item: item.size, min_batches=min_batches, light=light, alone=large):
        if large(batch[0]):
            n_pages += blocks.write_range_pages(work, run_id, n_pages, batch[0], block_size)
            continue
        if all(map(light, batch)) and (len(done) < MAX_DONE_RANGES or done[-1][1] == n_pages):
            work.write_result(run_id, n_pages, batch)
            totals["unchanged"] += len(batch)
            totals["unchanged_bytes"] += sum(record["size"] for record in batch)
            if done and done[-1][1] == n_pages:
                done[-1][1] += 1
            else:
                done.append([n_pages, n_pages + 1])
        else:
            work.write_page(run_id, n_pages, [as_row(item) for item in batch])
        n_pages += 1
    return {
        "pages": n_pages,
        "done": done,
        "files_total": totals["files"] + failures.count,
        "bytes_total": totals["bytes"],
        # an unchanged file is a skipped one too, as copy_page counts it
        "files_skipped": skipped.count + totals["unchanged"],
        "files_unchanged": totals["unchanged"],
        "bytes_skipped": totals["unchanged_bytes"],
        "skipped": skipped.items,
        "files_failed": failures.count,
        "failures": failures.items,
    }


def copy_page(deps: ActivityDeps, run_id: str, page: int, source: Path, container: str, prefix: str,
              commit: blocks.Commit | None = None, tier: str | None = None) -> dict[str, Any]:
    raw = deps.work.read_page(run_id, page if page >= 0 else blocks.commit_task(page))
    if isinstance(raw, dict):  # a range of a large file or (page < 0) its commit, with what its ranges reported
        return blocks.copy_block_page(deps, run_id, page, BlockRange.from_dict(raw), source, container, prefix,
                                      commit, tier)
    items = [CopyItem(*row) for row in raw]
    client = deps.container_client(container)
    records: list[dict[str, Any]] = []
    failures = Listed()
    n_files = n_bytes = n_unchanged = n_bytes_skipped = 0
    early = _put_small_files(deps, run_id, items, source, container, prefix, tier)
    for item in items:
        if deps.cancelled(run_id):
            break
        relpath, previous = item.relpath, item.previous
        try:
            if previous is not None and (not item.check or file_md5_b64(source / relpath) == previous.get("md5")):
                records.append(incremental.unchanged_record(relpath, previous))
                n_unchanged += 1
                n_bytes_skipped += previous["size"]
                continue
            done = early.get(relpath)
            if not isinstance(done, Uploaded):  # not sent early, or failed there: one more try here
                done = _upload_with_one_retry(client, source / relpath, backup_blob_name(prefix, relpath),
                                              item.what_is_held(), deps.large_file_threads, tier)
        except Exception as exc:
            error = file_error(exc, deps.endpoint)
            records.append({"path": relpath, "error": error})
            failures.add({"path": relpath, "error": error})
            continue
        n_files += 1
        n_bytes += done.size
        records.append(done.record(relpath))
    deps.work.write_result(run_id, page, records)
    # an unchanged file is a skipped one too: files_skipped = not uploaded on purpose
    return {"page": page, "files_uploaded": n_files, "bytes_uploaded": n_bytes,
            "files_failed": failures.count, "failures": failures.items,
            "files_unchanged": n_unchanged, "bytes_skipped": n_bytes_skipped, "files_skipped": n_unchanged}


def _put_small_files(deps: ActivityDeps, run_id: str, items: list[CopyItem], source: Path, container: str,
                     prefix: str, tier: str | None) -> dict[str, Any]:
    """Send the page's small new and changed files together; relpath -> Uploaded or the exception, handled
    by the caller."""
    if deps.put_many is None:
        return {}
    todo: list[tuple[Path, str, Held | None]] = []
    relpaths: list[str] = []
    for item in items:
        if item.previous is not None or item.size > SINGLE_PUT_BYTES:
            continue
        try:
            name = backup_blob_name(prefix, item.relpath)
        except ValueError:  # reported by the one-by-one path
            continue
        todo.append((source / item.relpath, name, item.what_is_held()))
        relpaths.append(item.relpath)
    if not todo:
        return {}
    return dict(zip(relpaths, deps.put_many(container, todo, lambda: deps.cancelled(run_id), tier)))


def _upload_with_one_retry(client: ContainerClient, path: Path, name: str, held: Held | None,
                           threads: int, tier: str | None) -> Uploaded:
    try:
        return upload_file(client, path, name, held=held, max_concurrency=threads, tier=tier)
    except FileChangedError:
        return upload_file(client, path, name, held=held, max_concurrency=threads, tier=tier)


def build_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    """The backup activities bound to *deps*, named with their durable names."""

    def scan_tree(ctx: task.ActivityContext, raw: dict[str, Any]) -> dict[str, Any]:
        inp = ScanInput.from_dict(raw)
        return scan_source(deps.work, ctx.orchestration_id, Path(inp.source), min_batches=inp.min_batches,
                           baseline=inp.baseline, mode=inp.compare, patterns=inp.patterns,
                           follow_symlinks=inp.follow_symlinks, block_size=inp.block_size or DEFAULT_BLOCK_SIZE)

    def copy_batch(ctx: task.ActivityContext, raw: dict[str, Any]) -> dict[str, Any]:
        inp = CopyInput.from_dict(raw)
        result = copy_page(deps, ctx.orchestration_id, inp.page, Path(inp.source), inp.container, inp.prefix,
                           blocks.Commit(inp.md5, inp.blocks, inp.digest), inp.tier)
        if deps.on_batch is not None:
            deps.on_batch(ctx.orchestration_id, result)
        return result

    return [activity(SCAN_TREE, scan_tree), activity(COPY_BATCH, copy_batch)]

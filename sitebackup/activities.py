"""Activities: all the I/O of a backup — scanning the tree into pages and uploading one page per call.

Dependencies (blob clients, the work store) arrive through ``build_activities`` closures, never
through activity inputs: inputs are stored durably and must not carry credentials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob import ContainerClient
from durabletask import task

from sitebackup import blocks, incremental, storage
from sitebackup.errors import DestinationError
from sitebackup.filters import Filter
from sitebackup.scan import Failed, FileEntry, Skipped, describe_os_error, walk
from sitebackup.workstore import RESERVED_PREFIX, BlobWorkStore, WorkStore, is_reserved

log = logging.getLogger("sitebackup.activities")

SCAN_TREE = "ScanSourceTree"
COPY_BATCH = "CopyFileBatch"
# outputs stay small whatever the tree: lists of failures are capped, with counts of the rest
MAX_LISTED = 20
BATCH_FILES = 256
BATCH_BYTES = 16 * 1024 * 1024
# unchanged files cost no I/O in the copy activity, so their pages are much larger
UNCHANGED_PAGE = 4096


@dataclass
class ActivityDeps:
    """What activities need from the hosting process: its own credentials and work store."""

    container_client: Callable[[str], ContainerClient]
    work: WorkStore | BlobWorkStore
    endpoint: str  # label for messages, never a secret
    large_file_threads: int = 4
    # asked between files (and block ranges) so that `sitebackup cancel` stops uploads at the next boundary
    cancelled: Callable[[str], bool] = lambda run_id: False
    # told (run id, copy result) after every finished batch: `sitebackup worker` prints a status line
    on_batch: Callable[[str, dict[str, Any]], None] | None = None
    # uploads a page's small files concurrently (asyncput.AsyncPutter.put_many); None: one by one
    put_many: Callable[..., list[Any]] | None = None


def plan_batches(files: list[FileEntry], *, min_batches: int, batch_files: int = BATCH_FILES,
                 batch_bytes: int = BATCH_BYTES) -> list[list[FileEntry]]:
    """Cut *files* into batches bounded by count and bytes; files over ``batch_bytes`` go alone.

    ``min_batches`` shrinks batches on small trees so that the upload window stays full.
    """
    if files:
        batch_files = max(1, min(batch_files, math.ceil(len(files) / max(1, min_batches))))
    batches: list[list[FileEntry]] = []
    current: list[FileEntry] = []
    current_bytes = 0
    for entry in files:
        if entry.size >= batch_bytes:
            batches.append([entry])
            continue
        if current and (len(current) >= batch_files or current_bytes + entry.size > batch_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += entry.size
    if current:
        batches.append(current)
    return batches


def scan_source(work: WorkStore, run_id: str, source: Path, *, min_batches: int, baseline: str | None = None,
                mode: str = incremental.MODE_MTIME, patterns: list[str] | None = None,
                follow_symlinks: bool = False, block_size: int = blocks.DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """Walk *source* into pages. A page item is ``[relpath, size, mtime_ns]`` (upload) or, for a file in
    the baseline record, ``[relpath, size, mtime_ns, previous_record, check]`` where *check* says the
    content must be hashed to tell whether it changed (``--checksum``)."""
    files: list[FileEntry] = []
    skipped: list[dict[str, str]] = []
    failures: list[dict[str, str]] = []
    n_skipped = n_failed = 0
    rules = Filter(patterns or [])
    excluded = rules.excluded if rules else None
    for entry in walk(source, excluded=excluded, follow_symlinks=follow_symlinks):
        if isinstance(entry, FileEntry):
            files.append(entry)
        elif isinstance(entry, Skipped):
            n_skipped += 1
            if len(skipped) < MAX_LISTED:
                skipped.append({"path": entry.relpath, "reason": entry.reason})
        elif isinstance(entry, Failed):
            n_failed += 1
            if len(failures) < MAX_LISTED:
                failures.append({"path": entry.relpath, "error": entry.reason})
    previous = incremental.load_baseline(work, baseline) if mode != incremental.MODE_FORCE else {}
    to_copy: list[FileEntry] = []
    extra: dict[str, list[Any]] = {}
    unchanged: list[list[Any]] = []
    for e in files:
        decision = incremental.decide(e.size, e.mtime_ns, previous.get(e.relpath), mode)
        if decision == incremental.UNCHANGED:
            unchanged.append([e.relpath, e.size, e.mtime_ns, previous[e.relpath], False])
            continue
        if decision == incremental.CHECK:
            extra[e.relpath] = [previous[e.relpath], True]
        to_copy.append(e)
    # large new or changed files go in block ranges (sitebackup.blocks); --checksum ones stay whole
    large = [e for e in to_copy if e.size > blocks.threshold(block_size) and e.relpath not in extra]
    if large:
        to_copy = [e for e in to_copy if e.size <= blocks.threshold(block_size) or e.relpath in extra]
    batches = plan_batches(to_copy, min_batches=min_batches)
    for number, batch in enumerate(batches):
        work.write_page(run_id, number, [[e.relpath, e.size, e.mtime_ns, *extra.get(e.relpath, [])] for e in batch])
    for start in range(0, len(unchanged), UNCHANGED_PAGE):
        work.write_page(run_id, len(batches) + start // UNCHANGED_PAGE, unchanged[start:start + UNCHANGED_PAGE])
    n_pages = len(batches) + -(-len(unchanged) // UNCHANGED_PAGE)
    n_pages += blocks.write_range_pages(work, run_id, n_pages, large, block_size)
    return {
        "pages": n_pages,
        "files_total": len(files) + n_failed,
        "bytes_total": sum(e.size for e in files),
        "files_skipped": n_skipped,
        "skipped": skipped,
        "files_failed": n_failed,
        "failures": failures,
    }


def copy_page(deps: ActivityDeps, run_id: str, page: int, source: Path, container: str, prefix: str,
              md5: str | None = None) -> dict[str, Any]:
    client = deps.container_client(container)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    n_files = n_bytes = n_failed = n_unchanged = n_bytes_skipped = 0
    items = deps.work.read_page(run_id, page if page >= 0 else blocks.commit_task(page))
    if isinstance(items, dict):  # a range of a large file or (page < 0) its commit, with the file's MD5 if known
        return blocks.copy_block_page(deps, run_id, page, items, source, container, prefix, md5)
    early = _put_small_files(deps, run_id, items, source, container, prefix)
    for relpath, _size, _mtime, *known in items:
        if deps.cancelled(run_id):
            break
        error = None
        try:
            if known and (not known[1] or storage.file_md5_b64(source / relpath) == known[0].get("md5")):
                records.append(incremental.unchanged_record(relpath, known[0]))
                n_unchanged += 1
                n_bytes_skipped += known[0]["size"]
                continue
            name = storage.blob_name(prefix, relpath)
            if is_reserved(name):
                raise ValueError(f"{name!r} is under {RESERVED_PREFIX}, reserved for sitebackup's work files; "
                                 "back up with --prefix to keep it")
            done = early.get(relpath)
            if not isinstance(done, storage.Uploaded):  # not sent early, or failed there: one more try here
                done = _upload_with_one_retry(client, source / relpath, name, deps.large_file_threads)
        except storage.FileChangedError as exc:
            error = str(exc)
        except ValueError as exc:  # name rules
            error = str(exc)
        except OSError as exc:
            error = describe_os_error(exc)
        except Exception as exc:
            fatal = storage.classify(exc, deps.endpoint)
            if fatal is not None:
                # the whole destination is failing: let the orchestration's retry policy decide
                raise fatal from None
            error = storage.redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        if error is None:
            n_files += 1
            n_bytes += done.size
            records.append({"path": relpath, "size": done.size, "mtime_ns": done.mtime_ns, "md5": done.md5})
        else:
            n_failed += 1
            records.append({"path": relpath, "error": error})
            if len(failures) < MAX_LISTED:
                failures.append({"path": relpath, "error": error})
    deps.work.write_result(run_id, page, records)
    return {"page": page, "files_uploaded": n_files, "bytes_uploaded": n_bytes,
            "files_failed": n_failed, "failures": failures,
            "files_unchanged": n_unchanged, "bytes_skipped": n_bytes_skipped}


def _put_small_files(deps: ActivityDeps, run_id: str, items: list[Any], source: Path, container: str,
                     prefix: str) -> dict[str, Any]:
    """Send the page's small new files together; relpath -> Uploaded or the exception, handled by the caller."""
    if deps.put_many is None:
        return {}
    todo: list[tuple[Path, str]] = []
    relpaths: list[str] = []
    for relpath, size, _mtime, *known in items:
        if known or size > storage.SINGLE_PUT_BYTES:
            continue
        try:
            name = storage.blob_name(prefix, relpath)
        except ValueError:
            continue
        if not is_reserved(name):
            todo.append((source / relpath, name))
            relpaths.append(relpath)
    if not todo:
        return {}
    return dict(zip(relpaths, deps.put_many(container, todo, lambda: deps.cancelled(run_id))))


def _upload_with_one_retry(client: ContainerClient, path: Path, name: str, threads: int) -> storage.Uploaded:
    try:
        return storage.upload_file(client, path, name, max_concurrency=threads)
    except storage.FileChangedError:
        return storage.upload_file(client, path, name, max_concurrency=threads)


def build_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    """The backup activities bound to *deps*, named with their durable names."""

    def scan_tree(ctx: task.ActivityContext, inp: dict[str, Any]) -> dict[str, Any]:
        return scan_source(deps.work, ctx.orchestration_id, Path(inp["source"]),
                           min_batches=int(inp.get("min_batches", 1)), baseline=inp.get("baseline"),
                           mode=inp.get("compare", incremental.MODE_MTIME), patterns=inp.get("patterns"),
                           follow_symlinks=bool(inp.get("follow_symlinks")),
                           block_size=int(inp.get("block_size") or blocks.DEFAULT_BLOCK_SIZE))

    def copy_batch(ctx: task.ActivityContext, inp: dict[str, Any]) -> dict[str, Any]:
        try:
            result = copy_page(deps, ctx.orchestration_id, int(inp["page"]), Path(inp["source"]),
                               inp["container"], inp.get("prefix", ""), inp.get("md5"))
        except DestinationError:
            raise
        except Exception as exc:
            log.debug("copy batch failed", exc_info=True)
            raise RuntimeError(storage.redact(str(exc))) from None
        if deps.on_batch is not None:
            deps.on_batch(ctx.orchestration_id, result)
        return result

    scan_tree.__name__ = SCAN_TREE
    copy_batch.__name__ = COPY_BATCH
    return [scan_tree, copy_batch]

"""The backup's activities, all its I/O: scanning the tree into pages, and copying one page per call.

A page of small files goes up through the process's asyncio uploader (``ActivityDeps.put_many``);
files the baseline holds unchanged are recorded without a read or a request; a page of a large
file's block range goes to ``blocks``. A file replacing content the baseline recorded keeps that
content as a blob snapshot first (``blob.upload.replace``), so every earlier run stays restorable.
Every page ends with its result records written to the work store: together they are the run's
record, which restore, verify, prune and the next run read.

A copy reads its page only when its bytes are the ones the scan wrote (``workflows.pages``), and opens
every source file beneath the source root by descriptor (``local.files.SourceTree``), whatever the page says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any
from zlib import crc32

from azure.storage.blob import ContainerClient
from durabletask import task

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import backup_blob_name
from sitebackup.blob.records import ContainerRecords, run_entries, run_pages
from sitebackup.blob.upload import SINGLE_PUT_BYTES, Uploaded, upload_file
from sitebackup.blob.workstore import WorkStore
from sitebackup.local import incremental
from sitebackup.local.files import FileChangedError, SourceTree, fd_md5_b64
from sitebackup.local.incremental import Compared, Found
from sitebackup.local.scan import Skipped
from sitebackup.model.codec import DamagedData, from_wire, to_wire
from sitebackup.model.records import FileEntry, PriorCopy
from sitebackup.model.work import (
    BackupCounts,
    CommitOrder,
    CopyInput,
    CopyItem,
    CopyPage,
    PageResult,
    Planned,
    RangePage,
    ScanInput,
    Span,
    Step,
    UploadSpec,
)
from sitebackup.workflows import blocks, pages
from sitebackup.workflows.activity import ActivityDeps, activity, no_slot
from sitebackup.workflows.names import COPY_BATCH, MAX_DONE_RANGES, PAGE_CUT_ODDS, SCAN_TREE
from sitebackup.workflows.window import Capped, stream_pages

_KIND = attrgetter("kind")
_SIZE = attrgetter("size")


def ends_page(item: CopyItem | FileEntry) -> bool:
    """Whether a page of the scan may end after *item* (``window.stream_pages``): decided by its path alone, the
    same from run to run and on every host (CRC-32: a hash of Python's own is seeded anew in every process)."""
    return crc32(item.path.encode("utf-8", "surrogatepass")) % PAGE_CUT_ODDS == 0


def scan_source(work: WorkStore, run_id: str, inp: ScanInput,
                records: ContainerRecords | None = None) -> Planned[BackupCounts]:
    """Walk the source into pages of ``CopyItem`` (new, changed and unchanged files) and block ranges.

    Pages are written as the walk goes, in walk order, and the baseline record is read beside it
    (``incremental.compare``): memory holds a page and a directory listing, not the tree. The
    results the copies write per page are then in walk order too: the next run's baseline. A page of
    unchanged files only is recorded here, as its copy would record it (``done``: its number is in
    the result's ``done`` spans, which the orchestration skips), so an unchanged tree costs no copy.
    The other pages' hashes go into the page index, whose chunks' hashes the result carries (``index``).
    """
    # run again after a kill, a scan starts over: no result of an earlier attempt may join the record
    work.remove(run_id)
    skipped, failures = Capped(), Capped()
    notes: list[str] = []
    counts = BackupCounts()
    done: list[Span] = []  # the pages recorded here
    large_above = blocks.threshold(inp.upload.block_size)

    def items() -> Iterator[CopyItem | FileEntry]:
        """What each entry needs: a ``CopyItem``, or for an unchanged file, a directory or a symlink its record,
        ready as it is."""
        # with --force too: what the baseline recorded at a name is kept as a snapshot before it is replaced
        for found in incremental.compare(Path(inp.source), patterns=inp.patterns,
                                         follow_symlinks=inp.follow_symlinks,
                                         baseline=_baseline(work, records, inp, notes.append), mode=inp.compare):
            if isinstance(found, Compared):  # a file: most entries
                file, before = found.file, found.previous
                counts.files_total += 1
                counts.bytes_total += file.size
                if found.decision == incremental.UNCHANGED:
                    assert before is not None
                    record, changed = incremental.unchanged(before, file.meta)
                    counts.metadata_changed += changed
                    yield record
                elif found.decision == incremental.CHECK:  # --checksum: hashed whole by the copy, never in ranges
                    yield CopyItem(file.path, file.size, file.mtime_ns, before, True, meta=file.meta)
                else:
                    yield CopyItem(file.path, file.size, file.mtime_ns, before, changed=before is not None,
                                   meta=file.meta)
            elif isinstance(found, Found):
                entry = found.entry
                if entry.kind == "dir":
                    counts.dirs_total += 1
                else:
                    counts.symlinks_total += 1
                counts.metadata_changed += incremental.metadata_change(found.previous, entry=entry) is not None
                yield entry
            elif isinstance(found, Skipped):
                skipped.add(found.relpath, reason=found.reason)
            else:
                failures.add(found.relpath, error=found.reason)

    def large(item: CopyItem | FileEntry) -> bool:
        return isinstance(item, CopyItem) and not item.check and item.size > large_above and \
            (item.previous is None or item.changed)

    def light(item: CopyItem | FileEntry) -> bool:
        return isinstance(item, FileEntry)

    def as_item(item: CopyItem | FileEntry) -> CopyItem:
        return CopyItem(item.path, item.size, item.mtime_ns, item) if isinstance(item, FileEntry) else item

    n_pages = 0
    writer = pages.PageWriter(work, run_id)
    for batch in stream_pages(items(), _SIZE, min_batches=inp.min_pages, light=light, alone=large,
                              ends_page=ends_page):
        first = batch[0]
        if isinstance(first, CopyItem) and large(first):
            n_pages += blocks.write_range_pages(writer, n_pages, first, inp.upload.block_size)
            continue
        # counted with C loops (map), as most pages of a quiet tree are these
        if all(map(isinstance, batch, repeat(FileEntry))) and (len(done) < MAX_DONE_RANGES or done[-1].end == n_pages):
            work.write_result(run_id, n_pages, batch)
            counts.files_unchanged += list(map(_KIND, batch)).count("file")
            counts.bytes_skipped += sum(map(_SIZE, batch))
            if done and done[-1].end == n_pages:
                done[-1].end += 1
            else:
                done.append(Span(n_pages, n_pages + 1))
        else:
            writer.write(n_pages, [as_item(item) for item in batch])
        n_pages += 1
    counts.files_total += failures.count
    counts.files_failed = failures.count
    # an unchanged file is a skipped one too, as copy_page counts it
    counts.files_skipped = skipped.count + counts.files_unchanged
    return Planned(pages=n_pages, counts=counts, done=done, index=writer.close(n_pages), failures=failures.items,
                   skipped=skipped.items, notes=notes)


def _baseline(work: WorkStore, records: ContainerRecords | None, inp: ScanInput,
              note: Callable[[str], None]) -> Iterator[FileEntry]:
    """The baseline's record, with what the runs cancelled since recorded over it, read beside the walk. A page of
    it that is damaged in the state directory and in the container too ends it there: the files after are
    compared with what the container holds at their names as they are uploaded (``blob.upload.replace``), so
    none is taken for unchanged without proof."""
    if inp.cancelled:
        return _overlaid(work, records, inp, note)
    if not inp.baseline:
        return iter(())
    # the baseline alone: its pages chained in C, so that no Python step per entry stands between them and the walk
    return chain.from_iterable(_up_to_damage(run_pages(records, work, inp.baseline, note), note))


def _up_to_damage(pages: Iterator[list[FileEntry]], note: Callable[[str], None]) -> Iterator[list[FileEntry]]:
    try:
        yield from pages
    except DamagedData as exc:
        note(_after_damage(exc))


def _overlaid(work: WorkStore, records: ContainerRecords | None, inp: ScanInput,
              note: Callable[[str], None]) -> Iterator[FileEntry]:
    # a cancelled run is never sealed: its record is the pages this work store holds
    sources = [run_entries(None, work, run_id, note) for run_id in inp.cancelled]
    if inp.baseline:
        sources.append(run_entries(records, work, inp.baseline, note))
    try:
        yield from incremental.overlaid(sources)
    except DamagedData as exc:
        note(_after_damage(exc))


def _after_damage(exc: DamagedData) -> str:
    return f"{exc}; the files after it are compared with the container as they are uploaded"


def copy_page(deps: ActivityDeps, run_id: str, page: int, items: list[CopyItem], source: SourceTree, container: str,
              prefix: str, spec: UploadSpec) -> PageResult[BackupCounts]:
    """Copy one page of small files: unchanged ones recorded as the baseline had them, the others uploaded."""
    client = deps.container_client(container)
    records: list[FileEntry] = []
    failures = Capped()
    counts = BackupCounts()
    early = _put_small_files(deps, run_id, items, source, prefix, container, spec)
    for item in items:
        if deps.cancelled(run_id):
            break
        relpath, previous = item.path, item.previous
        if previous is not None and not previous.is_file:  # a directory or symlink, recorded by the scan
            records.append(previous)
            continue
        try:
            if previous is not None and not item.changed and (
                    not item.check or _md5_b64(source, relpath) == previous.md5):
                record, changed = incremental.unchanged(previous, item.meta)
                # --checksum found the same bytes: what else changed was not counted by the scan
                counts.metadata_changed += item.check and changed
                records.append(record)
                counts.files_unchanged += 1
                counts.bytes_skipped += previous.size
                continue
            done = early.get(relpath)
            if not isinstance(done, Uploaded):  # not sent early (over the single-put size), or failed there
                # a file up to the range threshold goes in one Put Blob (the SDK's single put reaches further): in a
                # slot of the window the small files' requests and the large files' blocks share, its bytes counted
                # there; a larger one (--checksum hashes a file whole, never in ranges) in the SDK's own blocks
                whole = item.size <= blocks.threshold(spec.block_size)
                with (deps.held if whole else no_slot)(item.size):
                    done = _upload_with_one_retry(client, source, relpath, backup_blob_name(prefix, relpath),
                                                  spec, item.prior, deps.concurrency.per_file)
        except Exception as exc:
            error = file_error(exc, deps.endpoint)
            records.append(FileEntry.failed(relpath, error, previous).take(item.meta))
            failures.add(relpath, error=error)
            continue
        counts.files_uploaded += 1
        counts.bytes_uploaded += done.size
        records.append(done.record(relpath).take(item.meta))
    deps.work.write_result(run_id, page, records)
    # an unchanged file is a skipped one too: files_skipped = not uploaded on purpose
    counts.files_failed = failures.count
    counts.files_skipped = counts.files_unchanged
    return PageResult(page=page, counts=counts, failures=failures.items)


def _md5_b64(source: SourceTree, relpath: str) -> str:
    with source.opened(relpath) as fd:
        return fd_md5_b64(fd)


def _put_small_files(deps: ActivityDeps, run_id: str, items: list[CopyItem], source: SourceTree, prefix: str,
                     container: str, spec: UploadSpec) -> dict[str, Uploaded | BaseException]:
    """Send the page's small new and changed files together; path -> Uploaded or the exception, handled by
    the caller."""
    if deps.put_many is None:
        return {}
    todo: list[tuple[str, str, PriorCopy | None]] = []
    for item in items:
        if (item.previous is not None and not item.changed) or item.size > SINGLE_PUT_BYTES:
            continue
        try:
            name = backup_blob_name(prefix, item.path)
        except ValueError:  # reported by the one-by-one path
            continue
        todo.append((item.path, name, item.prior))
    if not todo:
        return {}
    return dict(zip((relpath for relpath, _, _ in todo),
                    deps.put_many(container, source, todo, spec, lambda: deps.cancelled(run_id))))


def _upload_with_one_retry(client: ContainerClient, source: SourceTree, relpath: str, name: str, spec: UploadSpec,
                           prior: PriorCopy | None, threads: int) -> Uploaded:
    try:
        return upload_file(client, source, relpath, name, spec, prior=prior, max_concurrency=threads)
    except FileChangedError:
        return upload_file(client, source, relpath, name, spec, prior=prior, max_concurrency=threads)


def copy_step(deps: ActivityDeps, run_id: str, inp: CopyInput) -> PageResult[BackupCounts]:
    """One copy activity: a page of small files, a block range, or (``inp.commit``) a large file's commit."""
    step = Step(inp.page, commit=inp.commit is not None)
    page: CopyPage = pages.read_page(deps.work, run_id, inp.page, inp.index, CopyPage)  # type: ignore[arg-type]
    with SourceTree(inp.source, follow_symlinks=inp.follow_symlinks) as source:
        if isinstance(page, RangePage):
            return blocks.copy_block_page(deps, run_id, step, page, source, inp.container, inp.prefix, inp.upload,
                                          inp.commit or CommitOrder())
        return copy_page(deps, run_id, inp.page, page, source, inp.container, inp.prefix, inp.upload)


def build_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    """The backup activities bound to *deps*, named with their durable names."""

    def scan_tree(ctx: task.ActivityContext, raw: object) -> Any:
        inp = from_wire(raw, ScanInput, "the input of a scan")
        records = deps.records(inp.container) if inp.container else None
        return to_wire(scan_source(deps.work, ctx.orchestration_id, inp, records))

    def copy_batch(ctx: task.ActivityContext, raw: object) -> Any:
        result = copy_step(deps, ctx.orchestration_id, from_wire(raw, CopyInput, "the input of a copy batch"))
        if deps.on_batch is not None:
            deps.on_batch(ctx.orchestration_id, result)
        return to_wire(result)

    return [activity(SCAN_TREE, scan_tree), activity(COPY_BATCH, copy_batch)]

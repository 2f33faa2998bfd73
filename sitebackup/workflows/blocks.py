"""Large files as block ranges: range pages, content-derived block ids, staging one range, the final commit.

A file larger than ``threshold(block_size)`` is not copied by one activity: the scan writes one
page per range (``model.work.RangePage``), each range activity reads its block, names it by its content
(``content_block_id``: a hash of the bytes plus the range index) and stages it with ``stage_block``
unless the service already holds a block of that id, staged or committed, so a block reused instead
of re-sent is the same bytes by construction; a resumed or repeated run (``--force`` too) sends only
the blocks whose bytes the service does not hold. The progress bytes move with every range.

The first range also streams the whole file for its MD5 and hashes every block on the way
(``hash_blocks``). Once the orchestration has counted the file's last range (``count_range``) it
schedules the commit with what the ranges reported (``CommitOrder``): the ids staged, the MD5, and a
digest of the ids the first range hashed. The commit checks the two agree, so the Content-MD5 it
commits is the MD5 of the bytes staged, keeps the content the baseline recorded as a snapshot
(``blob.upload.replace``) and calls ``commit_block_list``. A range that fails says why in its report,
which the orchestration hands to the commit the same way (``CommitOrder.failed``): range pages are
written once by the scan and never rewritten, so each keeps the SHA-256 its index lists.

The commit of the file whose first range page is ``p`` is the step ``Step(p, commit=True)``: it needs no
page of its own, and a failed commit is retried as a commit by the orchestration's retry queue.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import backup_blob_name
from sitebackup.blob.upload import Uploaded, commit_blocks
from sitebackup.local.files import CHUNK, FileChangedError, SourceTree, check_unchanged, read_at
from sitebackup.model.records import FileEntry, PriorCopy
from sitebackup.model.work import (
    MIB,
    BackupCounts,
    CommitOrder,
    CopyItem,
    FileRef,
    LargeFile,
    Listed,
    PageResult,
    RangePage,
    RangeReport,
    RunState,
    Step,
    UploadSpec,
)
from sitebackup.workflows.activity import ActivityDeps, HeldSlot, no_slot
from sitebackup.workflows.pages import PageWriter

MIN_BLOCK_SIZE = 1 * MIB
MAX_BLOCK_SIZE = 4000 * MIB  # Azure's limit for one block
# A range is read into memory while it is staged: the bytes held at once, not the window of
# activities, bound the RSS, so a larger --block-size means fewer ranges in flight, not more memory.
IN_MEMORY_BYTES = 128 * MIB
RANGES_ABOVE = 32 * MIB


class ByteBudget:
    """At most *capacity* bytes taken at once; one request larger than that waits until it is alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.taken = 0
        self.cond = threading.Condition()

    @contextmanager
    def take(self, n: int) -> Iterator[None]:
        n = min(n, self.capacity)
        with self.cond:
            self.cond.wait_for(lambda: self.taken + n <= self.capacity)
            self.taken += n
        try:
            yield
        finally:
            with self.cond:
                self.taken -= n
                self.cond.notify_all()


_in_memory = ByteBudget(IN_MEMORY_BYTES)


class Cancelled(Exception):
    """The run was cancelled (`sitebackup cancel`) before this range or commit went to the service."""


def threshold(block_size: int) -> int:
    """Files above this go in ranges; below it one Put Blob costs fewer requests (the SDK sends a file whole up to
    its single-put size, 64 MiB, beyond this).

    At most RANGES_ABOVE: a file below the threshold is read whole into memory by the SDK's
    single put, once per activity in flight, and it has no block-level resume.
    """
    return min(4 * block_size, RANGES_ABOVE)


def range_count(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


def content_block_id(data: bytes | memoryview, index: int) -> str:
    """The id of block *index* holding *data*: same bytes at the same place, same id; other bytes, another id.

    40 ASCII characters (128 bits of SHA-256, the index in 8 digits), base64: every id of a blob has the
    same length, as Azure requires of the blocks of one blob (staged ones included).
    """
    return _block_id(hashlib.sha256(data), index)


def _block_id(sha256: "hashlib._Hash", index: int) -> str:
    return base64.b64encode(f"{sha256.hexdigest()[:32]}{index:08d}".encode("ascii")).decode("ascii")


def ids_digest(ids: list[str]) -> str:
    """A short digest of a file's block ids in order: what the first range reports beside the file's MD5."""
    return hashlib.sha256("\n".join(ids).encode("ascii")).hexdigest()[:32]


def hash_blocks(fd: int, size: int, mtime_ns: int, block_size: int) -> tuple[str, list[str]]:
    """The MD5 (base64) of the version the scan saw (open as *fd*) and the content id of each of its blocks,
    from one streamed read: (size, mtime) checked before and after, so both describe the same bytes."""
    check_unchanged(fd, size, mtime_ns)
    whole = hashlib.md5()
    ids = []
    offset = 0
    for index in range(range_count(size, block_size)):
        block = hashlib.sha256()
        left = min(block_size, size - index * block_size)
        while left:
            chunk = os.pread(fd, min(CHUNK, left), offset)
            if not chunk:
                raise FileChangedError()
            whole.update(chunk)
            block.update(chunk)
            left -= len(chunk)
            offset += len(chunk)
        ids.append(_block_id(block, index))
    check_unchanged(fd, size, mtime_ns)
    return base64.b64encode(whole.digest()).decode("ascii"), ids


def write_range_pages(pages: PageWriter, first_page: int, item: CopyItem, block_size: int) -> int:
    """Write the range pages of the file *item* (with what the baseline recorded at its name) from page
    *first_page* on; return how many."""
    n = range_count(item.size, block_size)
    for index in range(n):
        pages.write(first_page + index, RangePage(
            file=FileRef(item.path, item.size, item.mtime_ns, item.meta), range=index, ranges=n, block_size=block_size,
            first_page=first_page, previous=item.previous))
    return n


def count_range(state: RunState[BackupCounts], report: RangeReport) -> Step | None:
    """Orchestration side (pure): keep what a finished range reported for its file's commit (the id it staged,
    or why it failed; from the first range the file's MD5 and the digest of the block ids it hashed), and once
    the file's last range is in, the step that commits it."""
    entry = state.large.setdefault(report.first_page,
                                   LargeFile(ranges_left=report.ranges, blocks=[None] * report.ranges))
    if report.block_id:
        entry.blocks[report.range] = report.block_id
    if report.error and entry.failed is None:
        entry.failed = report.error
    if report.md5:
        entry.md5, entry.digest = report.md5, report.digest
    entry.ranges_left -= 1
    return Step(report.first_page, commit=True) if entry.ranges_left <= 0 else None


def commit_order(state: RunState[BackupCounts], first_page: int) -> CommitOrder:
    """Orchestration side (pure): what the commit of the file whose first range page is *first_page* is handed."""
    entry = state.large.get(first_page)
    return CommitOrder() if entry is None else CommitOrder(md5=entry.md5, blocks=entry.blocks, digest=entry.digest,
                                                           failed=entry.failed)


class Staged(NamedTuple):
    length: int
    sent: bool  # False: the service already held a block of this id (the same bytes)
    block_id: str


def reported(order: CommitOrder, ranges: int) -> tuple[str, list[str]] | None:
    """(MD5, block ids) when every range reported; None when a report is missing (a range failed); FileChangedError
    when the bytes the first range hashed are not the staged ones."""
    ids = [block for block in order.blocks or [] if block is not None]
    if order.md5 is None or order.digest is None or len(ids) != ranges:
        return None
    if ids_digest(ids) != order.digest:
        raise FileChangedError()
    return order.md5, ids


def held_ids(blob: BlobClient) -> set[str]:
    """Block ids the service holds for *blob*, staged or committed: ids name content, so either serves.

    Committed ones matter when a commit went through but its activity was retried, or the same
    content was committed before; ``commit_block_list`` takes them too (block state "latest").
    """
    try:
        committed, uncommitted = blob.get_block_list("all")
    except ResourceNotFoundError:  # nothing staged yet: the blob does not exist
        return set()
    return {block.id for block in committed} | {block.id for block in uncommitted}


def stage_range(container: ContainerClient, fd: int, name: str, item: RangePage,
                cancelled: Callable[[], bool] = lambda: False, held: HeldSlot = no_slot) -> Staged:
    """Read one range of the file open as *fd*, name it by its content and stage it unless the service holds that
    block already, its Put Block in a slot of the process's window of requests (*held*).

    The block list is asked right after the read: a range may have waited long for the memory budget.
    """
    size, mtime_ns = item.file.size, item.file.mtime_ns
    block_size, index = item.block_size, item.range
    check_unchanged(fd, size, mtime_ns)
    blob = container.get_blob_client(name)
    offset = index * block_size
    length = min(block_size, size - offset)
    with _in_memory.take(length):
        if cancelled():
            raise Cancelled()
        data = read_at(fd, length, offset)
        if len(data) != length:
            raise FileChangedError()
        bid = content_block_id(data, index)
        if bid in held_ids(blob):
            return Staged(length, False, bid)
        with held(length):
            if cancelled():  # the block list and the slot can take a while to come
                raise Cancelled()
            # transactional MD5 per block: the service checks each range (and Azurite is faster with it)
            blob.stage_block(bid, data, length=length, validate_content=True)
        del data
    return Staged(length, True, bid)


def commit_file(container: ContainerClient, fd: int, name: str, item: RangePage, spec: UploadSpec,
                order: CommitOrder, cancelled: Callable[[], bool] = lambda: False) -> Uploaded:
    """Commit the staged ranges as the blob, with Content-MD5 of the whole file, as *spec* says, over what
    the baseline recorded there.

    The ids and MD5 come from the ranges (*order*), checked to describe the same bytes; when a range's
    report is missing, the file (open as *fd*) is hashed again now, and a block of other bytes is then not found
    staged.
    """
    size, mtime_ns = item.file.size, item.file.mtime_ns
    st = check_unchanged(fd, size, mtime_ns)
    md5, ids = reported(order, item.ranges) or hash_blocks(fd, size, mtime_ns, item.block_size)
    if cancelled():  # hashing a large file takes a while
        raise Cancelled()
    blob = container.get_blob_client(name)
    missing = len(set(ids) - held_ids(blob))
    if missing:
        raise FileChangedError(f"{missing} of {item.ranges} blocks were not staged")
    return commit_blocks(blob, ids, st, md5, spec, PriorCopy.of(item.previous))


def copy_block_page(deps: ActivityDeps, run_id: str, step: Step, item: RangePage, source: SourceTree,
                    container: str, prefix: str, spec: UploadSpec, order: CommitOrder) -> PageResult[BackupCounts]:
    """The copy activity for a range page or (``step.commit``) a large file's commit, shaped like a batch result.

    A range reports its bytes (progress) and the id it staged, and always counts as finished, even
    when it failed: then it reports why, which the orchestration hands to the commit (*order*), which
    reports the file failed with that reason ("changed during backup"), once, without committing. The first
    range also hashes the whole file and reports the MD5 with the digest of the block ids it hashed,
    which the orchestration hands to the commit (*order*): the hash overlaps the other ranges
    instead of delaying the commit.
    Once the run is cancelled neither a range nor the commit goes to the service and nothing is
    recorded: the file is neither uploaded nor failed, and the next run of the source sends it.
    """
    relpath = item.file.path
    counts = BackupCounts()
    result = PageResult(page=step.page, counts=counts, commit=step.commit)
    if not step.commit:
        result.range = RangeReport(first_page=item.first_page, ranges=item.ranges)
    client = deps.container_client(container)
    cancelled = functools.partial(deps.cancelled, run_id, fresh=True)
    error = None
    try:
        if cancelled():
            raise Cancelled()
        name = backup_blob_name(prefix, relpath)
        if result.range is not None:
            result.range.range = item.range
            with source.opened(relpath) as fd:
                staged = stage_range(client, fd, name, item, cancelled, deps.held)
                counts.bytes_uploaded = staged.length
                result.range.block_id, result.range.sent = staged.block_id, staged.sent
                if item.range == 0:
                    result.range.md5, ids = hash_blocks(fd, item.file.size, item.file.mtime_ns, item.block_size)
                    result.range.digest = ids_digest(ids)
        elif order.failed:
            error = order.failed
        else:
            with source.opened(relpath) as fd:
                done = commit_file(client, fd, name, item, spec, order, cancelled)
    except Cancelled:
        result.cancelled = True
        return result
    except Exception as exc:
        error = file_error(exc, deps.endpoint)
    if result.range is not None:
        result.range.error = error
        return result
    if error is None:
        record = done.record(relpath).take(item.file.meta)
        counts.files_uploaded = 1
    else:
        record = FileEntry.failed(relpath, error, item.previous).take(item.file.meta)
        counts.files_failed = 1
        result.failures = [Listed(relpath, error=error)]
    deps.work.write_result(run_id, item.first_page, [record])
    return result

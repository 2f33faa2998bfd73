"""Large files as block ranges: range pages, deterministic block ids, staging one range, the final commit.

A file larger than ``threshold(block_size)`` is not copied by one activity: the scan writes one
page per range (``types.BlockRange``), each
range activity stages one block with ``stage_block``, and once the orchestration has counted the
file's last range (``count_range``) it schedules the commit task, which hashes the file (streamed)
and calls ``commit_block_list``. Block ids derive from path, size, mtime, block size and range
index, so a resumed or repeated run finds the blocks the service already holds (its block list,
uncommitted and committed) and sends only the missing ones. The progress bytes move with every range.

The commit of the file whose first range page is ``p`` travels as page ``-1 - p``: it needs no page
of its own and a failed commit is retried as a commit by the orchestration's page retry queue.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobBlock, ContainerClient

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import backup_blob_name
from sitebackup.blob.upload import Uploaded, blob_properties
from sitebackup.blob.workstore import WorkStore
from sitebackup.local.files import FileChangedError, check_unchanged, hash_version
from sitebackup.local.scan import FileEntry
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.types import MIB, BlockRange

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
    """Files above this go in ranges; below it one Put Blob (or the SDK's own chunking) costs fewer requests.

    At most RANGES_ABOVE: a file below the threshold is read whole into memory by the SDK's
    single put, once per activity in flight, and it has no block-level resume.
    """
    return min(4 * block_size, RANGES_ABOVE)


def range_count(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


def block_id(relpath: str, size: int, mtime_ns: int, block_size: int, index: int) -> str:
    """Same file, same version, same cut -> same id; every id of a blob has the same length, as Azure requires."""
    digest = hashlib.sha256(f"{relpath}\0{size}\0{mtime_ns}\0{block_size}".encode("utf-8", "surrogateescape"))
    return base64.b64encode(f"{digest.hexdigest()[:32]}{index:08d}".encode("ascii")).decode("ascii")


def commit_task(first_page: int) -> int:
    return -1 - first_page


def write_range_pages(work: WorkStore, run_id: str, first_page: int, files: list[FileEntry],
                      block_size: int) -> int:
    """Write the range pages of *files* from page *first_page* on; return how many."""
    page = first_page
    for entry in files:
        n = range_count(entry.size, block_size)
        start = page
        for index in range(n):
            work.write_page(run_id, page, BlockRange(file=[entry.relpath, entry.size, entry.mtime_ns], range=index,
                                                     ranges=n, block_size=block_size, first_page=start).to_dict())
            page += 1
    return page - first_page


def count_range(state: dict[str, Any], info: dict[str, int]) -> int | None:
    """Orchestration side (pure): count one finished range; the commit task id once the file's last is in."""
    left = state.setdefault("ranges_left", {})
    key = str(info["first_page"])  # JSON object keys are strings: keep them so across continue-as-new
    remaining = left.get(key, info["ranges"]) - 1
    if remaining > 0:
        left[key] = remaining
        return None
    left.pop(key, None)
    return commit_task(info["first_page"])


def held_ids(blob: Any) -> set[str]:
    """Block ids the service holds for *blob*, staged or committed: ids name content, so either serves.

    Committed ones matter when a commit went through but its activity was retried, or the same
    version was committed before; ``commit_block_list`` takes them too (block state "latest").
    """
    try:
        committed, uncommitted = blob.get_block_list("all")
    except ResourceNotFoundError:  # nothing staged yet: the blob does not exist
        return set()
    return {block.id for block in committed} | {block.id for block in uncommitted}


def stage_range(container: ContainerClient, path: Path, name: str, item: BlockRange,
                cancelled: Callable[[], bool] = lambda: False) -> tuple[int, bool]:
    """Stage one range unless the service holds it already; return (its bytes, whether it was sent).

    Asked right before reading: a range may have waited long for the block list or the memory budget.
    """
    relpath, size, mtime_ns = item.relpath, item.size, item.mtime_ns
    block_size, index = item.block_size, item.range
    check_unchanged(path, size, mtime_ns)
    blob = container.get_blob_client(name)
    bid = block_id(relpath, size, mtime_ns, block_size, index)
    offset = index * block_size
    length = min(block_size, size - offset)
    if bid in held_ids(blob):
        return length, False
    with _in_memory.take(length):
        if cancelled():
            raise Cancelled()
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise FileChangedError()
        # transactional MD5 per block: the service checks each range (and Azurite is faster with it)
        blob.stage_block(bid, data, length=length, validate_content=True)
        del data
    return length, True


def commit_file(container: ContainerClient, path: Path, name: str, item: BlockRange,
                cancelled: Callable[[], bool] = lambda: False, md5: str | None = None,
                tier: str | None = None) -> Uploaded:
    """Commit the staged ranges as the blob, with Content-MD5 of the whole file: *md5*, hashed by the
    file's first range while the others were uploading, or streamed from disk now when it is missing."""
    relpath, size, mtime_ns = item.relpath, item.size, item.mtime_ns
    block_size, n = item.block_size, item.ranges
    st = check_unchanged(path, size, mtime_ns)
    if md5 is None:
        md5 = hash_version(path, size, mtime_ns)
    if cancelled():  # hashing a large file takes a while
        raise Cancelled()
    blob = container.get_blob_client(name)
    ids = [block_id(relpath, size, mtime_ns, block_size, i) for i in range(n)]
    missing = len(set(ids) - held_ids(blob))
    if missing:
        raise FileChangedError(f"{missing} of {n} blocks were not staged")
    blob.commit_block_list([BlobBlock(block_id=i) for i in ids],
                           **blob_properties(name, st, base64.b64decode(md5), tier))
    return Uploaded(size, mtime_ns, md5, tier)


def copy_block_page(deps: ActivityDeps, run_id: str, page: int, item: BlockRange, source: Path, container: str,
                    prefix: str, md5: str | None = None, tier: str | None = None) -> dict[str, Any]:
    """The copy activity for a range page (page >= 0) or a commit task (page < 0), shaped like a batch result.

    A range reports its bytes (progress) and always counts as finished, even when it failed: then it
    writes why on the file's first page, where the commit finds it and reports the file failed with
    that reason ("changed during backup"), once, without committing.
    The first range also hashes the whole file and reports the MD5, which the orchestration hands
    to the commit as *md5*: the hash overlaps the other ranges instead of delaying the commit.
    Once the run is cancelled neither a range nor the commit goes to the service and nothing is
    recorded: the file is neither uploaded nor failed, and the next run of the source sends it.
    """
    relpath = item.relpath
    result: dict[str, Any] = {"page": page, "files_uploaded": 0, "bytes_uploaded": 0, "files_failed": 0,
                              "failures": [], "files_unchanged": 0, "bytes_skipped": 0}
    if page >= 0:
        result["blocks"] = {"first_page": item.first_page, "ranges": item.ranges}
    client = deps.container_client(container)
    cancelled = functools.partial(deps.cancelled, run_id)
    error = None
    try:
        if cancelled():
            raise Cancelled()
        name = backup_blob_name(prefix, relpath)
        if page >= 0:
            result["bytes_uploaded"], result["staged"] = stage_range(client, source / relpath, name, item, cancelled)
            if item.range == 0:
                result["md5"] = hash_version(source / relpath, item.size, item.mtime_ns)
        elif item.failed:
            error = item.failed
        else:
            done = commit_file(client, source / relpath, name, item, cancelled, md5, tier)
    except Cancelled:
        result["cancelled"] = True
        return result
    except Exception as exc:
        error = file_error(exc, deps.endpoint)
    if page >= 0:
        if error is not None:
            deps.work.write_page(run_id, item.first_page, dataclasses.replace(item, range=0, failed=error).to_dict())
        return result
    if error is None:
        record = done.record(relpath)
        result["files_uploaded"] = 1
    else:
        record = {"path": relpath, "error": error}
        result.update(files_failed=1, failures=[record])
    deps.work.write_result(run_id, item.first_page, [record])
    return result

"""Large files as block ranges: range pages, content-derived block ids, staging one range, the final commit.

A file larger than ``threshold(block_size)`` is not copied by one activity: the scan writes one
page per range (``types.BlockRange``), each range activity reads its block, names it by its content
(``content_block_id``: a hash of the bytes plus the range index) and stages it with ``stage_block``
unless the service already holds a block of that id, staged or committed, so a block reused instead
of re-sent is the same bytes by construction; a resumed or repeated run (``--force`` too) sends only
the blocks whose bytes the service does not hold. The progress bytes move with every range.

The first range also streams the whole file for its MD5 and hashes every block on the way
(``hash_blocks``). Once the orchestration has counted the file's last range (``count_range``) it
schedules the commit with what the ranges reported (``Commit``): the ids staged, the MD5, and a
digest of the ids the first range hashed. The commit checks the two agree, so the Content-MD5 it
commits is the MD5 of the bytes staged, keeps the content the baseline recorded as a snapshot
(``blob.upload.replace``) and calls ``commit_block_list``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobBlock, ContainerClient

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import backup_blob_name
from sitebackup.blob.upload import Held, Uploaded, blob_properties, replace
from sitebackup.blob.workstore import WorkStore
from sitebackup.local.files import CHUNK, FileChangedError, check_unchanged
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.types import MIB, BlockRange, CopyItem

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


def content_block_id(data: bytes | memoryview, index: int) -> str:
    """The id of block *index* holding *data*: same bytes at the same place, same id; other bytes, another id.

    40 ASCII characters (128 bits of SHA-256, the index in 8 digits), base64: every id of a blob has the
    same length, as Azure requires of the blocks of one blob (staged ones included).
    """
    return _block_id(hashlib.sha256(data), index)


def _block_id(sha256: Any, index: int) -> str:
    return base64.b64encode(f"{sha256.hexdigest()[:32]}{index:08d}".encode("ascii")).decode("ascii")


def ids_digest(ids: list[str]) -> str:
    """A short digest of a file's block ids in order: what the first range reports beside the file's MD5."""
    return hashlib.sha256("\n".join(ids).encode("ascii")).hexdigest()[:32]


def hash_blocks(path: Path, size: int, mtime_ns: int, block_size: int) -> tuple[str, list[str]]:
    """The MD5 (base64) of the version the scan saw and the content id of each of its blocks, from one
    streamed read: (size, mtime) checked before and after, so both describe the same bytes."""
    check_unchanged(path, size, mtime_ns)
    whole = hashlib.md5()
    ids = []
    with open(path, "rb") as fh:
        for index in range(range_count(size, block_size)):
            block = hashlib.sha256()
            left = min(block_size, size - index * block_size)
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise FileChangedError()
                whole.update(chunk)
                block.update(chunk)
                left -= len(chunk)
            ids.append(_block_id(block, index))
    check_unchanged(path, size, mtime_ns)
    return base64.b64encode(whole.digest()).decode("ascii"), ids


def commit_task(first_page: int) -> int:
    return -1 - first_page


def write_range_pages(work: WorkStore, run_id: str, first_page: int, item: CopyItem, block_size: int) -> int:
    """Write the range pages of the file *item* (with what the baseline held at its name) from page *first_page*
    on; return how many."""
    n = range_count(item.size, block_size)
    for index in range(n):
        work.write_page(run_id, first_page + index, BlockRange(
            file=[item.relpath, item.size, item.mtime_ns], range=index, ranges=n, block_size=block_size,
            first_page=first_page, held=item.held).to_dict())
    return n


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


def note_range(state: dict[str, Any], result: dict[str, Any]) -> None:
    """Orchestration side (pure): keep what a range reported for its file's commit, until the commit is done.

    One entry per large file in flight: the id each range staged, and from the first range the
    file's MD5 and the digest of the block ids it hashed with it.
    """
    info = result["blocks"]
    entry = state.setdefault("large", {}).setdefault(str(info["first_page"]), {})
    if info.get("id"):
        entry.setdefault("ids", [None] * info["ranges"])[info["range"]] = info["id"]
    if result.get("md5"):
        entry.update(md5=result["md5"], digest=result.get("digest"))


class Staged(NamedTuple):
    length: int
    sent: bool  # False: the service already held a block of this id (the same bytes)
    block_id: str


@dataclass(frozen=True)
class Commit:
    """What the orchestration hands a file's commit from its ranges' results (``note_range``)."""

    md5: str | None = None
    blocks: list[str | None] | None = None
    digest: str | None = None

    def checked(self, ranges: int) -> tuple[str, list[str]] | None:
        """(MD5, block ids) when every range reported; None when a report is missing (a range failed or
        ran before this version); FileChangedError when the bytes the first range hashed are not the staged ones."""
        ids = self.blocks or []
        if self.md5 is None or self.digest is None or len(ids) != ranges or None in ids:
            return None
        if ids_digest(ids) != self.digest:  # type: ignore[arg-type]
            raise FileChangedError()
        return self.md5, ids  # type: ignore[return-value]


def held_ids(blob: Any) -> set[str]:
    """Block ids the service holds for *blob*, staged or committed: ids name content, so either serves.

    Committed ones matter when a commit went through but its activity was retried, or the same
    content was committed before; ``commit_block_list`` takes them too (block state "latest").
    """
    try:
        committed, uncommitted = blob.get_block_list("all")
    except ResourceNotFoundError:  # nothing staged yet: the blob does not exist
        return set()
    return {block.id for block in committed} | {block.id for block in uncommitted}


def stage_range(container: ContainerClient, path: Path, name: str, item: BlockRange,
                cancelled: Callable[[], bool] = lambda: False) -> Staged:
    """Read one range, name it by its content and stage it unless the service holds that block already.

    The block list is asked right after the read: a range may have waited long for the memory budget.
    """
    size, mtime_ns = item.size, item.mtime_ns
    block_size, index = item.block_size, item.range
    check_unchanged(path, size, mtime_ns)
    blob = container.get_blob_client(name)
    offset = index * block_size
    length = min(block_size, size - offset)
    with _in_memory.take(length):
        if cancelled():
            raise Cancelled()
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise FileChangedError()
        bid = content_block_id(data, index)
        if bid in held_ids(blob):
            return Staged(length, False, bid)
        if cancelled():  # the block list can take a while to come
            raise Cancelled()
        # transactional MD5 per block: the service checks each range (and Azurite is faster with it)
        blob.stage_block(bid, data, length=length, validate_content=True)
        del data
    return Staged(length, True, bid)


def commit_file(container: ContainerClient, path: Path, name: str, item: BlockRange,
                cancelled: Callable[[], bool] = lambda: False, commit: Commit | None = None,
                tier: str | None = None) -> Uploaded:
    """Commit the staged ranges as the blob, with Content-MD5 of the whole file, in access *tier*, over what
    the baseline held.

    The ids and MD5 come from the ranges (*commit*), checked to describe the same bytes; when a range's
    report is missing, the file is hashed again now, and a block of other bytes is then not found staged.
    """
    size, mtime_ns = item.size, item.mtime_ns
    st = check_unchanged(path, size, mtime_ns)
    reported = commit.checked(item.ranges) if commit is not None else None
    md5, ids = reported or hash_blocks(path, size, mtime_ns, item.block_size)
    if cancelled():  # hashing a large file takes a while
        raise Cancelled()
    blob = container.get_blob_client(name)
    missing = len(set(ids) - held_ids(blob))
    if missing:
        raise FileChangedError(f"{missing} of {item.ranges} blocks were not staged")
    properties = blob_properties(name, st, base64.b64decode(md5), tier)
    done = replace(blob, lambda **c: blob.commit_block_list([BlobBlock(block_id=i) for i in ids], **properties, **c),
                   md5, mtime_ns, Held(*item.held) if item.held else None)
    return Uploaded(size, mtime_ns, md5, tier, done["etag"])


def copy_block_page(deps: ActivityDeps, run_id: str, page: int, item: BlockRange, source: Path, container: str,
                    prefix: str, commit: Commit | None = None, tier: str | None = None) -> dict[str, Any]:
    """The copy activity for a range page (page >= 0) or a commit task (page < 0), shaped like a batch result.

    A range reports its bytes (progress) and the id it staged, and always counts as finished, even
    when it failed: then it writes why on the file's first page, where the commit finds it and reports
    the file failed with that reason ("changed during backup"), once, without committing. The first
    range also hashes the whole file and reports the MD5 with the digest of the block ids it hashed,
    which the orchestration hands to the commit (*commit*): the hash overlaps the other ranges
    instead of delaying the commit.
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
            staged = stage_range(client, source / relpath, name, item, cancelled)
            result["bytes_uploaded"], result["staged"] = staged.length, staged.sent
            result["blocks"].update(range=item.range, id=staged.block_id)
            if item.range == 0:
                result["md5"], ids = hash_blocks(source / relpath, item.size, item.mtime_ns, item.block_size)
                result["digest"] = ids_digest(ids)
        elif item.failed:
            error = item.failed
        else:
            done = commit_file(client, source / relpath, name, item, cancelled, commit, tier)
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

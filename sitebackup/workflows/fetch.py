"""The restore's activities, all its I/O: planning what to fetch into pages, and restoring one page per call.

Blob names are untrusted: every name is checked (``local.dest.safe_relpath``) before it is planned
and again before it is written, and files are written through ``local.dest.DestDir``. Every
download is checked against the MD5 the run recorded (or the blob's own Content-MD5).

A run's file is read from the copy holding the version the run recorded (``blob.history``): the
current blob, or the snapshot a later run kept when it replaced it, chosen by listings read beside the
run's record as the pages are planned when later backups of its names exist, and for one file when its
current blob turns out to hold another version as it is fetched (replaced while restoring, or by another writer).

A restore batch reads its page only when its bytes are the ones the plan wrote (``workflows.pages``).

A run's record is a tree: its files go to file pages, and what the restore's last activity makes once every
file is written (``workflows.tree``: hard links, symlinks, directories' own metadata) to tree pages between
them, which the page window skips (``Planned.done``) and the last activity reads (``Planned.tree``). A file
gets its recorded owner and exact mode as it is written (``local.dest.DestDir``).

A page's small files are downloaded together on the process's asyncio loop (``ActivityDeps.get_many``)
and written in page order as they arrive; large ones in ranges with the sync client, each GET of content in a
slot of the loop's window of requests (``ActivityDeps.held``).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from durabletask import task

from sitebackup.blob.asyncget import BlobFacts, Got
from sitebackup.blob.asyncput import Cancelled
from sitebackup.blob.errors import file_error
from sitebackup.blob.history import PRUNED, CopyLookup, choose, copies_of, copy_client
from sitebackup.blob.naming import blob_name, is_reserved, unescape_name
from sitebackup.blob.records import run_entries
from sitebackup.blob.upload import META_MODE, META_MTIME, STREAM_BLOCK_BYTES
from sitebackup.local.dest import (
    DestDir,
    UnsafeName,
    mtime_in_range,
    recorded_mode,
    restored_mode,
    safe_relpath,
)
from sitebackup.local.files import b64, fd_md5_b64
from sitebackup.local.filters import make_selector
from sitebackup.local.scan import walk_key
from sitebackup.model.codec import from_wire, to_wire
from sitebackup.model.records import ROOT, FileEntry, Meta, RestoredFile
from sitebackup.model.work import FetchInput, FetchItem, PageResult, PlanInput, Planned, RestoreCounts, Span
from sitebackup.workflows import pages
from sitebackup.workflows.activity import ActivityDeps, HeldSlot, activity
from sitebackup.workflows.names import PLAN_RESTORE, RESTORE_BATCH, UNCHANGED_PAGE
from sitebackup.workflows.window import Capped, stream_pages

# blobs over this size are fetched as ranges of RANGE_BYTES in parallel, written at their offsets
RANGE_BYTES = STREAM_BLOCK_BYTES
MTIME_RANGE = "modification time out of range (not a time a file can have)"


class _Tree:
    """The entries of a record the restore's last activity makes, cut into tree pages as the plan reads them.

    With --include/--exclude, a directory is made when it is selected or something beneath it is: one that is
    not waits (``pending``) until a selected entry beneath it comes, and goes to the tree before it, so that a
    directory always comes before what it holds (the last activity gives directories their metadata in the
    reverse order: deepest first)."""

    def __init__(self, selected: Callable[[str], bool], filtered: bool, flush: Callable[[list[FileEntry]], None]):
        self.selected = selected
        self.filtered = filtered
        self.flush = flush
        self.page: list[FileEntry] = []
        self.pending: dict[str, FileEntry] = {}

    def add(self, entry: FileEntry) -> None:
        self.page.append(entry)
        if len(self.page) >= UNCHANGED_PAGE:
            self.close()

    def reached(self, path: str) -> None:
        """A selected entry at *path*: the directories above it not selected themselves are made too."""
        if self.pending:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                above = self.pending.pop("/".join(parts[:depth]), None)
                if above is not None:
                    self.add(above)

    def directory(self, entry: FileEntry) -> None:
        if self.selected(entry.path):
            self.reached(entry.path)
            self.add(entry)
        elif self.filtered:
            self.pending[entry.path] = entry

    def close(self) -> None:
        if self.page:
            self.flush(self.page)
            self.page = []


def _hard_link_refused(entry: FileEntry) -> str | None:
    """Why the hard link *entry* records is refused, if it is: its first member must be a path beneath DEST
    that comes before it in the record (walk order), as a backup records it."""
    assert entry.link is not None
    try:
        safe_relpath(entry.link)
    except UnsafeName as exc:
        return f"refused: hard link to {entry.link!r}: {exc}"
    if entry.link == entry.path or walk_key(entry.link) >= walk_key(entry.path):
        return f"refused: hard link to {entry.link!r}, which the record does not hold before it"
    return None


def file_meta(entry: FileEntry) -> Meta | None:
    """The mode and owner a restored file gets from its record; None for a record of format 1 (the blob's
    mode metadata then)."""
    if entry.mode is None and entry.uid is None:
        return None
    return Meta(entry.mode, entry.uid, entry.gid, entry.user, entry.group)


def plan_restore(deps: ActivityDeps, restore_id: str, inp: PlanInput) -> Planned[RestoreCounts]:
    """List what to restore (run record or container listing), validate names, write pages as the list is read.

    Memory holds a page and what the lookup of recorded versions holds (``history.CopyLookup``), not the list.
    """
    options = inp.options
    selected = make_selector(options.include, options.exclude)
    failures, skipped, stale = Capped(), Capped(), Capped()
    notes: list[str] = []
    counts = RestoreCounts()
    # with no backup since the run, its files are the current blobs (a request per file, no listing): one that
    # another writer replaced anyway is found by its Content-MD5 as it is fetched, and looked up then
    lookup = CopyLookup(deps.container_client(inp.container), inp.prefix) if inp.run_id and inp.later_backups \
        else None
    n_pages = 0
    writer = pages.PageWriter(deps.work, restore_id)
    done: list[Span] = []  # the tree pages: the page window skips them
    owners = False  # whether the record names owners

    def write_tree_page(entries: list[FileEntry]) -> None:
        nonlocal n_pages
        writer.write(n_pages, entries)
        if done and done[-1].end == n_pages:
            done[-1].end += 1
        else:
            done.append(Span(n_pages, n_pages + 1))
        n_pages += 1

    tree = _Tree(selected, bool(options.include or options.exclude), write_tree_page)

    def items() -> Iterator[FetchItem]:
        nonlocal owners
        for item, entry in _candidates(deps, inp, notes.append):
            error = entry.error if entry is not None else None
            if entry is not None:
                owners = owners or entry.uid is not None
                if not entry.is_file or entry.link is not None:
                    try:
                        if entry.path != ROOT:
                            safe_relpath(entry.path)
                    except UnsafeName as exc:
                        failures.add(entry.path, error=f"refused: {exc}")
                        continue
                    if not mtime_in_range(entry.mtime_ns):  # the tree's last activity would give it that time
                        failures.add(entry.path, error=f"refused: {MTIME_RANGE}")
                        continue
                    if entry.path == ROOT:
                        tree.add(entry)
                        continue
                    if entry.kind == "dir":
                        tree.directory(entry)
                        continue
                    if not selected(entry.path):
                        continue
                    if entry.kind == "symlink":
                        tree.reached(entry.path)
                        tree.add(entry)
                        continue
                    refused = _hard_link_refused(entry)
                    if refused is not None:
                        failures.add(entry.path, error=refused)
                        continue
                    if entry.stored and selected(entry.link or ""):  # else restored from its own copy, alone
                        if entry.error is not None:
                            stale.add(entry.path, error=entry.error)
                        tree.reached(entry.path)
                        tree.add(entry)
                        counts.files_total += 1
                        counts.bytes_total += entry.size
                        continue
            if not item.name:  # the run holds no copy of it: it failed and no earlier run backed it up
                skipped.add(item.path, reason=f"not backed up by the run: {error or 'no copy recorded'}")
                continue
            if error is not None:  # failed in the run: its last good version is restored
                stale.add(item.path, error=error)
            try:
                safe_relpath(item.path)
            except UnsafeName as exc:
                failures.add(item.name, error=f"refused: {exc}")
                continue
            if not selected(item.path):
                continue
            if not mtime_in_range(item.mtime_ns):
                failures.add(item.path, error=f"refused: {MTIME_RANGE}")
                continue
            tree.reached(item.path)
            if lookup is not None:  # the copy holding the version the run recorded
                copy = choose(lookup.copies(item.name), item.md5)
                if copy is None:
                    failures.add(item.path, error=PRUNED)
                    continue
                item.snapshot = copy.snapshot
            counts.files_total += 1
            counts.bytes_total += item.size
            yield item

    for page in stream_pages(items(), lambda item: item.size, min_batches=inp.min_pages):
        writer.write(n_pages, page)
        n_pages += 1
    tree.close()
    if owners and options.owners and os.geteuid() != 0:
        notes.append("owners were not restored: only root can give files their recorded owners "
                     "(what was restored belongs to the user who ran the restore)")
    if not inp.run_id:
        notes.append("restored from the blobs alone: symlinks, hard links, owners and empty directories are in a "
                     "backup run's record (restore ID, or --as-of)")
    # refused names count as done: the progress bar reaches its total
    counts.files_total += failures.count
    counts.files_failed = counts.files_done = failures.count
    counts.files_skipped = skipped.count
    if stale.count:
        notes.append(f"{stale.count} file(s) failed in the run and are restored as the last run that backed them "
                     "up had them: " + ", ".join(f"{f.path} ({f.error})" for f in stale.items)
                     + (" ..." if stale.count > len(stale.items) else ""))
    return Planned(pages=n_pages, counts=counts, done=list(done), index=writer.close(n_pages),
                   failures=failures.items, skipped=skipped.items, notes=notes, tree=done)


def _candidates(deps: ActivityDeps, inp: PlanInput,
                note: Callable[[str], None]) -> Iterator[tuple[FetchItem, FileEntry | None]]:
    """Each entry the source holds, as the blob to fetch (no name: the run holds no copy of it, or it is not a
    file) with its record (None: a blob found by listing the container)."""
    if inp.run_id:
        records = deps.records(inp.container)
        for entry in run_entries(records, deps.work, inp.run_id, note):
            name = blob_name(inp.prefix, entry.path) if entry.stored else ""
            yield FetchItem(name, entry.path, entry.size, entry.md5, entry.mtime_ns, meta=file_meta(entry)), entry
        return
    client = deps.container_client(inp.container)
    start = f"{inp.prefix}/" if inp.prefix else None
    # the SDK pages the listing (5000 names per request) behind this iterator
    for blob in client.list_blobs(name_starts_with=start, include=["metadata"]):
        if is_reserved(blob.name):  # work files of multi-host runs, not backed-up content
            continue
        meta = blob.metadata or {}
        path = unescape_name(blob.name[len(start or ""):])  # the file's own name, control characters and all
        yield FetchItem(blob.name, path, blob.size, b64(blob.content_settings.content_md5),
                        _int_or_none(meta.get(META_MTIME))), None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class Outcome:
    kind: str  # "restored", "skipped" or "failed"
    reason: str = ""
    size: int = 0


class _Mismatch(Exception):
    pass


class _Replaced(_Mismatch):
    """The current blob no longer holds the recorded version (replaced or removed since the plan)."""


def _existing(dest: DestDir, item: FetchItem, overwrite: bool) -> Outcome | None:
    """What the file already at the item's path decides (skipped or failed), or None: fetch it."""
    st = dest.lstat(item.path)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        return Outcome("failed", "destination exists and is not a regular file")
    if item.md5 and st.st_size == item.size and dest.md5_b64(item.path) == item.md5:
        return Outcome("skipped", "identical file exists", item.size)
    if not overwrite:
        return Outcome("failed", "destination exists and differs (use --overwrite)")
    return None


def _fetch(client: ContainerClient, dest: DestDir, item: FetchItem, threads: int, held: HeldSlot,
           got: Future[Got] | None) -> Outcome:
    """Write the item from *got* (its download on the asyncio loop) or, without one, with the sync client."""
    try:
        if got is None:
            blob = client.get_blob_client(item.name, snapshot=item.snapshot)
            _write(dest, item, lambda fd: _download_into(blob, fd, item.size, threads, held))
        else:
            content = got.result()
            _write(dest, item, lambda fd: _write_content(fd, content))
    except (_Replaced, ResourceNotFoundError) as exc:
        if item.snapshot is not None:  # removed by a prune since the plan
            return Outcome("failed", PRUNED)
        # a run replaced the blob since the plan, keeping the recorded version as a snapshot: read that
        copy = choose(copies_of(client, item.name), item.md5)
        if copy is None:
            return Outcome("failed", "blob not found" if isinstance(exc, ResourceNotFoundError) else PRUNED)
        try:
            _write(dest, item, lambda fd: _download_into(copy_client(client, copy), fd, item.size, threads, held))
        except _Mismatch as again:
            return Outcome("failed", str(again))
    except _Mismatch as exc:
        return Outcome("failed", str(exc))
    return Outcome("restored", size=item.size)


def _write(dest: DestDir, item: FetchItem, download: Callable[[int], BlobFacts]) -> None:
    """Write the item's file under *dest* with *download* (content into the descriptor, what the service
    said of the blob back), checked against the recorded size and MD5."""
    owner = dest.owner(item.meta)

    def fill(fd: int) -> tuple[int, int | None]:
        facts = download(fd)
        if item.md5 and facts.md5 and facts.md5 != item.md5:
            raise _Replaced("blob changed since the backup run (Content-MD5 differs from the run record)")
        if facts.size != item.size:
            raise _Mismatch(f"blob is {facts.size} bytes, expected {item.size}")
        expected = item.md5 or facts.md5
        if expected and fd_md5_b64(fd) != expected:
            raise _Mismatch("downloaded content does not match its Content-MD5")
        meta = facts.metadata
        mtime_ns = item.mtime_ns if item.mtime_ns is not None else _int_or_none(meta.get(META_MTIME))
        if not mtime_in_range(mtime_ns):
            raise _Mismatch(f"refused: {MTIME_RANGE}")
        if item.meta is not None and item.meta.mode is not None:  # the record's: exact, whatever the umask
            return recorded_mode(item.meta.mode, owner is not None), mtime_ns
        return restored_mode(meta.get(META_MODE), dest.umask), mtime_ns

    dest.write(item.path, fill, owner)


def _write_content(fd: int, content: Got) -> BlobFacts:
    os.write(fd, content.data)
    return content.facts


def _download_into(blob: Any, fd: int, size: int, threads: int, held: HeldSlot) -> BlobFacts:
    """Download *blob* into *fd*, each GET of its content in a slot of the process's window of requests (*held*)."""
    props = blob.get_blob_properties()
    if props.size != size:  # never read: a blob larger than its record fills neither memory nor disk
        return BlobFacts.of(props)
    # every request is pinned to the same blob version: a blob rewritten mid-restore fails, never mixes
    pinned = {"etag": props.etag, "match_condition": MatchConditions.IfNotModified}
    if size <= RANGE_BYTES:
        # decompress=False everywhere: the blob's own bytes, whatever Content-Encoding it is marked with
        with held(size):
            downloader = blob.download_blob(decompress=False, **pinned)
            data = downloader.readall()
        os.write(fd, data)
        return BlobFacts.of(downloader.properties)

    def fetch(offset: int) -> None:
        length = min(RANGE_BYTES, props.size - offset)
        with held(length):
            data = blob.download_blob(offset=offset, length=length, decompress=False, **pinned).readall()
        os.pwrite(fd, data, offset)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(fetch, range(0, props.size, RANGE_BYTES)))
    os.ftruncate(fd, props.size)
    return BlobFacts.of(props)


def _guarded(run: Callable[[], Outcome | None], endpoint: str) -> Outcome | None:
    """*run*'s outcome, with what it raised turned into the file's failure."""
    try:
        return run()
    except UnsafeName as exc:
        return Outcome("failed", f"refused: {exc}")
    except ResourceNotFoundError:
        return Outcome("failed", "blob not found")
    except Exception as exc:
        return Outcome("failed", file_error(exc, endpoint))


def _start_small_downloads(deps: ActivityDeps, restore_id: str, container: str, items: list[FetchItem],
                           checked: list[Outcome | None]) -> dict[int, Future[Got]]:
    """Start the page's small downloads together on the asyncio loop; item index -> its future."""
    if deps.get_many is None:
        return {}
    small = [i for i, item in enumerate(items) if checked[i] is None and item.size <= RANGE_BYTES]
    if not small:
        return {}
    wanted = [(items[i].name, items[i].snapshot, items[i].size) for i in small]
    return dict(zip(small, deps.get_many(container, wanted, lambda: deps.cancelled(restore_id))))


def restore_dest(dest: str, restore_id: str, owners: bool, recorded_dirs: bool = True) -> DestDir:
    """DEST as a restore batch writes it: owners given when asked and run as root; a directory made on the way
    to a file is 0700 when the record has directories (*recorded_dirs*, format 2), whose own metadata come
    last."""
    return DestDir(dest, temp_tag=restore_id, owners=owners and os.geteuid() == 0,
                   dir_mode=0o700 if recorded_dirs else 0o755)


def restore_one(client: ContainerClient, dest: DestDir, item: FetchItem, overwrite: bool, threads: int,
                held: HeldSlot, endpoint: str) -> Outcome:
    """Restore one file alone (the restore's last activity: a hard link whose first member does not hold its
    content), as a batch restores each of its files."""
    outcome = _guarded(functools.partial(_existing, dest, item, overwrite), endpoint) or \
        _guarded(functools.partial(_fetch, client, dest, item, threads, held, None), endpoint)
    assert outcome is not None
    return outcome


def restore_page(deps: ActivityDeps, restore_id: str, inp: FetchInput) -> PageResult[RestoreCounts]:
    client = deps.container_client(inp.container)
    counts = RestoreCounts()
    failures, skipped = Capped(), Capped()
    journal: list[RestoredFile] = []
    items = pages.read_page(deps.work, restore_id, inp.page, inp.index, list[FetchItem])
    dest = restore_dest(inp.dest, restore_id, inp.owners, any(item.meta is not None for item in items))
    # the destination is checked before anything is fetched: a file already there is never downloaded
    checked = [_guarded(functools.partial(_existing, dest, item, inp.overwrite), deps.endpoint) for item in items]
    downloads = _start_small_downloads(deps, restore_id, inp.container, items, checked)
    for index, item in enumerate(items):
        if deps.cancelled(restore_id):  # `sitebackup cancel` stops a restore at the next file boundary
            break
        got = downloads.get(index)
        if got is not None and isinstance(got.exception(), Cancelled):
            break
        outcome = checked[index] or _guarded(
            functools.partial(_fetch, client, dest, item, deps.concurrency.per_file, deps.held, got), deps.endpoint)
        assert outcome is not None
        counts.files_done += 1
        counts.bytes_done += item.size
        if outcome.kind == "restored":
            counts.files_restored += 1
            counts.bytes_restored += outcome.size
            journal.append(RestoredFile(item.path, item.size))
        elif outcome.kind == "skipped":
            skipped.add(item.path, reason=outcome.reason)
            journal.append(RestoredFile(item.path, item.size, skipped=outcome.reason))
        else:
            failures.add(item.path, error=outcome.reason)
            journal.append(RestoredFile(item.path, error=outcome.reason))
    deps.work.write_result(restore_id, inp.page, journal)
    counts.files_skipped, counts.files_failed = skipped.count, failures.count
    return PageResult(page=inp.page, counts=counts, failures=failures.items, skipped=skipped.items)


def build_restore_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    """The restore activities bound to *deps*, named with their durable names."""

    def plan(ctx: task.ActivityContext, raw: object) -> Any:
        return to_wire(plan_restore(deps, ctx.orchestration_id, from_wire(raw, PlanInput, "the input of a plan")))

    def batch(ctx: task.ActivityContext, raw: object) -> Any:
        return to_wire(restore_page(deps, ctx.orchestration_id, from_wire(raw, FetchInput,
                                                                          "the input of a restore batch")))

    return [activity(PLAN_RESTORE, plan), activity(RESTORE_BATCH, batch)]

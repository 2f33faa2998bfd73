"""The restore's last activity: the record's tree once every file is written: hard links, then symlinks, then
the directories' own owner, mode and mtime, deepest first.

It reads the tree pages the plan wrote (``workflows.fetch``), each only as the plan wrote it
(``workflows.pages``). Hard links and symlinks come after every file, so that no file is written through a link
the restore made; directories last and deepest first, so that a directory's mtime is not moved by what is made
in it afterwards and a read-only directory does not keep its contents out. Everything goes through
``local.dest.DestDir``: walked by descriptor, never following a link. The record is data from the container: a
hard link is made only to a file at DEST holding the content the record names for it (else the file is restored
from its own copy), and what cannot be made is refused by name while the rest goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from durabletask import task

from sitebackup.blob.naming import blob_name
from sitebackup.local.dest import Conflict, UnsafeName
from sitebackup.local.files import describe_os_error
from sitebackup.model.codec import from_wire, to_wire
from sitebackup.model.records import ROOT, FileEntry, target_bytes
from sitebackup.model.work import FetchItem, PageResult, RestoreCounts, TreeInput
from sitebackup.workflows import pages
from sitebackup.workflows.activity import ActivityDeps, activity
from sitebackup.workflows.fetch import file_meta, restore_dest, restore_one
from sitebackup.workflows.names import RESTORE_TREE
from sitebackup.workflows.pages import chunk_hash
from sitebackup.workflows.window import Capped


def restore_tree(deps: ActivityDeps, restore_id: str, inp: TreeInput) -> PageResult[RestoreCounts]:
    """Make the tree pages' hard links and symlinks, then give their directories their metadata."""
    dest = restore_dest(inp.dest, restore_id, inp.owners)
    counts = RestoreCounts()
    failures, skipped = Capped(), Capped()
    numbers = [page for span in inp.tree for page in range(span.first, span.end)]

    def read(page: int) -> list[FileEntry]:
        return pages.read_page(deps.work, restore_id, page, chunk_hash(inp.index, page), list[FileEntry])

    def entries(kind: str) -> Iterator[FileEntry]:
        for page in numbers:
            for entry in read(page):
                if entry.kind == kind and not deps.cancelled(restore_id):
                    yield entry

    def failed(entry: FileEntry, error: str) -> None:
        if not entry.is_file:  # a hard link is a file the plan counted; a directory or symlink counts when it fails
            counts.files_total += 1
        counts.files_failed += 1
        counts.files_done += 1
        failures.add(entry.path, error=error)

    for entry in entries("file"):  # the hard links
        try:
            outcome = dest.hard_link(entry.path, entry.link or "", entry.size, entry.md5, inp.overwrite)
            if outcome is None:  # its first member is not there as recorded: the file from its own copy
                item = FetchItem(blob_name(inp.prefix, entry.path), entry.path, entry.size, entry.md5,
                                 entry.mtime_ns, meta=file_meta(entry))
                alone = restore_one(deps.container_client(inp.container), dest, item, inp.overwrite,
                                    deps.concurrency.per_file, deps.held, deps.endpoint)
                if alone.kind == "failed":
                    failed(entry, alone.reason)
                    continue
                outcome = alone.kind
        except (UnsafeName, Conflict, ValueError) as exc:
            failed(entry, f"refused: {exc}")
            continue
        except OSError as exc:
            failed(entry, describe_os_error(exc))
            continue
        counts.files_done += 1
        counts.bytes_done += entry.size
        if outcome == "skipped":
            skipped.add(entry.path, reason="identical file exists")
        else:
            counts.files_restored += 1
            counts.bytes_restored += entry.size

    for entry in entries("symlink"):
        try:
            dest.symlink(entry.path, target_bytes(entry.target or ""), entry.meta, entry.mtime_ns, inp.overwrite)
        except (UnsafeName, Conflict) as exc:
            failed(entry, f"refused: {exc}")
            continue
        except OSError as exc:
            failed(entry, describe_os_error(exc))
            continue
        counts.symlinks_restored += 1

    for page in reversed(numbers):  # deepest first: the record lists a directory before what it holds
        for entry in reversed(read(page)):
            if entry.kind != "dir" or deps.cancelled(restore_id) or (entry.path == ROOT and not inp.root):
                continue
            try:
                dest.set_dir(entry.path, entry.meta, entry.mtime_ns)
            except UnsafeName as exc:
                failed(entry, f"refused: {exc}")
                continue
            except OSError as exc:
                failed(entry, describe_os_error(exc))
                continue
            counts.dirs_restored += 1
    counts.files_skipped = skipped.count
    return PageResult(page=0, counts=counts, failures=failures.items, skipped=skipped.items)


def build_tree_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    def restore(ctx: task.ActivityContext, raw: object) -> Any:
        return to_wire(restore_tree(deps, ctx.orchestration_id, from_wire(raw, TreeInput, "the input of a tree")))

    return [activity(RESTORE_TREE, restore)]

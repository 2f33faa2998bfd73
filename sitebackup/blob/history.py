"""The stored copies of a blob name, current and snapshots, and which one holds a recorded version.

A run records each file's Content-MD5; later runs keep replaced content as blob snapshots
(``upload.replace``), and ``prune`` removes copies no kept run needs. So the version of a file a run
recorded is the current blob if its Content-MD5 is the recorded one, else the newest snapshot whose
Content-MD5 is; when neither remains, the version was pruned. Listings with snapshots answer this for a
run's files (``CopyLookup``), read beside its record: a request per tree of small directories, not per file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from azure.storage.blob import BlobClient, BlobPrefix, BlobProperties, ContainerClient

from sitebackup.blob.naming import is_reserved
from sitebackup.local.files import b64

PRUNED = "pruned: no copy of the recorded version remains in the container"

# entries a listing request asks for: the SDK holds a page parsed at about 12 KB an entry (60 MB at the
# service's most, 5,000); a thousand keeps that near 12 MB for a request per thousand copies
LISTING_PAGE = 1000


@dataclass(frozen=True)
class Copy:
    """One stored copy of a blob name: the current blob (``snapshot`` None) or one of its snapshots."""

    name: str
    snapshot: str | None
    md5: str | None
    size: int
    etag: str | None = None
    tier: str | None = None  # the access tier the service reports for this copy


def _copy(blob: BlobProperties) -> Copy:
    return Copy(blob.name, blob.snapshot, b64(blob.content_settings.content_md5), blob.size, blob.etag,
                getattr(blob.blob_tier, "value", blob.blob_tier))


def _copies(container: ContainerClient, start: str | None) -> Iterator[Copy]:
    return map(_copy, container.list_blobs(name_starts_with=start, include=["snapshots"],
                                           results_per_page=LISTING_PAGE))


def list_copies(container: ContainerClient, prefix: str = "") -> Iterator[Copy]:
    """Every copy under *prefix* (the whole container when empty), sitebackup's reserved work files left out."""
    return (copy for copy in _copies(container, f"{prefix}/" if prefix else None) if not is_reserved(copy.name))


class CopyLookup:
    """The copies of blob names asked for in a run record's order, in memory bounded by one listing page.

    A record lists a directory's files by name, then each subdirectory whole (``local.scan.walk_key``); the
    service lists names in name order, where a directory's files and its subdirectories' trees interleave, so
    no one listing can be read beside a record. Entering a directory, the lookup lists the tree of its highest
    ancestor that fits in one page and holds it: one request answers for a tree of small directories. A
    directory under no such ancestor has its own entries listed (delimited at ``/``) and read beside the record
    by name. A name that listing passes without finding is looked up alone, so a record out of order, or an
    order the service sorts otherwise, costs requests, never a wrong answer.
    """

    def __init__(self, container: ContainerClient, prefix: str = "", page_size: int = LISTING_PAGE):
        self.container = container
        self.root = f"{prefix}/" if prefix else ""
        self.page_size = page_size
        self._held_tree: str | None = None  # the directory whose whole tree is held
        self._held: dict[str, list[Copy]] = {}
        self._folder: str | None = None  # the directory read beside the record
        self._entries: Iterator[Copy] = iter(())
        self._head: Copy | None = None
        self._large: set[str] = set()  # directories whose tree is over a page: at most depth x entries / page

    def copies(self, name: str) -> list[Copy]:
        """The copies of *name*, a blob name under the prefix."""
        folder = name[:name.rfind("/") + 1]
        held = self._held_tree is not None and folder.startswith(self._held_tree)
        if not held and folder != self._folder:
            held = self._enter(folder)
        if held:
            return self._held.get(name, [])
        return self._next(name) or copies_of(self.container, name)

    def _enter(self, folder: str) -> bool:
        """Hold the tree of *folder*'s highest ancestor that fits in a page (True), or read *folder* alone (False)."""
        self._held_tree, self._held, self._folder, self._head = None, {}, None, None
        parts = folder[len(self.root):].split("/")[:-1]
        for depth in range(len(parts) + 1):
            tree = self.root + "".join(part + "/" for part in parts[:depth])
            if tree in self._large:
                continue
            pages = self.container.list_blobs(name_starts_with=tree or None, include=["snapshots"],
                                              results_per_page=self.page_size).by_page()
            page = list(next(pages))
            if pages.continuation_token is None:  # type: ignore[attr-defined]  # the SDK's ItemPaged pages
                self._held_tree = tree
                for blob in page:
                    self._held.setdefault(blob.name, []).append(_copy(blob))
                return True
            self._large.add(tree)
        self._folder = folder
        self._entries = (_copy(blob) for blob in self.container.walk_blobs(
            name_starts_with=folder or None, include=["snapshots"], results_per_page=self.page_size)
            if not isinstance(blob, BlobPrefix))
        self._head = next(self._entries, None)
        return False

    def _next(self, name: str) -> list[Copy]:
        """The copies of *name* in the directory's listing, read up to it."""
        while self._head is not None and self._head.name < name:
            self._head = next(self._entries, None)
        found = []
        while self._head is not None and self._head.name == name:
            found.append(self._head)
            self._head = next(self._entries, None)
        return found


def copies_of(container: ContainerClient, name: str) -> list[Copy]:
    """The copies of one blob name: a listing from that name on, one request (names are listed in order,
    so the name's own entries come before any longer name it starts)."""
    return list(itertools.takewhile(lambda copy: copy.name == name, _copies(container, name)))


def choose(copies: list[Copy], md5: str | None) -> Copy | None:
    """The copy holding the version hashed *md5*: the current blob if it is that version, else the newest
    such snapshot (snapshot ids are ISO timestamps: they sort by time)."""
    matching = [c for c in copies if c.md5 == md5 and md5 is not None]
    current = [c for c in matching if c.snapshot is None]
    if current:
        return current[0]
    return max(matching, key=lambda c: c.snapshot or "", default=None)


def copy_client(container: ContainerClient, copy: Copy) -> BlobClient:
    return container.get_blob_client(copy.name, snapshot=copy.snapshot)

"""Work pages read only as they were written: the page index and the one verified read of a page.

The first activity of a run (the backup's scan, the restore's plan) writes its pages through a
``PageWriter``, which keeps each page's SHA-256 and writes them, ``PAGES_PER_INDEX`` at a time, as
index chunks (``model.work.PageIndex``) into the work store too. Only the chunks' hashes travel
through the durable history (``Planned.index``, ``RunState.index``): a batch activity gets the hash
of the chunk listing its page (``chunk_hash``), reads that chunk and then its page, each refused
(``DamagedData``, naming it) unless its bytes hash as recorded. So the history grows by a hash per
``PAGES_PER_INDEX`` pages, never by the file list, and whoever can rewrite a page in the container
(``--taskhub``) or the state directory cannot make a worker read or upload a file the scan did not list.

A process keeps the last chunks it verified, by their hash: the pages of one chunk are most of a
run's batches, and a chunk's content is fixed by its hash, whichever run asks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TypeVar

from sitebackup.blob.workstore import WorkStore
from sitebackup.model.codec import DamagedData
from sitebackup.model.work import PageIndex
from sitebackup.workflows.names import PAGES_PER_INDEX

T = TypeVar("T")

CACHED_CHUNKS = 16


class PageWriter:
    """Writes a run's pages in increasing page order and their index; ``close`` gives the chunks' hashes."""

    def __init__(self, work: WorkStore, run_id: str):
        self.work = work
        self.run_id = run_id
        self.index: list[str] = []  # the hash of each chunk written
        self._hashes: list[str] = []  # the current chunk's page hashes

    def _reach(self, page: int) -> None:
        """Mark the page numbers before *page* that have no page ("": the first activity recorded them itself)."""
        while len(self.index) * PAGES_PER_INDEX + len(self._hashes) < page:
            self._add("")

    def _add(self, sha256: str) -> None:
        self._hashes.append(sha256)
        if len(self._hashes) == PAGES_PER_INDEX:
            self._flush()

    def _flush(self) -> None:
        chunk = len(self.index)
        self.index.append(self.work.write_index(self.run_id, chunk, PageIndex(first=chunk * PAGES_PER_INDEX,
                                                                                pages=self._hashes)))
        self._hashes = []

    def write(self, page: int, content: object) -> None:
        """Write page *page* (past every page written before)."""
        self._reach(page)
        self._add(self.work.write_page(self.run_id, page, content))

    def close(self, pages: int) -> list[str]:
        """The hashes of the index chunks of a run of *pages* pages, its last chunk written."""
        self._reach(pages)
        if self._hashes:
            self._flush()
        return self.index


def chunk_hash(index: list[str], page: int) -> str:
    """Orchestration side (pure): the hash of the index chunk listing *page*; "" when the run has none (a run of
    an earlier version), which the batch then refuses."""
    chunk = page // PAGES_PER_INDEX
    return index[chunk] if chunk < len(index) else ""


_verified: OrderedDict[str, PageIndex] = OrderedDict()
_lock = threading.Lock()


def _chunk(work: WorkStore, run_id: str, chunk: int, sha256: str) -> PageIndex:
    with _lock:
        found = _verified.get(sha256)
        if found is not None:
            _verified.move_to_end(sha256)
            return found
    found = work.read_index(run_id, chunk, sha256)
    with _lock:
        _verified[sha256] = found
        while len(_verified) > CACHED_CHUNKS:
            _verified.popitem(last=False)
    return found


def read_page(work: WorkStore, run_id: str, page: int, index: str, kind: type[T]) -> T:
    """Page *page* of the run as a *kind*, read only when it is the page the first activity wrote: its hash
    is in the index chunk whose hash is *index*. ``DamagedData`` naming the page (or the chunk) otherwise."""
    what = f"work page {page} of run {run_id}"
    if not index:
        raise DamagedData(f"{what} has no SHA-256 to check it against (a run of an earlier version): "
                          "cancel the run and start it again")
    listed = _chunk(work, run_id, page // PAGES_PER_INDEX, index)
    position = page - listed.first
    sha256 = listed.pages[position] if 0 <= position < len(listed.pages) else ""
    if not sha256:
        raise DamagedData(f"{what} is not in the run's page index")
    return work.read_page(run_id, page, kind, sha256)

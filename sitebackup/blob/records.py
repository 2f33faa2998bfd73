"""The backup's own catalog in its container: sealed run records, jobs and prune tombstones.

A run's record pages go to ``.sitebackup/records/<job>/<sha256>`` (named by the SHA-256 of their bytes, so a page
an earlier run of the job already sealed is not sent again; kept per job, so that a prune, which holds the job's
lock, never deletes a page another job's backup is sealing), then its header (``model.records.RunRecord``) to
``.sitebackup/runs/<run_id>``, last: a run without a header is unfinished. Headers carry the catalog fields
in their blob metadata too, so one listing names every sealed run without reading a header. Everything
read back is checked before use: a size bound before the body, the SHA-256 its seal names, then the strict
decoding of the model; a page that fails is damaged and named, never half-used.

Blobs here are written once (If-None-Match: \\*) and never replaced: a record is immutable once sealed.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobProperties, ContainerClient

from sitebackup.blob.naming import RESERVED_PREFIX
from sitebackup.blob.workstore import WorkStore, record_pages
from sitebackup.errors import InputError
from sitebackup.model.codec import FORMAT_VERSION, DamagedData, decode, encode
from sitebackup.model.records import CatalogEntry, ChangeCounts, FileEntry, Job, PageSeal, PruneMark, RunRecord

RECORDS = RESERVED_PREFIX + "records/"
RUNS = RESERVED_PREFIX + "runs/"
JOBS = RESERVED_PREFIX + "jobs/"
PRUNED = RESERVED_PREFIX + "pruned/"
# refused above this size before the body is read: a header names a page per few thousand files
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_RECORD_PAGE_BYTES = 64 * 1024 * 1024
# record pages downloaded while one is read (``ContainerRecords.pages``): a request's latency is paid once for
# several pages, as every reader of a record (restore's plan, verify, a backup's baseline, browse) would else
# wait a round trip a page
READ_AHEAD = 4
_CATALOG_FIELDS = ("job", "status", "started", "finished", "files", "bytes")
_CHANGE_FIELDS = ChangeCounts.__struct_fields__  # in the metadata of headers sealed since changes are counted


def _done(data: bytes) -> Future[bytes]:
    """*data* as a future already resolved: a page read from the state directory waits in line with downloads."""
    found: Future[bytes] = Future()
    found.set_result(data)
    return found


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def page_name(job: str, digest: str) -> str:
    return f"{RECORDS}{_checked_id(job)}/{digest}"


def _checked_id(run_id: str) -> str:
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise DamagedData(f"run id {run_id!r} is not one a run can have")
    return run_id


class HeaderCache:
    """The sealed headers a process read of one container, the last few, by run id: a header never changes once
    sealed, and prune, which removes it, waits for the job's lock that the run reading it holds. A header being
    read is waited for, not read twice; a read that fails or finds none is not kept."""

    KEPT = 16

    def __init__(self) -> None:
        self._held: dict[str, Future[RunRecord | None]] = {}
        self._lock = threading.Lock()

    def read(self, run_id: str, fetch: Callable[[], RunRecord | None]) -> RunRecord | None:
        """The header of *run_id*: kept, being read by another thread, or read now with *fetch*."""
        with self._lock:
            held = self._held.get(run_id)
            if held is None:
                held = self._held[run_id] = Future()
                while len(self._held) > self.KEPT:
                    del self._held[next(iter(self._held))]
                mine = True
            else:
                mine = False
        if mine:
            try:
                held.set_result(fetch())
            except BaseException as exc:
                held.set_exception(exc)
            if held.exception() is not None or held.result() is None:
                with self._lock:
                    if self._held.get(run_id) is held:
                        del self._held[run_id]
        return held.result()


class ContainerRecords:
    """The sealed records, jobs and tombstones of one container. With *headers*, the sealed headers read of it
    already are not read again."""

    def __init__(self, container: ContainerClient, headers: HeaderCache | None = None):
        self.container = container
        self._headers = headers

    # ---- writing

    def put_page(self, job: str, data: bytes) -> str:
        """Store one record page of *job* under its SHA-256 unless the container holds it already; the SHA-256."""
        digest = sha256_hex(data)
        self._create(page_name(job, digest), data)
        return digest

    def seal(self, record: RunRecord) -> None:
        """Write the run's header, last: from now on the run is in the catalog."""
        metadata = {"job": record.job, "status": record.status, "started": record.started,
                    "finished": record.finished, "files": str(record.files), "bytes": str(record.bytes),
                    "format": str(record.format)}
        if record.changes is not None:
            metadata.update((name, str(getattr(record.changes, name))) for name in _CHANGE_FIELDS)
        self._create(RUNS + _checked_id(record.run_id), encode(record), metadata)

    def put_job(self, job: Job) -> None:
        self._create(JOBS + job.id, encode(job))

    def mark_pruned(self, run_id: str, mark: PruneMark) -> None:
        self._create(PRUNED + _checked_id(run_id), encode(mark))

    def _create(self, name: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        """Upload a blob that is written once: one that exists already is left as it is."""
        try:
            self.container.upload_blob(name, data, metadata=metadata, overwrite=False)
        except ResourceExistsError:
            pass

    # ---- removing (prune, once a run's tombstone is written)

    def remove_run(self, run_id: str) -> None:
        """Delete the run's header: from now on the run is not in the catalog (its tombstone stays)."""
        try:
            self.container.delete_blob(RUNS + _checked_id(run_id))
        except ResourceNotFoundError:
            pass

    def remove_pages_but(self, job: str, referenced: set[str]) -> int:
        """Delete every record page of *job* whose SHA-256 is not in *referenced* (what the job's remaining headers
        name); how many went."""
        removed = 0
        folder = page_name(job, "")
        for blob in self.container.list_blobs(name_starts_with=folder):
            if blob.name[len(folder):] not in referenced:
                try:
                    self.container.delete_blob(blob.name)
                except ResourceNotFoundError:
                    continue
                removed += 1
        return removed

    # ---- reading

    def catalog(self) -> Iterator[CatalogEntry]:
        """Every sealed run, from one listing of the headers with their metadata (a request per 5,000 runs)."""
        for blob in self._listing(RUNS, include=["metadata"]):
            meta = blob.metadata or {}
            try:
                changes = ChangeCounts(**{name: int(meta[name]) for name in _CHANGE_FIELDS}) \
                    if all(name in meta for name in _CHANGE_FIELDS) else None
                yield CatalogEntry(run_id=blob.name[len(RUNS):], job=meta["job"], status=meta["status"],
                                   started=meta["started"], finished=meta["finished"],
                                   files=int(meta.get("files", 0)), bytes=int(meta.get("bytes", 0)), changes=changes)
            except (KeyError, ValueError):
                continue  # not a header this version can list: `check` names it

    def header(self, run_id: str) -> RunRecord | None:
        """The run's sealed header, checked; None when the run has none."""
        if self._headers is not None:
            return self._headers.read(run_id, lambda: self._read_header(run_id))
        return self._read_header(run_id)

    def prefetch(self, run_id: str) -> None:
        """Start reading the run's header on a daemon thread, for a ``header`` call to come (with *headers* only): what
        it finds, or what fails, is that call's to see."""
        if self._headers is not None:
            threading.Thread(target=self._prefetched, args=(run_id,), name="sitebackup-header", daemon=True).start()

    def _prefetched(self, run_id: str) -> None:
        with contextlib.suppress(Exception):  # not kept: the call to come reads it again, and says why it fails
            self.header(run_id)

    def _read_header(self, run_id: str) -> RunRecord | None:
        data = self._download(RUNS + _checked_id(run_id), MAX_HEADER_BYTES, f"the sealed record of run {run_id}")
        if data is None:
            return None
        record = decode(data, RunRecord, f"the sealed record of run {run_id}")
        if record.format > FORMAT_VERSION:  # its entries may mean what this version would do wrong: never guessed at
            raise InputError(f"run {run_id} was recorded in format {record.format}, newer than this sitebackup reads "
                             f"({FORMAT_VERSION}): restore, verify or prune it with a newer sitebackup")
        if record.run_id != run_id:
            raise DamagedData(f"the sealed record of run {run_id} is damaged: it names run {record.run_id}")
        return record

    def jobs(self, but: str | None = None) -> list[Job]:
        """The jobs the container names; with *but*, every one but the job of that id (its descriptor is not read)."""
        found = []
        for blob in self._listing(JOBS):
            if blob.name[len(JOBS):] == but:
                continue
            data = self._download(blob.name, MAX_HEADER_BYTES, f"job {blob.name[len(JOBS):]}")
            if data is not None:
                found.append(decode(data, Job, f"job {blob.name[len(JOBS):]}"))
        return found

    def pruned(self, run_id: str) -> PruneMark | None:
        data = self._download(PRUNED + _checked_id(run_id), MAX_HEADER_BYTES, f"the prune mark of run {run_id}")
        return None if data is None else decode(data, PruneMark, f"the prune mark of run {run_id}")

    def page(self, record: RunRecord, seal: PageSeal) -> bytes:
        """A page of a sealed record, its bytes checked against the seal."""
        what = f"record page {seal.page} of run {record.run_id}"
        if seal.size > MAX_RECORD_PAGE_BYTES:
            raise DamagedData(f"{what} is damaged: its seal says {seal.size} bytes")
        data = self._download(page_name(record.job, seal.sha256), seal.size, what)
        if data is None:
            raise DamagedData(f"{what} is missing from the container")
        if len(data) != seal.size or sha256_hex(data) != seal.sha256:
            raise DamagedData(f"{what} is damaged: its bytes do not hash as its seal says")
        return data

    def entries(self, record: RunRecord, cached: Iterable[tuple[int, bytes]] = (),
                on_damaged: Callable[[int], None] = lambda page: None,
                seen: set[str] | None = None, ahead: int = READ_AHEAD) -> Iterator[FileEntry]:
        """The record's entries in page order, a page at a time: from *cached* (this state directory's copy of the
        run's pages: number and bytes, in page order) when its bytes match the seal, else from the container
        (*ahead* pages downloaded while one is used), telling *on_damaged* the number of a cached page that does
        not. With *seen*, the SHA-256s of pages read already (and added to it as they are read): those are left
        out, as the pages runs share are. A copy in the state directory that cannot be read (gone: a later backup let
        it go, or a page unreadable) is read from the container from there on."""
        # chained in C: a reader pays a generator step per page, not per entry
        return chain.from_iterable(entries for _seal, entries in self.pages(record, cached, on_damaged, seen, ahead))

    def pages(self, record: RunRecord, cached: Iterable[tuple[int, bytes]] = (),
              on_damaged: Callable[[int], None] = lambda page: None,
              seen: set[str] | None = None, ahead: int = 0) -> Iterator[tuple[PageSeal, list[FileEntry]]]:
        """The record's pages in order, each decoded with its seal, read as ``entries`` reads them. With *ahead*, up
        to that many of the next pages are downloaded while one is decoded and used (a request's latency paid once
        for several pages); a reader that stops early leaves no download behind."""
        local = iter(cached)
        held = _next_cached(local)
        pool = ThreadPoolExecutor(max_workers=ahead) if ahead > 0 else None
        pending: deque[tuple[PageSeal, Future[bytes]]] = deque()
        try:
            for seal in record.pages:
                if seen is not None:
                    if seal.sha256 in seen:
                        continue
                    seen.add(seal.sha256)
                while held is not None and held[0] < seal.page:
                    held = _next_cached(local)
                data = held[1] if held is not None and held[0] == seal.page else None
                if data is not None and (len(data) != seal.size or sha256_hex(data) != seal.sha256):
                    on_damaged(seal.page)
                    data = None
                if data is not None:
                    pending.append((seal, _done(data)))
                elif pool is not None:
                    pending.append((seal, pool.submit(self.page, record, seal)))
                else:
                    pending.append((seal, _done(self.page(record, seal))))
                while len(pending) > ahead:
                    yield self._decoded(record, *pending.popleft())
            while pending:
                yield self._decoded(record, *pending.popleft())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _decoded(record: RunRecord, seal: PageSeal, data: Future[bytes]) -> tuple[PageSeal, list[FileEntry]]:
        return seal, decode(data.result(), list[FileEntry], f"record page {seal.page} of run {record.run_id}")

    def _listing(self, folder: str, include: list[str] | None = None) -> Iterator[BlobProperties]:
        """The blobs under *folder*; none when the container itself does not exist (nothing was sealed there)."""
        try:
            yield from self.container.list_blobs(name_starts_with=folder, include=include)
        except ResourceNotFoundError:
            return

    def _download(self, name: str, limit: int, what: str) -> bytes | None:
        try:
            downloader = self.container.download_blob(name)
        except ResourceNotFoundError:
            return None
        if downloader.size > limit:
            raise DamagedData(f"{what} is damaged: {downloader.size} bytes, over the {limit} it may have")
        return downloader.readall()

    # ---- what `check` lists beside the catalog

    def listed(self, folder: str) -> Iterator[str]:
        """The names under one of the folders above (``RUNS``, ``RECORDS``, ``PRUNED``, ``JOBS``), without it, as
        the container lists them (a request per 5,000): whatever their metadata, unlike ``catalog``."""
        for blob in self.container.list_blobs(name_starts_with=folder):
            yield blob.name[len(folder):]


def _next_cached(local: Iterator[tuple[int, bytes]]) -> tuple[int, bytes] | None:
    """The next page of a state directory's copy of a sealed record, or None: none left, or from the first one that
    cannot be read on (the copy is a cache: what it cannot give, the container does)."""
    try:
        return next(local, None)
    except OSError:
        return None


def run_entries(records: ContainerRecords | None, work: WorkStore, run_id: str,
                on_note: Callable[[str], None] = lambda note: None, seen: set[str] | None = None) -> Iterator[FileEntry]:
    """A run's record: its sealed copy in the container, each page read from this state directory when its
    bytes match the seal (*on_note* hears of one that does not), or, for a run never sealed (unfinished, or
    made by an earlier version), the pages the work store holds."""
    return chain.from_iterable(run_pages(records, work, run_id, on_note, seen))


def run_pages(records: ContainerRecords | None, work: WorkStore, run_id: str,
              on_note: Callable[[str], None] = lambda note: None,
              seen: set[str] | None = None) -> Iterator[list[FileEntry]]:
    """``run_entries`` a page at a time (each page's entries, in page order)."""
    header = records.header(run_id) if records is not None else None
    if header is None:
        yield from record_pages(work.result_pages(run_id), run_id)
        return
    assert records is not None

    def damaged(page: int) -> None:
        on_note(f"record page {page} of run {run_id} in the state directory is damaged: its sealed copy in the "
                "container is read instead")

    for _seal, entries in records.pages(header, cached=work.result_pages(run_id), on_damaged=damaged, seen=seen,
                                        ahead=READ_AHEAD):
        yield entries

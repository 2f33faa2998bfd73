"""Work pages and run records, kept outside the orchestration history.

The scan writes the file list as numbered pages; each copy activity reads one page and writes
one result file (what it uploaded, with sizes and hashes): together the results are the run's
record. Only page numbers, counts and hashes travel through the durable history, so its size does not
grow with the number of files. ``LocalWorkStore`` keeps them in the local state directory;
``BlobWorkStore`` keeps them in the destination container when workers on other hosts must see them.

Writing a work page or a chunk of the page index gives the SHA-256 of the bytes written, and reading one
back takes the hash it must have (``workflows.pages`` keeps them): whoever can write the container (or
the state directory) cannot make a worker act on a page the scan or the plan did not write.

A run ``prune`` drops gets a *pruned mark* before anything of it is deleted: it is the journal a
killed prune resumes from, and stays as the tombstone that lets ``restore ID`` say the run was pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from azure.core.exceptions import AzureError, ResourceNotFoundError

from sitebackup.blob.naming import RESERVED_PREFIX
from sitebackup.errors import write_fault
from sitebackup.model.codec import DamagedData, decode, encode
from sitebackup.model.records import FileEntry, PruneMark
from sitebackup.model.work import PageIndex

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient

T = TypeVar("T")

# A page or result file read back is refused above this size before its body is read: a page holds at most
# workflows.names.UNCHANGED_PAGE entries of a few hundred bytes each.
MAX_PAGE_BYTES = 64 * 1024 * 1024


class WorkStore(Protocol):
    """Pages of one run's work, the chunks of its page index and its per-page results (``FileEntry`` lines for a
    backup), by instance id. A page or chunk is written once and its SHA-256 returned; it is read back only
    with that hash, and is ``DamagedData`` when its bytes do not match."""

    def write_page(self, instance_id: str, page: int, content: object) -> str: ...

    def read_page(self, instance_id: str, page: int, kind: type[T], sha256: str) -> T: ...

    def write_index(self, instance_id: str, chunk: int, index: PageIndex) -> str: ...

    def read_index(self, instance_id: str, chunk: int, sha256: str) -> PageIndex: ...

    def write_result(self, instance_id: str, page: int, entries: Sequence[object]) -> None: ...

    def has_results(self, instance_id: str) -> bool: ...

    def iter_results(self, instance_id: str) -> Iterator[FileEntry]: ...

    def result_pages(self, instance_id: str) -> Iterator[tuple[int, bytes]]: ...

    def remove(self, instance_id: str, keep_mark: bool = False) -> None: ...

    def mark_pruned(self, instance_id: str, mark: PruneMark) -> None: ...

    def pruned(self, instance_id: str) -> PruneMark | None: ...


MARK = "pruned.json"


def page_number(name: str) -> int:
    """The page number of a page or result file's name (``…/000042.json``): files are read in this order, not by
    name, as a page past 999,999 has a longer name that sorts before ``999999.json``."""
    return int(name.rpartition("/")[2].removesuffix(".json"))


def _checked(instance_id: str) -> str:
    if "/" in instance_id or instance_id in ("", ".", ".."):
        raise ValueError(f"bad instance id {instance_id!r}")
    return instance_id


def _too_large(what: str, size: int) -> DamagedData:
    return DamagedData(f"{what} is damaged: {size} bytes, over the {MAX_PAGE_BYTES} a page may have")


def _record_page(page: int, instance_id: str) -> str:
    return f"record page {page} of run {instance_id}"


def _work_page(page: int, instance_id: str) -> str:
    return f"work page {page} of run {instance_id}"


def _index_chunk(chunk: int, instance_id: str) -> str:
    return f"page index {chunk} of run {instance_id}"


def _name(page: int) -> str:
    return f"{page:06d}.json"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(data: bytes, sha256: str, what: str) -> bytes:
    """*data* when its SHA-256 (hex) is *sha256*; else ``DamagedData`` naming *what*."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DamagedData(f"{what} is damaged: its SHA-256 is not the one recorded when it was written")
    return data


def record_entries(pages: Iterable[tuple[int, bytes]], instance_id: str) -> Iterator[FileEntry]:
    """The entries of a run's result pages (number, bytes), decoded page by page."""
    return chain.from_iterable(record_pages(pages, instance_id))


def record_pages(pages: Iterable[tuple[int, bytes]], instance_id: str) -> Iterator[list[FileEntry]]:
    """A run's result pages (number, bytes), each decoded into its entries."""
    for page, data in pages:
        yield decode(data, list[FileEntry], _record_page(page, instance_id))


class LocalWorkStore:
    """The work store in ``<state dir>/work``; *on_fault* hears why a write failed when the disk is full."""

    def __init__(self, root: Path, on_fault: Callable[[str], None] = lambda reason: None):
        self.root = root
        self.on_fault = on_fault

    def _dir(self, instance_id: str) -> Path:
        return self.root / _checked(instance_id)

    def _write(self, path: Path, data: object) -> bytes:
        """Write *data* (encoded) at *path*; the bytes written."""
        content = encode(data)
        try:
            # mkdir's mode applies to the last directory only: create each level owner-only
            folder = self.root
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for part in path.parent.relative_to(self.root).parts:
                folder = folder / part
                folder.mkdir(exist_ok=True, mode=0o700)
            # write-then-rename: a kill mid-write never leaves a half page behind
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # a half page on a full disk holds the space others need
                raise
        except OSError as exc:
            reason = write_fault(exc)
            if reason is not None:
                self.on_fault(reason)
            raise
        return content

    @staticmethod
    def _bytes(path: Path, what: str) -> bytes:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_PAGE_BYTES:
                raise _too_large(what, size)
            return fh.read()

    def _read(self, path: Path, kind: type[T], what: str) -> T:
        return decode(self._bytes(path, what), kind, what)

    def _read_verified(self, path: Path, kind: type[T], what: str, sha256: str) -> T:
        try:
            data = self._bytes(path, what)
        except FileNotFoundError:
            raise DamagedData(f"{what} is missing") from None
        return decode(verified(data, sha256, what), kind, what)

    def write_page(self, instance_id: str, page: int, content: object) -> str:
        return _sha256_hex(self._write(self._dir(instance_id) / "pages" / _name(page), content))

    def read_page(self, instance_id: str, page: int, kind: type[T], sha256: str) -> T:
        return self._read_verified(self._dir(instance_id) / "pages" / _name(page), kind,
                                   _work_page(page, instance_id), sha256)

    def write_index(self, instance_id: str, chunk: int, index: PageIndex) -> str:
        return _sha256_hex(self._write(self._dir(instance_id) / "index" / _name(chunk), index))

    def read_index(self, instance_id: str, chunk: int, sha256: str) -> PageIndex:
        return self._read_verified(self._dir(instance_id) / "index" / _name(chunk), PageIndex,
                                   _index_chunk(chunk, instance_id), sha256)

    def write_result(self, instance_id: str, page: int, entries: Sequence[object]) -> None:
        self._write(self._dir(instance_id) / "results" / _name(page), entries)

    def has_results(self, instance_id: str) -> bool:
        return (self._dir(instance_id) / "results").is_dir()

    def iter_results(self, instance_id: str) -> Iterator[FileEntry]:
        return record_entries(self.result_pages(instance_id), instance_id)

    def result_pages(self, instance_id: str) -> Iterator[tuple[int, bytes]]:
        folder = self._dir(instance_id) / "results"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json"), key=lambda path: page_number(path.name)):
            page = page_number(path.name)
            yield page, self._bytes(path, _record_page(page, instance_id))

    def remove(self, instance_id: str, keep_mark: bool = False) -> None:
        folder = self._dir(instance_id)
        for part in ("pages", "results") if keep_mark else ():
            shutil.rmtree(folder / part, ignore_errors=True)
        if not keep_mark:
            shutil.rmtree(folder, ignore_errors=True)

    def mark_pruned(self, instance_id: str, mark: PruneMark) -> None:
        self._write(self._dir(instance_id) / MARK, mark)

    def pruned(self, instance_id: str) -> PruneMark | None:
        try:
            return self._read(self._dir(instance_id) / MARK, PruneMark, f"prune mark of run {instance_id}")
        except (FileNotFoundError, DamagedData):
            return None


class BlobWorkStore:
    """The work store on blobs, for the scheduler backend where workers share no disk.

    Pages and results live under ``.sitebackup/work/<instance_id>/`` in the backup's destination
    container; *container_for* maps an instance id to that container's client.
    """

    def __init__(self, container_for: Callable[[str], ContainerClient]):
        self.container_for = container_for

    @staticmethod
    def _folder(instance_id: str) -> str:
        return f"{RESERVED_PREFIX}work/{_checked(instance_id)}/"

    def _write(self, instance_id: str, name: str, data: object) -> str:
        """Write *data* (encoded) as blob *name* of the run's folder; the SHA-256 (hex) of the bytes written."""
        content = encode(data)
        # one Put Blob is atomic: a reader never sees half a page
        self.container_for(instance_id).upload_blob(self._folder(instance_id) + name, content, overwrite=True)
        return hashlib.sha256(content).hexdigest()

    @staticmethod
    def _download(container: ContainerClient, name: str, what: str) -> bytes:
        downloader = container.download_blob(name)
        if downloader.size > MAX_PAGE_BYTES:
            raise _too_large(what, downloader.size)
        return downloader.readall()

    def _read(self, instance_id: str, name: str, kind: type[T], what: str) -> T:
        return decode(self._download(self.container_for(instance_id), self._folder(instance_id) + name, what), kind,
                      what)

    def _read_verified(self, instance_id: str, name: str, kind: type[T], what: str, sha256: str) -> T:
        try:
            data = self._download(self.container_for(instance_id), self._folder(instance_id) + name, what)
        except ResourceNotFoundError:
            raise DamagedData(f"{what} is missing") from None
        return decode(verified(data, sha256, what), kind, what)

    def write_page(self, instance_id: str, page: int, content: object) -> str:
        return self._write(instance_id, f"pages/{_name(page)}", content)

    def read_page(self, instance_id: str, page: int, kind: type[T], sha256: str) -> T:
        return self._read_verified(instance_id, f"pages/{_name(page)}", kind, _work_page(page, instance_id), sha256)

    def write_index(self, instance_id: str, chunk: int, index: PageIndex) -> str:
        return self._write(instance_id, f"index/{_name(chunk)}", index)

    def read_index(self, instance_id: str, chunk: int, sha256: str) -> PageIndex:
        return self._read_verified(instance_id, f"index/{_name(chunk)}", PageIndex, _index_chunk(chunk, instance_id),
                                   sha256)

    def write_result(self, instance_id: str, page: int, entries: Sequence[object]) -> None:
        self._write(instance_id, f"results/{_name(page)}", entries)

    def has_results(self, instance_id: str) -> bool:
        folder = self._folder(instance_id) + "results/"
        return any(True for _ in self.container_for(instance_id).list_blobs(name_starts_with=folder))

    def iter_results(self, instance_id: str) -> Iterator[FileEntry]:
        return record_entries(self.result_pages(instance_id), instance_id)

    def result_pages(self, instance_id: str) -> Iterator[tuple[int, bytes]]:
        container = self.container_for(instance_id)
        folder = self._folder(instance_id) + "results/"
        for name in sorted((b.name for b in container.list_blobs(name_starts_with=folder)), key=page_number):
            page = page_number(name)
            yield page, self._download(container, name, _record_page(page, instance_id))

    def remove(self, instance_id: str, keep_mark: bool = False) -> None:
        container = self.container_for(instance_id)
        mark = self._folder(instance_id) + MARK
        for blob in container.list_blobs(name_starts_with=self._folder(instance_id)):
            if not (keep_mark and blob.name == mark):
                container.delete_blob(blob.name)

    def mark_pruned(self, instance_id: str, mark: PruneMark) -> None:
        self._write(instance_id, MARK, mark)

    def pruned(self, instance_id: str) -> PruneMark | None:
        """The run's pruned mark; None when there is none or it cannot be read: the run's container unknown
        (its history is gone) or unreachable (the caller's own requests report that)."""
        try:
            return self._read(instance_id, MARK, PruneMark, f"prune mark of run {instance_id}")
        except (AzureError, LookupError, DamagedData):
            return None

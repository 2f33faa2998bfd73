"""Small-file downloads of a restore through the process's one asyncio loop, the one uploads use.

A restore of small files costs requests, not bytes, as a backup does, and so does one of 1 MiB files
once the bytes come in large chunks: ``AsyncPutter``'s loop, connection pool and window of requests
(``blob.inflight``) serve downloads as well. A download is one Get Blob built here (``ContainerGets``) and sent
through the same lean pipeline as the puts, authorized by a read-only container SAS signed in memory
(``asyncput.SignedUrls``): no SDK client, downloader or header deserializer per file. Activities stay
synchronous: they hand a page's small files to ``AsyncGetter.get_many`` and take each file's content
from its future in page order, writing one while the next ones arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import IncompleteReadError, ServiceResponseError
from azure.core.rest import HttpRequest

from sitebackup.blob.asyncput import AsyncPutter, Cancelled, SignedUrls
from sitebackup.blob.bwlimit import process_limiter
from sitebackup.blob.errors import response_error
from sitebackup.blob.inflight import InFlight
from sitebackup.blob.upload import META_MODE, META_MTIME
from sitebackup.local.files import b64

_META = "x-ms-meta-"
_OWN_METADATA = (META_MTIME, META_MODE)
# a body cut off mid-way is asked for again, as the pipeline's retries do for a body it reads itself
BODY_ATTEMPTS = 3


@dataclass(frozen=True)
class BlobFacts:
    """What a download says of its blob, for the caller's checks: size, Content-MD5 (base64), metadata."""

    size: int
    md5: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, props: Any) -> "BlobFacts":
        """From the SDK's ``BlobProperties`` of a download."""
        return cls(props.size, b64(props.content_settings.content_md5), dict(props.metadata or {}))

    @classmethod
    def from_headers(cls, size: int, headers: Mapping[str, str]) -> "BlobFacts":
        """Of a whole-blob Get Blob (200) whose body is *size* bytes, from its Content-MD5 and the metadata an
        upload of sitebackup writes (the only metadata a restore reads)."""
        # looked up by name: azure-core's response headers build their items view anew, key by key, per call
        metadata = {key: value for key in _OWN_METADATA if (value := headers.get(_META + key)) is not None}
        return cls(size, headers.get("Content-MD5") or headers.get("x-ms-blob-content-md5"), metadata)


@dataclass(frozen=True)
class Got:
    """A downloaded blob: its content and what the service said of it."""

    data: bytes
    facts: BlobFacts


class ContainerGets:
    """Get Blob requests of one container's blobs, through *pipeline* (``clients.put_pipeline``), authorized
    as *container* (an aio ``ContainerClient``) is, with a read-only SAS when it holds an account key."""

    def __init__(self, container: Any, pipeline: Any, clock: Callable[[], float] = time.monotonic):
        self._container = container
        self._urls = SignedUrls(container, read=True, clock=clock)
        self._pipeline = pipeline
        self._headers = {"x-ms-version": container.api_version}

    async def get(self, name: str, snapshot: str | None, size: int) -> Got:
        """The whole of blob *name* (its *snapshot*, if given) when it is *size* bytes, read into memory. A blob of
        another size is never read (a writer of the container can put any size behind a record): its ``Got``
        holds no data and the size the service gave, for the caller's checks to refuse."""
        if snapshot is not None:
            # through the SDK's client: Azurite refuses a container SAS on a snapshot read (it signs the
            # request's snapshot into the SAS), and only files replaced since their run come from one; a snapshot
            # never changes, so its size read first is the size of what is downloaded
            blob = self._container.get_blob_client(name, snapshot=snapshot)
            props = await blob.get_blob_properties()
            if props.size != size:
                return Got(b"", BlobFacts.of(props))
            downloader = await blob.download_blob(decompress=False)
            return Got(await downloader.readall(), BlobFacts.of(downloader.properties))
        # streamed, to see the size before the body; auto_decompress=False: a blob marked Content-Encoding: gzip
        # is restored as the bytes it holds (the ones its Content-MD5 is of), never inflated on the way
        request = HttpRequest("GET", self._urls.blob(name), headers=self._headers)
        attempt = 1
        while True:
            response = await self._pipeline.send_request(request, stream=True, auto_decompress=False)
            try:
                if response.status_code != 200:
                    await response.read()
                    raise response_error(response)
                facts = BlobFacts.from_headers(int(response.headers.get("Content-Length", -1)), response.headers)
                if facts.size != size:
                    return Got(b"", facts)
                try:
                    return Got(await response.read(), facts)
                except (IncompleteReadError, ServiceResponseError):  # cut off mid-body: asked again
                    if attempt == BODY_ATTEMPTS:
                        raise
                    attempt += 1
            finally:
                await response.close()


class AsyncGetter:
    """Downloads on an ``AsyncPutter``'s loop, paid for from the process's --bwlimit bucket."""

    def __init__(self, putter: AsyncPutter):
        self._putter = putter
        self._limiter = process_limiter()  # a small file's bytes are paid for before its request
        self._gets: dict[str, ContainerGets] = {}  # touched on the loop's thread only

    def get_many(self, container: str, items: list[tuple[str, str | None, int]],
                 cancelled: Callable[[], bool] = lambda: False) -> list[Future[Got]]:
        """Start downloading each (blob name, snapshot id or None for the current blob, expected size); per
        item a future of its ``Got`` or of the exception it raised (``Cancelled`` once the run is cancelled
        before its turn). A page's downloads share the loop's window with everything else on it."""
        futures: list[Future[Got]] = [Future() for _ in items]

        async def page(client: Any, pipeline: Any, window: InFlight) -> None:
            try:
                if container not in self._gets:
                    self._gets[container] = ContainerGets(client.get_container_client(container), pipeline)
                gets = self._gets[container]
                await asyncio.gather(*(self._settle(future, self._get(gets, window, item, cancelled))
                                       for item, future in zip(items, futures)))
            finally:  # the loop closing under it must not leave the activity waiting forever
                for future in futures:
                    if not future.done():
                        future.set_exception(RuntimeError("download did not finish"))

        self._putter.submit(page)
        return futures

    @staticmethod
    async def _settle(future: Future[Got], get: Any) -> None:
        try:
            future.set_result(await get)
        except Exception as exc:
            future.set_exception(exc)

    async def _get(self, gets: ContainerGets, window: InFlight, item: tuple[str, str | None, int],
                   cancelled: Callable[[], bool]) -> Got:
        name, snapshot, size = item
        async with window.slot():
            if cancelled():
                raise Cancelled()
            window.carried(size)
            if self._limiter is not None:
                await self._limiter.acquire_async(size)
            return await gets.get(name, snapshot, size)

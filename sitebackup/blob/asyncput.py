"""Small-file uploads through one asyncio event loop per process, shared by every copy activity.

On Azurite and on real links alike, small files cost requests, not bytes; the async SDK over
aiohttp spends much less CPU per request than threads over requests, and one loop with one
connection pool keeps a window of Put Blobs going (``blob.inflight``) whatever the number of activities feeding it.
Activities stay synchronous (the worker runs them in threads): they hand a page's small files to
``AsyncPutter.put_many`` and block on the results, and hold a slot of the same window (``AsyncPutter.held``)
around each request of a large file they send with the synchronous client. A run's seal sends its record pages
here too (``AsyncPutter.put_new``): at the end of a run the loop's connections are open and idle, where threads of
the synchronous client would open connections of their own, a round trip each, and send fewer at once.

The Put Blob of a small file is built here (``ContainerPuts``) from headers computed once per container,
and sent through a pipeline of retries alone, authorized by a container SAS in its URL (``SignedUrls``,
which restore's lean GETs use too): with an account key, one signed in memory for this process
(``clients.container_sas``) instead of a SharedKey HMAC per request. The rare requests of a changed file
(properties, snapshot) go through the SDK's client.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.core.rest import HttpRequest

from sitebackup.blob.bwlimit import process_limiter
from sitebackup.blob.clients import StorageSettings, container_sas, make_service_client, put_pipeline
from sitebackup.blob.errors import response_error
from sitebackup.blob.inflight import InFlight, ThrottleSignal, listen
from sitebackup.blob.upload import Uploaded, already_there, put_headers, replace_conditions, small_file_put, uploaded
from sitebackup.local.files import SourceTree
from sitebackup.model.records import PriorCopy
from sitebackup.model.work import UploadSpec

T = TypeVar("T")

# a run's SAS is signed for an hour and replaced a quarter of an hour before it runs out, so a request
# (with its retries, about a minute) never carries an expired one
SAS_LIFETIME = timedelta(hours=1)
SAS_MARGIN = timedelta(minutes=15)


class Cancelled(Exception):
    """The run was cancelled before this file's turn came."""


class SignedUrls:
    """Blob URLs of one container, authorized as *container* (an aio ``ContainerClient``) is: by the SAS in
    its URL, a SAS signed with its account key (renewed well before it expires) that reads blobs (*read*)
    or creates and writes them, or its token credential in the pipeline (no query)."""

    def __init__(self, container: Any, read: bool, clock: Callable[[], float] = time.monotonic):
        parts = urlsplit(container.url)
        self._base: str = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
        self._query = f"?{parts.query}" if parts.query else ""
        self._credential = container.credential
        self._container = container.container_name
        self._read = read
        self._clock = clock
        self._renew_at: float | None = None
        self._sign()

    def _sign(self) -> None:
        sas = container_sas(self._credential, self._container, SAS_LIFETIME, self._read)
        if sas is not None:
            self._query = f"?{sas}"
            self._renew_at = self._clock() + (SAS_LIFETIME - SAS_MARGIN).total_seconds()

    def blob(self, name: str) -> str:
        """The URL of blob *name*, authorized."""
        if self._renew_at is not None and self._clock() >= self._renew_at:
            self._sign()
        return self._base + quote(name, safe="~/") + self._query


class ContainerPuts:
    """Put Blob requests into one container, through *pipeline* (``clients.put_pipeline``), authorized as
    *container* is (``SignedUrls``)."""

    def __init__(self, container: Any, pipeline: Any, clock: Callable[[], float] = time.monotonic):
        self._urls = SignedUrls(container, read=False, clock=clock)
        self._pipeline = pipeline
        self._headers = {"x-ms-version": container.api_version, "x-ms-blob-type": "BlockBlob",
                         "Content-Type": "application/octet-stream", "Accept": "application/xml"}

    async def put(self, name: str, data: bytes, headers: dict[str, str]) -> str:
        """Put *data* as block blob *name* with *headers* (``upload.put_headers``); the response's ETag."""
        request = HttpRequest("PUT", self._urls.blob(name), headers={**self._headers, **headers}, content=data)
        response = await self._pipeline.send_request(request)
        if response.status_code != 201:
            raise response_error(response)
        return str(response.headers["ETag"])


class AsyncPutter:
    """An event loop in a daemon thread with one aio client, started by ``start`` or on first use."""

    def __init__(self, settings: StorageSettings, in_flight: int = 32, most_in_flight: int | None = None):
        self._settings = settings
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: concurrent.futures.Future[None] | None = None  # the client made on the loop
        self._client: Any = None
        self._pipeline: Any = None
        self._puts: dict[str, ContainerPuts] = {}
        # the window of requests, bound to the loop at its first use, as asyncio primitives are; it adapts from
        # *in_flight* up to *most_in_flight* (None: fixed at *in_flight*)
        self.window = InFlight(in_flight, most_in_flight or in_flight)
        self._limiter = process_limiter()  # --bwlimit: a small file's bytes are paid for before its request
        self._forget: Callable[[], None] = lambda: None  # stops the window hearing of the synchronous clients' 503s

    def start(self) -> tuple[asyncio.AbstractEventLoop, concurrent.futures.Future[None]]:
        """Start the loop and make its client without waiting for them: the hosting process calls this before
        the run's first page exists, so the client is made while the durable runtime starts, not after.
        The loop and the future of its client."""
        with self._lock:
            if self._loop is not None and self._ready is not None:
                return self._loop, self._ready
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="sitebackup-asyncput", daemon=True).start()

            async def setup() -> None:
                # the client and its aiohttp session must be born inside the loop that uses them
                # pools as wide as the window can grow: the connector's limit must never be what bounds it
                self._client, _label = make_service_client(self._settings, pool_size=self.window.ceiling, aio=True)
                self._pipeline = put_pipeline(self._client.credential, self.window.ceiling,
                                              ThrottleSignal(self.window))
                self._forget = listen(self.window, asyncio.get_running_loop())

            self._ready = asyncio.run_coroutine_threadsafe(setup(), loop)
            self._loop = loop
            # close the aiohttp session while the loop still runs, not in a warning at exit
            atexit.register(self.close)
            return loop, self._ready

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop, ready = self.start()
        ready.result()  # a client that could not be made fails every caller alike
        return loop

    def submit(self, work: Callable[[Any, Any, InFlight], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        """Run ``work(service client, lean request pipeline, window of requests)`` on this loop; a future of its
        result. Restore's ``blob.asyncget`` shares the loop, its connection pool and its window of requests
        this way."""
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(work(self._client, self._pipeline, self.window), loop)

    def held(self, size: int) -> AbstractContextManager[None]:
        """A slot of this loop's window, held by the calling thread (an activity's, never the loop's) around one
        request carrying *size* bytes that it sends with the synchronous client (``InFlight.held``)."""
        return self.window.held(self._ensure_loop(), size)

    def put_many(self, container: str, source: SourceTree, items: list[tuple[str, str, PriorCopy | None]],
                 spec: UploadSpec, cancelled: Callable[[], bool] = lambda: False) -> list[Uploaded | BaseException]:
        """Upload each (path relative to *source*, blob name, what the baseline recorded there) as *spec* says;
        return per item an ``Uploaded`` or the exception it raised."""
        loop = self._ensure_loop()

        async def all_items() -> list[Any]:
            client = self._client.get_container_client(container)
            puts = self._container_puts(container, client)
            return await asyncio.gather(*(self._put(client, puts, source, relpath, name, prior, cancelled, spec)
                                          for relpath, name, prior in items), return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(all_items(), loop).result()

    def put_new(self, container: str, name: str, data: bytes) -> concurrent.futures.Future[None]:
        """Write *data* as block blob *name* of *container* once (If-None-Match: \\*: a blob there already is
        left as it is), in a slot of the window; returns at once, with the future of the request's end."""
        loop = self._ensure_loop()

        async def put() -> None:
            puts = self._container_puts(container, self._client.get_container_client(container))
            async with self.window.slot():
                self.window.carried(len(data))
                if self._limiter is not None:
                    await self._limiter.acquire_async(len(data))
                try:
                    await puts.put(name, data, {"If-None-Match": "*"})
                except ResourceExistsError:
                    pass

        return asyncio.run_coroutine_threadsafe(put(), loop)

    def _container_puts(self, container: str, client: Any) -> ContainerPuts:
        """The Put Blob requests into *container* (*client*, the aio client's), made once; on the loop."""
        if container not in self._puts:
            self._puts[container] = ContainerPuts(client, self._pipeline)
        return self._puts[container]

    async def _put(self, client: Any, puts: ContainerPuts, source: SourceTree, relpath: str, name: str,
                   prior: PriorCopy | None, cancelled: Callable[[], bool], spec: UploadSpec) -> Uploaded:
        async with self.window.slot():
            if cancelled():
                raise Cancelled()
            # small files only: one read, one hash, one request (two for a changed file), as upload.upload_file does
            with source.opened(relpath) as fd:
                data, st, md5 = small_file_put(fd)
            self.window.carried(len(data))
            if self._limiter is not None:
                await self._limiter.acquire_async(len(data))

            def put(match_condition: MatchConditions | None = None, etag: str | None = None) -> Any:
                return puts.put(name, data, put_headers(name, st, md5, spec, etag,
                                                        match_condition == MatchConditions.IfMissing))

            etag = await _replace(lambda: client.get_blob_client(name), put, uploaded(st, md5).md5,
                                  st.st_mtime_ns, prior)
            return uploaded(st, md5, spec.tier, etag)

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
            ready, self._ready = self._ready, None
        if loop is None or ready is None:
            return
        self._forget()
        try:
            ready.result(timeout=10)
        except Exception:  # no client was made: nothing to close but the loop
            pass
        else:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            asyncio.run_coroutine_threadsafe(self._pipeline.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)


async def _replace(blob_client: Callable[[], Any], put: Callable[..., Awaitable[str]], md5: str, mtime_ns: int,
                   prior: PriorCopy | None) -> str:
    """``upload.replace`` on the async client: the old content is kept as a snapshot when it may differ.
    The SDK's client of the blob is made only when the put alone does not do."""
    conditions = replace_conditions(md5, prior)
    if conditions is not None:
        try:
            return await put(**conditions)
        except (ResourceExistsError, ResourceModifiedError):
            blob = blob_client()
            try:
                props = await blob.get_blob_properties()
            except ResourceNotFoundError:
                return await put()
            if already_there(props, md5, mtime_ns):
                return str(props.etag)
    try:
        await blob_client().create_snapshot()
    except ResourceNotFoundError:
        pass
    return await put()

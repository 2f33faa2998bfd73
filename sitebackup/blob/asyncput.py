"""Small-file uploads through one asyncio event loop per process, shared by every copy activity.

On Azurite and on real links alike, small files cost requests, not bytes; the async SDK over
aiohttp spends much less CPU per request than threads over requests, and one loop with one
connection pool keeps ``in_flight`` Put Blobs going whatever the number of activities feeding it.
Activities stay synchronous (the worker runs them in threads): they hand a page's small files to
``AsyncPutter.put_many`` and block on the results.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from sitebackup.blob.bwlimit import process_limiter
from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.blob.upload import (
    Held,
    Uploaded,
    already_there,
    replace_conditions,
    single_put_options,
    small_file_put,
    uploaded,
)


class Cancelled(Exception):
    """The run was cancelled before this file's turn came."""


class AsyncPutter:
    """An event loop in a daemon thread with one aio client, started on first use."""

    def __init__(self, settings: StorageSettings, in_flight: int = 32):
        self._settings = settings
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._gate: asyncio.Semaphore | None = None
        self._limiter = process_limiter()  # --bwlimit: a small file's bytes are paid for before its request

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="sitebackup-asyncput", daemon=True).start()

                async def setup() -> None:
                    # the client and its aiohttp session must be born inside the loop that uses them
                    self._client, _label = make_service_client(self._settings, pool_size=self._in_flight, aio=True)
                    self._gate = asyncio.Semaphore(self._in_flight)

                asyncio.run_coroutine_threadsafe(setup(), loop).result()
                self._loop = loop
                # close the aiohttp session while the loop still runs, not in a warning at exit
                atexit.register(self.close)
            return self._loop

    def submit(self, work: Callable[[Any, asyncio.Semaphore], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future:
        """Run ``work(service client, in-flight gate)`` on this loop; a future of its result. Restore's
        ``blob.asyncget`` shares the loop, its connection pool and its window of requests this way."""
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(work(self._client, self._gate), loop)

    def put_many(self, container: str, items: list[tuple[Path, str, Held | None]],
                 cancelled: Callable[[], bool] = lambda: False, tier: str | None = None) -> list[Uploaded | BaseException]:
        """Upload each (path, blob name, what the baseline held there) in access *tier*; return per item an
        ``Uploaded`` or the exception it raised."""
        loop = self._ensure_loop()

        async def all_items() -> list[Any]:
            client = self._client.get_container_client(container)
            return await asyncio.gather(*(self._put(client, path, name, held, cancelled, tier)
                                          for path, name, held in items), return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(all_items(), loop).result()

    async def _put(self, client: Any, path: Path, name: str, held: Held | None,
                   cancelled: Callable[[], bool], tier: str | None) -> Uploaded:
        async with self._gate:
            if cancelled():
                raise Cancelled()
            # small files only: one read, one hash, one request (two for a changed file), as upload.upload_file does
            data, st, md5 = small_file_put(path)
            if self._limiter is not None:
                await self._limiter.acquire_async(len(data))
            blob = client.get_blob_client(name)
            options = single_put_options(name, st, md5, tier)
            done = await _replace(blob, lambda **c: blob.upload_blob(data, length=len(data), **options, **c),
                                  uploaded(st, md5).md5, st.st_mtime_ns, held)
            return uploaded(st, md5, tier, done["etag"])

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)


async def _replace(blob: Any, put: Callable[..., Any], md5: str, mtime_ns: int, held: Held | None) -> Any:
    """``upload.replace`` on the async client: the old content is kept as a snapshot when it may differ."""
    conditions = replace_conditions(md5, held)
    if conditions is not None:
        try:
            return await put(**conditions)
        except (ResourceExistsError, ResourceModifiedError):
            try:
                props = await blob.get_blob_properties()
            except ResourceNotFoundError:
                return await put()
            if already_there(props, md5, mtime_ns):
                return {"etag": props.etag}
    try:
        await blob.create_snapshot()
    except ResourceNotFoundError:
        pass
    return await put()

"""Small-file downloads of a restore through the process's one asyncio loop, the one uploads use.

A restore of small files costs requests, not bytes, as a backup does: the async SDK over aiohttp spends
much less CPU per request than the sync SDK over requests in threads, and ``AsyncPutter``'s loop, client,
connection pool and window of ``in_flight`` requests serve downloads as well. Activities stay
synchronous: they hand a page's small files to ``AsyncGetter.get_many`` and take each file's content
from its future in page order, writing one while the next ones arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sitebackup.blob.asyncput import AsyncPutter, Cancelled
from sitebackup.blob.bwlimit import process_limiter


@dataclass(frozen=True)
class Got:
    """A downloaded blob: its content and the properties the service sent with it (size, Content-MD5,
    metadata) for the caller's checks."""

    data: bytes
    properties: Any


class AsyncGetter:
    """Downloads on an ``AsyncPutter``'s loop, paid for from the process's --bwlimit bucket."""

    def __init__(self, putter: AsyncPutter):
        self._putter = putter
        self._limiter = process_limiter()  # a small file's bytes are paid for before its request

    def get_many(self, container: str, items: list[tuple[str, str | None, int]],
                 cancelled: Callable[[], bool] = lambda: False) -> list[Future[Got]]:
        """Start downloading each (blob name, snapshot id or None for the current blob, expected size); per
        item a future of its ``Got`` or of the exception it raised (``Cancelled`` once the run is cancelled
        before its turn). A page's downloads share the loop's window with everything else on it."""
        futures: list[Future[Got]] = [Future() for _ in items]

        async def page(client: Any, gate: asyncio.Semaphore) -> None:
            try:
                container_client = client.get_container_client(container)
                await asyncio.gather(*(self._settle(future, self._get(container_client, gate, item, cancelled))
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

    async def _get(self, container_client: Any, gate: asyncio.Semaphore, item: tuple[str, str | None, int],
                   cancelled: Callable[[], bool]) -> Got:
        name, snapshot, size = item
        async with gate:
            if cancelled():
                raise Cancelled()
            if self._limiter is not None:
                await self._limiter.acquire_async(size)
            downloader = await container_client.get_blob_client(name, snapshot=snapshot).download_blob()
            return Got(await downloader.readall(), downloader.properties)

"""Restore's download paths: large response chunks on both clients, small files through the shared asyncio
loop (``blob.asyncget``), and bounds on what a restore costs per file (requests, chunk reads).

Counts are taken on real downloads from the suite's Azurite, never timings.
"""

from __future__ import annotations

import asyncio
import os

from azure.core.pipeline.transport._aiohttp import AioHttpStreamDownloadGenerator
from azure.core.pipeline.transport._requests_basic import StreamDownloadGenerator

from sitebackup.blob.clients import StorageSettings, make_service_client

MIB = 1024 * 1024


def test_both_clients_read_a_download_in_megabyte_chunks_not_4_kib(azurite, blob_service, container_name,
                                                                  monkeypatch):
    data = os.urandom(3 * MIB)
    blob_service.create_container(container_name)
    blob_service.get_blob_client(container_name, "big.bin").upload_blob(data)
    settings = StorageSettings(connection_string=azurite.connection_string)
    chunks: list[int] = []

    next_sync = StreamDownloadGenerator.__next__

    def counted_sync(self):
        chunk = next_sync(self)
        chunks.append(len(chunk))
        return chunk

    monkeypatch.setattr(StreamDownloadGenerator, "__next__", counted_sync)
    client, _label = make_service_client(settings)
    try:
        assert client.get_blob_client(container_name, "big.bin").download_blob().readall() == data
    finally:
        client.close()
    assert 1 <= len(chunks) <= 3, len(chunks)  # 768 reads of 4 KiB each without the setting

    next_async = AioHttpStreamDownloadGenerator.__anext__

    async def counted_async(self):
        chunk = await next_async(self)
        chunks.append(len(chunk))
        return chunk

    monkeypatch.setattr(AioHttpStreamDownloadGenerator, "__anext__", counted_async)
    chunks.clear()

    async def download() -> bytes:
        aio, _label = make_service_client(settings, aio=True)
        async with aio:
            downloader = await aio.get_blob_client(container_name, "big.bin").download_blob()
            return await downloader.readall()

    assert asyncio.run(download()) == data
    # aiohttp hands over what has arrived, up to the chunk size: never more than 4 KiB without the setting
    assert max(chunks) > 4096 and len(chunks) < 3 * MIB // 8192, chunks

"""Restore's download paths: large response chunks on both clients, small files through the shared asyncio
loop (``blob.asyncget``), and bounds on what a restore costs per file (requests, chunk reads).

Counts are taken on real downloads from the suite's Azurite, never timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from azure.core.pipeline.transport._aiohttp import AioHttpStreamDownloadGenerator
from azure.core.pipeline.transport._requests_basic import StreamDownloadGenerator
from azure.storage.blob import ContentSettings
from helpers import ForwardingProxy, replace_blob, write_tree

from sitebackup.blob.asyncget import AsyncGetter
from sitebackup.blob.asyncput import AsyncPutter
from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.blob.history import PRUNED
from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.local.dest import TEMP_SUFFIX
from sitebackup.local.files import b64
from sitebackup.model.work import FetchInput, FetchItem, Listed, PlanInput, RestoreOptions
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.fetch import plan_restore, restore_page
from sitebackup.workflows.pages import PageWriter, read_page

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


def _page_deps(work: Path, azurite, sync_endpoint: str) -> tuple[ActivityDeps, AsyncPutter]:
    """Activity deps on the work store in *work*, whose sync client talks to *sync_endpoint* and whose small
    downloads go through an asyncio getter on the suite's Azurite."""
    putter = AsyncPutter(StorageSettings(connection_string=azurite.connection_string))
    sync_conn = azurite.connection_string.replace(azurite.endpoint, sync_endpoint)
    service, label = make_service_client(StorageSettings(connection_string=sync_conn), quick=True)
    deps = ActivityDeps(container_client=service.get_container_client, work=LocalWorkStore(work),
                        endpoint=label, get_many=AsyncGetter(putter).get_many)
    return deps, putter


def test_a_page_of_small_files_comes_through_the_asyncio_loop_each_checked_against_its_md5(
        tmp_path, azurite, blob_service, container_name):
    files = {f"d{i % 3}/f{i}.txt": os.urandom(4096 + i) for i in range(12)}
    blob_service.create_container(container_name)
    container = blob_service.get_container_client(container_name)
    for name, data in files.items():
        container.upload_blob(name, data)
    # the bytes of one blob change behind a Content-MD5 that still claims the recorded content
    tampered = "d1/f4.txt"
    container.upload_blob(tampered, b"x" * len(files[tampered]), overwrite=True)
    container.get_blob_client(tampered).set_http_headers(
        ContentSettings(content_md5=bytearray(hashlib.md5(files[tampered]).digest())))
    mtime = 1_600_000_000_123_456_789
    items = [FetchItem(name, name, len(data), b64(hashlib.md5(data).digest()), mtime + i)
             for i, (name, data) in enumerate(files.items())]
    # the sync client points at a closed port: every small file must come through the asyncio getter
    deps, putter = _page_deps(tmp_path / "work", azurite, "http://127.0.0.1:9/devstoreaccount1")
    writer = PageWriter(deps.work, "r1")
    writer.write(0, items)
    [index] = writer.close(1)
    (tmp_path / "out").mkdir()
    try:
        result = restore_page(deps, "r1", FetchInput(dest=str(tmp_path / "out"), container=container_name, page=0,
                                                     index=index))
    finally:
        putter.close()

    assert result.counts.files_restored == len(files) - 1, result.failures
    assert result.counts.files_done == len(files)
    assert result.failures == [Listed(tampered, error="downloaded content does not match its Content-MD5")]
    out = tmp_path / "out"
    for item in items:
        path = out / item.path
        if item.path == tampered:
            assert not path.exists()
        else:
            assert path.read_bytes() == files[item.path] and path.stat().st_mtime_ns == item.mtime_ns
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.name.endswith(TEMP_SUFFIX)) == []


def test_a_small_file_without_recorded_times_takes_its_mtime_and_mode_from_its_blobs_metadata(
        tmp_path, azurite, blob_service, container_name):
    # what a restore of the current blobs (no run record) knows of a file: its blob's own metadata, whatever case
    # the service gives the names in; other metadata is not sitebackup's and changes nothing
    blob_service.create_container(container_name)
    container = blob_service.get_container_client(container_name)
    mtime = 1_600_000_000_123_456_789
    container.upload_blob("a.txt", b"a" * 100, metadata={"Mtime_ns": str(mtime), "MODE": "0640", "other": "x"})
    container.upload_blob("b.txt", b"b" * 100, metadata={"other": "0777"})
    items = [FetchItem("a.txt", "a.txt", 100, None, None), FetchItem("b.txt", "b.txt", 100, None, None)]
    deps, putter = _page_deps(tmp_path / "work", azurite, "http://127.0.0.1:9/devstoreaccount1")
    writer = PageWriter(deps.work, "r1")
    writer.write(0, items)
    [index] = writer.close(1)
    out = tmp_path / "out"
    out.mkdir()
    old_umask = os.umask(0o022)
    try:
        result = restore_page(deps, "r1", FetchInput(dest=str(out), container=container_name, page=0, index=index))
    finally:
        os.umask(old_umask)
        putter.close()

    assert result.counts.files_restored == 2, result.failures
    a, b = (out / "a.txt").stat(), (out / "b.txt").stat()
    assert a.st_mtime_ns == mtime and a.st_mode & 0o7777 == 0o640
    assert b.st_mtime_ns != mtime and b.st_mode & 0o7777 == 0o644  # no mode of its own: the default under the umask


class RequestLog(ForwardingProxy):
    """Notes every request as (method, path without its query, query): what a restore costs per file, counted."""

    def __init__(self, target: str):
        self.requests: list[tuple[str, str, str]] = []
        super().__init__(target)

    def intercept(self, request, body):
        path, _, query = request.path.partition("?")
        with self.lock:
            self.requests.append((request.command, path, query))
        return body


def test_a_restore_by_run_id_sends_one_get_per_small_file_and_a_range_per_8_mib(tmp_path, cli, cli_env, azurite,
                                                                                  container_name):
    files = {f"d{i % 4}/f{i:03d}.txt": os.urandom(2000 + i) for i in range(60)}
    files["big.bin"] = os.urandom(9 * MIB)  # over the range size: its properties, then two ranges
    src = write_tree(tmp_path / "site", files)
    proxy = RequestLog(azurite.endpoint)
    env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING":
           azurite.connection_string.replace(azurite.endpoint, proxy.endpoint)}
    try:
        backed = cli(src, "-c", container_name, "--json", env=env)
        assert backed.returncode == 0, backed.stderr
        run_id = json.loads(backed.stdout.splitlines()[-1])["instance_id"]
        proxy.requests.clear()
        restored = cli("restore", run_id, tmp_path / "out", "--json", env=env)
    finally:
        proxy.close()
    assert restored.returncode == 0, restored.stderr
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files
    prefix = urlsplit(proxy.endpoint).path + f"/{container_name}"
    per_blob = Counter(path.removeprefix(prefix + "/") for method, path, _query in proxy.requests
                       if path.startswith(prefix + "/"))
    assert {name: per_blob[name] for name in files if name != "big.bin"} == {n: 1 for n in files if n != "big.bin"}
    assert per_blob["big.bin"] == 3
    # beside the blobs: the container check and one listing of the copies the run's versions are in
    # the run's sealed record aside (tests/performance/test_catalog_requests.py counts it)
    others = [request for request in proxy.requests if not request[1].startswith(prefix + "/")
              and "prefix=.sitebackup%2F" not in request[2]]
    assert len(others) <= 2, others


def test_the_asyncio_path_reads_snapshots_and_falls_back_to_the_kept_copy_as_the_sync_one_does(
        tmp_path, cli, azurite, blob_service, container_name, state_dir):
    src = write_tree(tmp_path / "site", {"x.txt": b"one", "y.txt": b"why", "z.txt": b"zed"})
    backed = cli(src, "-c", container_name, "--json")
    assert backed.returncode == 0, backed.stderr
    run_id = json.loads(backed.stdout.splitlines()[-1])["instance_id"]
    cc = blob_service.get_container_client(container_name)

    replace_blob(cc, "z.txt", b"zzz", keep=True)  # before the plan: planned from its snapshot
    deps, putter = _page_deps(state_dir / "work", azurite, azurite.endpoint)
    try:
        options = RestoreOptions(concurrency=1)
        planned = plan_restore(deps, "r1", PlanInput(container=container_name, run_id=run_id, options=options))
        assert planned.pages == 2 and [(span.first, span.end) for span in planned.tree] == [(1, 2)]  # files, tree
        assert sum(1 for item in read_page(deps.work, "r1", 0, planned.index[0], list[FetchItem]) if item.snapshot) == 1
        replace_blob(cc, "x.txt", b"two", keep=True)  # after it: read from the snapshot kept
        replace_blob(cc, "y.txt", b"not why", keep=False)  # after it, nothing kept: pruned
        (tmp_path / "dest").mkdir()
        out = restore_page(deps, "r1", FetchInput(dest=str(tmp_path / "dest"), container=container_name, page=0,
                                                  index=planned.index[0]))
    finally:
        putter.close()
    assert out.counts.files_restored == 2
    assert (tmp_path / "dest" / "x.txt").read_bytes() == b"one" and (tmp_path / "dest" / "z.txt").read_bytes() == b"zed"
    assert out.failures == [Listed("y.txt", error=PRUNED)]
    assert not (tmp_path / "dest" / "y.txt").exists()

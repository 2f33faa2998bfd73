"""The plain-Python peers sitebackup is measured against, each run by the harness as its own process.

`python benchmarks/peers.py TOOL --src PATH [--container NAME]` with TOOL one of:

- ``threaded`` / ``threaded-md5``: 16 threads, one Put Blob per file (md5: the file's MD5 as Content-MD5);
- ``asyncio`` / ``asyncio-md5``: the async SDK over aiohttp, 32 uploads in flight (md5: each file read once,
  its MD5 sent as Content-MD5: the integrity work sitebackup does on every file);
- ``asyncio-get``: the async SDK, 32 downloads in flight into --src, with sitebackup's restore integrity work:
  each download checked against the blob's Content-MD5, written to a temporary name, given its recorded
  mode and mtime, then renamed into place (the files' blobs: not sitebackup's records beside them);
- ``walk``: a bare ``os.scandir`` + ``stat`` walk of --src (the floor for a scan of the same tree).

Storage comes from ``AZURE_STORAGE_CONNECTION_STRING``. Each peer prints one count line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIB = 1024 ** 2
THREADS = 16
IN_FLIGHT = 32
# one Put Blob per file up to this size: on Azurite requests cost, bytes don't
SINGLE_PUT = 256 * MIB
# downloads up to this size are one GET held in memory; larger ones are fetched in parallel ranges
SINGLE_GET = 8 * MIB
RECORDS = ".sitebackup/"  # where sitebackup keeps its sealed records and job locks in the container
PEERS = ("threaded", "threaded-md5", "asyncio", "asyncio-md5", "asyncio-get", "walk")


def regular_files(src: Path) -> Iterator[tuple[Path, str]]:
    """(path, '/'-separated relative name) of every regular file under *src*; symlinks are not followed."""
    stack = [(os.fspath(src), "")]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                name = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, f"{name}/"))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path), name


def walk(src: Path) -> tuple[int, int]:
    """Files and bytes under *src*: scandir and one stat per file, nothing kept."""
    files = size = 0
    stack = [os.fspath(src)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
    return files, size


def threaded(src: Path, container: str, with_md5: bool = False) -> int:
    """16 threads, one Put Blob per file; *with_md5*: the file's MD5 as its Content-MD5, the integrity
    work sitebackup does on every file (and needs for `verify` and `--checksum`)."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient, ContentSettings

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2 * THREADS))
    service = BlobServiceClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], transport=RequestsTransport(session=session),
        max_single_put_size=SINGLE_PUT)
    client = service.get_container_client(container)

    def put(item: tuple[Path, str]) -> None:
        path, name = item
        settings = None
        if with_md5:
            digest = hashlib.md5()
            with open(path, "rb") as fh:
                while chunk := fh.read(MIB):
                    digest.update(chunk)
            settings = ContentSettings(content_md5=bytearray(digest.digest()))
        with open(path, "rb") as fh:
            client.upload_blob(name, fh, length=os.fstat(fh.fileno()).st_size, overwrite=True, max_concurrency=4,
                               content_settings=settings)

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(1 for _ in pool.map(put, regular_files(src)))


def asyncio_put(src: Path, container: str, with_md5: bool = False) -> int:
    from azure.storage.blob import ContentSettings
    from azure.storage.blob.aio import BlobServiceClient

    async def main() -> int:
        async with BlobServiceClient.from_connection_string(
                os.environ["AZURE_STORAGE_CONNECTION_STRING"], max_single_put_size=SINGLE_PUT) as service:
            client = service.get_container_client(container)
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def put(path: Path, name: str) -> None:
                async with gate:
                    if with_md5:
                        data = path.read_bytes()
                        settings = ContentSettings(content_md5=bytearray(hashlib.md5(data).digest()))
                        await client.upload_blob(name, data, overwrite=True, max_concurrency=4,
                                                 content_settings=settings)
                        return
                    with open(path, "rb") as fh:
                        await client.upload_blob(name, fh, length=os.fstat(fh.fileno()).st_size, overwrite=True,
                                                 max_concurrency=4)

            return len(await asyncio.gather(*(put(p, n) for p, n in regular_files(src))))

    return asyncio.run(main())


def md5_b64(value: bytes | bytearray | str | None) -> str | None:
    """A Content-MD5 as the SDK reports it (bytes for a whole-blob GET, base64 text for a ranged one)."""
    if not value:
        return None
    return value if isinstance(value, str) else base64.b64encode(bytes(value)).decode("ascii")


def fd_md5_b64(fd: int) -> str:
    digest = hashlib.md5()
    offset = 0
    while chunk := os.pread(fd, MIB, offset):
        digest.update(chunk)
        offset += len(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def asyncio_get(dest: Path, container: str) -> int:
    """Restore every blob of *container* under *dest* with the integrity work sitebackup's restore does."""
    from azure.storage.blob.aio import BlobServiceClient

    async def main() -> int:
        async with BlobServiceClient.from_connection_string(
                os.environ["AZURE_STORAGE_CONNECTION_STRING"], max_single_get_size=SINGLE_GET) as service:
            client = service.get_container_client(container)
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def get(name: str, size: int, expected: str | None, meta: dict[str, str]) -> None:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                async with gate:
                    downloader = await client.download_blob(name, max_concurrency=4)
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    try:
                        if size <= SINGLE_GET:
                            data = await downloader.readall()
                            got = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
                            os.write(fd, data)
                        else:
                            with os.fdopen(os.dup(fd), "wb") as fh:
                                await downloader.readinto(fh)
                            got = fd_md5_b64(fd)
                        if got != (expected or md5_b64(downloader.properties.content_settings.content_md5)):
                            raise ValueError(f"{name}: content does not match its Content-MD5")
                        os.fchmod(fd, int(meta.get("mode", "644"), 8) & 0o1777)
                        if "mtime_ns" in meta:
                            mtime = int(meta["mtime_ns"])
                            os.utime(fd, ns=(mtime, mtime))
                    finally:
                        os.close(fd)
                    os.replace(tmp, target)

            blobs = [(b.name, b.size, md5_b64(b.content_settings.content_md5), b.metadata or {})
                     async for b in client.list_blobs(include=["metadata"])
                     if not b.name.startswith(RECORDS)]
            return len(await asyncio.gather(*(get(*blob) for blob in blobs)))

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=PEERS)
    parser.add_argument("--src", type=Path, required=True, help="the tree to upload or walk, or the restore target")
    parser.add_argument("--container")
    args = parser.parse_args()
    if args.tool == "walk":
        files, size = walk(args.src)
        print(f"{files} files {size} bytes")
        return
    run = {"threaded": lambda: threaded(args.src, args.container),
           "threaded-md5": lambda: threaded(args.src, args.container, with_md5=True),
           "asyncio": lambda: asyncio_put(args.src, args.container),
           "asyncio-md5": lambda: asyncio_put(args.src, args.container, with_md5=True),
           "asyncio-get": lambda: asyncio_get(args.src, args.container)}[args.tool]
    print(f"{run()} files")


if __name__ == "__main__":
    main()

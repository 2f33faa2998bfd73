"""The asyncio uploader reads and hashes a file of a quarter MiB or more in a thread, off its event loop,
and a small file on the loop (a thread hop costs more than a few KiB take); every blob still carries the
MD5 of the bytes sent. Real Azurite."""

from __future__ import annotations

import base64
import hashlib
import os
import threading

from sitebackup.blob import asyncput
from sitebackup.blob.asyncput import THREAD_READ_BYTES, AsyncPutter
from sitebackup.blob.clients import StorageSettings


def test_large_reads_leave_the_loop_small_ones_stay(tmp_path, azurite, blob_service, container_name, monkeypatch):
    blob_service.create_container(container_name)
    sizes = {"small-a": 4096, "small-b": THREAD_READ_BYTES - 1, "big-a": THREAD_READ_BYTES, "big-b": 3 * THREAD_READ_BYTES}
    items = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
        items.append((tmp_path / name, f"p/{name}", None, size))
    read_on: dict[str, str] = {}
    real = asyncput.small_file_put

    def recording(path):
        read_on[path.name] = threading.current_thread().name
        return real(path)

    monkeypatch.setattr(asyncput, "small_file_put", recording)
    putter = AsyncPutter(StorageSettings(connection_string=azurite.connection_string))
    try:
        results = putter.put_many(container_name, items)
    finally:
        putter.close()
    loop_thread = "sitebackup-asyncput"  # the thread running the uploader's event loop
    assert not [r for r in results if isinstance(r, BaseException)]
    assert read_on["small-a"] == read_on["small-b"] == loop_thread
    assert loop_thread not in (read_on["big-a"], read_on["big-b"])
    container = blob_service.get_container_client(container_name)
    for name in sizes:
        data = (tmp_path / name).read_bytes()
        props = container.get_blob_client(f"p/{name}").get_blob_properties()
        assert props.size == len(data)
        assert base64.b64encode(props.content_settings.content_md5).decode() == \
            base64.b64encode(hashlib.md5(data).digest()).decode()

"""What a writer of the container can put in front of a restore: each hostile blob or record value fails its own
file, by name, and the rest of the run is restored; nothing a blob claims makes the process read it whole."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

from azure.storage.blob import ContainerClient, ContentSettings
from helpers import run_cli_peak, write_tree

MiB = 1024 * 1024
BIG = 256 * MiB  # what a writer of the container puts behind a record of a few bytes


def summary_of(result) -> dict:
    return json.loads(result.stdout.splitlines()[-1])


def zeros(size: int, chunk: int = 4 * MiB) -> Iterator[bytes]:
    for offset in range(0, size, chunk):
        yield bytes(min(chunk, size - offset))


def put_big_blob(container: ContainerClient, name: str, md5: str) -> None:
    """A BIG blob at *name* whose Content-MD5 claims *md5* (a record's), streamed up, never held in memory."""
    blob = container.get_blob_client(name)
    blob.upload_blob(zeros(BIG), length=BIG, overwrite=True, max_concurrency=1)
    blob.set_http_headers(content_settings=ContentSettings(content_md5=bytearray(base64.b64decode(md5))))


def recorded_md5(container: ContainerClient, name: str) -> str:
    return base64.b64encode(container.get_blob_client(name).get_blob_properties().content_settings.content_md5).decode()


def test_a_blob_larger_than_its_record_is_refused_before_it_is_read(tmp_path, cli, cli_env, blob_service,
                                                                    container_name):
    src = write_tree(tmp_path / "site", {"small.txt": b"twenty bytes of text", "kept.txt": b"version one",
                                         "other.txt": b"restored as it is"})
    first = summary_of(cli(src, "-c", container_name, "--json"))["instance_id"]
    (src / "kept.txt").write_bytes(b"version two")  # the second run keeps version one as a snapshot
    assert cli(src, "-c", container_name).returncode == 0
    env = {**cli_env, "MALLOC_ARENA_MAX": "1"}
    before, baseline = run_cli_peak(["restore", first, tmp_path / "before", "--json"], env, tmp_path / "before.peak")
    assert before.returncode == 0, before.stderr

    container = blob_service.get_container_client(container_name)
    kept_md5 = base64.b64encode(hashlib.md5(b"version one").digest()).decode()
    put_big_blob(container, "small.txt", recorded_md5(container, "small.txt"))  # the current blob, read through the asyncio path
    put_big_blob(container, "kept.txt", kept_md5)  # then kept as the newest snapshot holding version one
    container.get_blob_client("kept.txt").create_snapshot()
    container.upload_blob("kept.txt", b"version two", overwrite=True)

    result, peak = run_cli_peak(["restore", first, tmp_path / "after", "--json"], env, tmp_path / "after.peak")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = {f["path"]: f["error"] for f in summary_of(result)["failures"]}
    assert failed == {"small.txt": f"blob is {BIG} bytes, expected 20", "kept.txt": f"blob is {BIG} bytes, expected 11"}
    assert (tmp_path / "after" / "other.txt").read_bytes() == b"restored as it is"
    assert not (tmp_path / "after" / "small.txt").exists() and not (tmp_path / "after" / "kept.txt").exists()
    assert peak - baseline < BIG / MiB / 4, (baseline, peak)  # MB: nothing of the blobs was read

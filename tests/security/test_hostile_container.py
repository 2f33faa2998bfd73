"""What a writer of the container can put in front of a restore: each hostile blob or record value fails its own
file, by name, and the rest of the run is restored; nothing a blob claims makes the process read it whole."""

from __future__ import annotations

import base64
import hashlib
import json
import os
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


def forge_record(container: ContainerClient, run_id: str, path: str, **changes: object) -> None:
    """Rewrite the sealed record of *run_id* as a writer of the container can: the entry of *path* changed, its page
    stored under its new SHA-256 and the header re-sealed naming it."""
    header_blob = container.get_blob_client(f".sitebackup/runs/{run_id}")
    metadata = header_blob.get_blob_properties().metadata
    header = json.loads(header_blob.download_blob().readall())
    for seal in header["pages"]:  # [page, sha256, size]
        entries = json.loads(container.download_blob(f".sitebackup/records/{header['job']}/{seal[1]}").readall())
        for entry in entries:
            if entry["path"] == path:
                entry.update(changes)
        data = json.dumps(entries).encode()
        seal[1], seal[2] = hashlib.sha256(data).hexdigest(), len(data)
        container.upload_blob(f".sitebackup/records/{header['job']}/{seal[1]}", data, overwrite=True)
    header_blob.upload_blob(json.dumps(header).encode(), overwrite=True, metadata=metadata)


OUT_OF_RANGE = "refused: modification time out of range (not a time a file can have)"


def test_a_modification_time_no_file_can_have_is_refused_by_name_and_the_rest_restored(tmp_path, cli, cli_env,
                                                                                      blob_service, container_name):
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok", "late.txt": b"late", "early.txt": b"early"})
    os.utime(src / "ok.txt", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    run_id = summary_of(cli(src, "-c", container_name, "--json"))["instance_id"]
    container = blob_service.get_container_client(container_name)
    forge_record(container, run_id, "late.txt", mtime_ns=2**70)
    forge_record(container, run_id, "early.txt", mtime_ns=-2**63 - 1)
    # the blobs' own metadata, which a restore of the container's names (no run) reads
    container.get_blob_client("late.txt").set_blob_metadata({"mtime_ns": str(2**63)})
    container.get_blob_client("early.txt").set_blob_metadata({"mtime_ns": str(-10**30)})

    fresh = {**cli_env, "SITEBACKUP_STATE_DIR": str(tmp_path / "new-machine")}
    for args in ([run_id, "--container", container_name], ["--container", container_name]):
        dest = tmp_path / f"out-{len(args)}"
        result = cli("restore", *args, dest, "--json", env=fresh)
        assert result.returncode == 1, result.stdout + result.stderr
        summary = summary_of(result)
        assert {f["path"]: f["error"] for f in summary["failures"]} == {"late.txt": OUT_OF_RANGE,
                                                                        "early.txt": OUT_OF_RANGE}
        assert (summary["files_restored"], summary["files_failed"]) == (1, 2)
        assert sorted(p.name for p in dest.iterdir()) == ["ok.txt"]
        assert (dest / "ok.txt").stat().st_mtime_ns == 1_700_000_000_123_456_789


def test_a_modification_time_no_directory_or_symlink_can_have_is_refused_by_name_and_the_rest_restored(
        tmp_path, cli, cli_env, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok", "d/in.txt": b"in"})
    (src / "empty").mkdir()
    (src / "link").symlink_to("ok.txt")
    run_id = summary_of(cli(src, "-c", container_name, "--json"))["instance_id"]
    container = blob_service.get_container_client(container_name)
    forge_record(container, run_id, "d", mtime_ns=2**70)
    forge_record(container, run_id, "empty", mtime_ns=-2**63 - 1)
    forge_record(container, run_id, "link", mtime_ns=2**64)
    forge_record(container, run_id, ".", mtime_ns=2**63)

    dest = tmp_path / "out"
    result = cli("restore", run_id, "--container", container_name, dest, "--json",
                 env={**cli_env, "SITEBACKUP_STATE_DIR": str(tmp_path / "new")})
    assert result.returncode == 1, result.stdout + result.stderr
    summary = summary_of(result)
    assert {f["path"]: f["error"] for f in summary["failures"]} == {p: OUT_OF_RANGE for p in (".", "d", "empty", "link")}
    assert (summary["files_restored"], summary["dirs_restored"], summary["symlinks_restored"]) == (2, 0, 0)
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*")} == {"ok.txt", "d", "d/in.txt"}

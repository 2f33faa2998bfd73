"""--tier: the access tier set by the upload itself on every upload path, kept in the run record,
checked by verify; archived blobs fail a restore with the rehydration step, not a raw service error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from azure.storage.blob import StandardBlobTier
from helpers import write_tree

MIB = 1024 * 1024
# with --block-size 4: the asyncio uploader, the SDK's chunked upload (over 8 MiB) and block ranges (over 16 MiB)
FILES = {"index.html": b"<html>", "css/site.css": b"body {}", "mid.bin": b"m" * (9 * MIB), "big.bin": b"b" * (17 * MIB)}


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def records_of(state_dir: Path, instance_id: str) -> dict[str, dict]:
    """The run's records of files (its directories' entries have no tier)."""
    return {rec["path"]: rec for page in (state_dir / "work" / instance_id / "results").glob("*.json")
            for rec in json.loads(page.read_text()) if rec.get("kind", "file") == "file"}


def tiers(blob_service, container: str) -> dict[str, str]:
    return {b.name: b.blob_tier for b in blob_service.get_container_client(container).list_blobs()
            if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files


def test_every_upload_path_sets_the_tier_and_the_run_records_it(tmp_path, cli, blob_service, container_name,
                                                                 state_dir):
    src = write_tree(tmp_path / "site", FILES)
    result = cli(src, "-c", container_name, "--tier", "cool", "--block-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    run = summary_of(result)["instance_id"]
    assert tiers(blob_service, container_name) == dict.fromkeys(FILES, "Cool")
    assert {path: rec["tier"] for path, rec in records_of(state_dir, run).items()} == dict.fromkeys(FILES, "Cool")

    # unchanged files keep the tier they were uploaded with, in the blob and in the next run's record
    (src / "index.html").write_bytes(b"<html>v2")
    second = cli(src, "-c", container_name, "--tier", "cold", "--block-size", "4", "--json")
    assert second.returncode == 0, second.stderr
    assert summary_of(second)["files_uploaded"] == 1
    expected = {**dict.fromkeys(FILES, "Cool"), "index.html": "Cold"}
    assert tiers(blob_service, container_name) == expected
    assert {p: r["tier"] for p, r in records_of(state_dir, summary_of(second)["instance_id"]).items()} == expected

    verified = cli("verify", summary_of(second)["instance_id"])
    assert verified.returncode == 0, verified.stderr


def test_without_tier_the_account_default_applies_and_nothing_is_recorded(tmp_path, cli, blob_service,
                                                                         container_name, state_dir):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    run = summary_of(cli(src, "-c", container_name, "--json"))["instance_id"]
    props = blob_service.get_blob_client(container_name, "a.txt").get_blob_properties()
    assert props.blob_tier_inferred  # no tier was sent
    assert "tier" not in records_of(state_dir, run)["a.txt"]


def test_verify_reports_a_blob_whose_tier_differs_from_the_record(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "b.txt": b"b"})
    run = summary_of(cli(src, "-c", container_name, "--tier", "cool", "--json"))["instance_id"]
    blob_service.get_blob_client(container_name, "b.txt").set_standard_blob_tier(StandardBlobTier.HOT)
    result = cli("verify", run, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["files_ok"] == 1
    assert report["mismatches"] == [{"path": "b.txt", "blob": "b.txt", "problem": "blob tier Hot != recorded Cool"}]


def test_archived_blobs_fail_restore_and_download_verify_with_the_rehydration_step(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a" * 100, "big.bin": b"b" * (9 * MIB)})
    run = summary_of(cli(src, "-c", container_name, "--tier", "archive", "--json"))["instance_id"]

    for args in (["restore", run, tmp_path / "by-id"], ["restore", "--container", container_name, tmp_path / "all"]):
        result = cli(*args, "--json")
        assert result.returncode == 1, result.stderr
        summary = summary_of(result)
        assert summary["files_failed"] == 2 and summary["files_restored"] == 0
        for failure in summary["failures"]:
            assert "Archive tier" in failure["error"] and "az storage blob set-tier" in failure["error"]
            assert "--rehydrate-priority" in failure["error"] and "RequestId" not in failure["error"]
        assert not any(p.is_file() for p in (tmp_path / args[-1].name).rglob("*"))  # no partial files left

    plain = cli("restore", run, tmp_path / "plain")
    assert plain.returncode == 1
    assert "FAILED a.txt: blob is in the Archive tier: rehydrate it first" in plain.stderr

    # the service will not overwrite an archived blob either: a changed file fails, named the same way
    (src / "a.txt").write_bytes(b"changed")
    again = cli(src, "-c", container_name, "--tier", "archive", "--json")
    assert again.returncode == 1
    assert [f["path"] for f in summary_of(again)["failures"]] == ["a.txt"]
    assert "rehydrate it first" in summary_of(again)["failures"][0]["error"]

    assert cli("verify", run).returncode == 0  # properties stay readable: present, size, MD5, tier
    download = cli("verify", run, "--download", "--json")
    assert download.returncode == 1
    problems = {m["problem"] for m in json.loads(download.stdout)["mismatches"]}
    assert len(problems) == 1 and "rehydrate it first" in problems.pop()


def test_tier_is_a_choice(tmp_path, cli, container_name):
    result = cli(tmp_path, "-c", container_name, "--tier", "glacier")
    assert result.returncode == 2 and "'glacier' is not one of" in result.stderr

"""`sitebackup check`: every sealed run's record and every copy the runs reference, read from the container alone
(from an empty state directory), with its problems named in one line each and its requests bounded. Real CLI
processes, the embedded backend and a real Azurite."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from azure.storage.blob import BlobServiceClient, ContentSettings
from azurite import KEY
from helpers import RecordingProxy, env_for, run_cli, write_tree

from sitebackup.blob.records import PRUNED, RECORDS, RUNS
from sitebackup.model.codec import decode, encode
from sitebackup.model.records import PruneMark, RunRecord
from sitebackup.ui.escape import printable

V1 = {"index.html": b"<h1>home</h1>", "css/site.css": b"body { color: red }", "img/logo.bin": os.urandom(30_000)}
SITE_CSS_V2 = b"body { color: blue; margin: 0 }"



def page_blob(record: RunRecord, sha256: str) -> str:
    """The blob of a record page: kept per job."""
    return f"{RECORDS}{record.job}/{sha256}"

def backup(cli, src: Path, container: str, *extra: str) -> str:
    result = cli(src, "--container", container, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["instance_id"]


def two_runs(tmp_path: Path, cli, container: str) -> tuple[Path, str, str]:
    """Run 1 of V1; run 2 after css/site.css changed (run 1's version kept as a snapshot)."""
    src = write_tree(tmp_path / "site", V1)
    first = backup(cli, src, container)
    (src / "css" / "site.css").write_bytes(SITE_CSS_V2)
    second = backup(cli, src, container)
    return src, first, second


def check(env: dict[str, str], container: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["check", "-c", container, *extra], env)


def fresh(azurite, tmp_path: Path, name: str = "new-machine", conn: str | None = None) -> dict[str, str]:
    """The environment of a machine with only the credentials: an empty state directory."""
    return env_for(conn or azurite.connection_string, tmp_path / name)


def header(blob_service: BlobServiceClient, container: str, run_id: str) -> RunRecord:
    data = blob_service.get_container_client(container).download_blob(RUNS + run_id).readall()
    return decode(data, RunRecord, run_id)


def pages_of(blob_service: BlobServiceClient, container: str, *runs: str) -> int:
    return sum(len(header(blob_service, container, run).pages) for run in runs)


def test_two_runs_check_whole_from_an_empty_state_directory_reading_only(
        tmp_path, cli, azurite, blob_service, container_name):
    _src, first, second = two_runs(tmp_path, cli, container_name)
    env = fresh(azurite, tmp_path)
    result = check(env, container_name)
    assert result.returncode == 0, result.stderr
    # index.html, img/logo.bin and both versions of css/site.css: four copies, each once
    pages = pages_of(blob_service, container_name, first, second)
    assert result.stdout.strip() == f"{container_name}: 2 runs, {pages} record pages and 4 copies checked: no problems"
    assert result.stderr == ""
    # its temporary database is gone: the state directory it made holds nothing
    assert list((tmp_path / "new-machine").iterdir()) == []
    read = check(env, container_name, "--read-data")
    assert read.returncode == 0 and read.stdout.strip().endswith("4 copies checked, contents read: no problems"), \
        read.stderr


def test_a_prefix_checks_the_runs_whose_names_can_meet_it(tmp_path, cli, azurite, blob_service, container_name):
    run_a = backup(cli, write_tree(tmp_path / "a", {"one.txt": b"one"}), container_name, "--prefix", "web/a")
    run_b = backup(cli, write_tree(tmp_path / "b", {"two.txt": b"two"}), container_name, "--prefix", "web/b")
    blob_service.get_container_client(container_name).delete_blob("web/b/two.txt")
    env = fresh(azurite, tmp_path)
    only_a = check(env, container_name, "--prefix", "web/a", "--json")
    assert only_a.returncode == 0, only_a.stderr
    assert json.loads(only_a.stdout)["runs_checked"] == 1 and json.loads(only_a.stdout)["copies_checked"] == 1
    assert check(env, container_name, "--prefix", "elsewhere").stdout.startswith(f"{container_name}: 0 runs, ")
    both = check(env, container_name, "--prefix", "web/", "--json")
    assert both.returncode == 1
    report = json.loads(both.stdout)
    assert (report["prefix"], report["runs_checked"], report["copies_checked"]) == ("web", 2, 2)
    assert report["problems"] == [{"kind": "MISSING", "what": f"two.txt (run {run_b})", "reason": "blob missing",
                                   "run": run_b, "path": "two.txt", "blob": "web/b/two.txt"}]
    assert run_a not in both.stdout


def test_a_damaged_record_page_is_named_with_its_run_and_the_other_run_is_checked(
        tmp_path, cli, azurite, blob_service, container_name):
    _src, first, second = two_runs(tmp_path, cli, container_name)
    # the page of run 1 that records css/site.css, which changed in run 2
    container = blob_service.get_container_client(container_name)
    record = header(blob_service, container_name, first)
    [seal] = [seal for seal in record.pages
              if b"css/site.css" in container.download_blob(page_blob(record, seal.sha256)).readall()]
    assert seal not in header(blob_service, container_name, second).pages
    # record pages are written once: the test overwrites one behind sitebackup's back
    container.upload_blob(page_blob(record, seal.sha256), b"[]", overwrite=True)
    result = check(fresh(azurite, tmp_path), container_name)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"DAMAGED record page {seal.page} of run {first}: its bytes do not hash as its seal says"]
    # the other pages are read, and their copies checked: all but run 1's version of css/site.css
    pages = pages_of(blob_service, container_name, first, second)
    assert result.stdout.strip() == f"{container_name}: 2 runs, {pages} record pages and 3 copies checked: 1 problem"


def test_a_missing_copy_is_named_with_its_file_and_run(tmp_path, cli, azurite, blob_service, container_name):
    _src, first, second = two_runs(tmp_path, cli, container_name)
    container = blob_service.get_container_client(container_name)
    [kept] = [b for b in container.list_blobs(name_starts_with="css/", include=["snapshots"]) if b.snapshot]
    container.get_blob_client("css/site.css", snapshot=kept.snapshot).delete_blob()  # run 1's version
    container.delete_blob("img/logo.bin")  # both runs' one copy
    result = check(fresh(azurite, tmp_path), container_name)
    assert result.returncode == 1
    # each in name order of the blobs; a copy both runs reference is named with the newest
    assert result.stderr.splitlines() == [
        f"MISSING css/site.css (run {first}): no copy with the recorded Content-MD5 (the blob was overwritten, "
        "or the version pruned)",
        f"MISSING img/logo.bin (run {second}): blob missing"]
    assert result.stdout.strip().endswith("4 copies checked: 2 problems")


def test_read_data_catches_content_that_differs_under_the_recorded_content_md5(
        tmp_path, cli, azurite, blob_service, container_name):
    _src, _first, second = two_runs(tmp_path, cli, container_name)
    blob = blob_service.get_container_client(container_name).get_blob_client("index.html")
    blob.upload_blob(b"x" * len(V1["index.html"]), overwrite=True)
    blob.set_http_headers(ContentSettings(content_md5=bytearray(hashlib.md5(V1["index.html"]).digest())))
    env = fresh(azurite, tmp_path)
    trusting = check(env, container_name)
    assert trusting.returncode == 0, trusting.stderr  # the listing shows the recorded Content-MD5 and size
    result = check(env, container_name, "--read-data")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"DAMAGED index.html (run {second}): blob content does not match the recorded MD5"]


def test_json_counts_problems_and_notes_an_unlisted_header_an_unfinished_prune_and_a_stray_page(
        tmp_path, cli, azurite, blob_service, container_name):
    _src, first, second = two_runs(tmp_path, cli, container_name)
    container = blob_service.get_container_client(container_name)
    # a prune that marked run 1 and stopped before removing its header
    container.upload_blob(PRUNED + first, encode(PruneMark(at="2026-12-07T03:00:00+00:00", container=container_name)))
    # a header whose metadata the catalog cannot list (run 2's record, under another id)
    record = header(blob_service, container_name, second)
    record.run_id = "20261207T030000-\u202egpj.exe"
    container.upload_blob(RUNS + record.run_id, encode(record))
    # a page no header names
    container.upload_blob(page_blob(record, hashlib.sha256(b"[]").hexdigest()), b"[]")
    result = check(fresh(azurite, tmp_path), container_name, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    pages = pages_of(blob_service, container_name, second)
    assert report == {
        "container": container_name, "prefix": "", "read_data": False, "runs_checked": 2, "pages_checked": 2 * pages,
        "copies_checked": 3, "problems_found": 1, "unfinished_prunes": [first], "unreferenced_pages": 1,
        "problems": [{"kind": "UNLISTED", "what": f"run {record.run_id}", "run": record.run_id,
                      "reason": "its header's metadata does not give its job, status, start and finish: list, "
                                "restore --as-of and prune do not see the run"}]}
    # the same in lines: the problem, escaped, on stderr; the notes and the summary on stdout
    text = check(fresh(azurite, tmp_path), container_name)
    assert text.returncode == 1
    assert text.stderr.splitlines() == [printable(f"UNLISTED run {record.run_id}: {report['problems'][0]['reason']}")]
    assert "\u202e" not in text.stderr
    notes = text.stdout.splitlines()
    assert len(notes) == 3 and notes[0].startswith(f"NOTE run {first}: dropped by a prune that did not finish")
    assert notes[1].startswith(f"NOTE 1 record pages under {RECORDS} are named by no header")
    assert notes[2].endswith(": 1 problem")


def test_check_reads_only_and_its_requests_are_bounded_by_the_runs_and_their_distinct_pages(
        tmp_path, cli, azurite, blob_service, container_name):
    src, first, second = two_runs(tmp_path, cli, container_name)
    runs = [first, second, backup(cli, src, container_name), backup(cli, src, container_name)]
    pages = {seal.sha256 for run in runs for seal in header(blob_service, container_name, run).pages}
    assert len(pages) < pages_of(blob_service, container_name, *runs)  # the unchanged runs share their page
    proxy = RecordingProxy(azurite.endpoint)
    try:
        env = fresh(azurite, tmp_path, conn=azurite.connection_string.replace(azurite.endpoint, proxy.endpoint))
        result = check(env, container_name, "--json")
        assert result.returncode == 0, result.stderr
        checked = proxy.requests[:]
        proxy.requests.clear()
        read = check(env, container_name, "--read-data", "--json")
        assert read.returncode == 0, read.stderr
    finally:
        proxy.close()
    report = json.loads(result.stdout)
    assert (report["runs_checked"], report["pages_checked"], report["copies_checked"]) == \
        (4, pages_of(blob_service, container_name, *runs), 4)
    assert {method for method, _path, _headers in checked + proxy.requests} <= {"GET", "HEAD"}
    paths = [path.split("?")[0].split("/", 3)[3] if path.count("/") > 2 else "" for _m, path, _h in checked]
    lists = [path for _m, path, _h in checked if "comp=list" in path]
    # the headers, their metadata (the catalog), the tombstones, the record pages, and the copies: a listing each
    assert len(lists) == 5, lists
    assert sorted(p for p in paths if p.startswith(RUNS)) == sorted(RUNS + run for run in runs)
    record = header(blob_service, container_name, runs[0])
    assert sorted(p for p in paths if p.startswith(RECORDS)) == sorted(page_blob(record, sha) for sha in pages)
    # and the container's properties, once, before anything else
    assert len(checked) == 1 + len(lists) + len(runs) + len(pages), [path for _m, path, _h in checked]
    # --read-data adds a GET per copy, whichever runs share it
    downloads = [path for _m, path, _h in proxy.requests if "comp=list" not in path and ".sitebackup" not in path
                 and path.split("?")[0].count("/") > 2]
    assert len(downloads) == 4, downloads


def test_usage_and_destination_errors_are_one_line_without_the_key(tmp_path, azurite, container_name):
    env = fresh(azurite, tmp_path)
    for args, code in ((["-c", "Bad_Name"], 2), (["-c", container_name], 2)):  # the container was never made
        result = run_cli(["check", *args], env)
        assert result.returncode == code and len(result.stderr.strip().splitlines()) == 1, result.stderr
    closed = azurite.connection_string.replace(azurite.endpoint, "http://127.0.0.1:9/devstoreaccount1")
    unreachable = check(fresh(azurite, tmp_path, conn=closed), container_name)
    assert unreachable.returncode == 3 and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert KEY not in unreachable.stderr + unreachable.stdout

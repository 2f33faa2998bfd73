"""Restore and verify end to end: the real CLI, the embedded durable backend and a real Azurite."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import ContentSettings
from helpers import ROOT, env_for, wait_until, write_tree

from sitebackup.local.dest import TEMP_SUFFIX, UnsafeName, safe_relpath
from sitebackup.local.filters import make_selector
from sitebackup.workflows.window import stream_pages

BIG = 20 * 1024 * 1024  # over storage.SINGLE_PUT_BYTES and restore.RANGE_BYTES: block-range download

TREE = {
    "index.html": b"<html>home</html>",
    "css/site.css": b"body { color: red }",
    "deep/a/b/c/d/e.txt": b"deep" * 1000,
    "empty.txt": b"",
    "deep/empty-too": b"",
    "with space/file name.txt": b"spaces",
    "unicode/ünïcødé-文件.txt": "ünïcødé".encode(),
    "special/a#b%c?d+e.txt": b"special characters",
    "bin/random.bin": os.urandom(300_000),
}


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.splitlines()[-1])


def backup(cli, src: Path, container: str, *extra: str) -> str:
    result = cli(src, "--container", container, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return summary_of(result)["instance_id"]


def tree_of(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """relpath -> (bytes, mtime_ns, permission bits) for every file under *root*."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.stat()
            out[path.relative_to(root).as_posix()] = (path.read_bytes(), st.st_mtime_ns, st.st_mode & 0o7777)
    return out


def make_site(tmp_path: Path, files: dict[str, bytes] = TREE, big: bool = False) -> Path:
    src = write_tree(tmp_path / "site", files)
    if big:
        (src / "large").mkdir()
        (src / "large" / "big.bin").write_bytes(os.urandom(BIG))
    # distinctive mtimes, down to the nanosecond, and a non-default mode
    for i, path in enumerate(sorted(p for p in src.rglob("*") if p.is_file())):
        when = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(path, ns=(when, when))
    os.chmod(src / "css" / "site.css", 0o640)
    return src


def test_round_trip_is_exact_in_names_bytes_mtimes_and_modes(tmp_path, cli, container_name):
    container = container_name
    src = make_site(tmp_path, big=True)
    run_id = backup(cli, src, container)
    dest = tmp_path / "restored"
    result = cli("restore", run_id, dest, "--json")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["runtime_status"] == "COMPLETED"
    assert summary["files_restored"] == summary["files_total"] == len(TREE) + 1
    assert summary["bytes_restored"] == sum(map(len, TREE.values())) + BIG
    assert tree_of(dest) == tree_of(src)
    assert tree_of(dest)["css/site.css"][2] == 0o640
    diff = subprocess.run(["diff", "-r", str(src), str(dest)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr

    # status and list describe the restore as one
    status = cli("status", summary["instance_id"])
    assert status.returncode == 0, status.stderr
    assert f"{len(TREE) + 1}/{len(TREE) + 1} restored" in status.stdout
    assert f"destination:  {dest}" in status.stdout
    rows = {r["instance_id"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows[summary["instance_id"]]["kind"] == "RestoreSiteContent"
    assert rows[summary["instance_id"]]["files"] == len(TREE) + 1

    # the same restore again: every file is identical, so every file is skipped
    again = cli("restore", run_id, dest, "--json")
    assert again.returncode == 0, again.stderr
    assert summary_of(again)["files_skipped"] == len(TREE) + 1
    assert summary_of(again)["files_restored"] == 0

    verify = cli("verify", run_id, "--local", "--download", "--json")
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["files_checked"] == report["files_ok"] == len(TREE) + 1
    assert report["mismatches"] == []


def test_restore_by_container_and_prefix_with_filters(tmp_path, cli, container_name):
    src = make_site(tmp_path)
    backup(cli, src, container_name, "--prefix", "nightly/web")
    dest = tmp_path / "restored"
    result = cli("restore", "--container", container_name, "--prefix", "nightly/web", dest)
    assert result.returncode == 0, result.stderr
    assert tree_of(dest) == tree_of(src)
    assert "files restored" in result.stdout.splitlines()[-1]

    subset = tmp_path / "subset"
    result = cli("restore", "-c", container_name, "--prefix", "nightly/web", subset,
                 "--include", "deep", "--include", "*.css", "--exclude", "empty-too")
    assert result.returncode == 0, result.stderr
    assert sorted(tree_of(subset)) == ["css/site.css", "deep/a/b/c/d/e.txt"]


def test_verify_catches_a_deleted_and_an_overwritten_blob(tmp_path, cli, blob_service, container_name):
    src = make_site(tmp_path)
    run_id = backup(cli, src, container_name)
    assert cli("verify", run_id).returncode == 0
    cc = blob_service.get_container_client(container_name)
    cc.delete_blob("index.html")
    evil = b"body { color: blue }"  # same length, different bytes, honest Content-MD5 for the new bytes
    cc.upload_blob("css/site.css", evil, overwrite=True,
                   content_settings=ContentSettings(content_md5=bytearray(hashlib.md5(evil).digest())))

    result = cli("verify", run_id, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["files_mismatched"] == 2
    assert report["files_ok"] == len(TREE) - 2
    assert sorted(m["path"] for m in report["mismatches"]) == ["css/site.css", "index.html"]

    plain = cli("verify", run_id)
    assert plain.returncode == 1
    assert "MISMATCH index.html: blob missing" in plain.stderr
    assert "MISMATCH css/site.css" in plain.stderr

    # --download re-hashes content: a blob whose Content-MD5 property lies is caught only then
    liar = b"liar" * 1000  # same size as the recorded file
    cc.upload_blob("deep/a/b/c/d/e.txt", liar, overwrite=True)
    # Set Blob Properties stores a Content-MD5 without checking it against the content
    cc.get_blob_client("deep/a/b/c/d/e.txt").set_http_headers(ContentSettings(
        content_md5=bytearray(hashlib.md5(TREE["deep/a/b/c/d/e.txt"]).digest())))
    trusting = json.loads(cli("verify", run_id, "--json").stdout)
    assert {m["path"] for m in trusting["mismatches"]} == {"css/site.css", "index.html"}
    rehashed = json.loads(cli("verify", run_id, "--download", "--json").stdout)
    assert {m["path"] for m in rehashed["mismatches"]} == {"css/site.css", "index.html", "deep/a/b/c/d/e.txt"}
    # and --local notices a changed source file
    (src / "empty.txt").write_bytes(b"no longer empty")
    local = json.loads(cli("verify", run_id, "--local", "--json").stdout)
    assert {m["path"] for m in local["mismatches"]} == {"css/site.css", "index.html", "empty.txt"}


def test_incremental_run_restores_whole_tree_and_an_older_run_restores_its_own_version(tmp_path, cli,
                                                                                      container_name):
    src = make_site(tmp_path)
    before = tree_of(src)
    first = backup(cli, src, container_name)
    (src / "index.html").write_bytes(b"<html>new home</html>")
    second = backup(cli, src, container_name)  # records the other files as unchanged

    dest = tmp_path / "second"
    result = cli("restore", second, dest, "--json")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["files_restored"] == len(TREE)
    assert tree_of(dest) == tree_of(src)
    assert cli("verify", second).returncode == 0

    # the first run recorded the old index.html: the second run kept it as a snapshot before replacing it
    old = tmp_path / "first"
    result = cli("restore", first, old, "--json")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["files_restored"] == len(TREE)
    assert tree_of(old) == before
    assert json.loads(cli("verify", first, "--download", "--json").stdout)["mismatches"] == []


def test_blob_names_that_escape_dest_are_refused_and_the_rest_restored(tmp_path, cli, blob_service, container_name):
    cc = blob_service.get_container_client(container_name)
    cc.create_container()
    crafted = ["/etc/x", "a//b", "../x", "ok/../../x"]
    for name in crafted + ["ok/fine.txt", "top.txt"]:
        try:
            cc.upload_blob(name, b"payload " + name.encode(), overwrite=True)
        except HttpResponseError:  # '..' segments are resolved in the URL before Azurite sees them
            pass
    stored = {b.name for b in cc.list_blobs()}
    refused = {n for n in crafted if n in stored}
    assert "/etc/x" in refused and "a//b" in refused  # Azurite keeps these names as given
    etc_x_before = os.path.exists("/etc/x")

    dest = tmp_path / "jail" / "dest"
    result = cli("restore", "--container", container_name, dest, "--json")
    assert result.returncode == 1, result.stderr
    summary = summary_of(result)
    assert summary["files_restored"] == 2
    assert summary["files_failed"] == len(refused)
    assert {f["path"] for f in summary["failures"]} == refused
    assert all("refused" in f["error"] for f in summary["failures"])
    assert tree_of(dest) == {"ok/fine.txt": (b"payload ok/fine.txt", *tree_of(dest)["ok/fine.txt"][1:]),
                             "top.txt": (b"payload top.txt", *tree_of(dest)["top.txt"][1:])}
    assert not (tmp_path / "jail" / "x").exists() and not (tmp_path / "x").exists()
    assert os.path.exists("/etc/x") == etc_x_before


def test_symlinked_directory_in_dest_is_not_followed(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"sub/f.txt": b"inside"})
    run_id = backup(cli, src, container_name)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    result = cli("restore", run_id, dest, "--json")
    assert result.returncode == 1
    assert summary_of(result)["failures"][0]["path"] == "sub/f.txt"
    assert list(outside.iterdir()) == []


def test_existing_files_are_kept_unless_overwrite(tmp_path, cli, container_name):
    src = make_site(tmp_path)
    run_id = backup(cli, src, container_name)
    dest = write_tree(tmp_path / "dest", {"index.html": b"local edit", "css/site.css": TREE["css/site.css"]})
    result = cli("restore", run_id, dest, "--json")
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["failures"] == [{"path": "index.html", "error": "destination exists and differs (use --overwrite)"}]
    assert summary["files_skipped"] == 1  # css/site.css is identical
    assert summary["files_restored"] == len(TREE) - 2
    assert (dest / "index.html").read_bytes() == b"local edit"

    result = cli("restore", run_id, dest, "--overwrite", "--json")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["files_restored"] == 1
    assert (dest / "index.html").read_bytes() == TREE["index.html"]
    assert tree_of(dest) == {k: v for k, v in tree_of(src).items()} | {"css/site.css": tree_of(dest)["css/site.css"]}


def test_usage_errors_are_one_line(tmp_path, cli, container_name):
    for args in (["restore", "nope-123", tmp_path / "d"], ["verify", "nope-123"],
                 ["restore", "--container", "Bad_Name", tmp_path / "d"],
                 ["restore", "a", "b", "--container", container_name]):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    missing = cli("restore", "--container", container_name, tmp_path / "d")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_restore_killed_with_sigkill_then_rerun_completes_exactly(tmp_path, cli, cli_env, container_name):
    files = {f"d{i % 13}/f{i:04d}.bin": os.urandom(20_000 + i) for i in range(2000)}
    src = write_tree(tmp_path / "site", files)
    run_id = backup(cli, src, container_name)
    dest = tmp_path / "restored"
    args = [sys.executable, "-m", "sitebackup", "restore", run_id, str(dest), "--concurrency", "1", "--json"]
    proc = subprocess.Popen(args, env=cli_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = json.loads(proc.stdout.readline())
        restore_id = start["instance_id"]
        def files_done() -> int:
            status = cli("status", restore_id, "--json")
            custom = json.loads(status.stdout).get("custom_status") or {} if status.returncode == 0 else {}
            return custom.get("files_done", 0) or proc.poll() is not None

        done = wait_until(files_done, "the restore to make progress")
        assert proc.poll() is None, "restore finished before it could be killed; make the tree bigger"
        assert 0 < done < len(files)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()

    result = cli("restore", run_id, dest, "--concurrency", "4", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["resumed"] is True and events[0]["instance_id"] == restore_id
    summary = events[-1]
    assert summary["files_total"] == len(files)
    assert summary["files_restored"] + summary["files_skipped"] == len(files)
    assert summary["files_restored"] > 0  # the killed process left work for the second one
    assert summary["files_failed"] == 0
    assert {k: v[0] for k, v in tree_of(dest).items()} == files
    assert not [p for p in dest.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


# ----------------------------------------------------------------------------- pure logic

@pytest.mark.parametrize("name", ["/etc/x", "a//b", "../x", "a/../b", "a/./b", "a/", "", "a\\b", "a\x00b", "."])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeName):
        safe_relpath(name)


@pytest.mark.parametrize("name", ["a", "a/b/c.txt", "with space/x", "a#b%c?d+e", "ünï/文件", "..a/b..", ".hidden"])
def test_safe_names_pass(name):
    assert safe_relpath(name) == name


def test_selection_patterns():
    def selected(path, include, exclude):
        return make_selector(include, exclude)(path)

    assert selected("css/site.css", [], [])
    assert selected("css/site.css", ["*.css"], [])
    assert not selected("css/site.css", ["*.html"], [])
    assert selected("deep/a/b.txt", ["deep"], [])
    assert selected("deep/a/b.txt", ["deep/a"], [])
    assert not selected("x/deep/a/b.txt", ["/deep/a"], [])
    assert not selected("deep/a/b.txt", [], ["a"])
    assert not selected("logs/x.log", [], ["*.log"])
    assert selected("logs/x.log", ["logs/"], ["*.txt"])


def test_pages_bound_count_and_bytes_and_isolate_big_blobs():
    items = [[f"n{i}", f"n{i}", 10, None, None] for i in range(1000)] + [["big", "big", 64 << 20, None, None]]
    pages = list(stream_pages(items, lambda item: item[2], min_batches=4))
    assert sum(len(p) for p in pages) == 1001
    assert ["big", "big", 64 << 20, None, None] in [p[0] for p in pages if len(p) == 1]
    assert max(len(p) for p in pages) <= 256


@pytest.mark.processes
def test_blob_service_outage_parks_the_restore_exit_3_and_resume_completes(tmp_path):
    from azurite import Azurite, free_port

    server = Azurite(free_port(), tmp_path / "azurite").start()
    try:
        files = {f"d{i % 20:02d}/f{i:05d}.bin": f"{i:08d}".encode() * 256 for i in range(1500)}
        src = write_tree(tmp_path / "site", files)
        # no HTTP retries: the outage outlasts the three batch attempts, so the restore parks
        env = env_for(server.connection_string, tmp_path / "st", SITEBACKUP_STORAGE_RETRIES="0")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "sitebackup", *map(str, args)], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)

        backed = run(src, "-c", "outage", "--json")
        assert backed.returncode == 0, backed.stderr
        run_id = summary_of(backed)["instance_id"]
        dest = tmp_path / "restored"
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", "restore", run_id, str(dest), "--concurrency", "1",
                                 "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            restore_id = json.loads(proc.stdout.readline())["instance_id"]
            for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "progress" and event["phase"] == "restoring" and event["files_done"] > 0:
                    break
            assert event["files_done"] < len(files), "restore finished before the outage; make the tree bigger"
            server.stop()
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 3, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["runtime_status"] == "WAITING" and summary["resumable"] is True
        assert f"sitebackup resume {restore_id}" in summary["error"]
        assert "Traceback" not in err

        server.start()
        resumed = run("resume", restore_id)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "COMPLETED" in resumed.stdout and "files restored" in resumed.stdout
        assert {k: v[0] for k, v in tree_of(dest).items()} == files
    finally:
        server.stop()

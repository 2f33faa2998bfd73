"""Cron-grade backups end to end: incremental runs, filters, dry runs, symlinks, one run at a time, logs.

Uploads are counted from the blob service's side: an upload always gives a blob a new ETag, and
the concurrency test reads a private Azurite's access log (one ``PUT`` line per Put Blob).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from azurite import Azurite, free_port
from helpers import ROOT, write_tree
from privileges import without_root_powers


def etags(blob_service, container: str) -> dict[str, str]:
    return {b.name: b.etag for b in blob_service.get_container_client(container).list_blobs()
            if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files


def summary_of(result: subprocess.CompletedProcess) -> dict:
    event = json.loads(result.stdout.splitlines()[-1])
    assert event["event"] == "summary", result.stdout
    return event


def records_of(state_dir: Path, instance_id: str) -> dict[str, dict]:
    records = {}
    for page in sorted((state_dir / "work" / instance_id / "results").glob("*.json")):
        for record in json.loads(page.read_text()):
            records[record["path"]] = record
    return records


TREE = {f"d{i % 4}/f{i:03d}.txt": f"content {i}".encode() * (i + 1) for i in range(40)}


def test_second_run_skips_unchanged_and_a_change_reuploads_exactly_that_file(tmp_path, cli, blob_service,
                                                                              container_name, state_dir):
    src = write_tree(tmp_path / "site", TREE)
    first = cli(src, "-c", container_name, "--json")
    assert first.returncode == 0, first.stderr
    assert summary_of(first)["files_uploaded"] == 40
    before = etags(blob_service, container_name)
    # read now: once the second run is sealed, the state directory lets its copy of the first run's record go
    first_records = records_of(state_dir, summary_of(first)["instance_id"])

    second = cli(src, "-c", container_name, "--json")
    assert second.returncode == 0, second.stderr
    s = summary_of(second)
    total = sum(len(v) for v in TREE.values())
    assert (s["files_uploaded"], s["bytes_uploaded"], s["files_unchanged"], s["bytes_skipped"]) == (0, 0, 40, total)
    assert s["files_skipped"] == 40 and s["files_failed"] == 0
    assert etags(blob_service, container_name) == before  # nothing was written again
    # the new run's record is complete: unchanged files carry size, mtime and md5 forward
    second_records = records_of(state_dir, s["instance_id"])
    second_files = {path: r for path, r in second_records.items() if r.get("kind", "file") == "file"}
    assert set(second_files) == set(TREE)
    assert {r["kind"] for path, r in second_records.items() if path not in TREE} == {"dir"}  # and the directories
    for path, record in second_files.items():
        assert record["unchanged"] is True
        assert {k: record[k] for k in ("size", "mtime_ns", "md5")} == \
            {k: first_records[path][k] for k in ("size", "mtime_ns", "md5")}

    (src / "d1/f005.txt").write_bytes(b"changed!")
    third = cli(src, "-c", container_name, "--json")
    assert third.returncode == 0, third.stderr
    assert summary_of(third)["files_uploaded"] == 1 and summary_of(third)["files_unchanged"] == 39
    after = etags(blob_service, container_name)
    assert [name for name in after if after[name] != before[name]] == ["d1/f005.txt"]
    assert blob_service.get_container_client(container_name).download_blob("d1/f005.txt").readall() == b"changed!"

    forced = cli(src, "-c", container_name, "--json", "--force")
    assert summary_of(forced)["files_uploaded"] == 40
    assert all(etags(blob_service, container_name)[n] != after[n] for n in after)


def test_checksum_catches_a_same_size_same_mtime_change(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"AAAA", "b.txt": b"BBBB"})
    assert cli(src, "-c", container_name).returncode == 0
    st = os.stat(src / "a.txt")
    (src / "a.txt").write_bytes(b"ZZZZ")
    os.utime(src / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    cc = blob_service.get_container_client(container_name)

    plain = cli(src, "-c", container_name, "--json")
    assert summary_of(plain)["files_uploaded"] == 0  # size and mtime cannot see it
    assert cc.download_blob("a.txt").readall() == b"AAAA"

    checked = cli(src, "-c", container_name, "--json", "--checksum")
    s = summary_of(checked)
    assert (s["files_uploaded"], s["files_unchanged"]) == (1, 1)
    assert cc.download_blob("a.txt").readall() == b"ZZZZ"


def test_filters_and_sitebackupignore(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {
        ".sitebackupignore": b"*.tmp\ncache/\n",
        "index.html": b"i", ".hidden": b"h", "a.tmp": b"t", "keep.tmp": b"k", "cache/x": b"c",
        "sub/cache/y": b"c", "sub/z.bak": b"b", "app/node_modules/m.js": b"m", "app/main.js": b"j",
    })
    (tmp_path / "more").write_text("# backups\n*.bak\n")
    result = cli(src, "-c", container_name, "--exclude", "**/node_modules/", "--include", "keep.tmp",
                 "--exclude-from", tmp_path / "more")
    assert result.returncode == 0, result.stderr
    assert set(etags(blob_service, container_name)) == {".sitebackupignore", "index.html", ".hidden", "keep.tmp",
                                                       "app/main.js"}
    other = "t-" + container_name[2:][::-1]
    unfiltered = cli(src, "-c", other, "--no-ignore-file")
    assert unfiltered.returncode == 0
    assert len(etags(blob_service, other)) == 10


def test_dry_run_writes_nothing(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "b.txt": b"b"})
    fresh = cli(src, "-c", container_name, "--dry-run")
    assert fresh.returncode == 0, fresh.stderr
    assert "would upload a.txt" in fresh.stdout and "2 files would be uploaded" in fresh.stdout
    assert container_name not in [c.name for c in blob_service.list_containers()]  # not even created

    assert cli(src, "-c", container_name).returncode == 0
    before = etags(blob_service, container_name)
    (src / "b.txt").write_bytes(b"bigger")
    (src / "c.txt").write_bytes(b"new")
    dry = cli(src, "-c", container_name, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    events = [json.loads(line) for line in dry.stdout.splitlines()]
    actions = {e["path"]: e["action"] for e in events if e["event"] == "dry_run"}
    assert actions == {"a.txt": "unchanged", "b.txt": "upload", "c.txt": "upload"}
    assert (events[-1]["files_to_upload"], events[-1]["bytes_to_upload"], events[-1]["files_unchanged"]) == (2, 9, 1)
    assert etags(blob_service, container_name) == before


def test_follow_symlinks_survives_a_loop_and_notes_a_fifo(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"real/file.txt": b"data", "top.txt": b"top"})
    outside = write_tree(tmp_path / "outside", {"secret.txt": b"no"})
    (src / "real" / "loop").symlink_to("..")
    (src / "link.txt").symlink_to("top.txt")
    (src / "linkdir").symlink_to("real")
    (src / "escape").symlink_to(outside)
    os.mkfifo(src / "pipe")

    default = cli(src, "-c", container_name, "--json")
    assert default.returncode == 0, default.stderr
    assert set(etags(blob_service, container_name)) == {"real/file.txt", "top.txt"}
    summary = json.loads(default.stdout.splitlines()[-1])
    assert summary["skipped"] == [{"path": "pipe", "reason": "FIFO"}]  # the links are recorded, not followed
    assert summary["symlinks_total"] == 4

    other = "t-" + container_name[2:][::-1]
    followed = cli(src, "-c", other, "--follow-symlinks", timeout=120)
    assert followed.returncode == 0, followed.stderr
    assert set(etags(blob_service, other)) == {"real/file.txt", "top.txt", "link.txt", "linkdir/file.txt"}
    assert "skipped pipe: FIFO" in followed.stdout
    assert "symlink loop" in followed.stdout and "outside the source" in followed.stdout


def test_unreadable_directory_and_file_exit_1_and_the_rest_is_uploaded(tmp_path, cli_env, blob_service,
                                                                         container_name):
    # CI runs as root, who can read anything: the CLI runs without that power so the denial is real
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok", "locked/inner.txt": b"x", "secret.txt": b"s",
                                         "sub/fine.txt": b"f"})
    (src / "locked").chmod(0o000)
    (src / "secret.txt").chmod(0o000)
    try:
        result = subprocess.run([*without_root_powers(), sys.executable, "-m", "sitebackup", str(src),
                                 "-c", container_name], env=cli_env, capture_output=True, text=True,
                                timeout=300, cwd=ROOT)
    finally:
        (src / "locked").chmod(0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED locked: cannot read directory: Permission denied" in result.stderr
    assert "FAILED secret.txt: Permission denied" in result.stderr
    assert set(etags(blob_service, container_name)) == {"ok.txt", "sub/fine.txt"}


@pytest.fixture(scope="module")
def counting_azurite(tmp_path_factory):
    """A private Azurite with its access log on: every request is one line we can count."""
    location = tmp_path_factory.mktemp("azurite-log")
    server = Azurite(free_port(), location, in_memory=True, access_log=True).start()
    yield server, location / "azurite.log"
    server.stop()


def puts_per_blob(log: Path, container: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    pattern = re.compile(rf'"PUT /devstoreaccount1/{container}/([^ ?]+)(\?[^ ]*)? HTTP')
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m and not m.group(1).startswith(".sitebackup"):  # the sealed record aside
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def test_two_concurrent_invocations_never_upload_a_file_twice(tmp_path, cli_env, counting_azurite, container_name):
    server, log = counting_azurite
    files = {f"d{i % 10}/f{i:04d}.bin": os.urandom(64) for i in range(600)}
    src = write_tree(tmp_path / "site", files)
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=server.connection_string)
    cmd = [sys.executable, "-m", "sitebackup", str(src), "-c", container_name, "--concurrency", "4"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = puts_per_blob(log, container_name)
    assert set(counts) == set(files)
    assert max(counts.values()) == 1
    # one ran the backup, the other showed the same run (or, if it came late, found nothing to do)
    ids = [re.search(r"(started|attached to) (\S+):", out).group(2) for out, _ in outputs]
    assert ids[0] == ids[1] or any("0/600 files uploaded" in out for out, _ in outputs), outputs


def test_no_wait_exits_4_with_the_running_id(tmp_path, cli_env, counting_azurite, container_name):
    server, _log = counting_azurite
    files = {f"f{i:05d}.txt": b"x" for i in range(4000)}
    src = write_tree(tmp_path / "site", files)
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=server.connection_string)
    cmd = [sys.executable, "-m", "sitebackup", str(src), "-c", container_name]
    first = subprocess.Popen([*cmd, "--concurrency", "1"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        start_line = first.stdout.readline()
        running_id = re.search(r"started (\S+):", start_line).group(1)
        second = subprocess.run([*cmd, "--no-wait"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 4, second.stdout + second.stderr
        assert running_id in second.stderr and "already running" in second.stderr
        # the hint names a command that follows the run: status --watch draws its bar
        assert f"follow it with: sitebackup status {running_id} --watch" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0


def test_cron_output_quiet_log_file_and_no_control_characters(tmp_path, cli, container_name):
    long_rel = "/".join(["d" * 200] * 6) + "/too-long.txt"
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok", long_rel: b"no"})
    log = tmp_path / "logs" / "backup.log"
    quiet = cli(src, "-c", container_name, "-q", "--log-file", log)
    assert quiet.returncode == 1
    assert quiet.stdout == ""
    assert [line.startswith("FAILED ") for line in quiet.stderr.splitlines()] == [True]
    lines = log.read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "
    assert all(re.match(stamp, line) for line in lines), lines
    assert "started " in lines[0] and "FAILED " in lines[1] and "COMPLETED: 1/2 files uploaded" in lines[2]

    again = cli(src, "-c", container_name)  # plain, no TTY
    assert again.returncode == 1
    assert again.stdout.splitlines()[0].startswith("sitebackup: started ")
    for text in (quiet.stdout, quiet.stderr, again.stdout, again.stderr, log.read_text()):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), repr(text)


def test_prefix_template_is_expanded_once(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    before = datetime.now()
    result = cli(src, "-c", container_name, "--prefix", "snap/{date}/{hostname}")
    assert result.returncode == 0, result.stderr
    [name] = etags(blob_service, container_name)
    import socket
    host = socket.gethostname().split(".")[0]
    dates = {(before + timedelta(seconds=s)).strftime("%Y-%m-%d") for s in (0, 120)}
    assert name in {f"snap/{d}/{host}/a.txt" for d in dates}


def test_the_documented_crontab_lines_work_in_crons_bare_environment(tmp_path, azurite, blob_service, container_name):
    """Each crontab line of docs/cron-systemd.md, run as cron runs it (sh, PATH=/usr/bin:/bin, nothing else of a
    login's environment), backs up with the credentials of the environment file it reads; only the places are
    swapped for the test's: the file, the executable (this checkout), the source, the container and the log."""
    page = (ROOT / "docs" / "cron-systemd.md").read_text(encoding="utf-8")
    lines = [line for line in page.splitlines() if re.match(r"(?:[\d*]+ +){5}\S", line)]
    assert len(lines) == 2
    env_file = tmp_path / "cron.env"
    env_file.write_text(f"AZURE_STORAGE_CONNECTION_STRING='{azurite.connection_string}'\n"
                        f"SITEBACKUP_STATE_DIR='{tmp_path / 'state'}'\n")
    env_file.chmod(0o600)
    exe = tmp_path / "bin" / "sitebackup"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m sitebackup \"$@\"\n")
    exe.chmod(0o755)
    src = write_tree(tmp_path / "www", {"index.html": b"<html>", "css/site.css": b"body {}"})
    swaps = {"/etc/sitebackup/cron.env": str(env_file), "/usr/local/bin/sitebackup": str(exe), " /var/www ": f" {src} ",
             "-c backups ": f"-c {container_name} ", "/var/log/sitebackup.log": str(tmp_path / "sitebackup.log")}
    for line in lines:
        command = re.sub(r"^(?:[\d*]+ +){5}", "", line)
        for old, new in swaps.items():
            command = command.replace(old, new)
        result = subprocess.run(["sh", "-c", command], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                           "SHELL": "/bin/sh", "LOGNAME": "root"},
                                capture_output=True, text=True, timeout=300)
        # -q and prune's >/dev/null: cron mails nothing when all went well
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (command, result)
    host = socket.gethostname().split(".")[0]
    assert sorted(etags(blob_service, container_name)) == [f"web/{host}/css/site.css", f"web/{host}/index.html"]
    assert "COMPLETED" in (tmp_path / "sitebackup.log").read_text()

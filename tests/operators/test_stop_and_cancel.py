"""Stopping and cancelling as an operator does it: SIGTERM (systemd, cron's timeout) or Ctrl-C stops a backup paced
by --bwlimit within 10 s, the process gone, and the next run resumes it exactly; a second Ctrl-C stops at once; a
run whose process was killed is cancelled at once, and the next run does not send again what it recorded.

The 10 s is a correctness bound (systemd's stop timeout, a user's patience), not a speed figure: measured from the
signal to the process's end, on a run whose transfers at the cap would take several times that to finish.

Real processes, a real Azurite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from azure.storage.blob import BlobServiceClient
from helpers import (
    ROOT,
    JsonRun,
    assert_exact,
    env_for,
    many_files,
    run_cli,
    uploading,
    write_tree,
)

from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.errors import EXIT_INTERRUPTED
from sitebackup.local.incremental import overlaid
from sitebackup.local.scan import walk_key
from sitebackup.model.records import FileEntry

MIB = 1024 * 1024
STOP_BOUND_SECONDS = 10.0


def paced_tree(root):
    """Every upload path at once: small files (the asyncio uploader), files the SDK sends in chunks, and files in
    block ranges (with --block-size 4): at 3 MiB/s a couple of minutes of transfers."""
    files = {f"small/s{i}.bin": os.urandom(MIB) for i in range(6)}
    files |= {f"mid/m{i}.bin": os.urandom(9 * MIB) for i in range(3)}
    files |= {f"big/b{i}.bin": os.urandom(24 * MIB) for i in range(2)}
    return write_tree(root, files)


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "start", first
    for line in proc.stdout:  # transfers in flight: the first file done
        event = json.loads(line)
        if event["event"] == "progress" and event["phase"] == "uploading" and event["bytes_done"] > 0:
            return proc, first["instance_id"]
    raise AssertionError(f"the run ended first: {proc.wait()} {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_under_bwlimit_ends_within_10s_and_the_next_run_resumes_exactly(azurite, tmp_path, container_name,
                                                                                sig):
    src = paced_tree(tmp_path / "site")
    env = env_for(azurite.connection_string, tmp_path / "state")
    args = [str(src), "-c", container_name, "--block-size", "4"]
    proc, run_id = start([*args, "--bwlimit", "3M"], env)
    try:
        stopped_at = time.monotonic()
        proc.send_signal(sig)
        try:
            _out, err = proc.communicate(timeout=STOP_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_SECONDS:.0f}s after {sig.name}")
        gone_after = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert gone_after <= STOP_BOUND_SECONDS
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert f"resume with: sitebackup resume {run_id}" in err, err

    again = subprocess.run([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["instance_id"], summary["runtime_status"]) == (run_id, "COMPLETED"), summary
    assert summary["files_failed"] == 0 and summary["files_total"] == 11
    assert_exact(azurite.connection_string, container_name, src)


# a command whose stop would take long, under the CLI's own signal handling: the second Ctrl-C must not wait for it
SLOW_STOP = """
import sys, threading
from sitebackup import cli
with cli.stoppable():
    try:
        print("running", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)
        threading.Event().wait()
"""


@pytest.mark.processes
@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGTERM)])
def test_a_second_ctrl_c_or_sigterm_during_the_stop_ends_the_process_at_once(first, second):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STOP], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "running\n", (line, proc.wait(), proc.stderr.read())
        proc.send_signal(first)
        line = proc.stdout.readline()
        assert line == "stopping\n", (line, proc.wait(), proc.stderr.read())
        proc.send_signal(second)
        _out, err = proc.communicate(timeout=STOP_BOUND_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err == "sitebackup: stopped at once; the run resumes from what was saved\n"


def etags(conn: str, container: str) -> dict[str, str]:
    service = BlobServiceClient.from_connection_string(conn)
    try:
        return {b.name: b.etag for b in service.get_container_client(container).list_blobs()
                if not b.name.startswith(".sitebackup/")}
    finally:
        service.close()


def test_cancel_of_a_killed_run_takes_effect_at_once_and_the_next_run_sends_nothing_it_recorded(
        azurite, tmp_path, container_name):
    src = tmp_path / "site"
    total = len(many_files(src, 1200))
    state = tmp_path / "state"
    env = env_for(azurite.connection_string, state)
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "1"], env)
    try:
        run_id = run.until(lambda e: e["event"] == "start")["instance_id"]
        run.until(uploading(300))
        run.proc.send_signal(signal.SIGKILL)
    finally:
        run.kill()

    cancelled = run_cli(["cancel", run_id], env)
    assert cancelled.returncode == 0 and f"{run_id} cancelled (was RUNNING)" in cancelled.stdout, cancelled.stderr
    info = json.loads(run_cli(["status", run_id, "--json"], env).stdout)
    assert info["runtime_status"] == "CANCELLED", info  # at once: no process works on the run
    assert "CANCELLED" in run_cli(["status", run_id], env).stdout
    [row] = json.loads(run_cli(["list", "--status", "cancelled", "--json"], env).stdout)
    assert (row["instance_id"], row["runtime_status"]) == (run_id, "CANCELLED")

    recorded = {entry.path for entry in LocalWorkStore(state / "work").iter_results(run_id) if entry.stored}
    assert recorded and len(recorded) < total
    before = etags(azurite.connection_string, container_name)

    again = run_cli([str(src), "-c", container_name, "--json"], env)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["instance_id"] != run_id and summary["runtime_status"] == "COMPLETED"
    assert (summary["files_uploaded"], summary["files_unchanged"]) == (total - len(recorded), len(recorded)), summary
    after = etags(azurite.connection_string, container_name)
    assert {path: after[path] for path in recorded} == {path: before[path] for path in recorded}
    assert_exact(azurite.connection_string, container_name, src)


def test_records_overlaid_keep_walk_order_and_each_paths_entry_from_the_newest_run():
    def record(*paths_and_md5s: tuple[str, str]) -> list[FileEntry]:
        return [FileEntry(path, size=1, md5=md5) for path, md5 in paths_and_md5s]

    # walk order: a directory's files, then its subdirectories
    cancelled_later = record(("a/x", "c2"))
    cancelled = record(("b", "c1"), ("b.txt", "c1"), ("a/x", "c1"))
    baseline = record(("b", "b"), ("c", "b"), ("a/x", "b"), ("a/y", "b"))
    merged = list(overlaid([cancelled_later, cancelled, baseline]))
    assert [(e.path, e.md5) for e in merged] == [("b", "c1"), ("b.txt", "c1"), ("c", "b"), ("a/x", "c2"),
                                                 ("a/y", "b")]
    assert [e.path for e in merged] == sorted((e.path for e in merged), key=walk_key)
    assert list(overlaid([baseline])) == baseline


def test_a_killed_backup_is_left_to_its_own_next_run_by_other_commands(azurite, tmp_path, container_name):
    state = tmp_path / "state"
    env = env_for(azurite.connection_string, state)
    other_src = write_tree(tmp_path / "other", {"o.txt": b"other job"})
    other_container = container_name + "-o"
    first_other = run_cli([str(other_src), "-c", other_container, "--json"], env)
    other_run = json.loads(first_other.stdout.splitlines()[0])["instance_id"]

    src = tmp_path / "site"
    total = len(many_files(src, 1200))
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "1"], env)
    try:
        killed = run.until(lambda e: e["event"] == "start")["instance_id"]
        run.until(uploading(100))
        run.proc.send_signal(signal.SIGKILL)
    finally:
        run.kill()
    done_at_kill = json.loads(run_cli(["status", killed, "--json"], env).stdout)["custom_status"]["files_done"]

    # another job's backup, and a restore, each host a worker: neither takes the killed run's work, both say so
    (other_src / "p.txt").write_bytes(b"more")
    for args in ([str(other_src), "-c", other_container], ["restore", other_run, str(tmp_path / "restored")]):
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr
        [note] = [line for line in result.stderr.splitlines() if killed in line]
        assert note.startswith("sitebackup: note: left for their own commands: 1 unfinished run(s)"), note
        info = json.loads(run_cli(["status", killed, "--json"], env).stdout)
        assert info["runtime_status"] == "RUNNING" and info["worker_attached"] is False, info
        assert info["custom_status"]["files_done"] == done_at_kill
    assert (tmp_path / "restored" / "o.txt").read_bytes() == b"other job"

    # its own next run resumes it
    again = run_cli([str(src), "-c", container_name, "--json"], env)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["instance_id"], summary["runtime_status"], summary["files_total"]) == (killed, "COMPLETED", total)
    assert_exact(azurite.connection_string, container_name, src)

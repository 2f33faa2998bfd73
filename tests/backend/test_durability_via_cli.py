"""Durability through the real CLI: SIGKILL mid-backup and resume, status from another process,
list, cancel and purge, all against the embedded backend and a real Azurite."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

from helpers import ROOT, read_blobs, wait_until, write_tree


def tree_of(n_dirs: int, per_dir: int, size: int) -> dict[str, bytes]:
    return {f"d{d:02d}/f{i:04d}.bin": os.urandom(size) for d in range(n_dirs) for i in range(per_dir)}


def start_backup(src, container, env, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "--container", container, "--json", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    start = json.loads(proc.stdout.readline())
    assert start["event"] == "start", start
    return proc, start["instance_id"]


def status_json(cli, instance_id) -> dict:
    result = cli("status", instance_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def etags(blob_service, container) -> dict[str, str]:
    return {b.name: b.etag for b in blob_service.get_container_client(container).list_blobs()
            if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files


def test_sigkill_mid_backup_then_resume_completes_without_redoing_finished_batches(
        tmp_path, cli, cli_env, blob_service, container_name):
    files = tree_of(10, 500, 4096)
    src = write_tree(tmp_path / "site", files)
    proc, instance_id = start_backup(src, container_name, cli_env, "--concurrency", "2")
    try:
        # status from a second process while the backup runs: RUNNING, counters that increase
        first = wait_until(lambda: (s := status_json(cli, instance_id))["custom_status"]
                         and s["custom_status"]["files_done"] > 0 and s)
        assert first["runtime_status"] == "RUNNING"
        assert first["worker_attached"] is True
        later = wait_until(lambda: (s := status_json(cli, instance_id))["custom_status"]["files_done"]
                         > max(first["custom_status"]["files_done"], 600) and s)
        assert later["runtime_status"] == "RUNNING"
        assert later["custom_status"]["bytes_done"] > first["custom_status"]["bytes_done"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = etags(blob_service, container_name)
    assert 0 < len(before) < len(files)
    # the dead process's leases are released at once: status says nobody works on it
    orphan = status_json(cli, instance_id)
    assert orphan["runtime_status"] == "RUNNING" and orphan["worker_attached"] is False
    assert f"no worker attached; resume with: sitebackup resume {instance_id}" in cli("status", instance_id).stdout

    result = cli("resume", instance_id, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["runtime_status"] == "COMPLETED"
    assert summary["files_total"] == len(files)
    assert summary["bytes_total"] == sum(len(v) for v in files.values())
    assert summary["files_failed"] == 0

    after = etags(blob_service, container_name)
    assert set(after) == set(files)
    stored = read_blobs(blob_service.get_container_client(container_name), files)
    for name, data in files.items():
        assert stored[name].data == data, name
        assert stored[name].content_md5 == hashlib.md5(data).digest(), name
    # only the pages in flight at the kill (window of 2 batches of at most 256 files) ran again
    redone = [name for name, tag in before.items() if after[name] != tag]
    assert len(redone) <= 2 * 256, len(redone)
    assert len(before) - len(redone) >= 256


def test_status_unknown_id_is_one_line_exit_2(cli):
    result = cli("status", "no-such-run")
    assert result.returncode == 2
    assert "no-such-run" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_status_list_and_purge_after_a_run(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "b/c.txt": b"cc"})
    run = cli(src, "--container", container_name, "--json")
    assert run.returncode == 0, run.stderr
    instance_id = json.loads(run.stdout.splitlines()[0])["instance_id"]

    info = status_json(cli, instance_id)
    assert info["runtime_status"] == "COMPLETED"
    assert info["output"]["files_uploaded"] == 2 and info["custom_status"]["files_done"] == 2
    for key in ("instance_id", "runtime_status", "custom_status", "output", "created_at", "last_updated_at"):
        assert key in info
    text = cli("status", instance_id)
    assert text.returncode == 0 and "COMPLETED" in text.stdout and str(src) in text.stdout

    rows = json.loads(cli("list", "--json").stdout)
    assert [r["instance_id"] for r in rows] == [instance_id]
    assert rows[0]["files"] == 2 and rows[0]["bytes"] == 3
    assert json.loads(cli("list", "--json", "--status", "RUNNING").stdout) == []
    assert instance_id in cli("list").stdout

    kept = cli("purge", "--older-than", "1d")
    assert kept.returncode == 0 and "purged 0" in kept.stdout
    # a completed backup is left to `prune`: purge never makes a run prune keeps unrestorable
    left = cli("purge", "--older-than", "0s")
    assert left.returncode == 0 and "purged 0" in left.stdout and "kept 1 completed backup" in left.stdout
    assert cli("status", instance_id).returncode == 0
    assert cli("purge", "--older-than", "soon").returncode == 2


def test_cancel_stops_a_running_backup(tmp_path, cli, cli_env, blob_service, container_name):
    files = tree_of(4, 500, 1024)
    src = write_tree(tmp_path / "site", files)
    proc, instance_id = start_backup(src, container_name, cli_env, "--concurrency", "1")
    try:
        wait_until(lambda: (s := status_json(cli, instance_id))["custom_status"] and s["custom_status"]["files_done"])
        result = cli("cancel", instance_id)
        assert result.returncode == 0 and "cancelled" in result.stdout
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(out.splitlines()[-1])
    assert summary["runtime_status"] == "CANCELLED"
    assert proc.returncode == 7  # cancelled
    assert status_json(cli, instance_id)["runtime_status"] == "CANCELLED"
    assert len(etags(blob_service, container_name)) < len(files)
    again = cli("cancel", instance_id)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_ctrl_c_stops_cleanly_exits_130_and_the_run_resumes(tmp_path, cli, cli_env, blob_service, container_name):
    files = tree_of(6, 400, 2048)
    src = write_tree(tmp_path / "site", files)
    proc, instance_id = start_backup(src, container_name, cli_env, "--concurrency", "2")
    try:
        wait_until(lambda: (s := status_json(cli, instance_id))["custom_status"] and s["custom_status"]["files_done"])
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"resume with: sitebackup resume {instance_id}" in err
    assert "Traceback" not in err
    info = status_json(cli, instance_id)
    assert info["runtime_status"] == "RUNNING" and info["worker_attached"] is False

    result = cli("resume", instance_id, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["files_uploaded"] == len(files)
    assert set(etags(blob_service, container_name)) == set(files)

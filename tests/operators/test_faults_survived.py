"""Faults a backup must survive, each against real processes: the blob service going away,
throttling, files changing or vanishing under the upload, SIGKILL, unusable state directories
and credentials that expire mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from azure.storage.blob import (
    BlobServiceClient,
)
from azurite import ACCOUNT, Azurite, free_port
from helpers import (
    ROOT,
    ForwardingProxy,
    JsonRun,
    account_sas_url,
    assert_exact,
    assert_nothing_leaks,
    env_for,
    many_files,
    run_cli,
    secret_forms,
    uploading,
    wait_until,
    write_tree,
)


@pytest.fixture
def own_azurite(tmp_path: Path):
    """An Azurite this test may stop and start again (same port, same data)."""
    server = Azurite(free_port(), tmp_path / "azurite").start()
    yield server
    server.stop()


# ---------------------------------------------------------------- the blob service goes away


@pytest.mark.processes
def test_short_outage_is_retried_and_the_run_completes_exact(own_azurite, tmp_path):
    src = tmp_path / "site"
    many_files(src, 1500)  # enough that the run is still uploading when Azurite goes away
    env = env_for(own_azurite.connection_string, tmp_path / "state")
    run = JsonRun([str(src), "-c", "outage", "--concurrency", "2"], env)
    try:
        run.until(uploading(20))
        own_azurite.stop()
        time.sleep(3)
        own_azurite.start()
        code, summary, err = run.finish()
    finally:
        run.kill()
    assert code == 0, err
    assert summary["runtime_status"] == "COMPLETED"
    assert summary["files_uploaded"] == 1500 and summary["files_failed"] == 0
    assert_exact(own_azurite.connection_string, "outage", src)


@pytest.mark.processes
def test_long_outage_ends_resumable_with_exit_3_and_resume_completes(own_azurite, tmp_path):
    src = tmp_path / "site"
    many_files(src, 1500)
    state = tmp_path / "state"
    # no HTTP retries: the outage outlasts the limit after the three batch attempts (5 s + 10 s apart)
    env = env_for(own_azurite.connection_string, state, SITEBACKUP_STORAGE_RETRIES="0")
    run = JsonRun([str(src), "-c", "outage", "--concurrency", "2"], env)
    try:
        start = run.until(lambda e: e["event"] == "start")
        run.until(uploading(20))
        own_azurite.stop()
        code, summary, err = run.finish()
    finally:
        run.kill()
    assert code == 3, err
    assert summary["runtime_status"] == "WAITING" and summary["resumable"] is True
    assert f"cannot reach the blob service at {own_azurite.endpoint}" in summary["error"]
    assert f"sitebackup resume {start['instance_id']}" in summary["error"]
    assert "Traceback" not in err

    shown = run_cli(["status", start["instance_id"], "--json"], env)
    status = json.loads(shown.stdout)
    assert status["runtime_status"] == "RUNNING"  # parked, not FAILED
    assert status["custom_status"]["phase"] == "waiting-destination"
    assert own_azurite.endpoint in status["custom_status"]["error"]

    own_azurite.start()
    resumed = run_cli(["resume", start["instance_id"]], env_for(own_azurite.connection_string, state))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{start['instance_id']} COMPLETED: 1500/1500 files uploaded" in resumed.stdout
    assert_exact(own_azurite.connection_string, "outage", src)


# ---------------------------------------------------------------- throttling


class ThrottlingProxy(ForwardingProxy):
    """Answers every *nth* PUT with 503 ServerBusy or 500 OperationTimedOut; with *damage*, it instead
    flips one byte in the body of every blob's first upload request."""

    def __init__(self, upstream: str, nth: int = 0, damage: bool = False):
        self.nth, self.damage = nth, damage
        self.puts = self.throttled = 0
        self.damaged: set[str] = set()
        super().__init__(upstream)
        self.port = self.server.server_address[1]

    def intercept(self, request, body):
        if request.command != "PUT":
            return body
        blob = request.path.split("?")[0]
        with self.lock:
            self.puts += 1
            busy = bool(self.nth) and self.puts % self.nth == 0
            if self.damage and body and blob not in self.damaged:
                self.damaged.add(blob)
                body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 1]) + body[len(body) // 2 + 1:]
            if busy:
                self.throttled += 1
                status, code = (503, "ServerBusy") if self.throttled % 2 else (500, "OperationTimedOut")
        if busy:
            request.reply_error(status, code)
            return None
        return body


def test_throttling_is_retried_with_backoff_and_no_file_is_lost(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 150)
    proxy = ThrottlingProxy(f"http://127.0.0.1:{azurite.port}", nth=12)
    try:
        conn = azurite.connection_string.replace(f":{azurite.port}/", f":{proxy.port}/")
        result = run_cli([str(src), "-c", container_name, "--concurrency", "8"], env_for(conn, tmp_path / "state"))
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert proxy.throttled >= 10  # the retries really happened
    assert "COMPLETED: 150/150 files uploaded" in result.stdout
    assert_exact(azurite.connection_string, container_name, src)


def test_a_body_damaged_on_the_way_is_refused_and_sent_again_never_stored(azurite, tmp_path, container_name):
    """Every upload carries the MD5 of the bytes read: a flipped byte in flight fails that request
    (400 Md5Mismatch), the file goes again, and what is stored is byte-exact."""
    src = tmp_path / "site"
    many_files(src, 40)
    proxy = ThrottlingProxy(f"http://127.0.0.1:{azurite.port}", damage=True)
    try:
        conn = azurite.connection_string.replace(f":{azurite.port}/", f":{proxy.port}/")
        result = run_cli([str(src), "-c", container_name], env_for(conn, tmp_path / "state"))
    finally:
        proxy.close()
    assert len(proxy.damaged) >= 40  # every file's first request really was damaged
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED: 40/40 files uploaded" in result.stdout
    assert_exact(azurite.connection_string, container_name, src)


# ---------------------------------------------------------------- files moving under the upload


def results_of(state: Path) -> dict[str, dict]:
    records = {}
    for path in (state / "work").glob("*/results/*.json"):
        for record in json.loads(path.read_text()):
            records[record["path"]] = record
    return records


def test_file_changing_during_upload_is_retried_once_then_failed_never_recorded(azurite, tmp_path,
                                                                               container_name):
    src = tmp_path / "site"
    write_tree(src, {"stable.txt": b"stable", "big.bin": os.urandom(12 * 1024 * 1024)})
    state = tmp_path / "state"
    stop = threading.Event()

    def touch_forever():
        # a log file being appended to: its mtime moves all the time
        n = 0
        while not stop.is_set():
            n += 1
            os.utime(src / "big.bin", ns=(n * 1_000_000_000, n * 1_000_000_000))
            time.sleep(0.002)

    toucher = threading.Thread(target=touch_forever, daemon=True)
    toucher.start()
    try:
        result = run_cli([str(src), "-c", container_name], env_for(azurite.connection_string, state))
    finally:
        stop.set()
        toucher.join()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED big.bin: changed during backup" in result.stderr
    assert "Traceback" not in result.stderr
    records = results_of(state)
    # nothing stored for it: no size, MD5 or ETag; its mode and owner are recorded as for any entry
    assert {k: v for k, v in records["big.bin"].items() if k not in ("mode", "uid", "gid", "user", "group")} == \
        {"path": "big.bin", "error": "changed during backup"}
    assert records["stable.txt"]["size"] == 6
    # a second run, with the file at rest, backs it up
    again = run_cli([str(src), "-c", container_name], env_for(azurite.connection_string, state))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_exact(azurite.connection_string, container_name, src)


def test_file_deleted_between_scan_and_upload_is_reported_not_fatal(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 1000)
    state = tmp_path / "state"
    victim = src / "d19" / "f00999.bin"  # in the last page: uploaded last
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "1"], env_for(azurite.connection_string, state))
    try:
        run.until(lambda e: e["event"] == "progress" and e.get("phase") == "uploading")
        victim.unlink()
        code, summary, err = run.finish()
    finally:
        run.kill()
    assert code == 1, err
    assert summary["runtime_status"] == "COMPLETED"
    assert summary["files_uploaded"] == 999 and summary["files_failed"] == 1
    assert summary["failures"] == [{"path": "d19/f00999.bin", "error": "No such file or directory"}]
    assert_exact(azurite.connection_string, container_name, src)


# ---------------------------------------------------------------- SIGKILL


def kill_at(args: list[str], env: dict[str, str], predicate, last: bool = False):
    """SIGKILL the command at the first event matching *predicate*; its run id (or that event, *last*)."""
    run = JsonRun(args, env)
    try:
        start = run.until(lambda e: e["event"] == "start")
        event = start if predicate(start) else run.until(predicate)
        run.proc.send_signal(signal.SIGKILL)
    finally:
        run.kill()
    return event if last else start["instance_id"]


def test_sigkill_loop_at_every_phase_then_rerun_completes_exact(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 2000)
    (src / "big.bin").write_bytes(os.urandom(40 * 1024 * 1024))  # uploaded as block ranges, then committed
    state = tmp_path / "state"
    env = env_for(azurite.connection_string, state)
    args = [str(src), "-c", container_name, "--concurrency", "2"]
    instance_id = kill_at(args, env, lambda e: e["event"] == "start")  # scheduling, before or while scanning
    done, kills = 0, 1
    # then each rerun is killed at its first progress past the last kill: a little further each time
    while kills < 6:
        try:
            event = kill_at(args, env, lambda e, after=done: e["event"] == "progress" and e["files_done"] > after,
                            last=True)
        except AssertionError:
            break  # the run finished before the next kill: nothing left to interrupt
        done, kills = event["files_done"], kills + 1
    assert kills >= 4 and done > 0
    # every rerun of the same command resumed the same run; `resume` completes it
    again = run_cli(["resume", instance_id], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{instance_id} COMPLETED: 2001/2001 files uploaded" in again.stdout
    assert_exact(azurite.connection_string, container_name, src)


# ---------------------------------------------------------------- unusable state directory


def test_read_only_state_directory_is_a_clear_error_before_any_work(azurite, tmp_path, container_name,
                                                                   mount_point):
    # CI runs as root, for whom chmod changes nothing: a read-only mount refuses even root
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)], check=True)
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    result = run_cli([str(src), "-c", container_name], env_for(azurite.connection_string, mount_point))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"cannot use state directory {mount_point}" in result.stderr and "--state-dir" in result.stderr
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    # the pre-flight may have created the container, but nothing was uploaded
    client = service.get_container_client(container_name)
    assert not client.exists() or not list(client.list_blobs())


def test_full_state_disk_is_a_clear_error(azurite, tmp_path, container_name, mount_point):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=True)
    (mount_point / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
    try:
        (mount_point / "filler2").write_bytes(b"\0" * 8192)
    except OSError:
        pass
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    result = run_cli([str(src), "-c", container_name], env_for(azurite.connection_string, mount_point / "state"))
    assert result.returncode == 5, result.stdout + result.stderr  # state-full, as when the disk fills mid-run
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr or "full" in result.stderr
    assert "--state-dir" in result.stderr


# ---------------------------------------------------------------- credentials expiring mid-run


def test_expired_sas_stops_with_exit_3_and_resume_with_fresh_sas_completes(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 400, size=512)
    state = tmp_path / "state"
    # long enough for a loaded machine to start the run (it must start before the SAS expires)
    lifetime = 20
    expiry = time.monotonic() + lifetime
    url, sas = account_sas_url(azurite.port, timedelta(seconds=lifetime))
    env = env_for(None, state, AZURE_STORAGE_ACCOUNT_URL=url)
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "-c", container_name, "--concurrency", "1",
                             "--log-file", str(tmp_path / "run.log")], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # freeze the whole run while uploading until the SAS has expired: no race with a fast machine
        log = tmp_path / "run.log"
        wait_until(lambda: (log.exists() and "started" in log.read_text()) or proc.poll() is not None,
                   "the run to start")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(max(0.0, expiry - time.monotonic()) + 1.5)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"authentication failed at http://127.0.0.1:{azurite.port}/{ACCOUNT}" in result.stderr
    assert "resume with: sitebackup resume" in result.stderr and "Traceback" not in result.stderr
    instance_id = result.stderr.split("sitebackup resume ")[1].split()[0]

    fresh, _ = account_sas_url(azurite.port, timedelta(hours=1))
    resumed = run_cli(["resume", instance_id], env_for(None, state, AZURE_STORAGE_ACCOUNT_URL=fresh))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "COMPLETED: 400/400 files uploaded" in resumed.stdout
    assert_exact(azurite.connection_string, container_name, src)
    # the failure details the orchestration keeps, and all output, hold neither SAS
    assert_nothing_leaks(secret_forms(url, sas, fresh), [result.stdout, result.stderr, resumed.stdout,
                                                         resumed.stderr], [state])

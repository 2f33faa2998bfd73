"""Scale-out through the Durable Task Scheduler code path, for real, on one machine.

``sitebackup serve`` serves the embedded backend on loopback TCP; ``sitebackup worker`` processes and
the CLI reach it through ``--taskhub "Endpoint=http://...;Authentication=None"``, i.e. through
durabletask-azuremanaged's ``DurableTaskSchedulerWorker``/``Client`` and the ``taskhub`` header.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_tree
from sitebackup.taskhub import parse
from sitebackup.workstore import RESERVED_PREFIX

WAIT = 120  # generous bound for slow shared machines; never asserted on


def _spawn(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "sitebackup", *args], env=env, cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, text=True)


def _until(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"gave up waiting for {what}")


@pytest.fixture
def served(tmp_path: Path, cli_env: dict[str, str]):
    """A `sitebackup serve` process on a free loopback port with short leases; yields (address, state_dir)."""
    state = tmp_path / "served-state"
    out = tmp_path / "serve.out"
    proc = _spawn(["serve", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--lease-seconds", "2"],
                  cli_env, out)
    try:
        def address():
            assert proc.poll() is None, out.read_text()
            lines = [ln for ln in out.read_text().splitlines() if ln.startswith("127.0.0.1:")]
            return lines[0] if lines else None
        yield _until(address, "serve to listen"), state
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()


def _hub(address: str, name: str = "default") -> str:
    return f"Endpoint=http://{address};TaskHub={name};Authentication=None"


def _streams(state: Path, hub: str) -> int:
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT COUNT(*) FROM streams WHERE taskhub=?", (hub,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _batches(out: Path) -> int:
    return sum(1 for ln in out.read_text().splitlines() if ln.startswith("batch "))


def _tree(root: Path, n: int, size: int) -> dict[str, bytes]:
    files = {f"d{i % 7}/f{i:04d}.bin": os.urandom(size) for i in range(n)}
    files["reserved/.sitebackup/kept.txt"] = b"not at the container root: an ordinary file"
    write_tree(root, files)
    return files


def _assert_exact(blob_service, container: str, files: dict[str, bytes]) -> None:
    client = blob_service.get_container_client(container)
    names = {b.name for b in client.list_blobs() if not b.name.startswith(RESERVED_PREFIX)}
    assert names == set(files)
    for name, data in files.items():
        blob = client.get_blob_client(name)
        assert blob.download_blob().readall() == data, name
        assert bytes(blob.get_blob_properties().content_settings.content_md5) == hashlib.md5(data).digest(), name


def _workers(tmp_path: Path, env: dict[str, str], hub: str, n: int) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for i in range(n):
        out = tmp_path / f"worker{i}.out"
        # each worker gets its own state dir: nothing but the task hub and the storage account is shared
        procs.append((_spawn(["worker", "--taskhub", hub, "--concurrency", "2",
                              "--state-dir", str(tmp_path / f"w{i}")], env, out), out))
    return procs


def test_two_workers_share_one_backup(tmp_path, served, cli_env, cli, blob_service, container_name):
    address, state = served
    files = _tree(tmp_path / "site", 160, 3000)
    workers = _workers(tmp_path, cli_env, _hub(address), 2)
    try:
        _until(lambda: _streams(state, "default") >= 2, "both workers to connect")
        result = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(address),
                     "--no-local-worker", "--concurrency", "4", "--json", "--state-dir", tmp_path / "cli-state")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["runtime_status"] == "COMPLETED"
        assert summary["files_uploaded"] == len(files)
    finally:
        for proc, _ in workers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc, _ in workers]
    counts = [_batches(out) for _, out in workers]
    assert codes == [0, 0], [out.read_text()[-2000:] for _, out in workers]
    assert all(c >= 1 for c in counts), counts
    _assert_exact(blob_service, container_name, files)


def test_a_killed_worker_leaves_its_work_to_the_other(tmp_path, served, cli_env, cli, blob_service,
                                                      container_name):
    address, state = served
    files = _tree(tmp_path / "site", 120, 64 * 1024)
    (victim, victim_out), (survivor, survivor_out) = _workers(tmp_path, cli_env, _hub(address), 2)
    try:
        _until(lambda: _streams(state, "default") >= 2, "both workers to connect")
        started = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(address),
                      "--no-local-worker", "--detach", "--concurrency", "4", "--state-dir", tmp_path / "cli-state")
        assert started.returncode == 0, started.stderr
        instance_id = started.stdout.strip()
        _until(lambda: _batches(victim_out) >= 1, "the victim to finish a batch")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)

        def done():
            state_ = client.get_orchestration_state(instance_id)
            return state_ if state_.runtime_status.name in ("COMPLETED", "FAILED", "TERMINATED") else None

        from durabletask.azuremanaged.client import DurableTaskSchedulerClient
        hub = parse(_hub(address))
        client = DurableTaskSchedulerClient(host_address=hub.host_address, taskhub=hub.taskhub,
                                            token_credential=None, secure_channel=False)
        try:
            final = _until(done, "the survivor to finish the backup")
        finally:
            client.close()
        assert final.runtime_status.name == "COMPLETED"
        output = final.get_output()
        assert output["files_uploaded"] == len(files) and output["files_failed"] == 0
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=60) == 0, survivor_out.read_text()[-2000:]
    assert _batches(survivor_out) >= 1
    _assert_exact(blob_service, container_name, files)


def test_task_hubs_do_not_see_each_others_instances(tmp_path, served, cli, container_name):
    address, _ = served
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    started = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(address, "alpha"),
                  "--no-local-worker", "--detach", "--json", "--state-dir", tmp_path / "cli-state")
    assert started.returncode == 0, started.stderr
    event = json.loads(started.stdout.splitlines()[0])
    assert event["event"] == "start"
    instance_id = event["instance_id"]

    from sitebackup.runtime import open_backend

    seen = {}
    for name in ("alpha", "beta"):
        with open_backend(tmp_path / "unused", parse(_hub(address, name))) as runtime:
            client = runtime.client()
            try:
                seen[name] = client.get_orchestration_state(instance_id)
            finally:
                client.close()
    assert seen["alpha"] is not None and seen["alpha"].name == "BackupSiteContent"
    assert seen["beta"] is None


def test_serve_refuses_remote_addresses_and_bad_listen(cli):
    refused = cli("serve", "--listen", "0.0.0.0:4001")
    assert refused.returncode == 2
    assert "--allow-remote" in refused.stderr and "Traceback" not in refused.stderr
    bad = cli("serve", "--listen", "nowhere")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_a_malformed_taskhub_string_is_a_usage_error(tmp_path, cli, container_name):
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    result = cli(tmp_path / "site", "--container", container_name,
                 "--taskhub", "Endpoint=https://x.io;TaskHub=h;Authentication=Secret123")
    assert result.returncode == 2
    assert result.stderr.startswith("sitebackup: error: task hub connection string:")
    assert "Secret123" not in result.stderr


def test_a_source_file_under_the_reserved_name_is_refused_not_uploaded(tmp_path, cli, blob_service,
                                                                        container_name):
    write_tree(tmp_path / "site", {".sitebackup/work/x/pages/000000.json": b"[]", "ok.txt": b"ok"})
    result = cli(tmp_path / "site", "--container", container_name, "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["files_uploaded"] == 1 and summary["files_failed"] == 1
    assert "reserved" in summary["failures"][0]["error"]
    names = {b.name for b in blob_service.get_container_client(container_name).list_blobs()}
    assert names == {"ok.txt"}
    with_prefix = cli(tmp_path / "site", "--container", container_name, "--prefix", "p", "--json")
    assert with_prefix.returncode == 0, with_prefix.stderr

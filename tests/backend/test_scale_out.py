"""Scale-out through the Durable Task Scheduler code path, for real, on one machine.

``sitebackup serve`` serves the embedded backend on loopback TCP; ``sitebackup worker`` processes and
the CLI reach it through ``--taskhub "Endpoint=http://...;Authentication=None;TokenFile=..."``, i.e. through
durabletask-azuremanaged's ``DurableTaskSchedulerWorker``/``Client`` and the ``taskhub`` header.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, HoldingProxy, read_blobs, wait_until, write_tree

from sitebackup.blob.naming import RESERVED_PREFIX
from sitebackup.durable.taskhub import parse
from sitebackup.model.codec import encode
from sitebackup.model.work import CopyItem

WAIT = 120  # generous bound for slow shared machines; never asserted on


def _spawn(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "sitebackup", *args], env=env, cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, text=True)


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
        yield wait_until(address, "serve to listen"), state
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()


def _hub(served: tuple[str, Path], name: str = "default") -> str:
    """The connection string of the `served` endpoint: a path to its token, never the token itself."""
    address, state = served
    return f"Endpoint=http://{address};TaskHub={name};Authentication=None;TokenFile={state / 'serve.token'}"


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
    stored = read_blobs(client, files)
    for name, data in files.items():
        assert stored[name].data == data, name
        assert stored[name].content_md5 == hashlib.md5(data).digest(), name


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
    workers = _workers(tmp_path, cli_env, _hub(served), 2)
    try:
        wait_until(lambda: _streams(state, "default") >= 2, "both workers to connect")
        result = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(served),
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
    (victim, victim_out), (survivor, survivor_out) = _workers(tmp_path, cli_env, _hub(served), 2)
    try:
        wait_until(lambda: _streams(state, "default") >= 2, "both workers to connect")
        started = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(served),
                      "--no-local-worker", "--detach", "--concurrency", "4", "--state-dir", tmp_path / "cli-state")
        assert started.returncode == 0, started.stderr
        instance_id = started.stdout.strip()
        wait_until(lambda: _batches(victim_out) >= 1, "the victim to finish a batch")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)

        def done():
            state_ = client.get_orchestration_state(instance_id)
            return state_ if state_.runtime_status.name in ("COMPLETED", "FAILED", "CANCELLED") else None

        from sitebackup.durable.runtime import open_backend
        with open_backend(tmp_path / "unused", parse(_hub(served))) as runtime, runtime.connected() as client:
            final = wait_until(done, "the survivor to finish the backup")
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
    started = cli(tmp_path / "site", "--container", container_name, "--taskhub", _hub(served, "alpha"),
                  "--no-local-worker", "--detach", "--json", "--state-dir", tmp_path / "cli-state")
    assert started.returncode == 0, started.stderr
    event = json.loads(started.stdout.splitlines()[0])
    assert event["event"] == "start"
    instance_id = event["instance_id"]

    from sitebackup.durable.runtime import open_backend

    seen = {}
    for name in ("alpha", "beta"):
        with open_backend(tmp_path / "unused", parse(_hub(served, name))) as runtime:
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
    names = {b.name for b in blob_service.get_container_client(container_name).list_blobs()
             if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files
    assert names == {"ok.txt"}
    # under a prefix the name is an ordinary one (another container: a container's root belongs to one job)
    with_prefix = cli(tmp_path / "site", "--container", container_name + "-p", "--prefix", "p", "--json")
    assert with_prefix.returncode == 0, with_prefix.stderr


def _run_json(result) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]


def test_every_command_reads_the_task_hub_after_a_run_done_by_a_worker(tmp_path, served, cli_env, cli,
                                                                        blob_service, container_name):
    """list, status, verify, restore, --dry-run and purge see what a `sitebackup worker` did through --taskhub,
    from a state directory that never held the run."""
    address, state = served
    hub = _hub(served)
    files = {f"d{i % 3}/f{i}.txt": os.urandom(200 + i) for i in range(12)}
    write_tree(tmp_path / "site", files)
    mine = ("--state-dir", tmp_path / "cli-state")
    [(proc, out)] = _workers(tmp_path, cli_env, hub, 1)
    try:
        wait_until(lambda: _streams(state, "default") >= 1, "the worker to connect")
        events = _run_json(cli(tmp_path / "site", "--container", container_name, "--taskhub", hub,
                               "--no-local-worker", "--json", *mine))
        run_id = events[0]["instance_id"]
        assert events[-1]["runtime_status"] == "COMPLETED" and events[-1]["files_uploaded"] == len(files)

        [row] = [r for r in json.loads(cli("list", "--taskhub", hub, "--json", *mine).stdout)
                 if r["instance_id"] == run_id]
        assert row["runtime_status"] == "COMPLETED" and row["files"] == len(files)
        # the embedded backend of the same state directory never saw it
        assert json.loads(cli("list", "--json", *mine).stdout) == []

        info = json.loads(cli("status", run_id, "--taskhub", hub, "--json", *mine).stdout)
        assert info["runtime_status"] == "COMPLETED" and info["output"]["files_uploaded"] == len(files)
        assert cli("status", run_id, *mine).returncode == 2

        report = json.loads(cli("verify", run_id, "--taskhub", hub, "--json", *mine).stdout)
        assert report["files_checked"] == len(files) and report["files_ok"] == len(files)
        assert cli("verify", run_id, *mine).returncode == 2

        plan = _run_json(cli(tmp_path / "site", "--container", container_name, "--taskhub", hub, "--dry-run",
                             "--json", *mine))[-1]
        assert plan["baseline"] == run_id and plan["files_unchanged"] == len(files)
        assert plan["files_to_upload"] == 0

        # the worker may take download batches too: DEST is a path it sees, as the README requires
        restored = _run_json(cli("restore", run_id, tmp_path / "dest", "--taskhub", hub, "--json", *mine))
        assert restored[-1]["runtime_status"] == "COMPLETED"
        for name, data in files.items():
            assert (tmp_path / "dest" / name).read_bytes() == data, name
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()[-2000:]

    work = blob_service.get_container_client(container_name)
    prefix = f"{RESERVED_PREFIX}work/{run_id}/"
    assert any(True for _ in work.list_blobs(name_starts_with=prefix))
    purged = cli("purge", "--older-than", "0s", "--taskhub", hub, *mine)
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 " in purged.stdout  # the restore: the completed backup is left to `prune`
    assert {b.name.split("/")[2] for b in work.list_blobs(name_starts_with=f"{RESERVED_PREFIX}work/")} == {run_id}
    assert cli("status", run_id, "--taskhub", hub, *mine).returncode == 0
    pruned = cli("prune", "-c", container_name, "--keep-last", "1", "--taskhub", hub, "--json", *mine)
    assert pruned.returncode == 0, pruned.stderr
    assert [r["instance_id"] for r in json.loads(pruned.stdout)["kept"]] == [run_id]
    _assert_exact(blob_service, container_name, files)


def test_status_resume_and_cancel_through_the_task_hub(tmp_path, served, cli_env, cli, blob_service,
                                                        container_name):
    address, state = served
    hub = _hub(served)
    files = {f"f{i}.txt": os.urandom(100) for i in range(6)}
    write_tree(tmp_path / "site", files)
    write_tree(tmp_path / "other", {"x.txt": b"x"})
    mine = ("--state-dir", tmp_path / "cli-state")
    started = cli(tmp_path / "site", "--container", container_name, "--taskhub", hub, "--no-local-worker",
                  "--detach", *mine)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()

    # no worker anywhere: the run waits, and status cannot know whether a worker holds it
    shown = cli("status", run_id, "--taskhub", hub, *mine)
    assert shown.returncode == 0, shown.stderr
    assert "worker:       unknown with --taskhub" in shown.stdout
    assert json.loads(cli("status", run_id, "--taskhub", hub, "--json", *mine).stdout)["worker_attached"] is None

    # resume hosts a worker from this terminal (the environment variable selects the hub here)
    resumed = cli("resume", run_id, "--json", *mine, env={**cli_env, "DURABLE_TASK_SCHEDULER_CONNECTION_STRING": hub})
    summary = _run_json(resumed)[-1]
    assert summary["runtime_status"] == "COMPLETED" and summary["files_uploaded"] == len(files)
    _assert_exact(blob_service, container_name, files)
    finished = cli("cancel", run_id, "--taskhub", hub, *mine)
    assert finished.returncode == 0 and "already finished (COMPLETED)" in finished.stdout

    # another job: another container, as a container's root belongs to the first job
    other = cli(tmp_path / "other", "--container", container_name + "-o", "--prefix", "other", "--taskhub", hub,
                "--no-local-worker", "--detach", *mine)
    assert other.returncode == 0, other.stderr
    other_id = other.stdout.strip()
    cancelled = cli("cancel", other_id, "--taskhub", hub, *mine)
    assert cancelled.returncode == 0 and f"{other_id} cancelled (was PENDING)" in cancelled.stdout
    # a run no worker holds is cancelled at once, nothing of it ever runs
    [(proc, out)] = _workers(tmp_path, cli_env, hub, 1)
    try:
        # connected, so it has its signal handlers: a SIGTERM before then ends it as the default action does
        wait_until(lambda: _streams(state, "default") >= 1, "the worker to connect")

        def terminated():
            info = json.loads(cli("status", other_id, "--taskhub", hub, "--json", *mine).stdout)
            return info["runtime_status"] != "PENDING" and info["runtime_status"]
        assert wait_until(terminated, "the cancel to be applied") == "CANCELLED"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()[-2000:]
    rows = json.loads(cli("list", "--taskhub", hub, "--status", "CANCELLED", "--json", *mine).stdout)
    assert [r["instance_id"] for r in rows] == [other_id]
    _assert_exact(blob_service, container_name, files)  # nothing of the cancelled run was uploaded


@pytest.mark.parametrize("args", [["status", "some-id"], ["list"], ["cancel", "some-id"], ["resume", "some-id"],
                                  ["purge", "--older-than", "1d"], ["verify", "some-id"],
                                  ["restore", "some-id", "DEST"]])
def test_every_command_rejects_a_malformed_taskhub_string(tmp_path, cli, args):
    args = [str(tmp_path / "dest") if a == "DEST" else a for a in args]
    result = cli(*args, "--taskhub", "Endpoint=ftp://x.io;TaskHub=h;Authentication=None")
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.startswith("sitebackup: error: task hub connection string: Endpoint must start")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_work_page_rewritten_in_the_container_is_refused_by_the_worker(tmp_path, served, cli_env, cli, azurite,
                                                                           blob_service, container_name):
    """Whoever can write the container can rewrite a pending page: the worker (root here) refuses every page whose
    bytes are not the ones the scan wrote, whatever it names (a path out of the source, an absolute one, a file
    of the source the scan left out), uploads nothing of them, and the run fails naming a page."""
    hub = _hub(served)
    files = {f"f{i}.txt": b"listed %d" % i for i in range(8)}
    src = write_tree(tmp_path / "site", {**files, "excluded.txt": b"left out by the user"})
    outside = write_tree(tmp_path / "outside", {"shadow": b"root only"})
    forged = {1: "../../etc/shadow", 2: str(outside / "shadow"), 3: "excluded.txt"}
    # the scan's page index is held on its way to the container: every page is there, none taken yet
    proxy = HoldingProxy(azurite.endpoint, lambda path: f"/{RESERVED_PREFIX}work/" in path and "/index/" in path)
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(azurite.endpoint,
                                                                                          proxy.endpoint))
    mine = ("--state-dir", tmp_path / "cli-state")
    # a window of 4 pages, 16 pages at least (shared): a page per file, pages 1 to 3 in the first window
    started = cli(src, "--container", container_name, "--exclude", "excluded.txt", "--taskhub", hub,
                  "--no-local-worker", "--detach", "--concurrency", "4", *mine)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    [(proc, out)] = _workers(tmp_path, env, hub, 1)
    try:
        wait_until(lambda: proxy.held >= 1, "the scan to write its pages")
        container = blob_service.get_container_client(container_name)
        pages = f"{RESERVED_PREFIX}work/{run_id}/pages/"
        assert len(list(container.list_blob_names(name_starts_with=pages))) == len(files)
        for page, named in forged.items():
            container.upload_blob(f"{pages}{page:06d}.json", encode([CopyItem(named, 9, 1)]), overwrite=True)
        proxy.release.set()

        def done():
            info = json.loads(cli("status", run_id, "--taskhub", hub, "--json", *mine).stdout)
            return info if info["runtime_status"] in ("COMPLETED", "FAILED", "CANCELLED") else None

        final = wait_until(done, "the run to end")
    finally:
        proxy.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()[-2000:]
    assert final["runtime_status"] == "FAILED"
    assert re.match(rf"work page [123] of run {run_id} is damaged: ", final["failure"]["message"]), final
    uploaded = {b.name: container.download_blob(b.name).readall() for b in container.list_blobs()
                if not b.name.startswith(RESERVED_PREFIX)}
    # what the forged pages named never went up, nor did the files the scan had put on them
    assert set(uploaded) <= set(files) - {"f1.txt", "f2.txt", "f3.txt"}
    assert b"root only" not in uploaded.values() and b"left out by the user" not in uploaded.values()

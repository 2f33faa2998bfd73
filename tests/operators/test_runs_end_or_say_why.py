"""Runs that can be trusted to end or to say why not: a state disk that fills mid-run, a live run that
stalls, a peer process dying on a shared state directory, and a cancelled run's watcher.

Real processes, a real Azurite, real small file systems (tmpfs) for the full disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from helpers import ROOT, ForwardingProxy, JsonRun, assert_exact, env_for, many_files, run_cli, uploading, wait_until

from sitebackup.commands.hosting import stalled_for
from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.store import Store
from sitebackup.durable.runtime import open_backend
from sitebackup.errors import EXIT_CANCELLED, EXIT_STALLED, EXIT_STATE_FULL, StateFullError
from sitebackup.model.work import BackupCounts, Summary
from sitebackup.ui.printers import failure_lines, summary_line
from sitebackup.workflows.activity import ActivityDeps, unless_halted
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, WAITING_PHASE

CHILD = ROOT / "tests" / "backend" / "_child.py"


def mount_tmpfs(point: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)


def fill(mount: Path) -> Path:
    """Write one file until the file system is full; delete it to free the space again."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.splitlines()[-1])


def status_json(env: dict[str, str], instance_id: str, *extra: str) -> dict:
    result = run_cli(["status", instance_id, "--json", *extra], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------- the state disk fills mid-run


def test_state_disk_filling_mid_run_stops_it_with_exit_5_and_a_rerun_completes_exact(
        azurite, tmp_path, container_name, mount_point):
    mount_tmpfs(mount_point, "4m")
    src = tmp_path / "site"
    many_files(src, 1500)
    state = mount_point / "state"
    env = env_for(azurite.connection_string, state)
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "2"], env)
    try:
        start = run.until(lambda e: e["event"] == "start")
        run.until(uploading(1))
        filler = fill(mount_point)
        # the guard: the run must stop on its own within 30 s (it used to wait forever)
        code, last, err = run.finish(timeout=30)
    finally:
        run.kill()
    assert code == EXIT_STATE_FULL, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"sitebackup: error: state directory {state} cannot be written (")
    assert "No space left on device" in line or "disk is full" in line
    assert f"sitebackup resume {start['instance_id']}" in line
    assert last["event"] == "error" and last["exit_code"] == EXIT_STATE_FULL

    filler.unlink()
    again = run_cli([str(src), "-c", container_name, "--json"], env)
    assert again.returncode == 0, again.stderr
    summary = summary_of(again)
    assert summary["instance_id"] == start["instance_id"] and summary["runtime_status"] == "COMPLETED"
    assert summary["files_failed"] == 0
    assert_exact(azurite.connection_string, container_name, src)


def test_a_full_state_disk_is_exit_5_for_prune_as_for_backup(azurite, tmp_path, container_name, mount_point):
    # the same condition, met as the command opens the state directory, is the same exit code for every command
    mount_tmpfs(mount_point, "4m")
    state = mount_point / "state"
    env = env_for(azurite.connection_string, state)
    src = tmp_path / "site"
    many_files(src, 3)
    for _ in range(2):
        assert run_cli([str(src), "-c", container_name], env).returncode == 0
    fill(mount_point)
    (src / "new.txt").write_bytes(b"new")
    for args in (["prune", "-c", container_name, "--keep-last", "1"], [str(src), "-c", container_name]):
        result = run_cli(args, env)
        assert result.returncode == EXIT_STATE_FULL, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"sitebackup: error: state directory {state} cannot be written ("), line
        assert "free space there" in line and "--state-dir" in line, line


def test_worker_on_a_state_disk_that_fills_exits_5(azurite, mount_point):
    mount_tmpfs(mount_point, "4m")
    state = mount_point / "state"
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", "worker"], env=env_for(azurite.connection_string, state),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "worker started" in proc.stderr.readline()
        db = state / "state.db"
        wait_until(lambda: stream_owners(db), "the run to work on the state dir", timeout=6)
        fill(mount_point)
        # its next write (the stream or the lease heartbeat, every 10 s) is refused: the guard is the timeout
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STATE_FULL, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        line for line in err.splitlines() if line.startswith(f"sitebackup: error: state directory {state} cannot be")]


def test_work_delivered_after_the_state_disk_filled_fails_at_once_without_running():
    ran: list[object] = []

    def copy_batch(ctx, inp):
        ran.append(inp)
        return "uploaded"

    deps = ActivityDeps(container_client=lambda name: None, work=None, endpoint="test")  # type: ignore[arg-type]
    guarded = unless_halted(copy_batch, deps)
    assert guarded.__name__ == "copy_batch" and guarded(None, 1) == "uploaded"
    deps.halted = lambda: "No space left on device"
    with pytest.raises(RuntimeError, match="not started: No space left on device"):
        guarded(None, 2)
    assert ran == [1]


def test_any_failure_after_the_state_disk_filled_is_reported_as_the_full_disk(tmp_path):
    with pytest.raises(StateFullError, match=f"state directory {tmp_path} cannot be written \\(database or disk"):
        with open_backend(tmp_path) as runtime:
            assert runtime.backend is not None
            runtime.backend.record_fault("database or disk is full")
            raise RuntimeError("StatusCode.UNKNOWN: Exception calling application")  # what a refused RPC looks like


def test_a_write_the_full_disk_refuses_is_rolled_back_reported_and_the_next_one_works(mount_point):
    mount_tmpfs(mount_point, "1m")
    faults: list[str] = []
    store = Store(mount_point / "state.db", on_fault=faults.append)
    try:
        store.create_instance("default", "before", "orch")
        filler = fill(mount_point)
        with pytest.raises(sqlite3.OperationalError):
            store.create_instance("default", "big", "orch", input="x" * 600_000)
        assert faults == ["database or disk is full"]
        filler.unlink()
        # a failed COMMIT used to leave the transaction open: "cannot start a transaction within a transaction"
        store.create_instance("default", "after", "orch")
        assert store.get_instance("default", "big") is None and store.get_instance("default", "after") is not None
    finally:
        store.close()


def scheduled_names(events) -> list[str]:
    return [e.taskScheduled.name for e in events if e.HasField("taskScheduled")]


def test_an_episode_the_full_disk_refused_never_reaches_a_later_replay(mount_point):
    mount_tmpfs(mount_point, "1m")
    a, b = Store(mount_point / "state.db"), Store(mount_point / "state.db")
    try:
        a.create_instance("default", "i1", "orch")
        [first] = a.claim_orchestrations("default", "A", 10, lease_seconds=0)
        filler = fill(mount_point)
        refused = pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="refused"))
        refused.scheduleTask.input.value = "x" * 600_000
        with pytest.raises(sqlite3.OperationalError):
            a.complete_orchestration("default", pb.OrchestratorResponse(
                instanceId="i1", completionToken=first.token, actions=[refused]))
        filler.unlink()
        # another process runs the episode again (the lease lapsed), and its activity's result arrives
        [again] = b.claim_orchestrations("default", "B", 10, lease_seconds=0)
        applied = pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="applied"))
        assert b.complete_orchestration("default", pb.OrchestratorResponse(
            instanceId="i1", completionToken=again.token, actions=[applied]))
        [act] = b.claim_activities("default", "B", 10, lease_seconds=30)
        assert b.complete_activities([("default", pb.ActivityResponse(instanceId="i1", taskId=1,
                                                                      completionToken=act.token))]) == [True]
        [later] = a.claim_orchestrations("default", "A", 10, lease_seconds=30)
        assert scheduled_names(later.request.pastEvents) == ["applied"] == scheduled_names(b.history("default", "i1"))
    finally:
        a.close()
        b.close()


class Gate:
    """An activity or orchestration episode held until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"


def test_activity_results_the_full_disk_refuses_are_kept_and_written_once_space_returns(mount_point):
    mount_tmpfs(mount_point, "4m")
    gate = Gate()

    def held(ctx: task.ActivityContext, _) -> str:
        gate.hold()
        return "r" * 200_000  # a result the database must grow for

    def one_held(ctx: task.OrchestrationContext, _):
        return len((yield ctx.call_activity(held)))

    backend = EmbeddedBackend(mount_point / "state")
    address = backend.start()
    worker = dt_worker.TaskHubGrpcWorker(host_address=address)
    worker.add_activity(held)
    worker.add_orchestrator(one_held)
    worker.start()
    client = dt_client.TaskHubGrpcClient(host_address=address)
    try:
        instance_id = client.schedule_new_orchestration(one_held)
        assert gate.entered.wait(30)
        filler = fill(mount_point)
        gate.open.set()
        wait_until(lambda: backend.fault, "the full disk to be noticed", timeout=6)  # the result's write was refused
        filler.unlink()
        # it used to be dropped while its lease stayed with this live process: the run waited forever
        state = client.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state.runtime_status == dt_client.OrchestrationStatus.COMPLETED
        assert state.serialized_output == "200000"
    finally:
        gate.open.set()
        worker.stop()
        client.close()
        backend.stop()


# ---------------------------------------------------------------- a peer dies on a shared state directory


def test_releasing_a_dead_peers_leases_keeps_this_process_episode(tmp_path):
    store = Store(tmp_path / "state.db")
    try:
        store.create_instance("default", "mine", "orch")
        store.create_instance("default", "theirs", "orch")
        [mine] = store.claim_orchestrations("default", "host:1:live", 1, lease_seconds=30)
        [theirs] = store.claim_orchestrations("default", "host:2:dead", 1, lease_seconds=30)
        store.release_leases("host:2:dead")
        assert store.complete_orchestration("default", pb.OrchestratorResponse(
            instanceId=mine.request.instanceId, completionToken=mine.token))
        assert not store.complete_orchestration("default", pb.OrchestratorResponse(
            instanceId=theirs.request.instanceId, completionToken=theirs.token))
    finally:
        store.close()


def stream_owners(db: Path) -> list[str]:
    """Owners of the open work-item streams, read beside the processes (none while the schema is being made)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return [row[0] for row in conn.execute("SELECT owner FROM streams")]
    except sqlite3.OperationalError:
        return []


@pytest.mark.processes
def test_a_sigkilled_peer_on_the_same_state_dir_never_stalls_the_survivors_run(tmp_path):
    state = tmp_path / "state"
    gate = Gate()

    def echo(ctx: task.ActivityContext, value: str) -> str:
        return value

    def gated(ctx: task.OrchestrationContext, _):
        if not ctx.is_replaying:
            gate.hold()  # this process's episode stays in flight while the peer dies
        return (yield ctx.call_activity(echo, input="done"))

    survivor = EmbeddedBackend(state)
    address = survivor.start()
    worker = dt_worker.TaskHubGrpcWorker(host_address=address)
    worker.add_orchestrator(gated)
    worker.add_activity(echo)
    worker.start()
    client = dt_client.TaskHubGrpcClient(host_address=address)
    peer = None
    try:
        instance_id = client.schedule_new_orchestration(gated)
        assert gate.entered.wait(30)
        peer = subprocess.Popen([sys.executable, str(CHILD), str(state), "30", "serve"], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert peer.stdout.readline().strip() == "ready"
        marker = f":{peer.pid}:"
        wait_until(lambda: any(marker in owner for owner in stream_owners(state / "state.db")), "the peer's stream",
                   timeout=6)
        peer.kill()
        peer.wait()
        survivor.worker_attached(instance_id)  # looks for dead local owners and releases theirs
        assert not any(marker in owner for owner in stream_owners(state / "state.db"))
        gate.open.set()
        done = client.wait_for_orchestration_completion(instance_id, timeout=30)
        assert done.runtime_status == dt_client.OrchestrationStatus.COMPLETED
        assert done.serialized_output == '"done"'
    finally:
        gate.open.set()
        if peer is not None and peer.poll() is None:
            peer.kill()
        worker.stop()
        client.close()
        survivor.stop()


# ---------------------------------------------------------------- a live run that stalls


def state_at(status: dt_client.OrchestrationStatus, updated: datetime,
             custom: dict | None = None) -> dt_client.OrchestrationState:
    updated = updated.replace(tzinfo=None)  # the SDK gives naive UTC times
    return dt_client.OrchestrationState(
        instance_id="r", name=BACKUP_ORCHESTRATION, runtime_status=status, created_at=updated - timedelta(hours=5),
        last_updated_at=updated, serialized_input=None, serialized_output=None,
        serialized_custom_status=json.dumps(custom) if custom else None, failure_details=None)


def test_a_run_is_stalled_only_when_unfinished_not_waiting_and_idle_past_the_threshold():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    running = dt_client.OrchestrationStatus.RUNNING
    limit = timedelta(minutes=10)
    assert stalled_for(state_at(running, now - timedelta(minutes=11)), limit, now) == timedelta(minutes=11)
    assert stalled_for(state_at(running, now - timedelta(minutes=9)), limit, now) is None
    assert stalled_for(state_at(dt_client.OrchestrationStatus.PENDING, now - timedelta(hours=2)), limit, now)
    assert stalled_for(state_at(dt_client.OrchestrationStatus.COMPLETED, now - timedelta(hours=2)), limit, now) is None
    parked = state_at(running, now - timedelta(hours=2), {"phase": WAITING_PHASE})
    assert stalled_for(parked, limit, now) is None  # waiting for `resume`, not stalled


class GateProxy(ForwardingProxy):
    """While ``open`` is clear, blob uploads wait here: the run stops moving (a second invocation's
    pre-flight, on the container, still goes through)."""

    def __init__(self, target: str, pace: float = 0.0):
        self.open = threading.Event()
        self.open.set()
        self.pace = pace  # seconds each upload takes here: long enough a run to be caught uploading, however fast
        super().__init__(target)

    def intercept(self, request, body):
        if request.command == "PUT" and "restype=container" not in request.path:
            self.open.wait(120)
            time.sleep(self.pace)
        return body

    def close(self) -> None:
        self.open.set()
        super().close()


def test_no_wait_on_a_stalled_run_exits_6_and_status_shows_its_last_progress(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 400)
    # uploads paced and a window fixed at 4 requests: a run on a quiet machine, or with a window that widens
    # through the proxy, could finish before it is seen uploading
    proxy = GateProxy(azurite.endpoint, pace=0.02)
    conn = azurite.connection_string.replace(azurite.endpoint, proxy.endpoint)
    env = env_for(conn, tmp_path / "state")
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "2", "--max-inflight", "4"], env)
    try:
        instance_id = run.until(lambda e: e["event"] == "start")["instance_id"]
        run.until(uploading(1))
        proxy.open.clear()  # held at the gate: the live run makes no more progress
        stalled = wait_until(lambda: (s := status_json(env, instance_id, "--stall-after", "1s"))["stalled"] and s,
                         "the run to be reported stalled", timeout=60, interval=0.5)
        assert stalled["runtime_status"] == "RUNNING" and stalled["worker_attached"] is True
        assert stalled["idle_s"] > 1 and datetime.fromisoformat(stalled["last_progress_at"]).tzinfo is not None
        assert status_json(env, instance_id)["stalled"] is False  # the default threshold is an hour

        text = run_cli(["status", instance_id], dict(env, SITEBACKUP_STALL_AFTER="1s"))
        assert "STALLED: no progress for" in text.stdout and "progress at:" in text.stdout

        healthy = run_cli([str(src), "-c", container_name, "--no-wait"], env)
        assert healthy.returncode == 4, healthy.stderr
        late = run_cli([str(src), "-c", container_name, "--no-wait", "--stall-after", "1s"], env)
        assert late.returncode == EXIT_STALLED, late.stderr
        [line] = late.stderr.strip().splitlines()
        assert instance_id in line and "no progress for" in line and "sitebackup cancel" in line
        by_env = run_cli([str(src), "-c", container_name, "--no-wait"], dict(env, SITEBACKUP_STALL_AFTER="1s"))
        assert by_env.returncode == EXIT_STALLED, by_env.stderr

        proxy.open.set()
        code, summary, err = run.finish()
    finally:
        run.kill()
        proxy.close()
    assert code == 0, err
    assert summary["runtime_status"] == "COMPLETED" and summary["files_uploaded"] == 400
    assert_exact(azurite.connection_string, container_name, src)


# ---------------------------------------------------------------- a cancelled run


def test_a_cancelled_runs_watcher_says_cancelled_exits_7_and_keeps_its_counters(azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 1500)
    env = env_for(azurite.connection_string, tmp_path / "state")
    run = JsonRun([str(src), "-c", container_name, "--concurrency", "1"], env)
    try:
        instance_id = run.until(lambda e: e["event"] == "start")["instance_id"]
        seen = run.until(uploading(1))
        assert run_cli(["cancel", instance_id], env).returncode == 0
        code, summary, err = run.finish()
    finally:
        run.kill()
    assert code == EXIT_CANCELLED, err
    assert "Traceback" not in err and "WARNING" not in err
    assert summary["event"] == "summary" and summary["cancelled"] is True
    assert summary["runtime_status"] == "CANCELLED" and summary["files_total"] == 1500
    assert seen["files_done"] <= summary["files_uploaded"] < 1500 and summary["bytes_uploaded"] > 0

    status = run_cli(["status", instance_id], env).stdout
    assert f"{instance_id}  backup  CANCELLED\n" in status
    assert f"files:        {summary['files_uploaded']}/1500 done" in status
    [row] = json.loads(run_cli(["list", "--json"], env).stdout)
    assert row["files"] == summary["files_uploaded"] and row["bytes"] == summary["bytes_uploaded"]

    resumed = run_cli(["resume", instance_id], env)  # any later watcher says the same
    assert resumed.returncode == EXIT_CANCELLED
    assert f"{instance_id} CANCELLED: {summary['files_uploaded']}/1500 files uploaded" in resumed.stdout
    assert f"run {instance_id} was cancelled" in resumed.stderr


def test_a_cancelled_summary_reads_cancelled_in_plain_text():
    summary = Summary(instance_id="r1", kind=BACKUP_ORCHESTRATION, runtime_status="CANCELLED", cancelled=True,
                      counts=BackupCounts(files_total=10, files_uploaded=4, bytes_uploaded=4096, files_failed=0),
                      duration_s=2.0)
    assert summary_line(summary).startswith("r1 CANCELLED: 4/10 files uploaded (4.0 KiB)")
    assert failure_lines(summary) == ["sitebackup: run r1 was cancelled (sitebackup cancel); what it backed up before stays"]


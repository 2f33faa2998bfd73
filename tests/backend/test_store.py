"""Store-level tests: leases, stale completions, several processes on one state dir, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import flows
import pytest
from durabletask.client import OrchestrationQuery, OrchestrationStatus
from harness import Harness

from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.store import Store

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "_child.py"


def store_with_activity(path: Path) -> Store:
    store = Store(path)
    store.create_instance("default", "i1", "orch")
    claim = store.claim_orchestrations("default", "setup", 10, 30)[0]
    action = pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="act"))
    assert store.complete_orchestration("default", pb.OrchestratorResponse(
        instanceId="i1", completionToken=claim.token, actions=[action]))
    return store


def test_expired_lease_is_redelivered_and_stale_completion_rejected(tmp_path):
    a = store_with_activity(tmp_path / "state.db")
    b = Store(tmp_path / "state.db")
    first = a.claim_activities("default", "A", 10, lease_seconds=0.2)
    assert len(first) == 1
    assert b.claim_activities("default", "B", 10, lease_seconds=30) == []  # live lease is not stolen
    time.sleep(0.3)
    second = b.claim_activities("default", "B", 10, lease_seconds=30)
    assert len(second) == 1 and second[0].token != first[0].token
    result = pb.ActivityResponse(instanceId="i1", taskId=1)
    result.completionToken = first[0].token
    assert not a.complete_activities([("default", result)])[0]  # lease lost: rejected
    result.completionToken = second[0].token
    assert b.complete_activities([("default", result)])[0]
    assert not b.complete_activities([("default", result)])[0]  # never applied twice


def test_orchestrator_lease_expiry_and_stale_completion(tmp_path):
    a = Store(tmp_path / "state.db")
    b = Store(tmp_path / "state.db")
    a.create_instance("default", "i1", "orch")
    first = a.claim_orchestrations("default", "A", 10, lease_seconds=0.2)
    assert len(first) == 1
    assert b.claim_orchestrations("default", "B", 10, lease_seconds=30) == []
    time.sleep(0.3)
    second = b.claim_orchestrations("default", "B", 10, lease_seconds=30)
    assert len(second) == 1
    assert [e.WhichOneof("eventType") for e in second[0].request.newEvents] == [
        "orchestratorStarted", "executionStarted"]
    done = pb.OrchestratorAction(id=-1, completeOrchestration=pb.CompleteOrchestrationAction(
        orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED))
    assert not a.complete_orchestration("default", pb.OrchestratorResponse(
        instanceId="i1", completionToken=first[0].token, actions=[done]))
    assert b.complete_orchestration("default", pb.OrchestratorResponse(
        instanceId="i1", completionToken=second[0].token, actions=[done]))
    assert b.get_instance("default", "i1").status == pb.ORCHESTRATION_STATUS_COMPLETED


def test_task_hubs_are_isolated(tmp_path):
    store = Store(tmp_path / "state.db")
    store.create_instance("hub-a", "same-id", "orch")
    store.create_instance("hub-b", "same-id", "orch")
    assert len(store.claim_orchestrations("hub-a", "A", 10, 30)) == 1
    assert store.get_instance("hub-c", "same-id") is None
    assert len(store.claim_orchestrations("hub-b", "A", 10, 30)) == 1


def test_stop_releases_leases(tmp_path):
    with EmbeddedBackend(tmp_path / "state") as one:
        one.store.create_instance("default", "i1", "orch")
        assert one.store.claim_orchestrations("default", one.owner, 10, 30)
        assert one.worker_attached("i1")
    with EmbeddedBackend(tmp_path / "state") as two:
        assert not two.worker_attached("i1")
        assert len(two.store.claim_orchestrations("default", two.owner, 10, 30)) == 1


def spawn(state_dir: Path, lease: float, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(CHILD), str(state_dir), str(lease), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.mark.processes
def test_two_processes_execute_each_activity_exactly_once(tmp_path):
    state_dir, log = tmp_path / "state", tmp_path / "executions.log"
    other = spawn(state_dir, 30, "serve")
    h = Harness(state_dir)
    h.start(with_worker=False)
    h.start_worker(max_activities=10)
    try:
        iid = h.client.schedule_new_orchestration(flows.fan_out_recorded, input=[str(log), 200])
        state = h.client.wait_for_orchestration_completion(iid, timeout=120)
        assert state.runtime_status == OrchestrationStatus.COMPLETED
        assert json.loads(state.serialized_output) == sum(range(200))
    finally:
        other.stdin.close()
        other.wait(timeout=60)
        h.stop()
    lines = log.read_text().split()
    assert sorted(map(int, lines)) == list(range(200))


@pytest.mark.processes
def test_sigkill_during_writes_leaves_a_usable_database(tmp_path):
    state_dir = tmp_path / "state"
    rng = random.Random(7)
    for _ in range(4):
        child = spawn(state_dir, 1.0, "churn")
        time.sleep(rng.uniform(0.3, 1.2))
        child.send_signal(signal.SIGKILL)
        child.wait()
    db = sqlite3.connect(state_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    h = Harness(state_dir, lease_seconds=1.0).start()
    try:
        states = h.client.get_all_orchestration_states(OrchestrationQuery())
        assert states  # the children did schedule work
        for s in states:
            final = h.client.wait_for_orchestration_completion(s.instance_id, timeout=60)
            assert final.runtime_status == OrchestrationStatus.COMPLETED
            assert json.loads(final.serialized_output) == 20 * 19
    finally:
        h.stop()

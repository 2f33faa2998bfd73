"""Runs that can be trusted to end or to say why not: a state disk that fills mid-run, a live run that
stalls, a peer process dying on a shared state directory, and a cancelled run's watcher.

Real processes, a real Azurite, real small file systems (tmpfs) for the full disk.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from helpers import ROOT

from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.store import Store

CHILD = ROOT / "tests" / "backend" / "_child.py"


def poll_until(predicate, polls: int = 120, interval: float = 0.5):
    for _ in range(polls):
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not reached in {polls} polls")


class Gate:
    """An activity or orchestration episode held until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"


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
        poll_until(lambda: any(marker in owner for owner in stream_owners(state / "state.db")), interval=0.05)
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

"""A long activity on the embedded backend runs once and its result counts: the real SDK worker, which takes
a silent work-item stream for a lost connection, against the real backend, with every interval shortened
(the worker's silent-disconnect timeout, the backend's lease and health-ping interval)."""

from __future__ import annotations

import threading
import time

from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.grpc_options import GrpcWorkerResiliencyOptions
from helpers import open_stream_ids

from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.servicer import PING_SECONDS

# Long enough that a loaded machine's scheduling delays neither let a renewed lease lapse nor make a
# pinged stream look silent; the activity outlasts several of both.
SILENT = 1.5  # the worker reconnects after a stream silent this long
LEASE = 1.5
PERIODS = 4  # the activity lasts this many silent-disconnect periods


class Probe:
    """An activity that works for PERIODS silent-disconnect periods, counting its executions and noting the
    backend's open streams when it starts and ends (a reconnect in between shows as new ids)."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.lock = threading.Lock()
        self.executions = 0
        self.streams: list[set[str]] = []

    def __call__(self, ctx: task.ActivityContext, _) -> str:
        with self.lock:
            self.executions += 1
        self.streams.append(open_stream_ids(self.state_dir))
        time.sleep(PERIODS * SILENT)  # the work itself, not a wait for something to happen
        self.streams.append(open_stream_ids(self.state_dir))
        return "done"


def run_long_activity(tmp_path, ping_seconds: float) -> tuple[Probe, dt_client.OrchestrationState]:
    state = tmp_path / "state"
    probe = Probe(state)

    def long_work(ctx: task.ActivityContext, value) -> str:
        return probe(ctx, value)

    def orchestration(ctx: task.OrchestrationContext, _):
        return (yield ctx.call_activity(long_work))

    backend = EmbeddedBackend(state, lease_seconds=LEASE, ping_seconds=ping_seconds)
    address = backend.start()
    worker = dt_worker.TaskHubGrpcWorker(host_address=address, resiliency_options=GrpcWorkerResiliencyOptions(
        silent_disconnect_timeout_seconds=SILENT, reconnect_backoff_base_seconds=0.05,
        reconnect_backoff_cap_seconds=0.2))
    worker.add_orchestrator(orchestration)
    worker.add_activity(long_work)
    worker.start()
    client = dt_client.TaskHubGrpcClient(host_address=address)
    try:
        instance_id = client.schedule_new_orchestration(orchestration)
        done = client.wait_for_orchestration_completion(instance_id, timeout=60 + 10 * PERIODS * SILENT)
    finally:
        worker.stop()
        client.close()
        backend.stop()
    return probe, done


def test_an_activity_lasting_several_silent_disconnect_periods_runs_once_and_its_result_counts(tmp_path):
    probe, done = run_long_activity(tmp_path, ping_seconds=SILENT / 6)
    assert done.runtime_status == dt_client.OrchestrationStatus.COMPLETED
    assert done.serialized_output == '"done"'
    assert probe.executions == 1
    start, end = probe.streams
    assert len(start) == 1 and start == end  # health pings kept the worker's one stream: no reconnect


def test_a_worker_that_reconnects_is_not_given_the_activity_it_still_runs(tmp_path):
    probe, done = run_long_activity(tmp_path, ping_seconds=3600)  # no pings: the worker reconnects again and again
    start, end = probe.streams
    assert not start & end  # it did reconnect while the activity ran
    assert probe.executions == 1
    assert done.runtime_status == dt_client.OrchestrationStatus.COMPLETED
    assert done.serialized_output == '"done"'


def test_the_backend_pings_well_within_the_sdk_workers_silent_disconnect_timeout():
    assert 3 * PING_SECONDS <= GrpcWorkerResiliencyOptions().silent_disconnect_timeout_seconds

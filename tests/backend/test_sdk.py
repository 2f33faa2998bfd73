"""SDK-level tests: the standard durabletask worker and client against the embedded backend."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import flows
import grpc
import pytest
from durabletask import client
from durabletask.client import OrchestrationQuery, OrchestrationStatus
from helpers import wait_until

TIMEOUT = 60


def run(h, orchestrator, input=None, **kwargs):
    iid = h.client.schedule_new_orchestration(orchestrator, input=input, **kwargs)
    return iid, h.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)


def pending_events(h, iid) -> int:
    """Events queued for *iid* that no orchestrator episode has completed yet."""
    db = sqlite3.connect(h.state_dir / "state.db")
    try:
        return db.execute("SELECT count(*) FROM new_events WHERE instance_id=?", (iid,)).fetchone()[0]
    finally:
        db.close()


def wait_status(h, iid, status, timeout=TIMEOUT):
    def reached():
        state = h.client.get_orchestration_state(iid)
        return state if state is not None and state.runtime_status == status else None

    return wait_until(reached, f"{iid} to reach {status}", timeout)


def test_fan_out_fan_in_1000(harness):
    _, state = run(harness, flows.fan_out, 1000)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == 1000 * 999


def test_an_episode_whose_completion_the_store_refused_runs_again(harness, monkeypatch):
    # The SDK worker only logs a failed CompleteOrchestratorTask: unless the backend gives the lease back, this
    # live process renews it forever and the run waits on an episode nobody works on.
    store = harness.backend.store
    complete = store.complete_orchestration
    refused: list[str] = []

    def refuse_the_first_after_the_fan_out(hub, response):
        if not refused and not any(a.HasField("scheduleTask") for a in response.actions):
            refused.append(response.completionToken)
            raise sqlite3.OperationalError("database is locked")
        return complete(hub, response)

    monkeypatch.setattr(store, "complete_orchestration", refuse_the_first_after_the_fan_out)
    _, state = run(harness, flows.fan_out, 3)
    assert refused
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == 6


def test_retry_policy_uses_durable_timers(harness):
    flows.ATTEMPTS.clear()
    iid, state = run(harness, flows.retrying, "k1")
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == "ok after 3"
    history = harness.client.get_orchestration_history(iid)
    assert sum(1 for e in history if type(e).__name__ == "TimerFiredEvent") == 2


def test_sub_orchestrations(harness):
    _, state = run(harness, flows.parent, 5)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == [11, 13, 15]


def test_sub_orchestration_failure_reaches_parent(harness):
    _, state = run(harness, flows.parent_of_failing)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert "negative input" in json.loads(state.serialized_output)


def test_continue_as_new(harness):
    iid, state = run(harness, flows.counter, 0)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == 10
    # Continue-as-new restarts history: only the last execution remains.
    history = harness.client.get_orchestration_history(iid)
    assert sum(1 for e in history if type(e).__name__ == "ExecutionStartedEvent") == 1


def test_raise_event_and_custom_status(harness):
    iid = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, iid, OrchestrationStatus.RUNNING)
    state = wait_until(lambda: (s := harness.client.get_orchestration_state(iid)).serialized_custom_status and s,
                       "the custom status", TIMEOUT)
    assert json.loads(state.serialized_custom_status) == {"phase": "waiting"}
    harness.client.raise_orchestration_event(iid, "go", data="hello")
    state = harness.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
    assert json.loads(state.serialized_output) == "hello"
    assert json.loads(state.serialized_custom_status) == {"phase": "done"}


def test_send_event_between_orchestrations(harness):
    target = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, target, OrchestrationStatus.RUNNING)
    run(harness, flows.sender, target)
    state = harness.client.wait_for_orchestration_completion(target, timeout=TIMEOUT)
    assert json.loads(state.serialized_output) == "from sender"


def test_terminate(harness):
    iid = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, iid, OrchestrationStatus.RUNNING)
    harness.client.terminate_orchestration(iid, output="stopped")
    state = harness.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
    assert state.runtime_status == OrchestrationStatus.TERMINATED
    assert json.loads(state.serialized_output) == "stopped"


def test_suspend_and_resume(harness):
    iid = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, iid, OrchestrationStatus.RUNNING)
    harness.client.suspend_orchestration(iid)
    wait_status(harness, iid, OrchestrationStatus.SUSPENDED)
    harness.client.raise_orchestration_event(iid, "go", data="late")
    # the worker has taken the episode with the event (nothing left queued), yet the instance stays suspended
    wait_until(lambda: not pending_events(harness, iid), "the worker to take the raised event", TIMEOUT)
    assert harness.client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.SUSPENDED
    harness.client.resume_orchestration(iid)
    state = harness.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == "late"


def test_failure_details(harness):
    _, state = run(harness, flows.failing)
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details.error_type.endswith("KeyError")
    assert "boom" in state.failure_details.message


def test_purge_by_id_and_by_filter(harness):
    done = [run(harness, flows.fan_out, 2)[0] for _ in range(3)]
    running = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, running, OrchestrationStatus.RUNNING)
    assert harness.client.purge_orchestration(done[0]).deleted_instance_count == 1
    assert harness.client.get_orchestration_state(done[0]) is None
    result = harness.client.purge_orchestrations_by(
        created_time_from=datetime.now(timezone.utc) - timedelta(minutes=5),
        runtime_status=[OrchestrationStatus.COMPLETED, OrchestrationStatus.RUNNING])
    assert result.deleted_instance_count == 2  # running instances are never purged
    assert harness.client.get_orchestration_state(running) is not None


def test_query_and_list(harness):
    ids = [run(harness, flows.fan_out, 1, instance_id=f"q-{i}")[0] for i in range(5)]
    running = harness.client.schedule_new_orchestration(flows.waiter, instance_id="q-running")
    wait_status(harness, running, OrchestrationStatus.RUNNING)
    everything = harness.client.get_all_orchestration_states(OrchestrationQuery(max_instance_count=2))
    assert sorted(s.instance_id for s in everything) == sorted(ids + [running])
    completed = harness.client.get_all_orchestration_states(
        OrchestrationQuery(runtime_status=[OrchestrationStatus.COMPLETED], fetch_inputs_and_outputs=True))
    assert len(completed) == 5 and all(s.serialized_output == "0" for s in completed)
    prefixed = harness.client.get_all_orchestration_states(OrchestrationQuery(instance_id_prefix="q-r"))
    assert [s.instance_id for s in prefixed] == ["q-running"]
    page = harness.client.list_instance_ids(page_size=3)
    rest = harness.client.list_instance_ids(page_size=3, continuation_token=page.continuation_token)
    assert sorted(page.items + rest.items) == sorted(ids) and rest.continuation_token is None


def test_id_reuse_policy(harness):
    iid, _ = run(harness, flows.fan_out, 1, instance_id="reuse")
    with pytest.raises(grpc.RpcError) as err:
        harness.client.schedule_new_orchestration(flows.fan_out, input=1, instance_id="reuse")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    policy = client.pb.OrchestrationIdReusePolicy(replaceableStatus=[OrchestrationStatus.COMPLETED.value])
    _, state = run(harness, flows.fan_out, 3, instance_id="reuse", reuse_id_policy=policy)
    assert json.loads(state.serialized_output) == 6


def test_scheduled_start(harness):
    start_at = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    iid, state = run(harness, flows.fan_out, 2, start_at=start_at)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    finished = state.last_updated_at
    finished = finished if finished.tzinfo else finished.replace(tzinfo=timezone.utc)
    assert finished >= start_at


def test_entities_are_unimplemented(harness):
    from durabletask.entities import EntityInstanceId
    with pytest.raises(grpc.RpcError) as err:
        harness.client.signal_entity(EntityInstanceId("counter", "x"), "add", input=1)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("orchestrator,input", [(flows.waiter, None), (flows.sleeper, 1.5)])
def test_instance_survives_backend_restart(harness, orchestrator, input):
    iid = harness.client.schedule_new_orchestration(orchestrator, input=input)
    wait_status(harness, iid, OrchestrationStatus.RUNNING)
    harness.restart()
    if orchestrator is flows.waiter:
        harness.client.raise_orchestration_event(iid, "go", data="after restart")
    state = harness.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == ("after restart" if orchestrator is flows.waiter else 42)


def test_worker_attached(harness):
    iid = harness.client.schedule_new_orchestration(flows.waiter)
    wait_status(harness, iid, OrchestrationStatus.RUNNING)
    assert harness.backend.worker_attached(iid)
    harness.worker.stop()
    harness.worker = None
    wait_until(lambda: not harness.backend.worker_attached(iid), "the stopped worker to detach", 10)

"""Nothing the embedded backend does not support is ignored: an orchestration step that asks for it fails
the orchestration with a message naming it (whether the step also completes or continues as new), and an
RPC it does not implement answers UNIMPLEMENTED with a message. In the store, through the SDK against the
in-process backend, and through `sitebackup serve` over TCP with its token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import flows
import grpc
import pytest
from durabletask import client, worker
from durabletask.client import OrchestrationStatus
from google.protobuf import wrappers_pb2
from harness import QUIET
from helpers import wait_until

from sitebackup.durable.backend.guard import bearer
from sitebackup.durable.backend.servicer import Servicer
from sitebackup.durable.backend.store import Store

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60
HUB = "default"


# ---------------------------------------------------------------- the store: one episode, applied whole or failed


def _step(store: Store, iid: str, response: pb.OrchestratorResponse) -> None:
    """Start *iid* and complete its first episode with *response* (token and id filled in)."""
    store.create_instance(HUB, iid, "orch")
    claim = store.claim_orchestrations(HUB, "test", 10, 30)[0]
    response.instanceId, response.completionToken = iid, claim.token
    assert store.complete_orchestration(HUB, response)


def _done(status: int = pb.ORCHESTRATION_STATUS_COMPLETED) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=9, completeOrchestration=pb.CompleteOrchestrationAction(
        orchestrationStatus=status, result=wrappers_pb2.StringValue(value='"done"')))


def _failure(store: Store, iid: str) -> pb.TaskFailureDetails:
    row = store.get_instance(HUB, iid)
    assert row is not None and row.status == pb.ORCHESTRATION_STATUS_FAILED, row
    assert row.failure is not None
    return pb.TaskFailureDetails.FromString(row.failure)


# An action of a type this backend's protocol does not know: field 99 of OrchestratorAction, as a newer
# worker would send it (protobuf keeps it as an unknown field; no action type is set).
_FROM_THE_FUTURE = pb.OrchestratorAction.FromString(b"\x08\x05\x9a\x06\x00")

UNSUPPORTED = {
    "sendEntityMessage (entityOperationSignaled)": pb.OrchestratorAction(
        id=5, sendEntityMessage=pb.SendEntityMessageAction(entityOperationSignaled=pb.EntityOperationSignaledEvent(
            requestId="r1", operation="add", targetInstanceId=wrappers_pb2.StringValue(value="@counter@c1")))),
    "terminateOrchestration": pb.OrchestratorAction(
        id=5, terminateOrchestration=pb.TerminateOrchestrationAction(instanceId="other")),
    "rewindOrchestration": pb.OrchestratorAction(id=5, rewindOrchestration=pb.RewindOrchestrationAction()),
    "an action of a type unknown to this backend (id 5)": _FROM_THE_FUTURE,
}


@pytest.mark.parametrize("name", UNSUPPORTED)
@pytest.mark.parametrize("ending", ["completes", "continues as new", "fails", "goes on"])
def test_a_step_with_an_unsupported_action_fails_naming_it_and_carries_out_nothing(tmp_path, name, ending):
    assert _FROM_THE_FUTURE.WhichOneof("orchestratorActionType") is None
    store = Store(tmp_path / "state.db")
    store.create_instance(HUB, "target", "orch", start_at=time.time() + 3600)  # ready only when an event arrives
    others = [
        pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="act")),
        pb.OrchestratorAction(id=2, createSubOrchestration=pb.CreateSubOrchestrationAction(instanceId="sub",
                                                                                           name="orch")),
        pb.OrchestratorAction(id=3, sendEvent=pb.SendEventAction(instance=pb.OrchestrationInstance(
            instanceId="target"), name="go")),
    ]
    endings = {"completes": [_done()], "continues as new": [_done(pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW)],
               "fails": [_done(pb.ORCHESTRATION_STATUS_FAILED)], "goes on": []}
    _step(store, "i1", pb.OrchestratorResponse(actions=[*others, UNSUPPORTED[name], *endings[ending]]))

    failure = _failure(store, "i1")
    assert failure.errorType == "NotSupportedError" and failure.isNonRetriable
    assert failure.errorMessage == (f"not supported by the sitebackup embedded backend: {name}; "
                                    "none of this step's actions was carried out")
    # nothing else the step asked for happened: no activity to run, no sub-orchestration, no event sent
    assert store.claim_activities(HUB, "test", 10, 30) == []
    assert store.get_instance(HUB, "sub") is None
    assert store.claim_orchestrations(HUB, "test", 10, 30) == []  # the target got no event
    history = [e.WhichOneof("eventType") for e in store.history(HUB, "i1") or []]
    assert history[-2:] == ["orchestratorCompleted", "executionCompleted"]
    assert "taskScheduled" not in history and "eventSent" not in history


def test_every_unsupported_thing_in_a_step_is_named_once(tmp_path):
    store = Store(tmp_path / "state.db")
    signal_again = pb.OrchestratorAction()
    signal_again.CopyFrom(UNSUPPORTED["sendEntityMessage (entityOperationSignaled)"])
    signal_again.id = 6
    _step(store, "i1", pb.OrchestratorResponse(actions=[
        UNSUPPORTED["sendEntityMessage (entityOperationSignaled)"], signal_again,
        UNSUPPORTED["terminateOrchestration"], _done()]))
    assert ("sendEntityMessage (entityOperationSignaled), terminateOrchestration;"
            in _failure(store, "i1").errorMessage)


def test_a_partial_response_fails_instead_of_being_applied_as_the_whole_step(tmp_path):
    store = Store(tmp_path / "state.db")
    _step(store, "i1", pb.OrchestratorResponse(isPartial=True, chunkIndex=wrappers_pb2.Int32Value(value=0), actions=[
        pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="act"))]))
    assert "a partial (chunked) orchestrator response" in _failure(store, "i1").errorMessage
    assert store.claim_activities(HUB, "test", 10, 30) == []


def test_a_supported_step_is_unchanged(tmp_path):
    store = Store(tmp_path / "state.db")
    _step(store, "i1", pb.OrchestratorResponse(actions=[
        pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="act"))]))
    row = store.get_instance(HUB, "i1")
    assert row is not None and row.status == pb.ORCHESTRATION_STATUS_RUNNING and row.failure is None
    assert [c.request.name for c in store.claim_activities(HUB, "test", 10, 30)] == ["act"]


# ---------------------------------------------------------------- the SDK against the in-process backend


@pytest.mark.parametrize("orchestrator,named", [
    (flows.signaller, "sendEntityMessage (entityOperationSignaled)"),
    (flows.caller, "sendEntityMessage (entityOperationCalled)"),
    (flows.signaller_continuing, "sendEntityMessage (entityOperationSignaled)"),
])
def test_an_orchestration_that_uses_an_entity_fails_naming_it(harness, orchestrator, named):
    iid = harness.client.schedule_new_orchestration(orchestrator, input=0)
    state = harness.client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details.error_type == "NotSupportedError"
    assert named in state.failure_details.message, state.failure_details.message
    assert state.serialized_output is None  # neither "signalled" nor a new execution's result


def test_an_event_sent_in_the_step_that_continues_as_new_still_arrives(harness):
    target = harness.client.schedule_new_orchestration(flows.waiter)
    wait_until(lambda: (s := harness.client.get_orchestration_state(target)) and s.serialized_custom_status,
               "the waiter to wait", TIMEOUT)
    sender = harness.client.schedule_new_orchestration(flows.sender_continuing, input=[target, 0])
    assert json.loads(harness.client.wait_for_orchestration_completion(sender, timeout=TIMEOUT).serialized_output) == 1
    state = harness.client.wait_for_orchestration_completion(target, timeout=TIMEOUT)
    assert json.loads(state.serialized_output) == "from a continuing sender"


# ---------------------------------------------------------------- RPCs it does not implement


def test_every_rpc_of_the_protocol_has_an_answer_of_ours():
    """None falls through to the generated base class ("Method not implemented!", no reason given)."""
    base = stubs.TaskHubSidecarServiceServicer
    rpcs = [name for name in vars(base) if not name.startswith("_")]
    assert "GetWorkItems" in rpcs and "SkipGracefulOrchestrationTerminations" in rpcs
    assert [name for name in rpcs if getattr(Servicer, name) is getattr(base, name)] == []


# ---------------------------------------------------------------- the same through `sitebackup serve` over TCP


@pytest.fixture
def served(tmp_path: Path):
    """`sitebackup serve` on a free loopback port; yields (address, token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_"))}
    env["PYTHONUNBUFFERED"] = "1"
    state, out = tmp_path / "served-state", tmp_path / "serve.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", "serve", "--listen", "127.0.0.1:0",
                                 "--state-dir", str(state)], env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    try:
        def address():
            assert proc.poll() is None, out.read_text()
            lines = [ln for ln in out.read_text().splitlines() if ln.startswith("127.0.0.1:")]
            return lines[0] if lines else None
        yield wait_until(address, "serve to listen", TIMEOUT), (state / "serve.token").read_text().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()


@pytest.mark.processes  # sitebackup serve
def test_serve_fails_an_orchestration_that_uses_an_entity_naming_it(served):
    address, token = served
    metadata = [bearer(token)]
    sdk_worker = worker.TaskHubGrpcWorker(host_address=address, metadata=metadata, logger=QUIET)
    sdk_worker.add_orchestrator(flows.signaller)
    sdk_worker.start()
    sdk_client = client.TaskHubGrpcClient(host_address=address, metadata=metadata, logger=QUIET)
    try:
        iid = sdk_client.schedule_new_orchestration(flows.signaller)
        state = sdk_client.wait_for_orchestration_completion(iid, timeout=TIMEOUT)
        assert state.runtime_status == OrchestrationStatus.FAILED
        assert state.failure_details.error_type == "NotSupportedError"
        assert "sendEntityMessage (entityOperationSignaled)" in state.failure_details.message
    finally:
        sdk_worker.stop()
        sdk_client.close()


@pytest.mark.processes  # sitebackup serve
def test_serve_answers_unimplemented_with_a_reason(served):
    address, token = served
    with grpc.insecure_channel(address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        calls = {
            "SignalEntity": lambda: stub.SignalEntity(pb.SignalEntityRequest(instanceId="@counter@c1", name="add"),
                                                      metadata=[bearer(token)]),
            "SkipGracefulOrchestrationTerminations": lambda: stub.SkipGracefulOrchestrationTerminations(
                pb.SkipGracefulOrchestrationTerminationsRequest(), metadata=[bearer(token)]),
            "DeleteTaskHub": lambda: stub.DeleteTaskHub(pb.DeleteTaskHubRequest(), metadata=[bearer(token)]),
            "CreateTaskHub(recreateIfExists)": lambda: stub.CreateTaskHub(
                pb.CreateTaskHubRequest(recreateIfExists=True), metadata=[bearer(token)]),
            "PurgeInstances(instanceBatch)": lambda: stub.PurgeInstances(pb.PurgeInstancesRequest(
                instanceBatch=pb.InstanceBatch(instanceIds=["x"])), metadata=[bearer(token)]),
            "QueryInstances(taskHubNames)": lambda: stub.QueryInstances(pb.QueryInstancesRequest(
                query=pb.InstanceQuery(taskHubNames=[wrappers_pb2.StringValue(value="other")])),
                metadata=[bearer(token)]),
        }
        for what, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, (what, refused.value)
            assert "not supported by the sitebackup embedded backend" in refused.value.details(), (what, refused.value)
        # what a task hub of its own does not need stays a plain answer
        stub.CreateTaskHub(pb.CreateTaskHubRequest(), metadata=[bearer(token)])
        stub.QueryInstances(pb.QueryInstancesRequest(query=pb.InstanceQuery(
            taskHubNames=[wrappers_pb2.StringValue(value=HUB)])), metadata=[bearer(token)])

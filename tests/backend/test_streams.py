"""Work-item streams of the embedded backend, spoken to with the raw sidecar protocol: health pings on an
idle stream, and what happens to a stream's work items when it closes (kept for this process's own
worker on the private socket, given back after a lease for a worker behind ``serve``)."""

from __future__ import annotations

import json
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
import pytest
from google.protobuf import wrappers_pb2
from helpers import open_stream_ids, wait_until

from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.guard import bearer

LEASE = 1.0  # renewed every third of it: a loaded machine does not let it lapse
PING = 0.2
STREAM_SECONDS = 30
TOKEN = "a-serve-token-for-the-stream-tests"


class Sidecar:
    """A started backend and a raw stub; *remote* serves it on loopback TCP as ``sitebackup serve`` does."""

    def __init__(self, state: Path, remote: bool):
        self.backend = EmbeddedBackend(state, lease_seconds=LEASE, ping_seconds=PING)
        address = self.backend.start("127.0.0.1:0", TOKEN) if remote else self.backend.start()
        self.metadata = [bearer(TOKEN)] if remote else []
        self.channel = grpc.insecure_channel(address)
        self.stub = stubs.TaskHubSidecarServiceStub(self.channel)

    def stream(self, max_activities: int = 1):
        # a deadline, so a stream that stays silent fails the test instead of hanging it
        return self.stub.GetWorkItems(pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=max_activities),
                                      metadata=self.metadata, timeout=STREAM_SECONDS)

    def close(self) -> None:
        self.channel.close()
        self.backend.stop()


@pytest.fixture
def sidecar(tmp_path):
    made: list[Sidecar] = []

    def make(remote: bool = False) -> Sidecar:
        made.append(Sidecar(tmp_path / "state", remote))
        return made[-1]

    yield make
    for s in made:
        s.close()


def work(stream) -> pb.WorkItem:
    """The next work item that is not a health ping."""
    for item in stream:
        if not item.HasField("healthPing"):
            return item
    raise AssertionError("the stream ended")


def only_pings(stream, count: int) -> None:
    """Read *count* items and require every one to be a ping: nothing was delivered meanwhile."""
    for _ in range(count):
        item = next(stream)
        assert item.HasField("healthPing"), item


def no_activity(stream, pings: int) -> None:
    """Read until *pings* health pings came and require that no activity was delivered meanwhile
    (an orchestrator episode, made ready by a completion, may be)."""
    while pings:
        item = next(stream)
        assert not item.HasField("activityRequest"), item
        pings -= item.HasField("healthPing")


def activities(stream, count: int) -> list[pb.WorkItem]:
    """The next *count* activities delivered (episodes between them are left in flight)."""
    items: list[pb.WorkItem] = []
    while len(items) < count:
        item = work(stream)
        if item.HasField("activityRequest"):
            items.append(item)
    return items


def task_ids(items: list[pb.WorkItem]) -> list[int]:
    return sorted(item.activityRequest.taskId for item in items)


def schedule(s: Sidecar, stream, activities: int) -> list[pb.WorkItem]:
    """Start a run whose first episode schedules *activities* activities; returns those delivered."""
    s.stub.StartInstance(pb.CreateInstanceRequest(instanceId="run", name="orch"), metadata=s.metadata)
    episode = work(stream)
    assert episode.HasField("orchestratorRequest")
    s.stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
        instanceId="run", completionToken=episode.completionToken,
        actions=[pb.OrchestratorAction(id=i, scheduleTask=pb.ScheduleTaskAction(
            name="work", input=wrappers_pb2.StringValue(value=json.dumps(i)))) for i in range(1, activities + 1)]),
        metadata=s.metadata)
    return [work(stream)]


def complete(s: Sidecar, item: pb.WorkItem, result: str) -> None:
    s.stub.CompleteActivityTask(pb.ActivityResponse(
        instanceId="run", taskId=item.activityRequest.taskId, completionToken=item.completionToken,
        result=wrappers_pb2.StringValue(value=json.dumps(result))), metadata=s.metadata)


def completed_results(episode: pb.WorkItem) -> list[str]:
    return [json.loads(e.taskCompleted.result.value) for e in episode.orchestratorRequest.newEvents
            if e.HasField("taskCompleted")]


def test_an_idle_work_item_stream_gets_health_pings(sidecar):
    s = sidecar()
    stream = s.stream()
    only_pings(stream, 3)
    # a ping does not stand in for work: the run's first episode still arrives on the same stream
    s.stub.StartInstance(pb.CreateInstanceRequest(instanceId="run", name="orch"))
    assert work(stream).orchestratorRequest.instanceId == "run"
    stream.cancel()


def test_a_reconnecting_local_stream_is_not_given_the_work_its_process_still_runs(sidecar):
    s = sidecar()
    first = s.stream()
    [running] = schedule(s, first, 1)
    assert running.activityRequest.taskId == 1
    first.cancel()  # the worker reconnects (a silent disconnect) while the activity runs on
    second = s.stream()
    only_pings(second, round(3 * LEASE / PING))  # three lease periods: the lease stayed this process's, renewed
    complete(s, running, "done")  # the first execution's result is not refused as stale
    assert completed_results(work(second)) == ["done"]
    second.cancel()


def test_a_reconnect_counts_the_work_still_running_against_the_new_streams_window(sidecar):
    s = sidecar()
    first = s.stream(max_activities=1)  # a window of 5 activities, refilled when 2 or fewer remain
    running = schedule(s, first, 10) + [work(first) for _ in range(4)]
    first.cancel()
    wait_until(lambda: not open_stream_ids(s.backend.state_dir), "the backend to close the first stream")
    second = s.stream(max_activities=1)
    only_pings(second, 5)  # the five still running fill the new stream's window too
    for item in running[:3]:
        complete(s, item, "done")
    assert task_ids(activities(second, 3)) == [6, 7, 8]  # new work only, none of what still runs
    second.cancel()


def test_a_stream_open_when_another_local_one_closes_counts_the_work_that_one_still_runs(sidecar):
    s = sidecar()
    first = s.stream(max_activities=1)
    earlier = schedule(s, first, 15) + [work(first) for _ in range(4)]
    second = s.stream(max_activities=1)  # the worker reconnected before the backend saw the first close
    own = activities(second, 5)
    assert task_ids(own) == [6, 7, 8, 9, 10]
    first.cancel()
    wait_until(lambda: len(open_stream_ids(s.backend.state_dir)) == 1, "the backend to close the first stream")
    for item in own[:3]:
        complete(s, item, "done")
    no_activity(second, 5)  # seven still run here, over the refill mark of two
    for item in earlier:
        complete(s, item, "done")
    assert task_ids(activities(second, 3)) == [11, 12, 13]
    second.cancel()


def test_a_remote_workers_closed_stream_gives_its_work_back_after_the_lease(sidecar):
    s = sidecar(remote=True)  # the worker may have died on another host
    first = s.stream()
    [running] = schedule(s, first, 1)
    first.cancel()
    second = s.stream()
    again = work(second)
    assert again.activityRequest.taskId == running.activityRequest.taskId
    assert again.completionToken != running.completionToken
    second.cancel()

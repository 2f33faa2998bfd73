"""gRPC TaskHubSidecarService servicer of the embedded backend.

Owns the mapping from sidecar RPCs to ``Store`` calls, the ``GetWorkItems`` streams
(with per-stream flow control) and the waiting RPCs. Waiters wake on the store's
in-process condition for low latency, and also poll the database because another
process on the same state directory may have changed it.

An idle stream gets the protocol's health ping every ``PING_SECONDS``: the SDK worker takes a stream
that delivers nothing for 120 s as silently disconnected and reconnects. A stream's work items are
disowned when it closes only if its worker may be another process (``sitebackup serve``): on the
private socket every worker is this live process's, and it still finishes what it was given after a
reconnect, so that work stays leased (and renewed) and the next stream counts it, instead of being
delivered a second time while it runs.

Nothing it sends exceeds the 4 MiB a client accepts (``MAX_MESSAGE``, the SDK's default): a
payload too large to return is replaced by a marker, a query answer is cut into pages, and a work
item too large to deliver fails its instance or activity instead of breaking the stream for all.

A request it does not implement (entities, rewind, deleting a task hub, ...) answers UNIMPLEMENTED
with the reason, never a success that did nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn

import durabletask.internal.helpers as helpers
import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
from google.protobuf import empty_pb2, timestamp_pb2, wrappers_pb2

from sitebackup.errors import write_fault

from .statedir import Damage, is_corrupt
from .store import TERMINAL, AlreadyExists, InstanceRow, NotFound, Store

log = logging.getLogger(__name__)

DEFAULT_TASKHUB = "default"
POLL_SECONDS = 0.05  # how stale a view of other processes' changes may get
PING_SECONDS = 30.0  # well within the SDK worker's 120 s silent-disconnect timeout
FLUSH_RETRY_SECONDS = 0.5  # between attempts to write activity results the database refused
_UNSUPPORTED = "not supported by the sitebackup embedded backend"
_DEFAULT_PAGE = 100
MAX_MESSAGE = 4 * 1024 * 1024
_PAGE_BYTES = MAX_MESSAGE - 64 * 1024  # room for the response's own fields
_PAYLOAD_BYTES = 1024 * 1024  # a payload over this is dropped from a state too large to send
# Whether a worker's filters accept a work item of this name and version.
_Accept = Callable[[str, str | None], bool]


def _taskhub(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "taskhub" and value:
            return str(value)
    return DEFAULT_TASKHUB


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _unsupported(context: grpc.ServicerContext, what: str) -> NoReturn:
    """Answer a request this backend does not implement: never a silent success that did nothing."""
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} {_UNSUPPORTED}")


def _omitted(what: str, size: int) -> str:
    return json.dumps(f"<omitted by sitebackup: {what} of {size} bytes, too large to return "
                      f"within the {MAX_MESSAGE}-byte message bound>")


def _too_large(what: str, size: int) -> pb.TaskFailureDetails:
    """Why a work item is failed instead of delivered: the worker could not receive it."""
    return pb.TaskFailureDetails(errorType="MessageTooLarge", isNonRetriable=True,
                                 errorMessage=f"this {what} work item of {size} bytes is over the "
                                              f"{MAX_MESSAGE} byte message bound a worker accepts")


def state_of(row: InstanceRow, include_payloads: bool) -> pb.OrchestrationState:
    """The row as a client sees it, small enough to send: oversized payloads become a marker."""
    state = row.to_state(include_payloads)
    if state.ByteSize() <= _PAGE_BYTES:
        return state
    for field, what in (("input", "input"), ("output", "output"), ("customStatus", "custom status")):
        value = getattr(state, field)
        if len(value.value) > _PAYLOAD_BYTES:
            value.value = _omitted(what, len(value.value))
    return state


class _Stream:
    """Outstanding work items of one GetWorkItems stream, for flow control."""

    def __init__(self, max_activities: int, max_orchestrations: int):
        self.max_activities = max(1, max_activities)
        self.max_orchestrations = max(1, max_orchestrations)
        self.activities: set[str] = set()
        self.orchestrations: set[str] = set()


class Servicer(stubs.TaskHubSidecarServiceServicer):
    def __init__(self, store: Store, owner: str, lease_seconds: float, damage: Damage, *,
                 remote_workers: bool, ping_seconds: float = PING_SECONDS):
        self.store = store
        self.damage = damage
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.remote_workers = remote_workers
        self.ping_seconds = ping_seconds
        self.stopping = threading.Event()
        self._streams_lock = threading.Lock()
        self._token_stream: dict[str, _Stream] = {}
        # This process's work items whose stream closed, kept for the next stream (local workers only).
        self._unattached = _Stream(1, 1)
        self._open: set[_Stream] = set()
        self._dropping = False  # this process stops at once: its activities' results are not results
        # the runs this process's own workers may take (``host_only``); None: any (``sitebackup worker``)
        self._only: set[str] | None = None
        self._completions: list[tuple[str, pb.ActivityResponse]] = []
        self._completions_ready = threading.Condition()
        self._flusher_done = False
        self._flusher = threading.Thread(target=self._flush_loop, name="sitebackup-activity-flush", daemon=True)
        self._flusher.start()

    def host_only(self, instance_id: str) -> None:
        """Let this process's workers take the work of *instance_id* (and of the runs named before) only: a command
        hosting its own run never adopts another one this state directory holds (a killed backup's) behind its
        back. Workers of other processes (``sitebackup serve``) are not held to it."""
        self._only = (self._only or set()) | {instance_id}

    def drop_results(self) -> None:
        """From now on ignore what this process's workers report of their activities: the process is stopping at
        once and what they end with (cut short) is no result. Their work items stay leased to this process until
        ``Store.release_leases`` (``EmbeddedBackend.stop``, or the next process, this one being dead) lets another
        run them."""
        self._dropping = True

    def shutdown(self) -> None:
        """Make streams end; called before the gRPC server stops."""
        self.stopping.set()
        self.store.notify()

    def close(self) -> None:
        """Write the activity results still queued; called after the gRPC server stopped."""
        with self._completions_ready:
            self._flusher_done = True
            self._completions_ready.notify()
        self._flusher.join()

    def _flush_loop(self) -> None:
        # Activity results are acknowledged at once and written in batches by this thread:
        # one transaction per batch instead of one per activity keeps large fan-outs cheap.
        # If the process dies before a batch is written, the activity's lease expires and it
        # runs again (activities are at-least-once anyway); a result is never applied twice.
        # A batch that cannot be written (disk full) is kept and tried again: dropping it would
        # leave its work items leased to this live process, never to run again.
        while True:
            with self._completions_ready:
                while not self._completions and not self._flusher_done:
                    self._completions_ready.wait()
                batch, self._completions = self._completions, []
                closing = self._flusher_done
                if not batch and closing:
                    return
            try:
                applied = self.store.complete_activities(batch)
            except Exception as exc:
                if is_corrupt(exc):  # every request now answers with it; the results are lost with the db
                    self.damage.note(exc)
                    continue
                if closing:  # the process stops: its leases are released (here or by the next process)
                    log.debug("dropped %d activity results that could not be recorded: %s", len(batch), exc)
                    return
                if write_fault(exc) is None:
                    log.exception("could not record %d activity results; trying again", len(batch))
                with self._completions_ready:
                    self._completions[:0] = batch
                    self._completions_ready.wait(FLUSH_RETRY_SECONDS)
                continue
            stale = len(applied) - sum(applied)
            if stale:  # normal after a cancel or a lost lease
                log.debug("ignored %d stale activity completion(s)", stale)

    # --- helpers --------------------------------------------------------------------

    def _wait_changed(self, generation: int, timeout: float) -> None:
        cond = self.store.changed
        with cond:
            if self.store.generation == generation and not self.stopping.is_set():
                cond.wait(timeout)

    def _wait_for(self, request: pb.GetInstanceRequest, context: grpc.ServicerContext,
                  done: Callable[[InstanceRow], bool], what: str) -> pb.GetInstanceResponse:
        hub = _taskhub(context)
        key = (hub, request.instanceId)
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else 3600.0)
        while True:
            seen = self.store.touched.get(key)
            read_at = time.monotonic()
            row = self.store.get_instance(hub, request.instanceId)
            if row is None:
                return pb.GetInstanceResponse(exists=False)
            if done(row):
                return pb.GetInstanceResponse(exists=True,
                                              orchestrationState=state_of(row, request.getInputsAndOutputs))
            # Re-read when this process touched the instance, or after a poll period for other processes.
            while self.store.touched.get(key) == seen and time.monotonic() - read_at < 2 * POLL_SECONDS:
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active() or self.stopping.is_set():
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"Timed out waiting for instance '{request.instanceId}' to {what}")
                generation = self.store.generation
                if self.store.touched.get(key) != seen:
                    break
                self._wait_changed(generation, min(left, 2 * POLL_SECONDS))

    # --- client RPCs ----------------------------------------------------------------

    def Hello(self, request: empty_pb2.Empty, context: grpc.ServicerContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    def StartInstance(self, request: pb.CreateInstanceRequest, context: grpc.ServicerContext) -> pb.CreateInstanceResponse:
        instance_id = request.instanceId or uuid.uuid4().hex
        try:
            self.store.create_instance(
                _taskhub(context), instance_id, request.name,
                version=request.version.value if request.HasField("version") else None,
                input=request.input.value if request.HasField("input") else None,
                tags=dict(request.tags) or None,
                start_at=_seconds(request.scheduledStartTimestamp)
                if request.HasField("scheduledStartTimestamp") else None,
                replaceable=list(request.orchestrationIdReusePolicy.replaceableStatus)
                if request.HasField("orchestrationIdReusePolicy") else None)
        except AlreadyExists as ex:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(ex))
        return pb.CreateInstanceResponse(instanceId=instance_id)

    def GetInstance(self, request: pb.GetInstanceRequest, context: grpc.ServicerContext) -> pb.GetInstanceResponse:
        row = self.store.get_instance(_taskhub(context), request.instanceId)
        if row is None:
            return pb.GetInstanceResponse(exists=False)
        return pb.GetInstanceResponse(exists=True, orchestrationState=state_of(row, request.getInputsAndOutputs))

    def WaitForInstanceStart(self, request: pb.GetInstanceRequest, context: grpc.ServicerContext) -> pb.GetInstanceResponse:
        return self._wait_for(request, context, lambda r: r.status != pb.ORCHESTRATION_STATUS_PENDING, "start")

    def WaitForInstanceCompletion(self, request: pb.GetInstanceRequest, context: grpc.ServicerContext
                                  ) -> pb.GetInstanceResponse:
        return self._wait_for(request, context, lambda r: r.status in TERMINAL, "complete")

    def _queue(self, context: grpc.ServicerContext, instance_id: str, event: pb.HistoryEvent) -> None:
        try:
            self.store.raise_event(_taskhub(context), instance_id, event)
        except NotFound as ex:
            context.abort(grpc.StatusCode.NOT_FOUND, str(ex))

    def RaiseEvent(self, request: pb.RaiseEventRequest, context: grpc.ServicerContext) -> pb.RaiseEventResponse:
        self._queue(context, request.instanceId, helpers.new_event_raised_event(
            request.name, request.input.value if request.HasField("input") else None))
        return pb.RaiseEventResponse()

    def TerminateInstance(self, request: pb.TerminateRequest, context: grpc.ServicerContext) -> pb.TerminateResponse:
        self.store.terminate(_taskhub(context), request.instanceId,
                             request.output.value if request.HasField("output") else None, request.recursive)
        return pb.TerminateResponse()

    def SuspendInstance(self, request: pb.SuspendRequest, context: grpc.ServicerContext) -> pb.SuspendResponse:
        row = self.store.get_instance(_taskhub(context), request.instanceId)
        if row is not None and row.status == pb.ORCHESTRATION_STATUS_SUSPENDED:
            return pb.SuspendResponse()
        self._queue(context, request.instanceId, helpers.new_suspend_event(
            encoded_input=request.reason.value if request.HasField("reason") else None))
        return pb.SuspendResponse()

    def ResumeInstance(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        self._queue(context, request.instanceId, helpers.new_resume_event(
            encoded_input=request.reason.value if request.HasField("reason") else None))
        return pb.ResumeResponse()

    def RestartInstance(self, request: pb.RestartInstanceRequest, context: grpc.ServicerContext) -> pb.RestartInstanceResponse:
        new_id = uuid.uuid4().hex if request.restartWithNewInstanceId else request.instanceId
        try:
            self.store.restart(_taskhub(context), request.instanceId, new_id)
        except NotFound as ex:
            context.abort(grpc.StatusCode.NOT_FOUND, str(ex))
        except AlreadyExists as ex:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(ex))
        return pb.RestartInstanceResponse(instanceId=new_id)

    def RewindInstance(self, request: pb.RewindInstanceRequest, context: grpc.ServicerContext) -> pb.RewindInstanceResponse:
        _unsupported(context, "rewind is")

    def QueryInstances(self, request: pb.QueryInstancesRequest, context: grpc.ServicerContext) -> pb.QueryInstancesResponse:
        q = request.query
        if any(name.value != _taskhub(context) for name in q.taskHubNames):
            _unsupported(context, "querying other task hubs (taskHubNames) is")
        offset = 0
        if q.HasField("continuationToken") and q.continuationToken.value.isdigit():
            offset = int(q.continuationToken.value)
        limit = min(q.maxInstanceCount, _DEFAULT_PAGE) if q.maxInstanceCount > 0 else _DEFAULT_PAGE
        rows, more = self.store.query_instances(
            _taskhub(context), statuses=list(q.runtimeStatus),
            created_from=_seconds(q.createdTimeFrom) if q.HasField("createdTimeFrom") else None,
            created_to=_seconds(q.createdTimeTo) if q.HasField("createdTimeTo") else None,
            prefix=q.instanceIdPrefix.value if q.HasField("instanceIdPrefix") else None,
            offset=offset, limit=limit)
        response = pb.QueryInstancesResponse()
        size = 0
        for i, row in enumerate(rows):
            state = state_of(row, q.fetchInputsAndOutputs)
            size += state.ByteSize() + 8
            if i and size > _PAGE_BYTES:  # the rest on the next page
                rows, more = rows[:i], True
                break
            response.orchestrationState.append(state)
        if more:
            response.continuationToken.value = str(offset + len(rows))
        return response

    def ListInstanceIds(self, request: pb.ListInstanceIdsRequest, context: grpc.ServicerContext) -> pb.ListInstanceIdsResponse:
        after = None
        if request.HasField("lastInstanceKey") and "|" in request.lastInstanceKey.value:
            stamp, _, iid = request.lastInstanceKey.value.partition("|")
            after = (float(stamp), iid)
        rows, more = self.store.list_terminal_ids(
            _taskhub(context), statuses=list(request.runtimeStatus),
            completed_from=_seconds(request.completedTimeFrom) if request.HasField("completedTimeFrom") else None,
            completed_to=_seconds(request.completedTimeTo) if request.HasField("completedTimeTo") else None,
            after=after, limit=request.pageSize if request.pageSize > 0 else _DEFAULT_PAGE)
        response = pb.ListInstanceIdsResponse(instanceIds=[iid for _, iid in rows])
        if more and rows:
            response.lastInstanceKey.value = f"{rows[-1][0]!r}|{rows[-1][1]}"
        return response

    def PurgeInstances(self, request: pb.PurgeInstancesRequest, context: grpc.ServicerContext) -> pb.PurgeInstancesResponse:
        hub = _taskhub(context)
        kind = request.WhichOneof("request")
        if kind == "instanceId":
            count = self.store.purge(hub, instance_id=request.instanceId, recursive=request.recursive)
        elif kind == "purgeInstanceFilter":
            f = request.purgeInstanceFilter
            count = self.store.purge(
                hub, statuses=list(f.runtimeStatus), recursive=request.recursive,
                created_from=_seconds(f.createdTimeFrom) if f.HasField("createdTimeFrom") else None,
                created_to=_seconds(f.createdTimeTo) if f.HasField("createdTimeTo") else None)
        else:
            _unsupported(context, f"a purge by {kind} is" if kind else "a purge that names no instance or filter is")
        return pb.PurgeInstancesResponse(deletedInstanceCount=count, isComplete=wrappers_pb2.BoolValue(value=True))

    def StreamInstanceHistory(self, request: pb.StreamInstanceHistoryRequest, context: grpc.ServicerContext
                              ) -> Iterator[pb.HistoryChunk]:
        events = self.store.history(_taskhub(context), request.instanceId)
        if events is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Orchestration instance '{request.instanceId}' not found")
        for offset in range(0, len(events), 100):
            yield pb.HistoryChunk(events=events[offset:offset + 100])

    def CreateTaskHub(self, request: pb.CreateTaskHubRequest, context: grpc.ServicerContext) -> pb.CreateTaskHubResponse:
        # a task hub exists as soon as an instance names it: there is nothing to create
        if request.recreateIfExists:
            _unsupported(context, "recreating a task hub is")
        return pb.CreateTaskHubResponse()

    def DeleteTaskHub(self, request: pb.DeleteTaskHubRequest, context: grpc.ServicerContext) -> pb.DeleteTaskHubResponse:
        _unsupported(context, "deleting a task hub is")

    def SkipGracefulOrchestrationTerminations(self, request: pb.SkipGracefulOrchestrationTerminationsRequest,
                                              context: grpc.ServicerContext) -> pb.SkipGracefulOrchestrationTerminationsResponse:
        _unsupported(context, "skipping graceful orchestration terminations is")

    # --- worker RPCs ----------------------------------------------------------------

    @staticmethod
    def _filters(request: pb.GetWorkItemsRequest) -> tuple[_Accept | None, _Accept | None]:
        if not request.HasField("workItemFilters"):
            return None, None

        def build(filters: Iterable[pb.OrchestrationFilter | pb.ActivityFilter]) -> _Accept:
            accepted: dict[str, set[str]] = {}
            for f in filters:
                accepted.setdefault(f.name, set()).update(f.versions)
            return lambda name, version: name in accepted and (
                not accepted[name] or (version or "") in accepted[name])

        return build(request.workItemFilters.orchestrations), build(request.workItemFilters.activities)

    def GetWorkItems(self, request: pb.GetWorkItemsRequest, context: grpc.ServicerContext) -> Iterator[pb.WorkItem]:
        hub = _taskhub(context)
        stream_id = uuid.uuid4().hex
        orch_ok, act_ok = self._filters(request)
        # Deliver well ahead of the worker's concurrency so it never starves between refills;
        # still bounded so several processes on one state dir share a large fan-out.
        stream = _Stream(5 * (request.maxConcurrentActivityWorkItems or 100),
                         request.maxConcurrentOrchestrationWorkItems or 100)
        self.store.register_stream(hub, stream_id, self.owner)
        self._attach(stream)
        try:
            sent = time.monotonic()
            while context.is_active() and not self.stopping.is_set():
                generation = self.store.generation
                items = self._claim(hub, stream, orch_ok, act_ok)
                if items:
                    yield from items
                    sent = time.monotonic()
                elif time.monotonic() - sent >= self.ping_seconds:
                    yield pb.WorkItem(healthPing=pb.HealthPing())
                    sent = time.monotonic()
                else:
                    self._wait_changed(generation, POLL_SECONDS)
        finally:
            held = self._detach(stream)
            if held and not self.stopping.is_set():
                # The worker behind this stream may be gone (killed on another host): this process
                # must not keep its leases alive forever. stop() releases everything anyway.
                for token in held:
                    self.store.disown(hub, token, self.lease_seconds)
            self.store.unregister_stream(hub, stream_id)

    def _attach(self, stream: _Stream) -> None:
        """Open *stream*; a local worker's reconnect takes over the work its earlier stream still runs."""
        with self._streams_lock:
            self._open.add(stream)
            if not self.remote_workers:
                self._move(self._unattached, stream)

    def _detach(self, stream: _Stream) -> set[str]:
        """Close *stream*; the tokens to disown (a remote worker's), or none when this process runs them."""
        with self._streams_lock:
            self._open.discard(stream)
            if not self.remote_workers:
                self._move(stream, next(iter(self._open), self._unattached))
                return set()
            held = stream.activities | stream.orchestrations
            for token in held:
                self._token_stream.pop(token, None)
            return held

    def _move(self, source: _Stream, target: _Stream) -> None:
        for token in source.activities | source.orchestrations:
            self._token_stream[token] = target
        target.activities |= source.activities
        target.orchestrations |= source.orchestrations
        source.activities.clear()
        source.orchestrations.clear()

    def _claim(self, hub: str, stream: _Stream, orch_ok: _Accept | None, act_ok: _Accept | None) -> list[pb.WorkItem]:
        items: list[pb.WorkItem] = []
        only = None if self.remote_workers else self._only
        free = stream.max_orchestrations - len(stream.orchestrations)
        if free > 0:
            for claim in self.store.claim_orchestrations(hub, self.owner, min(free, 50), self.lease_seconds, orch_ok,
                                                         only):
                item = pb.WorkItem(completionToken=claim.token, orchestratorRequest=claim.request)
                if item.ByteSize() > MAX_MESSAGE:
                    self.store.complete_orchestration(hub, pb.OrchestratorResponse(
                        instanceId=claim.request.instanceId, completionToken=claim.token,
                        actions=[pb.OrchestratorAction(id=-1, completeOrchestration=pb.CompleteOrchestrationAction(
                            orchestrationStatus=pb.ORCHESTRATION_STATUS_FAILED,
                            failureDetails=_too_large("orchestration", item.ByteSize())))]))
                    continue
                self._track(stream, stream.orchestrations, claim.token)
                items.append(item)
        # Refill activities in batches rather than one per completion: fewer claim transactions.
        if len(stream.activities) <= stream.max_activities // 2:
            free = min(stream.max_activities - len(stream.activities), 500)
            for task in self.store.claim_activities(hub, self.owner, free, self.lease_seconds, act_ok, only):
                item = pb.WorkItem(completionToken=task.token, activityRequest=task.request)
                if item.ByteSize() > MAX_MESSAGE:
                    self.store.complete_activities([(hub, pb.ActivityResponse(
                        instanceId=task.request.orchestrationInstance.instanceId, taskId=task.request.taskId,
                        completionToken=task.token, failureDetails=_too_large("activity", item.ByteSize())))])
                    continue
                self._track(stream, stream.activities, task.token)
                items.append(item)
        return items

    def _track(self, stream: _Stream, bucket: set[str], token: str) -> None:
        with self._streams_lock:
            bucket.add(token)
            self._token_stream[token] = stream

    def _untrack(self, token: str) -> None:
        with self._streams_lock:
            stream = self._token_stream.pop(token, None)
            if stream is None:
                return
            stream.activities.discard(token)
            stream.orchestrations.discard(token)
            refill = len(stream.activities) == stream.max_activities // 2
        if refill:
            self.store.notify()

    def CompleteOrchestratorTask(self, request: pb.OrchestratorResponse, context: grpc.ServicerContext
                                 ) -> pb.CompleteTaskResponse:
        hub = _taskhub(context)
        try:
            applied = self.store.complete_orchestration(hub, request)
        except Exception:
            # Nothing of the episode was recorded and the SDK worker only logs the error: give the lease back so
            # the episode runs again, or this process would renew it forever for a completion that never comes.
            self._give_back(hub, request.completionToken)
            raise
        self._untrack(request.completionToken)
        if not applied:
            log.warning("ignored a stale orchestrator completion for instance %r", request.instanceId)
        return pb.CompleteTaskResponse()

    def _give_back(self, hub: str, token: str) -> None:
        try:
            self.store.abandon(hub, token)
        except Exception as exc:  # the store refuses writes: a full disk stops the run and says so in one line
            log.debug("could not give back the work item %r: %s", token, exc)
        self._untrack(token)

    def CompleteActivityTask(self, request: pb.ActivityResponse, context: grpc.ServicerContext) -> pb.CompleteTaskResponse:
        if self._dropping and not self.remote_workers:
            self._untrack(request.completionToken)
            return pb.CompleteTaskResponse()
        with self._completions_ready:
            self._completions.append((_taskhub(context), request))
            self._completions_ready.notify()
        self._untrack(request.completionToken)
        return pb.CompleteTaskResponse()

    def AbandonTaskOrchestratorWorkItem(self, request: pb.AbandonOrchestrationTaskRequest, context: grpc.ServicerContext
                                        ) -> pb.AbandonOrchestrationTaskResponse:
        self.store.abandon(_taskhub(context), request.completionToken)
        self._untrack(request.completionToken)
        return pb.AbandonOrchestrationTaskResponse()

    def AbandonTaskActivityWorkItem(self, request: pb.AbandonActivityTaskRequest, context: grpc.ServicerContext
                                    ) -> pb.AbandonActivityTaskResponse:
        self.store.abandon(_taskhub(context), request.completionToken)
        self._untrack(request.completionToken)
        return pb.AbandonActivityTaskResponse()

    # --- entities: out of scope (an orchestration step that uses one fails: ``store.unsupported``) --------

    def _no_entities(self, request: object, context: grpc.ServicerContext) -> NoReturn:
        _unsupported(context, "entities are")

    CompleteEntityTask = _no_entities
    SignalEntity = _no_entities
    GetEntity = _no_entities
    QueryEntities = _no_entities
    CleanEntityStorage = _no_entities
    AbandonTaskEntityWorkItem = _no_entities


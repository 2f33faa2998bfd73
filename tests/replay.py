"""Orchestrators replayed deterministically, with fake activities and no sidecar, as durabletask-python's own
tests drive them: the SDK's ``_OrchestrationExecutor`` replays the history so far and takes the new events,
and this harness plays the backend's part, turning the actions it returns into history and feeding back
what fake activities return, one completion per episode, oldest first.

Everything is on the wire: the orchestration is found by its durable name, inputs, activity inputs and
outputs and the custom status are plain JSON values, and what a test looks at is the list of activities
scheduled (name and input), the custom status after every episode, the inputs of continued generations
and the output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import durabletask.internal.helpers as helpers
import durabletask.internal.orchestrator_service_pb2 as pb
from durabletask import task, worker
from durabletask.serialization import JsonDataConverter

from sitebackup.workflows.registry import ORCHESTRATIONS

INSTANCE_ID = "replayed"
START = datetime(2030, 1, 1, 12, 0, 0)
QUIET = logging.getLogger("sitebackup.tests.replay")
QUIET.setLevel(logging.WARNING)
MAX_EPISODES = 2000  # far above any test's run: an orchestration that never ends fails instead of hanging

Fake = Callable[[dict[str, Any]], Any]  # an activity: its JSON input in, its JSON output out (or it raises)


@dataclass
class Scheduled:
    """One activity the orchestrator scheduled: its durable name and its JSON input."""

    name: str
    input: dict[str, Any]
    at: datetime  # the orchestration's clock when it was scheduled
    generation: int


@dataclass
class _Pending:
    task_id: int
    kind: str  # "activity" or "timer"
    activity: Scheduled | None = None
    fire_at: datetime | None = None


@dataclass
class Replay:
    """One orchestration instance run against *activities* (durable name -> fake)."""

    orchestration: str
    activities: dict[str, Fake]
    scheduled: list[Scheduled] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)  # the custom status after each episode
    encoded_statuses: list[str] = field(default_factory=list)
    generations: list[Any] = field(default_factory=list)  # the input each generation started with
    retry_delays: list[timedelta] = field(default_factory=list)  # the timers the SDK set before a retry
    most_in_flight: int = 0
    output: Any = None
    done: bool = False

    def __post_init__(self) -> None:
        functions = {task.get_name(fn): fn for fn in ORCHESTRATIONS}
        registry = worker._Registry()
        registry.add_named_orchestrator(self.orchestration, functions[self.orchestration])
        self._executor = worker._OrchestrationExecutor(registry, QUIET, JsonDataConverter())
        self._now = START
        self._history: list[pb.HistoryEvent] = []
        self._pending: list[_Pending] = []
        self._episodes = 0

    def start(self, raw: Any) -> "Replay":
        """Start the instance with the JSON input *raw* and run it until it ends or waits for an event."""
        self._start_generation(json.dumps(raw))
        return self.run()

    def raise_event(self, name: str, data: Any = None) -> "Replay":
        """Raise the external event *name* and run on until the instance ends or waits again."""
        self._episode([helpers.new_event_raised_event(name, json.dumps(data))])
        return self.run()

    @property
    def waiting(self) -> bool:
        """Nothing scheduled is outstanding, yet the instance has not ended: it waits for an external event."""
        return not self.done and not self._pending

    @property
    def status(self) -> dict[str, Any]:
        return self.statuses[-1]

    def names(self) -> list[str]:
        return [s.name for s in self.scheduled]

    def inputs(self, name: str) -> list[dict[str, Any]]:
        return [s.input for s in self.scheduled if s.name == name]

    def run(self) -> "Replay":
        while not self.done and self._pending:
            self._episode([self._complete(self._pending.pop(0))])
        return self

    def _start_generation(self, encoded_input: str) -> None:
        self.generations.append(json.loads(encoded_input))
        self._history, self._pending = [], []
        self._episode([helpers.new_execution_started_event(self.orchestration, INSTANCE_ID, encoded_input)])

    def _complete(self, pending: _Pending) -> pb.HistoryEvent:
        if pending.kind == "timer":
            assert pending.fire_at is not None
            self._now = max(self._now, pending.fire_at)
            return helpers.new_timer_fired_event(pending.task_id, pending.fire_at)
        assert pending.activity is not None
        try:
            result = self.activities[pending.activity.name](pending.activity.input)
        except Exception as exc:  # what a worker reports for an activity that raised
            return helpers.new_task_failed_event(pending.task_id, exc)
        return helpers.new_task_completed_event(pending.task_id, json.dumps(result))

    def _episode(self, events: list[pb.HistoryEvent]) -> None:
        """One orchestrator episode, as a backend runs it: replay the history, apply *events*, record the
        actions returned as history and as outstanding work."""
        self._episodes += 1
        if self._episodes > MAX_EPISODES:
            raise AssertionError(f"the orchestration is still running after {MAX_EPISODES} episodes")
        self._now += timedelta(milliseconds=10)
        new = [helpers.new_orchestrator_started_event(self._now), *events]
        results = self._executor.execute(INSTANCE_ID, self._history, new)
        self._history += new
        if results.encoded_custom_status is not None:
            self.encoded_statuses.append(results.encoded_custom_status)
            self.statuses.append(json.loads(results.encoded_custom_status))
        for action in results.actions:
            if action.HasField("scheduleTask"):
                call = action.scheduleTask
                activity = Scheduled(call.name, json.loads(call.input.value) if call.HasField("input") else None,
                                     self._now, len(self.generations))
                self.scheduled.append(activity)
                self._history.append(helpers.new_task_scheduled_event(action.id, call.name, call.input.value))
                self._pending.append(_Pending(action.id, "activity", activity=activity))
            elif action.HasField("createTimer"):
                fire_at = action.createTimer.fireAt.ToDatetime()
                self.retry_delays.append(fire_at - self._now)
                self._history.append(helpers.new_timer_created_event(action.id, fire_at))
                self._pending.append(_Pending(action.id, "timer", fire_at=fire_at))
            elif action.HasField("completeOrchestration"):
                self._end(action.completeOrchestration)
                return
            else:
                raise AssertionError(f"an action this harness does not play: {action}")
        self.most_in_flight = max(self.most_in_flight, sum(p.kind == "activity" for p in self._pending))

    def _end(self, end: pb.CompleteOrchestrationAction) -> None:
        if end.orchestrationStatus == pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW:
            self._start_generation(end.result.value)
            return
        if end.orchestrationStatus != pb.ORCHESTRATION_STATUS_COMPLETED:
            raise AssertionError(f"the orchestration ended {end.orchestrationStatus}: {end.failureDetails}")
        self.output = json.loads(end.result.value)
        self.done = True

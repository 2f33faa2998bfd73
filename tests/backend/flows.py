"""Orchestrators and activities shared by the backend tests (and their child processes)."""

from __future__ import annotations

import os
from datetime import timedelta

from durabletask import task
from durabletask.entities import EntityInstanceId

ATTEMPTS: dict[str, int] = {}
RETRY = task.RetryPolicy(first_retry_interval=timedelta(seconds=0.2), max_number_of_attempts=5)


def double(ctx: task.ActivityContext, x: int) -> int:
    return 2 * x


def flaky(ctx: task.ActivityContext, key: str) -> str:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] < 3:
        raise RuntimeError(f"attempt {ATTEMPTS[key]} fails")
    return f"ok after {ATTEMPTS[key]}"


def record(ctx: task.ActivityContext, args: list) -> int:
    """Append one line per execution to a log file: O_APPEND keeps lines whole across processes."""
    path, i = args
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i


def fan_out(ctx: task.OrchestrationContext, n: int):
    results = yield task.when_all([ctx.call_activity(double, input=i) for i in range(n)])
    return sum(results)


def fan_out_recorded(ctx: task.OrchestrationContext, args: list):
    path, n = args
    results = yield task.when_all([ctx.call_activity(record, input=[path, i]) for i in range(n)])
    return sum(results)


def retrying(ctx: task.OrchestrationContext, key: str):
    return (yield ctx.call_activity(flaky, input=key, retry_policy=RETRY))


def child(ctx: task.OrchestrationContext, x: int):
    doubled = yield ctx.call_activity(double, input=x)
    if x < 0:
        raise ValueError("negative input")
    return doubled + 1


def parent(ctx: task.OrchestrationContext, x: int):
    results = yield task.when_all([ctx.call_sub_orchestrator(child, input=x + i) for i in range(3)])
    return results


def parent_of_failing(ctx: task.OrchestrationContext, _):
    try:
        yield ctx.call_sub_orchestrator(child, input=-1)
    except task.TaskFailedError as ex:
        return f"caught: {ex.details.message}"
    return "no error"


def counter(ctx: task.OrchestrationContext, n: int):
    if n < 10:
        ctx.continue_as_new(n + 1)
        return None
    return n


def waiter(ctx: task.OrchestrationContext, _):
    ctx.set_custom_status({"phase": "waiting"})
    value = yield ctx.wait_for_external_event("go")
    ctx.set_custom_status({"phase": "done"})
    return value


def sleeper(ctx: task.OrchestrationContext, seconds: float):
    yield ctx.create_timer(timedelta(seconds=seconds))
    value = yield ctx.call_activity(double, input=21)
    return value


def failing(ctx: task.OrchestrationContext, _):
    yield ctx.call_activity(double, input=1)
    raise KeyError("boom")


def sender(ctx: task.OrchestrationContext, target: str):
    ctx.send_event(target, "go", data="from sender")
    return "sent"


def signaller(ctx: task.OrchestrationContext, _):
    """Signals an entity (which the embedded backend does not support) and completes in the same step."""
    ctx.signal_entity(EntityInstanceId("counter", "c1"), "add", input=1)
    return "signalled"


def caller(ctx: task.OrchestrationContext, _):
    """Calls an entity without waiting for the answer and completes in the same step."""
    ctx.call_entity(EntityInstanceId("counter", "c1"), "get")
    return "called"


def signaller_continuing(ctx: task.OrchestrationContext, n: int):
    """Signals an entity while continuing as new: the orchestration must fail, not continue."""
    if n == 0:
        ctx.signal_entity(EntityInstanceId("counter", "c1"), "add", input=1)
        ctx.continue_as_new(1)
        return None
    return n


def sender_continuing(ctx: task.OrchestrationContext, args: list):
    """Sends an event to another instance in the step that continues as new."""
    target, n = args
    if n == 0:
        ctx.send_event(target, "go", data="from a continuing sender")
        ctx.continue_as_new([target, 1])
        return None
    return n


ORCHESTRATORS = [fan_out, fan_out_recorded, retrying, child, parent, parent_of_failing, counter, waiter,
                 sleeper, failing, sender, signaller, caller, signaller_continuing, sender_continuing]
ACTIVITIES = [double, flaky, record]

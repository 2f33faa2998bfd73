"""The speed work keeps its promises: the byte budget of staged ranges, the range
threshold, and a worker that stops promptly still drains what it was given (no timings asserted)."""

from __future__ import annotations

import threading
from pathlib import Path

from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker

from sitebackup.durable import workerstop
from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.model.work import DEFAULT_BLOCK_SIZE
from sitebackup.workflows import blocks

MIB = 1024 * 1024


def test_byte_budget_never_holds_more_than_its_capacity():
    budget = blocks.ByteBudget(10)
    held, peak, lock = [0], [0], threading.Lock()
    go = threading.Barrier(8)

    def take(n: int) -> None:
        go.wait()
        for _ in range(50):
            with budget.take(n):
                with lock:
                    held[0] += n
                    peak[0] = max(peak[0], held[0])
                with lock:
                    held[0] -= n

    threads = [threading.Thread(target=take, args=(n,)) for n in (3, 4, 5, 6, 3, 4, 5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 10 and budget.taken == 0


def test_byte_budget_lets_a_request_larger_than_capacity_through_alone():
    budget = blocks.ByteBudget(10)
    with budget.take(25):
        assert budget.taken == 10  # the whole budget: nothing else fits beside it
    assert budget.taken == 0


def test_ranges_start_at_four_blocks_but_never_above_32_mib():
    assert blocks.threshold(MIB) == 4 * MIB
    assert blocks.threshold(8 * MIB) == 32 * MIB
    assert blocks.threshold(DEFAULT_BLOCK_SIZE) == 32 * MIB
    assert blocks.threshold(1000 * MIB) == 32 * MIB


def test_prompt_worker_drains_a_running_activity_on_stop_and_finishes_runs(tmp_path: Path):
    started, release, done = threading.Event(), threading.Event(), []

    def slow(ctx: task.ActivityContext, n: int) -> int:
        started.set()
        release.wait(60)
        done.append(n)
        return n + 1

    def orchestrator(ctx: task.OrchestrationContext, n: int):
        return (yield ctx.call_activity(slow, input=n))

    def new_worker(address: str) -> dt_worker.TaskHubGrpcWorker:
        worker = dt_worker.TaskHubGrpcWorker(host_address=address)
        worker.add_orchestrator(orchestrator)
        worker.add_activity(slow)
        workerstop.make_prompt(worker)
        assert isinstance(worker._async_worker_manager, workerstop._PromptManager)
        return worker

    backend = EmbeddedBackend(tmp_path / "state")
    address = backend.start()
    try:
        client = dt_client.TaskHubGrpcClient(host_address=address)
        worker = new_worker(address)
        worker.start()
        first = client.schedule_new_orchestration(orchestrator, input=1)
        assert started.wait(60)
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        assert worker._shutdown.wait(60)  # stop() has begun while the activity still runs
        release.set()
        stopper.join(60)
        assert not stopper.is_alive() and done == [1]  # stop() returned only after the activity ended
        assert not worker._runLoop.is_alive()

        # a second prompt worker completes runs end to end, and stops with nothing left behind
        release.set()
        worker = new_worker(address)
        worker.start()
        second = client.schedule_new_orchestration(orchestrator, input=5)
        state = client.wait_for_orchestration_completion(second, timeout=60)
        worker.stop()
        assert state is not None and state.runtime_status == dt_client.OrchestrationStatus.COMPLETED
        assert state.serialized_output == "6" and 5 in done
        assert not worker._runLoop.is_alive()
        assert client.get_orchestration_state(first) is not None
        client.close()
    finally:
        backend.stop()

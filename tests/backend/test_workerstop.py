"""The prompt-stopping work-item consumer (``sitebackup.durable.workerstop``) never loses an item it took.

The SDK waits for each item through ``asyncio.wait_for(queue.get(), 1.0)``, and our wait inside it times out
after as long: the SDK's timeout can cancel our wait in the instant after its inner get took an item off the
queue. Dropped there, an orchestrator episode stayed leased to the live process (renewed, never redelivered)
and a restore hung for good. The unlucky instant is made here on purpose, not waited for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from durabletask import worker as dt_worker

from sitebackup.durable.workerstop import make_prompt


def _prompt_manager() -> Any:
    worker = dt_worker.TaskHubGrpcWorker(host_address="unix:/nonexistent", logger=logging.getLogger("quiet"))
    make_prompt(worker)
    manager = worker._async_worker_manager
    assert type(manager).__name__ == "_PromptManager", "make_prompt no longer swaps the SDK's manager"
    return manager


def test_an_item_taken_as_the_sdks_timeout_cancels_the_wait_is_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = _prompt_manager()
    real_wait_for = asyncio.wait_for
    ran: list[str] = []

    async def work(name: str) -> None:
        ran.append(name)

    async def cancel(name: str) -> None:
        ran.append(f"abandoned {name}")

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        raced = asyncio.Event()

        async def unlucky_wait_for(aw: Any, timeout: float | None) -> Any:
            """The SDK's wait_for whose timeout fires right after the wait's get took the item off the queue."""
            if raced.is_set():
                return await real_wait_for(aw, timeout)
            waiting = asyncio.ensure_future(aw)
            while not queue._getters:  # type: ignore[attr-defined]  # the consumer's get now waits on the queue
                await asyncio.sleep(0)
            queue.put_nowait((work, cancel, ("episode",), {}))
            while not queue.empty():  # the inner get takes it; the consumer's wait has not seen it yet
                await asyncio.sleep(0)
            raced.set()
            return await real_wait_for(waiting, 0)  # its timeout, at that instant: the wait is cancelled

        monkeypatch.setattr(dt_worker.asyncio, "wait_for", unlucky_wait_for)
        consumer = asyncio.ensure_future(manager._consume_queue(queue, asyncio.Semaphore(4)))
        await raced.wait()
        manager.shutdown()  # the consumer ends once its queue is empty and what it started has run
        await real_wait_for(consumer, 30)

    asyncio.run(main())
    assert ran == ["episode"]

"""Stopping a durabletask worker promptly: its idle queue consumers notice shutdown at once.

The SDK's work-item consumers (durabletask 1.12, ``_AsyncWorkerManager._consume_queue``) wait
for the next item with a fixed 1 s timeout and look at the shutdown flag only between waits, so
every ``worker.stop()`` of an idle worker costs up to a second of wall time: most of a short
run's shutdown. ``make_prompt`` swaps in a manager whose consumers' wait re-checks the flag every
``POLL_SECONDS`` and ends as soon as shutdown is set and the queue is empty. Draining is
unchanged: items already queued or running are still finished, as ``stop()`` promises.
If the SDK's internals differ from what this expects, the worker keeps its own manager.
"""

from __future__ import annotations

import asyncio
from typing import Any

from durabletask import worker as dt_worker

POLL_SECONDS = 0.05
_Manager = getattr(dt_worker, "_AsyncWorkerManager", None)


def make_prompt(worker: dt_worker.TaskHubGrpcWorker) -> None:
    """Give *worker* (not yet started) a manager that stops without the idle 1 s wait."""
    current = getattr(worker, "_async_worker_manager", None)
    if _Manager is None or type(current) is not _Manager or not hasattr(_Manager, "_consume_queue"):
        return
    worker._async_worker_manager = _PromptManager(current.concurrency_options, current._logger)


if _Manager is not None:
    class _PromptManager(_Manager):  # type: ignore[misc, valid-type]
        async def _consume_queue(self, queue: asyncio.Queue, semaphore: asyncio.Semaphore) -> None:
            wait_for_item = queue.get

            async def get() -> Any:
                # the consumer treats TimeoutError as "no item yet" and then checks the shutdown flag
                while not (self._shutdown and queue.empty()):
                    try:
                        return await asyncio.wait_for(wait_for_item(), POLL_SECONDS)
                    except asyncio.TimeoutError:
                        continue
                # still draining running items: don't let the consumer spin
                await asyncio.sleep(POLL_SECONDS)
                raise asyncio.TimeoutError

            queue.get = get  # type: ignore[method-assign]
            try:
                await super()._consume_queue(queue, semaphore)
            finally:
                del queue.get

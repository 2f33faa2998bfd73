"""Stopping a durabletask worker promptly: its idle queue consumers notice shutdown at once.

The SDK's work-item consumers (durabletask 1.12, ``_AsyncWorkerManager._consume_queue``) wait
for the next item with a fixed 1 s timeout and look at the shutdown flag only between waits, so
every ``worker.stop()`` of an idle worker costs up to a second of wall time: most of a short
run's shutdown. ``make_prompt`` swaps in a manager whose consumers' wait is woken by ``shutdown()`` itself, so a
consumer ends as soon as shutdown is set, its queue is empty and nothing it started still runs. Draining is
unchanged: items already queued or running are still finished, as ``stop()`` promises. An item a wait took off
the queue is handed on even when the SDK's timeout cancels that wait at the same instant: a dropped work item
would stay leased to this live process, never run and never given back, and its run would hang.
If the SDK's internals differ from what this expects, the worker keeps its own manager.
"""

from __future__ import annotations

import asyncio
from typing import Any

from durabletask import worker as dt_worker

POLL_SECONDS = 0.05  # the drain's pace while items this consumer started still run
WAIT_SECONDS = 1.0  # an idle wait, as the SDK's: shutdown() wakes it sooner
_Manager = getattr(dt_worker, "_AsyncWorkerManager", None)


def make_prompt(worker: dt_worker.TaskHubGrpcWorker) -> None:
    """Give *worker* (not yet started) a manager that stops without the idle 1 s wait."""
    current: Any = getattr(worker, "_async_worker_manager", None)  # the SDK's private manager, untyped
    if _Manager is None or type(current) is not _Manager or not hasattr(_Manager, "_consume_queue"):
        return
    worker._async_worker_manager = _PromptManager(current.concurrency_options, current._logger)


if _Manager is not None:
    class _PromptManager(_Manager):  # type: ignore[misc, valid-type]  # the SDK class, found at run time
        def shutdown(self) -> None:
            super().shutdown()
            # called on the worker's loop (its stream ended) and later from stop()'s thread: wake the waits
            for loop, stopping in getattr(self, "_stopping", ()):
                try:
                    loop.call_soon_threadsafe(stopping.set)
                except RuntimeError:  # that loop is closed: its consumers are gone
                    pass

        async def _consume_queue(self, queue: asyncio.Queue[Any], semaphore: asyncio.Semaphore) -> None:
            wait_for_item = queue.get
            stopping = asyncio.Event()
            # a reconnect runs the consumers again on a new loop: drop the waits of closed ones
            self._stopping = [(loop, event) for loop, event in getattr(self, "_stopping", ()) if not loop.is_closed()]
            self._stopping.append((asyncio.get_running_loop(), stopping))
            polls = 0

            async def get() -> Any:
                nonlocal polls
                # the consumer treats TimeoutError as "no item yet" and then checks the shutdown flag
                while not (self._shutdown and queue.empty()):
                    if self._shutdown:
                        return queue.get_nowait()
                    item = asyncio.ensure_future(wait_for_item())
                    stop = asyncio.ensure_future(stopping.wait())
                    try:
                        await asyncio.wait((item, stop), timeout=WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                    except asyncio.CancelledError:
                        # the SDK's own timeout around this wait, as long as ours, may cancel it after the item was
                        # taken off the queue but before this wait saw it: hand the item on (its wait_for returns
                        # what a cancelled wait still gave), else the work item is lost and its lease renewed forever
                        if item.done() and not item.cancelled():
                            return item.result()
                        raise
                    finally:
                        stop.cancel()
                        if not item.done():
                            item.cancel()  # an item not yet taken stays in the queue
                    if item.done() and not item.cancelled():
                        return item.result()
                # shutting down with nothing queued: the first time, let the consumer leave at once if
                # nothing of its own still runs; after that it is draining running items, so don't spin
                polls += 1
                if polls > 1:
                    await asyncio.sleep(POLL_SECONDS)
                raise asyncio.TimeoutError

            queue.get = get  # type: ignore[method-assign]  # on this one queue, undone below
            try:
                await super()._consume_queue(queue, semaphore)
            finally:
                del queue.get

"""What every activity gets: its dependencies from the hosting process, and one wrapper for errors.

Dependencies (blob clients, the work store, the cancel check) arrive through closures, never through
activity inputs: inputs are stored durably and must not carry credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from azure.storage.blob import ContainerClient
from durabletask import task

from sitebackup.blob.asyncget import Got
from sitebackup.blob.errors import redact
from sitebackup.blob.records import ContainerRecords, HeaderCache
from sitebackup.blob.upload import Uploaded
from sitebackup.blob.workstore import WorkStore
from sitebackup.errors import DestinationError
from sitebackup.local.files import SourceTree
from sitebackup.model.codec import DamagedData
from sitebackup.model.records import PriorCopy
from sitebackup.model.work import BackupCounts, Concurrency, PageResult, UploadSpec

# uploads a page's small files concurrently: (container, source root, [(relative path, blob name, prior copy)],
# spec, cancelled)
PutMany = Callable[[str, SourceTree, list[tuple[str, str, PriorCopy | None]], UploadSpec, Callable[[], bool]],
                   list[Uploaded | BaseException]]
# downloads a restore page's small files concurrently: (container, [(blob name, snapshot, size)], cancelled)
GetMany = Callable[[str, list[tuple[str, str | None, int]], Callable[[], bool]], list[Future[Got]]]
# writes a blob once on the process's loop, in a slot of its window: (container, blob name, bytes); returns at once
PutNew = Callable[[str, str, bytes], Future[None]]
# a slot of the process's window of requests in flight, held by the calling thread around one request of a large
# file carrying (size) bytes that it sends with the synchronous client
HeldSlot = Callable[[int], AbstractContextManager[None]]


def no_slot(_size: int) -> AbstractContextManager[None]:
    """A ``HeldSlot`` of no window: a process without an asyncio loop bounds the requests of large files by its
    threads alone."""
    return nullcontext()


log = logging.getLogger("sitebackup.activities")


class CancelQuery(Protocol):
    """Whether run *run_id* was cancelled: an answer a little old between files, as the backend has it now with
    *fresh* (before a block range, which takes far longer than the question)."""

    def __call__(self, run_id: str, fresh: bool = False) -> bool: ...


@dataclass
class ActivityDeps:
    """What activities need from the hosting process: its own credentials and work store."""

    container_client: Callable[[str], ContainerClient]
    work: WorkStore
    endpoint: str  # label for messages, never a secret
    concurrency: Concurrency = Concurrency()  # the hosting process's (--concurrency)
    # asked between files (and block ranges) so that `sitebackup cancel` stops uploads at the next boundary
    cancelled: CancelQuery = lambda run_id, fresh=False: False
    # told (run id, copy result) after every finished batch: `sitebackup worker` prints a status line
    on_batch: Callable[[str, PageResult[BackupCounts]], None] | None = None
    # blob.asyncput.AsyncPutter.put_many; None: one by one
    put_many: PutMany | None = None
    # blob.asyncput.AsyncPutter.put_new, for the seal's record pages; None: by threads of the synchronous client
    put_new: PutNew | None = None
    # blob.asyncget.AsyncGetter.get_many; None: one by one
    get_many: GetMany | None = None
    # blob.asyncput.AsyncPutter.held; by default no window bounds the requests of large files
    held: HeldSlot = no_slot
    # why the hosting process is stopping at once (its state directory is full), else None: the work
    # items already delivered then end without uploading what could not be recorded
    halted: Callable[[], str | None] = lambda: None
    # whether the hosting process is stopping (Ctrl-C, SIGTERM): what an activity returns then is not a result
    stopping: Callable[[], bool] = lambda: False
    # the sealed headers this process read, by container: a run's scan reads its baseline's, and its seal finds it here
    headers: dict[str, HeaderCache] = field(default_factory=dict)

    def records(self, container: str) -> ContainerRecords:
        """The catalog of *container*, sharing the sealed headers read of it by this process's other activities."""
        return ContainerRecords(self.container_client(container), self.headers.setdefault(container, HeaderCache()))


def activity(name: str, run: Callable[[task.ActivityContext, object], Any]) -> Callable[[task.ActivityContext, object], Any]:
    """*run* under its durable *name*: a DestinationError goes up as it is (the orchestration's retry
    policy and `resume` handle it), and so does DamagedData (a page that is not as written: the run fails,
    ``window.run_page_window``); anything else becomes a one-line, redacted failure."""

    def wrapped(ctx: task.ActivityContext, inp: object) -> Any:
        try:
            return run(ctx, inp)
        except (DestinationError, DamagedData):
            raise
        except Exception as exc:
            log.debug("activity %s failed", name, exc_info=True)
            raise RuntimeError(redact(str(exc))) from None

    # the worker registers activities under fn.__name__
    wrapped.__name__ = name
    return wrapped


def unless_halted(fn: Callable[..., Any], deps: ActivityDeps) -> Callable[..., Any]:
    """*fn*, failing at once instead of starting while ``deps.halted`` gives a reason, and failing instead of
    returning once ``deps.stopping``: a batch cut short by the stop (its transfers ended, its files left) must
    not be taken for done. The failure is retried, like any, when the run goes on."""

    def wrapped(ctx: task.ActivityContext, inp: Any) -> Any:
        reason = deps.halted()
        if reason is not None:
            raise RuntimeError(f"not started: {reason}")
        result = fn(ctx, inp)
        if deps.stopping():
            raise RuntimeError("not done: the process stopped (Ctrl-C or SIGTERM) while it ran")
        return result

    wrapped.__name__ = fn.__name__
    return wrapped

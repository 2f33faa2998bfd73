"""Opening a durable backend and hosting the worker and client that talk to it.

``open_backend`` is the one seam between commands and the durable engine: every command gets a
``Runtime`` from it and never cares whether the embedded SQLite backend or another sidecar
serves it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from durabletask import client as dt_client
from durabletask import worker as dt_worker

from sitebackup.activities import ActivityDeps, build_activities
from sitebackup.orchestrations import backup_site_content

ENV_STATE_DIR = "SITEBACKUP_STATE_DIR"
# The SDK logs INFO on every episode; its own logger keeps that out of the user's terminal
# unless --debug lowers the level.
SDK_LOGGER = logging.getLogger("sitebackup.durabletask")

if TYPE_CHECKING:
    from sitebackup.backend import EmbeddedBackend


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sitebackup"


def worker_threads(concurrency: int) -> int:
    """Activity slots plus headroom for orchestrator episodes, so uploads never starve replay."""
    return concurrency + 4


@dataclass
class Runtime:
    address: str
    state_dir: Path
    backend: "EmbeddedBackend | None" = None
    _workers: list[dt_worker.TaskHubGrpcWorker] = field(default_factory=list)

    def client(self) -> dt_client.TaskHubGrpcClient:
        return dt_client.TaskHubGrpcClient(host_address=self.address, logger=SDK_LOGGER)

    def start_worker(self, deps: ActivityDeps, concurrency: int) -> dt_worker.TaskHubGrpcWorker:
        options = dt_worker.ConcurrencyOptions(
            maximum_concurrent_activity_work_items=concurrency,
            maximum_concurrent_orchestration_work_items=4,
            maximum_thread_pool_workers=worker_threads(concurrency),
        )
        worker = dt_worker.TaskHubGrpcWorker(host_address=self.address, logger=SDK_LOGGER,
                                             concurrency_options=options)
        worker.add_orchestrator(backup_site_content)
        for activity in build_activities(deps):
            worker.add_activity(activity)
        worker.start()
        self._workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        while self._workers:
            self._workers.pop().stop()

    def worker_attached(self, instance_id: str) -> bool | None:
        """Whether a live process works on *instance_id*; None when the backend cannot tell."""
        return self.backend.worker_attached(instance_id) if self.backend else None


@contextmanager
def open_backend(state_dir: Path) -> Iterator[Runtime]:
    """Serve the embedded backend for *state_dir* in this process for the duration of the block."""
    from sitebackup.backend import EmbeddedBackend

    backend = EmbeddedBackend(state_dir)
    address = backend.start()
    runtime = Runtime(address=address, state_dir=state_dir, backend=backend)
    try:
        yield runtime
    finally:
        try:
            runtime.stop_workers()
        finally:
            backend.stop()

"""The embedded backend under test: a real backend on a temp state dir with an SDK worker and client."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from durabletask import client, worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flows  # noqa: E402

from sitebackup.durable.backend import EmbeddedBackend  # noqa: E402
from sitebackup.durable.workerstop import make_prompt  # noqa: E402

QUIET = logging.getLogger("sitebackup.tests.quiet")
QUIET.setLevel(logging.WARNING)


class Harness:
    """One EmbeddedBackend + worker + client; ``restart()`` simulates a new process on the same dir."""

    def __init__(self, state_dir: Path, lease_seconds: float = 30.0):
        self.state_dir = state_dir
        self.lease_seconds = lease_seconds
        self.backend: EmbeddedBackend | None = None
        self.worker: worker.TaskHubGrpcWorker | None = None
        self.client: client.TaskHubGrpcClient | None = None

    def start(self, with_worker: bool = True) -> "Harness":
        self.backend = EmbeddedBackend(self.state_dir, lease_seconds=self.lease_seconds)
        self.address = self.backend.start()
        self.client = client.TaskHubGrpcClient(host_address=self.address, logger=QUIET)
        if with_worker:
            self.start_worker()
        return self

    def start_worker(self, max_activities: int | None = None) -> None:
        self.worker = worker.TaskHubGrpcWorker(
            host_address=self.address, logger=QUIET,
            concurrency_options=worker.ConcurrencyOptions(maximum_concurrent_activity_work_items=max_activities))
        make_prompt(self.worker)  # as sitebackup's own workers: stop() without the SDK's idle second
        for fn in flows.ORCHESTRATORS:
            self.worker.add_orchestrator(fn)
        for fn in flows.ACTIVITIES:
            self.worker.add_activity(fn)
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    def restart(self) -> None:
        self.stop()
        self.start()

"""Client CPU per file on a backup: progress read when the backend changed the run (not polled), and the
requests a small file costs (no timings asserted)."""

from __future__ import annotations

import threading
from pathlib import Path

from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker

from sitebackup.commands import hosting
from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.runtime import Runtime


class CountingClient:
    """A durabletask client that counts the status reads made through it."""

    def __init__(self, inner: dt_client.TaskHubGrpcClient):
        self.inner = inner
        self.reads = 0

    def get_orchestration_state(self, instance_id: str, **kwargs):
        self.reads += 1
        return self.inner.get_orchestration_state(instance_id, **kwargs)


class Progress:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def progress(self, status: dict) -> None:
        self.seen.append(status)


def test_a_hosted_run_is_read_only_when_its_backend_changed_it(tmp_path: Path, monkeypatch):
    # no idle reads at all: every read must come from a change this process's backend applied
    monkeypatch.setattr(hosting, "IDLE_READ_SECONDS", 3600.0)
    release = threading.Event()

    def slow(ctx: task.ActivityContext, n: int) -> int:
        release.wait(60)
        return n + 1

    def orchestrator(ctx: task.OrchestrationContext, n: int):
        ctx.set_custom_status({"phase": "copy", "files_done": 0})
        done = yield ctx.call_activity(slow, input=n)
        ctx.set_custom_status({"phase": "done", "files_done": done})
        return done

    backend = EmbeddedBackend(tmp_path / "state")
    address = backend.start()
    runtime = Runtime(address=address, state_dir=tmp_path / "state", backend=backend)
    worker = dt_worker.TaskHubGrpcWorker(host_address=address)
    worker.add_orchestrator(orchestrator)
    worker.add_activity(slow)
    inner = dt_client.TaskHubGrpcClient(host_address=address)
    try:
        worker.start()
        instance_id = inner.schedule_new_orchestration(orchestrator, input=1)
        first = runtime.status_version(instance_id)
        # the activity is held long enough for a 10 Hz poll to read the unchanged run several times
        threading.Timer(0.8, release.set).start()
        client, printer = CountingClient(inner), Progress()
        state = hosting.watch(client, instance_id, printer, runtime=runtime)
        changes = runtime.status_version(instance_id) - first
    finally:
        release.set()
        worker.stop()
        inner.close()
        backend.stop()
    assert state.runtime_status == dt_client.OrchestrationStatus.COMPLETED
    assert printer.seen[-1] == {"phase": "done", "files_done": 2}
    assert 1 <= client.reads <= changes + 1 <= 4

"""Opening a durable backend and hosting the worker and client that talk to it.

``open_backend`` is the one seam between commands and the durable engine: every command gets a
``Runtime`` from it and never cares whether the embedded SQLite backend or Azure Durable Task
Scheduler (``TaskHubSettings``, through durabletask-azuremanaged) serves it. When the state
directory stops taking writes (disk full), ``Runtime.check`` raises ``StateFullError`` so the
command stops instead of waiting for work that can no longer be recorded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from durabletask import client as dt_client
from durabletask import worker as dt_worker
from durabletask.grpc_options import GrpcChannelOptions, GrpcRetryPolicyOptions
from durabletask.internal.grpc_interceptor import DefaultClientInterceptorImpl

from sitebackup.blob.workstore import BlobWorkStore, LocalWorkStore, WorkStore
from sitebackup.durable.backend.guard import bearer
from sitebackup.durable.backend.servicer import DEFAULT_TASKHUB
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.durable.workerstop import make_prompt
from sitebackup.errors import InputError, SiteBackupError, StateFullError
from sitebackup.workflows.registry import ActivityDeps, register

ENV_STATE_DIR = "SITEBACKUP_STATE_DIR"
# once a process stops at once (``Runtime.interrupt``), how long it waits for its workers to end the work items they
# run before it goes on without them: the stop stays within systemd's and a user's patience whatever they do
STOP_SECONDS = 4.0
# The SDK logs INFO on every episode; its own logger keeps that out of the user's terminal
# unless --debug lowers the level.
SDK_LOGGER = logging.getLogger("sitebackup.durabletask")
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# The embedded backend lives in this process, so it is unreachable only for an instant: after the process was
# stopped and continued (SIGSTOP, Ctrl-Z, a paused VM) a connection's deadline has passed while it slept, and the
# next call fails UNAVAILABLE although the server is right there. gRPC's own retry policy asks again.
_IN_PROCESS = GrpcChannelOptions(retry_policy=GrpcRetryPolicyOptions(
    max_attempts=5, initial_backoff_seconds=0.2, max_backoff_seconds=2.0))

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.blob import BlobServiceClient

    from sitebackup.durable.backend import EmbeddedBackend


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sitebackup"


@dataclass
class Runtime:
    address: str
    state_dir: Path
    backend: "EmbeddedBackend | None" = None
    taskhub: TaskHubSettings | None = None
    credential: "TokenCredential | None" = None
    _workers: list[dt_worker.TaskHubGrpcWorker] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)  # set by ``interrupt``
    _containers: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def connected(self) -> Iterator[dt_client.TaskHubGrpcClient]:
        """A client for the duration of a block, closed after."""
        client = self.client()
        try:
            yield client
        finally:
            client.close()

    def client(self, patient: bool = True) -> dt_client.TaskHubGrpcClient:
        """A client of the backend; *patient* (the embedded backend only) asks again a call that found it
        unreachable for an instant. A caller that must not wait, as one on an event loop's thread, passes False."""
        if self.taskhub is not None:
            from durabletask.azuremanaged.client import DurableTaskSchedulerClient

            return DurableTaskSchedulerClient(host_address=self.address, taskhub=self.taskhub.taskhub,
                                              token_credential=self.credential, secure_channel=self.taskhub.secure,
                                              interceptors=self._interceptors(), logger=SDK_LOGGER)
        return dt_client.TaskHubGrpcClient(host_address=self.address, logger=SDK_LOGGER,
                                           channel_options=_IN_PROCESS if patient else None)

    def _interceptors(self) -> list[DefaultClientInterceptorImpl]:
        """The `sitebackup serve` token on every call, when the connection string or environment gives one."""
        token = self.taskhub.serve_token() if self.taskhub is not None else None
        return [DefaultClientInterceptorImpl([bearer(token)])] if token else []

    def check_access(self) -> None:
        """Fail now, with the one-line error, if the backend refuses this process; a worker would
        otherwise retry a refused stream forever without a word. Unreachable is left to its retries."""
        with self.connected() as client:
            try:
                client.get_orchestration_state("sitebackup-access-check")
            except grpc.RpcError as exc:
                if exc.code() in _REFUSED:
                    raise

    def start_worker(self, deps: ActivityDeps, run: str | None = None) -> dt_worker.TaskHubGrpcWorker:
        """A worker running every orchestration and activity, as many at once as *deps* says (its concurrency): of
        the *run* this process hosts alone, when given, under the embedded backend (the scheduler hands any
        work to any worker)."""
        if run is not None and self.backend is not None:
            self.backend.host_only(run)
        options = dt_worker.ConcurrencyOptions(
            maximum_concurrent_activity_work_items=deps.concurrency.batches,
            maximum_concurrent_orchestration_work_items=4,
            maximum_thread_pool_workers=deps.concurrency.threads,
        )
        if self.taskhub is not None:
            from durabletask.azuremanaged.worker import DurableTaskSchedulerWorker

            worker: dt_worker.TaskHubGrpcWorker = DurableTaskSchedulerWorker(
                host_address=self.address, taskhub=self.taskhub.taskhub, token_credential=self.credential,
                secure_channel=self.taskhub.secure, interceptors=self._interceptors(), logger=SDK_LOGGER,
                concurrency_options=options)
        else:
            worker = dt_worker.TaskHubGrpcWorker(host_address=self.address, logger=SDK_LOGGER,
                                                 concurrency_options=options)
        register(worker, deps)
        make_prompt(worker)
        worker.start()
        self._workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Stop this process's workers: each ends the work items it runs first, however long they take, unless the
        process stops at once (``interrupt``): then they get ``STOP_SECONDS`` between them."""
        workers, self._workers = self._workers[::-1], []
        if not self.stopping.is_set():
            for worker in workers:
                worker.stop()
            return
        stops = [threading.Thread(target=worker.stop, name="sitebackup-worker-stop", daemon=True) for worker in workers]
        deadline = time.monotonic() + STOP_SECONDS
        for stop in stops:
            stop.start()
        for stop in stops:
            stop.join(max(0.0, deadline - time.monotonic()))

    def interrupt(self) -> None:
        """Stop at once (Ctrl-C, SIGTERM), keeping what resuming needs: the work items this process's workers still
        run are cut short and their results dropped, so they run again, whole, when the run resumes. Under the
        scheduler they fail instead (``ActivityDeps.stopping``) and its retries run them again."""
        self.stopping.set()
        if self.backend is not None:
            self.backend.drop_results()

    def status_version(self, instance_id: str) -> int | None:
        """A number that moves whenever this process's backend applies a change to the instance (an
        episode, a termination); None under the scheduler, where changes happen elsewhere."""
        store = self.backend.store if self.backend is not None else None
        return None if store is None else store.touched.get((DEFAULT_TASKHUB, instance_id), 0)

    def wait_status(self, instance_id: str, seen: int | None, timeout: float) -> int | None:
        """Block until ``status_version`` of the instance moves from *seen* or *timeout* passes; the version
        then. Without an embedded backend nothing here can tell: it just waits *timeout*."""
        store = self.backend.store if self.backend is not None else None
        if store is None:
            time.sleep(timeout)
            return None
        key = (DEFAULT_TASKHUB, instance_id)
        with store.changed:
            store.changed.wait_for(lambda: store.touched.get(key, 0) != seen, timeout)
            return store.touched.get(key, 0)

    def fault(self) -> str | None:
        """Why the embedded backend's state directory stopped taking writes, if it did."""
        return self.backend.fault if self.backend else None

    def check(self, instance_id: str | None = None) -> None:
        """Raise ``StateFullError`` once the state directory has refused a write."""
        fault = self.fault()
        if fault is not None:
            raise StateFullError(self.state_dir, fault, instance_id)

    def worker_attached(self, instance_id: str) -> bool | None:
        """Whether a live process works on *instance_id*; None when the backend cannot tell."""
        return self.backend.worker_attached(instance_id) if self.backend else None

    def work_store(self, service: "BlobServiceClient | None") -> WorkStore:
        """Local pages for the embedded backend; blobs in the destination when workers share no disk."""
        if self.taskhub is None:
            assert self.backend is not None
            return LocalWorkStore(self.state_dir / "work", on_fault=self.backend.record_fault)
        assert service is not None, "the scheduler's work store lives in the destination container"
        return BlobWorkStore(lambda instance_id: service.get_container_client(self._container_of(instance_id)))

    def _container_of(self, instance_id: str) -> str:
        # activities know only the instance id; its input (paths and options) names the container
        if instance_id not in self._containers:
            with self.connected() as client:
                state = client.get_orchestration_state(instance_id, fetch_payloads=True)
            inp = state.get_input() if state is not None and state.serialized_input else None
            if not isinstance(inp, dict) or "container" not in inp:
                raise LookupError(f"cannot find the destination container of {instance_id!r}")
            self._containers[instance_id] = inp["container"]
        return self._containers[instance_id]


@contextmanager
def open_backend(state_dir: Path, taskhub: TaskHubSettings | None = None) -> Iterator[Runtime]:
    """Serve the embedded backend for *state_dir* in this process for the duration of the block,
    or, given *taskhub*, talk to that Durable Task Scheduler instead."""
    if taskhub is not None:
        runtime = Runtime(address=taskhub.host_address, state_dir=state_dir, taskhub=taskhub,
                          credential=taskhub.credential())
        try:
            yield runtime
        finally:
            runtime.stop_workers()
        return

    from sitebackup.durable.backend import EmbeddedBackend

    backend = EmbeddedBackend(state_dir)
    address = backend.start()
    runtime = Runtime(address=address, state_dir=state_dir, backend=backend)
    try:
        yield runtime
    except SiteBackupError:
        raise
    except Exception:
        runtime.check()  # a failed call (gRPC or file) of a full state directory says so, once
        raise
    finally:
        try:
            runtime.stop_workers()
        finally:
            backend.stop()


def peek_run_ids(state_dir: Path, prefix: str, *, names: tuple[str, ...] = (), statuses: tuple[int, ...] = (),
                 limit: int = 100) -> list[str]:
    """Run ids in the embedded backend's database, newest first, read without serving it (shell completion)."""
    from sitebackup.durable.backend.servicer import DEFAULT_TASKHUB
    from sitebackup.durable.backend.store import peek_instance_ids

    return peek_instance_ids(state_dir / "state.db", DEFAULT_TASKHUB, prefix=prefix, names=names,
                             statuses=statuses, limit=limit)


@contextmanager
def open_client(state_dir: Path, taskhub: TaskHubSettings | None = None
                ) -> Iterator[tuple[Runtime, dt_client.TaskHubGrpcClient]]:
    """``open_backend`` and a client of it, for commands that only ask the backend."""
    with open_backend(state_dir, taskhub) as runtime, runtime.connected() as client:
        yield runtime, client


def backend_error(exc: BaseException) -> SiteBackupError | None:
    """The one-line error for a backend's refusal or damage that reached a command as a gRPC error."""
    if not isinstance(exc, grpc.RpcError):
        return None
    code, details = exc.code(), exc.details()
    if code in _REFUSED:
        return InputError(f"the task hub refused this client: {details}")
    if code == grpc.StatusCode.DATA_LOSS:
        return InputError(details)
    return None

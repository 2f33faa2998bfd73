"""Client CPU per file on a backup: progress read when the backend changed the run (not polled), and the
requests a small file costs (no timings asserted)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from helpers import ROOT, RecordingProxy, assert_nothing_leaks, env_for, many_files, run_cli, secret_forms, write_tree

from sitebackup.commands import hosting
from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.runtime import Runtime
from sitebackup.model.work import Progress, UploadSpec


class CountingClient:
    """A durabletask client that counts the status reads made through it."""

    def __init__(self, inner: dt_client.TaskHubGrpcClient):
        self.inner = inner
        self.reads = 0

    def get_orchestration_state(self, instance_id: str, **kwargs):
        self.reads += 1
        return self.inner.get_orchestration_state(instance_id, **kwargs)


class ProgressLog:
    def __init__(self) -> None:
        self.seen: list[Progress] = []

    def progress(self, status: Progress) -> None:
        self.seen.append(status)


@contextlib.contextmanager
def held_run(tmp_path: Path, hold_seconds: float) -> Iterator[tuple[Runtime, dt_client.TaskHubGrpcClient, str]]:
    """A run on a real embedded backend whose one activity is held *hold_seconds*: its runtime, a client and
    its instance id. Its status says "copy" with 0 files done until the activity ends, then "done" with 2."""
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
    worker = dt_worker.TaskHubGrpcWorker(host_address=address)
    worker.add_orchestrator(orchestrator)
    worker.add_activity(slow)
    inner = dt_client.TaskHubGrpcClient(host_address=address)
    try:
        worker.start()
        instance_id = inner.schedule_new_orchestration(orchestrator, input=1)
        threading.Timer(hold_seconds, release.set).start()
        yield Runtime(address=address, state_dir=tmp_path / "state", backend=backend), inner, instance_id
    finally:
        release.set()
        worker.stop()
        inner.close()
        backend.stop()


def test_a_hosted_run_is_read_only_when_its_backend_changed_it(tmp_path: Path, monkeypatch):
    # no idle reads at all: every read must come from a change this process's backend applied
    monkeypatch.setattr(hosting, "IDLE_READ_SECONDS", 3600.0)
    # the activity is held long enough for a poll to read the unchanged run several times
    with held_run(tmp_path, 0.8) as (runtime, inner, instance_id):
        first = runtime.status_version(instance_id)
        client, printer = CountingClient(inner), ProgressLog()
        state = hosting.watch(client, instance_id, printer, runtime=runtime)
        changes = runtime.status_version(instance_id) - first
    assert state.runtime_status == dt_client.OrchestrationStatus.COMPLETED
    assert printer.seen[-1] == Progress(phase="done", files_done=2)
    assert 1 <= client.reads <= changes + 1 <= 4


def test_a_run_watched_from_elsewhere_is_read_at_most_twice_a_second(tmp_path: Path):
    """`status --watch` (no embedded backend of its own) polls the serving process: a bounded rate."""
    with held_run(tmp_path, 2.0) as (_runtime, inner, instance_id):
        client = CountingClient(inner)
        started = time.monotonic()
        state = hosting.watch(client, instance_id, ProgressLog())
        elapsed = time.monotonic() - started
    assert state.runtime_status == dt_client.OrchestrationStatus.COMPLETED
    # the first reads come quickly (20 ms doubling), then one per POLL_SECONDS: 10 Hz would be 20 or more
    assert elapsed >= 2.0 and client.reads <= 6 + elapsed / hosting.POLL_SECONDS <= 6 + elapsed / 0.5, client.reads


def blob_puts(proxy: RecordingProxy) -> list[tuple[str, dict[str, str]]]:
    """The Put Blob requests the proxy saw: (blob path, headers); container and block requests left out."""
    return [(urlsplit(path).path, headers) for method, path, headers in proxy.requests
            if method == "PUT" and "restype=" not in path and "comp=" not in path
            and "/.sitebackup/" not in path]  # the run's sealed record: tests/performance/test_catalog_requests.py


def test_a_small_file_costs_one_put_with_both_md5s_and_no_per_request_signature(azurite, blob_service, tmp_path,
                                                                                 container_name):
    src = tmp_path / "site"
    files = many_files(src, 120, size=4096)
    files["odd name ü+%.txt"] = b"odd"
    write_tree(src, {"odd name ü+%.txt": b"odd"})
    state, log = tmp_path / "state", tmp_path / "backup.log"
    proxy = RecordingProxy(azurite.endpoint)
    conn = azurite.connection_string.replace(azurite.endpoint, proxy.endpoint)
    try:
        first = run_cli([str(src), "-c", container_name, "--debug", "--log-file", str(log), "--json"],
                        env_for(conn, state))
    finally:
        proxy.close()
    assert first.returncode == 0, first.stderr
    puts = blob_puts(proxy)
    assert len(puts) == len(files)  # one request per file, nothing before or after it
    for path, headers in puts:
        name = unquote(path).split(f"/{container_name}/", 1)[1]
        digest = base64.b64encode(hashlib.md5(files[name]).digest()).decode()
        assert headers["Content-MD5"] == digest and headers["x-ms-blob-content-md5"] == digest
        assert headers["If-None-Match"] == "*"  # a name the baseline did not hold
        assert "Authorization" not in headers  # authorized by the run's container SAS, signed once
    sigs = {parse_qs(urlsplit(path).query)["sig"][0] for method, path, _ in proxy.requests
            if method == "PUT" and "restype=" not in path and "/.sitebackup/" not in path}
    assert len(sigs) == 1
    # the run's SAS stays in memory: not in the state directory, the log or the output
    assert_nothing_leaks(secret_forms(*sigs), [first.stdout, first.stderr], [state, log.parent])
    container = blob_service.get_container_client(container_name)
    for name, data in files.items():
        props = container.get_blob_client(name).get_blob_properties()
        assert props.content_settings.content_md5 == hashlib.md5(data).digest()
        assert props.metadata["mtime_ns"] == str((src / name).stat().st_mtime_ns) and props.size == len(data)
    assert container.get_blob_client("odd name ü+%.txt").get_blob_properties().content_settings.content_type == "text/plain"


def test_the_runs_sas_is_renewed_before_it_expires_and_a_given_sas_is_kept(monkeypatch):
    from types import SimpleNamespace

    from azure.storage.blob.aio import BlobServiceClient

    from sitebackup.blob import asyncput

    sent: list[str] = []
    signed: list[str] = []

    def counting_sas(*args):
        signed.append(asyncput_sas(*args))
        return signed[-1]

    asyncput_sas = asyncput.container_sas
    monkeypatch.setattr(asyncput, "container_sas", counting_sas)

    class Pipeline:
        async def send_request(self, request):
            sent.append(request.url)
            return SimpleNamespace(status_code=201, headers={"ETag": '"0x1"'})

    async def put_two(puts: asyncput.ContainerPuts, now: dict[str, float]) -> None:
        assert await puts.put("a/b c.txt", b"x", {}) == '"0x1"'
        now["t"] += (asyncput.SAS_LIFETIME - asyncput.SAS_MARGIN).total_seconds()
        await puts.put("a/b c.txt", b"x", {})

    now = {"t": 0.0}
    keyed = BlobServiceClient.from_connection_string("UseDevelopmentStorage=true").get_container_client("c")
    asyncio.run(put_two(asyncput.ContainerPuts(keyed, Pipeline(), clock=lambda: now["t"]), now))
    query = parse_qs(urlsplit(sent[0]).query)
    assert urlsplit(sent[0]).path == "/devstoreaccount1/c/a/b%20c.txt"
    assert query["sp"] == ["cw"] and query["sr"] == ["c"]  # create and write blobs of this container, nothing else
    assert len(signed) == 2  # signed again before the first one runs out
    assert [urlsplit(url).query for url in sent] == signed
    sent.clear()
    given = BlobServiceClient("https://acct.blob.core.windows.net/?sv=2024-01-01&sig=given").get_container_client("c")
    asyncio.run(put_two(asyncput.ContainerPuts(given, Pipeline(), clock=lambda: now["t"]), now))
    assert [urlsplit(url).query for url in sent] == ["sv=2024-01-01&sig=given"] * 2


def test_a_refused_put_raises_what_the_sdk_would():
    from types import SimpleNamespace

    from azure.core.exceptions import ClientAuthenticationError, ResourceExistsError, ResourceModifiedError

    from sitebackup.blob.errors import classify, is_archived, one_line, response_error

    def response(status: int, code: str, message: str = "The specified blob already exists.") -> SimpleNamespace:
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}\nRequestId:1</Message></Error>"
        return SimpleNamespace(status_code=status, reason="Reason", headers={"x-ms-error-code": code},
                               text=lambda: body)

    exists = response_error(response(409, "BlobAlreadyExists"))
    assert isinstance(exists, ResourceExistsError) and one_line(exists) == "The specified blob already exists."
    assert isinstance(response_error(response(412, "ConditionNotMet")), ResourceModifiedError)
    refused = response_error(response(403, "AuthorizationFailure", "Server failed to authenticate the request."))
    assert isinstance(refused, ClientAuthenticationError) and "authentication failed" in str(classify(refused, "x"))
    assert is_archived(response_error(response(409, "BlobArchived", "This operation is not permitted")))
    assert response_error(SimpleNamespace(status_code=500, reason="Server Error", headers={}, text=lambda: "")
                          ).error_code is None


LAZY = ("rich", "azure.identity", "durabletask.azuremanaged", "prometheus_client")
REPORT_MODULES = f"""
import atexit, sys
atexit.register(lambda: print("LOADED", sorted({{m for m in sys.modules if m.startswith({LAZY!r})}}), file=sys.stderr))
from sitebackup.cli import main
sys.argv[0] = "sitebackup"
main()
"""


def test_a_cron_run_with_a_connection_string_loads_no_terminal_ui_identity_scheduler_or_metrics_code(
        azurite, tmp_path, container_name):
    src = tmp_path / "site"
    many_files(src, 5)
    env = env_for(azurite.connection_string, tmp_path / "state")
    run = subprocess.run([sys.executable, "-c", REPORT_MODULES, str(src), "-c", container_name], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stderr


def _upload_loops() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "sitebackup-asyncput")


def test_the_upload_client_made_ahead_serves_the_first_page_and_a_broken_one_fails_every_page(azurite, blob_service,
                                                                                             tmp_path, container_name):
    from sitebackup.blob.asyncput import AsyncPutter
    from sitebackup.blob.clients import StorageSettings
    from sitebackup.blob.upload import Uploaded
    from sitebackup.errors import InputError
    from sitebackup.local.files import SourceTree

    blob_service.create_container(container_name)
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "b.txt": b"beta"})
    before = _upload_loops()
    putter = AsyncPutter(StorageSettings(connection_string=azurite.connection_string))
    putter.start()
    putter.start()  # once is all it takes: no second loop
    assert _upload_loops() == before + 1
    try:
        done = putter.put_many(container_name, SourceTree(src), [("a.txt", "a.txt", None), ("b.txt", "b.txt", None)],
                               UploadSpec())
        assert all(isinstance(d, Uploaded) for d in done), done
        assert _upload_loops() == before + 1
        container = blob_service.get_container_client(container_name)
        assert container.download_blob("b.txt").readall() == b"beta"
    finally:
        putter.close()
    deadline = time.monotonic() + 10
    while _upload_loops() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _upload_loops() == before

    broken = AsyncPutter(StorageSettings(connection_string="AccountName=x;AccountKey=not base64!"))
    broken.start()
    for _ in range(2):
        with pytest.raises(InputError, match="AccountKey"):
            broken.put_many(container_name, SourceTree(src), [("a.txt", "a.txt", None)], UploadSpec())
    broken.close()  # returns: nothing was made to close

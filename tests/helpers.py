"""Helpers the tests import by name (conftest modules are not importable reliably: there are two).

Test modules never import each other: whatever two of them share lives here.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import zygote
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ContainerClient,
    ContentSettings,
    ResourceTypes,
    generate_account_sas,
)
from azurite import ACCOUNT, KEY

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command in a child process, as a user or cron would: forked from the suite's fork server
    (tests/zygote.py, imports paid once) when nothing but its arguments, environment and directory is asked
    for, else a real ``python -m sitebackup``."""
    cwd = kwargs.pop("cwd", ROOT)
    if not kwargs and zygote.SERVER.fits(env):
        return zygote.SERVER.run(args, env, cwd, timeout)
    return subprocess.run([sys.executable, "-m", "sitebackup", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, **kwargs)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str = "the condition", timeout: float = 120.0, interval: float = 0.05) -> T:
    """Poll *predicate* until it returns something truthy and return that; fail naming *what* otherwise.

    The one polling helper: tests wait for an observable condition, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(interval)


def open_stream_ids(state_dir: Path) -> set[str]:
    """The work-item streams an embedded backend on *state_dir* has open, read beside it: a worker that
    reconnects shows up as a new id."""
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT stream_id FROM streams")}
    finally:
        db.close()


# every command the tests start retries a failing batch as often as in production, and asks again for a lock it
# waits for, only sooner: tests whose batches keep failing or who wait for a lock spend less time asleep (the
# production intervals are pinned in this process: by the orchestration replays, and the lock's own tests)
QUICK_WAITS = {"SITEBACKUP_BATCH_RETRY_SECONDS": "1", "SITEBACKUP_LOCK_POLL_SECONDS": "1"}


def env_for(conn: str | None, state: Path, **extra: str) -> dict[str, str]:
    """A child's environment: no inherited Azure or sitebackup settings, this storage and state directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_"))}
    if conn:
        env["AZURE_STORAGE_CONNECTION_STRING"] = conn
    env.update(SITEBACKUP_STATE_DIR=str(state), PYTHONUNBUFFERED="1", **QUICK_WAITS)
    env.update(extra)
    return env


def many_files(root: Path, count: int, size: int = 2048) -> dict[str, bytes]:
    files = {f"d{i % 20:02d}/f{i:05d}.bin": (f"{i:08d}".encode() * (size // 8 + 1))[:size] for i in range(count)}
    write_tree(root, files)
    return files


class Stored(NamedTuple):
    data: bytes
    content_md5: bytes | None  # the blob's stored Content-MD5 (a whole-blob GET returns it with the bytes)


def read_blobs(client: ContainerClient, names: Iterable[str]) -> dict[str, Stored]:
    """The bytes and stored Content-MD5 of each blob named: one GET each, several at a time (the test's wait
    is then the service's, not the client's per-request CPU)."""
    def read(name: str) -> tuple[str, Stored]:
        download = client.download_blob(name)
        data = download.readall()
        md5 = download.properties.content_settings.content_md5
        return name, Stored(data, bytes(md5) if md5 else None)

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(read, names))


RESERVED = ".sitebackup/"  # the records sitebackup seals beside the files (sitebackup/blob/records.py)


def unseal(conn: str, container: str, run_id: str) -> None:
    """Make *run_id* a run as an earlier version left it, its record only in the state directory (its sealed
    header removed from the container): a test may then stand a record of its own in there."""
    service = BlobServiceClient.from_connection_string(conn)
    try:
        service.get_container_client(container).delete_blob(f"{RESERVED}runs/{run_id}")
    finally:
        service.close()


def assert_exact(conn: str, container: str, src: Path, prefix: str = "") -> None:
    """Every file of *src* is a blob with its exact bytes, and there is nothing else."""
    service = BlobServiceClient.from_connection_string(conn)
    try:
        client = service.get_container_client(container)
        names = {b.name for b in client.list_blobs() if not b.name.startswith(".sitebackup")}
        files = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()}
        want = {f"{prefix}/{rel}" if prefix else rel for rel in files}
        assert names == want
        stored = read_blobs(client, want)
        for rel, path in files.items():
            name = f"{prefix}/{rel}" if prefix else rel
            assert stored[name].data == path.read_bytes(), name
    finally:
        service.close()


class JsonRun:
    """A `sitebackup ... --json` child process whose NDJSON events we read as they come."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []

    def until(self, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            if predicate(event):
                return event
            assert time.monotonic() < deadline, f"no matching event within {timeout}s: {self.events[-3:]}"
        raise AssertionError(f"process ended first ({self.proc.wait()}): {self.proc.stderr.read()}")

    def finish(self, timeout: float = 120) -> tuple[int, dict, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.proc.returncode, (self.events[-1] if self.events else {}), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def uploading(min_done: int = 1) -> Callable[[dict], bool]:
    return lambda e: e["event"] == "progress" and e.get("phase") == "uploading" and e["files_done"] >= min_done


def account_sas_url(port: int, expires_in: timedelta, write: bool = True) -> tuple[str, str]:
    sas = generate_account_sas(ACCOUNT, KEY, resource_types=ResourceTypes(service=True, container=True, object=True),
                               permission=AccountSasPermissions(read=True, write=write, list=True, create=write,
                                                                add=write, delete=write),
                               expiry=datetime.now(timezone.utc) + expires_in)
    return f"http://127.0.0.1:{port}/{ACCOUNT}?{sas}", sas


def secret_forms(*secrets: str) -> list[bytes]:
    """Each secret as stored or printed anywhere: raw, URL-decoded, and its query's sig alone."""
    forms: set[str] = set()
    for secret in secrets:
        forms.update({secret, unquote(secret)})
        query = urlsplit(secret).query if secret.startswith("http") else ""
        for sig in parse_qs(query).get("sig", []):
            forms.update({sig, unquote(sig)})
    return [f.encode() for f in forms if len(f) >= 16]


def assert_nothing_leaks(secrets: list[bytes], texts: list[str], dirs: list[Path]) -> None:
    blobs = [t.encode() for t in texts]
    for folder in dirs:
        for path in folder.rglob("*"):
            if path.is_file():
                blobs.append(path.read_bytes())  # state.db, its WAL, work pages and results, logs
    assert blobs
    for secret in secrets:
        for data in blobs:
            assert secret not in data, f"secret found: {secret[:6]!r}..."


class ForwardingProxy:
    """An HTTP proxy in front of Azurite for tests that count, hold, alter or refuse blob requests.

    Subclasses override ``intercept``; ``endpoint`` is the proxy's URL, with the target's path (the
    account), to put in a connection string.
    """

    def __init__(self, target: str):
        self.target = urlsplit(target)
        self.lock = threading.Lock()
        self.release = threading.Event()  # for subclasses that hold requests until the test says so
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def reply_error(self, status: int, code: str) -> None:
                """Answer as the service does when it refuses a request, without forwarding it."""
                data = f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'.encode()
                self.send_response(status)
                self.send_header("x-ms-error-code", code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self):
                body = proxy.intercept(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if body is None:
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer's Content-Length is the blob's size, not this (empty) body's
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def intercept(self, request: BaseHTTPRequestHandler, body: bytes) -> bytes | None:
        """The body to forward for *request* (``command``, ``path``, ``headers``), possibly altered; None when
        the request was answered here (``request.reply_error``) or is dropped unanswered."""
        return body

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.target.path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class RecordingProxy(ForwardingProxy):
    """Records every request's method, path (with its query) and headers."""

    def __init__(self, target: str):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(target)

    def intercept(self, request, body):
        with self.lock:
            self.requests.append((request.command, request.path,
                                  {k: v for k, v in request.headers.items() if k.lower() != "connection"}))
        return body


class HoldingProxy(ForwardingProxy):
    """Holds every PUT whose blob path (unquoted, without the query) *holds* accepts until ``release`` is set;
    ``held`` counts them."""

    def __init__(self, target: str, holds: Callable[[str], bool]):
        self.holds = holds
        self.held = 0
        super().__init__(target)

    def intercept(self, request, body):
        if request.command == "PUT" and self.holds(unquote(request.path.split("?")[0])):
            with self.lock:
                self.held += 1
            self.release.wait(120)
        return body


def replace_blob(container: ContainerClient, name: str, data: bytes, keep: bool) -> None:
    """Replace blob *name* with *data* behind sitebackup's back; *keep* first takes a snapshot, as a backup run does."""
    blob = container.get_blob_client(name)
    if keep:
        blob.create_snapshot()
    blob.upload_blob(data, overwrite=True, content_settings=ContentSettings(
        content_md5=bytearray(hashlib.md5(data).digest())))


# the command in a child that writes its peak RSS to the file named first as it exits: VmHWM, not ru_maxrss
# (that counts the RSS of the process that forked the child too, the test runner's)
PEAK_CLI_CHILD = """
import atexit, runpy, sys
def peak_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(peak_kb())))
sys.argv[0] = "sitebackup"
runpy.run_module("sitebackup", run_name="__main__")
"""


def run_cli_peak(args: list[str], env: dict[str, str], peak: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run the real command in a child; its result and its peak RSS in MB."""
    proc = subprocess.run([sys.executable, "-c", PEAK_CLI_CHILD, str(peak), *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    return proc, int(peak.read_text()) / 1024 if peak.exists() else float("nan")

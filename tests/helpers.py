"""Helpers the tests import by name (conftest modules are not importable reliably: there are two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from azure.storage.blob import BlobServiceClient

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command in a child process, as a user or cron would."""
    return subprocess.run([sys.executable, "-m", "sitebackup", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def env_for(conn: str | None, state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_"))}
    if conn:
        env["AZURE_STORAGE_CONNECTION_STRING"] = conn
    env.update(SITEBACKUP_STATE_DIR=str(state), PYTHONUNBUFFERED="1", **extra)
    return env


def many_files(root: Path, count: int, size: int = 2048) -> dict[str, bytes]:
    files = {f"d{i % 20:02d}/f{i:05d}.bin": (f"{i:08d}".encode() * (size // 8 + 1))[:size] for i in range(count)}
    write_tree(root, files)
    return files


def assert_exact(conn: str, container: str, src: Path, prefix: str = "") -> None:
    """Every file of *src* is a blob with its exact bytes, and there is nothing else."""
    service = BlobServiceClient.from_connection_string(conn)
    try:
        client = service.get_container_client(container)
        names = {b.name for b in client.list_blobs() if not b.name.startswith(".sitebackup")}
        files = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()}
        want = {f"{prefix}/{rel}" if prefix else rel for rel in files}
        assert names == want
        for rel, path in files.items():
            name = f"{prefix}/{rel}" if prefix else rel
            assert client.download_blob(name).readall() == path.read_bytes(), name
    finally:
        service.close()


class JsonRun:
    """A `sitebackup ... --json` child process whose NDJSON events we read as they come."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []

    def until(self, predicate, timeout: float = 60) -> dict:
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


def uploading(min_done: int = 1):
    return lambda e: e["event"] == "progress" and e.get("phase") == "uploading" and e["files_done"] >= min_done

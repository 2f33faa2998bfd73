"""Shared fixtures: one real Azurite per test session, per-test containers and state dirs, a CLI runner.

Azurite failing to start fails the suite: blob tests are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from azurite import Azurite, free_port  # noqa: E402
from helpers import run_cli  # noqa: E402


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory):
    server = Azurite(free_port(), tmp_path_factory.mktemp("azurite"))
    try:
        server.start()
    except Exception as exc:  # fail, never skip: CI must notice a missing Azurite
        pytest.fail(f"cannot start Azurite: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def blob_service(azurite: Azurite):
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    yield client
    client.close()


@pytest.fixture
def container_name() -> str:
    return "t-" + uuid.uuid4().hex[:20]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def cli_env(azurite: Azurite, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_"))}
    env.update(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string, SITEBACKUP_STATE_DIR=str(state_dir),
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def cli(cli_env):
    def _run(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return run_cli([str(a) for a in args], env if env is not None else cli_env, **kwargs)
    return _run


@pytest.fixture
def mount_point(tmp_path: Path):
    """An empty directory to mount a small file system on (tmpfs: a full or read-only disk); unmounted after."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", str(point)], check=False)

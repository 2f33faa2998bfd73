"""Shared fixtures: one real Azurite per test session, per-test containers and state dirs, a CLI runner; and the
fast tier (``--fast``, see fast_tier.py): only tests that start no process, guarded.

Azurite failing to start fails the suite: blob tests are never skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_tier  # noqa: E402
from azurite import Azurite, free_port  # noqa: E402
from helpers import QUICK_WAITS, run_cli  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="only tests that start no process and no Azurite; any that tries fails")


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that (Python then installs no
    # KeyboardInterrupt handler): a suite run from a script would see the Ctrl-C its tests send ignored, where a
    # user's comes at a terminal. Restored here, in each test process, rather than in each child before its exec
    # (a ``preexec_fn`` makes the fork run gRPC's fork handlers in a process whose backend tests left gRPC threads).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("fast"):
        fast_tier.select(config, items)


@pytest.fixture(autouse=True)
def _fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    attempts = fast_tier.guard(monkeypatch) if request.config.getoption("fast") else []
    yield
    if attempts:
        pytest.fail("fast tier: this test " + "; ".join(attempts), pytrace=False)


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
               PYTHONUNBUFFERED="1", **QUICK_WAITS)
    return env


@pytest.fixture
def cli(cli_env):
    def _run(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return run_cli([str(a) for a in args], env if env is not None else cli_env, **kwargs)
    return _run


@pytest.fixture
def short_tmp():
    """A directory with a short path, for a state directory that must hold the backend's unix socket: beneath
    pytest's per-test directories (longer under pytest-xdist, and with a longer user name) a socket path can pass
    the ``sun_path`` bound, and the backend then rightly binds it in a private temp directory instead."""
    path = Path(tempfile.mkdtemp(prefix="sbt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mount_point(tmp_path: Path):
    """An empty directory to mount a small file system on (tmpfs: a full or read-only disk); unmounted after."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", str(point)], check=False)

"""Helpers the tests import by name (conftest modules are not importable reliably: there are two)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

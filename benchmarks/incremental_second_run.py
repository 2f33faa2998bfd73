"""First and second run of the real CLI over an unchanged 5,000-file tree: times and bytes.

Run: .venv/bin/python benchmarks/incremental_second_run.py [FILES]
Starts its own in-memory Azurite; prints one row per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from azurite import start_azurite  # noqa: E402


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = start_azurite(tmp_path / "azurite", in_memory=True)
        try:
            src = tmp_path / "site"
            for i in range(n):
                path = src / f"d{i % 50}" / f"f{i:05d}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(4096))
            env = dict(os.environ, AZURE_STORAGE_CONNECTION_STRING=server.connection_string,
                       SITEBACKUP_STATE_DIR=str(tmp_path / "state"))
            print(f"{'run':<8}{'seconds':>10}{'uploaded':>10}{'unchanged':>11}{'bytes up':>12}")
            for label in ("first", "second"):
                t0 = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "sitebackup", str(src), "-c", "bench", "--json"],
                                     env=env, capture_output=True, text=True, check=True).stdout
                elapsed = time.monotonic() - t0
                s = json.loads(out.splitlines()[-1])
                print(f"{label:<8}{elapsed:>10.2f}{s['files_uploaded']:>10}{s.get('files_unchanged', 0):>11}"
                      f"{s['bytes_uploaded']:>12}")
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)

"""Benchmark: how close `--bwlimit` runs come to their cap, backing up and restoring one dataset.

Run: .venv/bin/python benchmarks/bench_bwlimit.py [--dataset medium] [--caps off,8M,32M] [--repeat 1]

Each backup (``--force``) goes into a fresh container of one in-memory Azurite, each restore into a
fresh directory; the throughput is the run's bytes over its duration as the run's summary reports it
(scheduled to finished, without process start-up), next to the wall time of the whole command.
``achieved/cap`` should stay between 0.9 and 1.0; the ``off`` rows are the unlimited reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from azurite import start_azurite  # noqa: E402
from bench_upload import DATASETS, MIB, generate  # noqa: E402

from sitebackup.blob.bwlimit import parse_rate  # noqa: E402


def run(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.splitlines()[-1]), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="medium", choices=sorted(DATASETS))
    parser.add_argument("--caps", default="off,8M,32M", help="comma-separated --bwlimit values")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sitebackup-bench")
    opts = parser.parse_args()
    src = generate(DATASETS[opts.dataset], opts.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = start_azurite(tmp_path / "azurite", in_memory=True)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_"))}
            env.update(AZURE_STORAGE_CONNECTION_STRING=server.connection_string,
                       SITEBACKUP_STATE_DIR=str(tmp_path / "state"))
            print(f"{'run':<9}{'cap':>7}{'MiB':>8}{'run s':>8}{'wall s':>8}{'MiB/s':>8}{'achieved/cap':>14}")
            for cap_text in opts.caps.split(","):
                cap = parse_rate(cap_text)
                for _ in range(opts.repeat):
                    container = "bw-" + uuid.uuid4().hex[:12]
                    backup, wall = run([str(src), "-c", container, "--force", "--bwlimit", cap_text], env)
                    row("backup", cap_text, cap, backup["bytes_uploaded"], backup["duration_s"], wall)
                    dest = tmp_path / "restore"
                    restore, wall = run(["restore", backup["instance_id"], str(dest), "--bwlimit", cap_text], env)
                    row("restore", cap_text, cap, restore["bytes_restored"], restore["duration_s"], wall)
                    shutil.rmtree(dest)
        finally:
            server.stop()


def row(label: str, cap_text: str, cap: int | None, nbytes: int, seconds: float, wall: float) -> None:
    rate = nbytes / seconds
    ratio = f"{rate / cap:.3f}" if cap else "-"
    print(f"{label:<9}{cap_text:>7}{nbytes / MIB:>8.1f}{seconds:>8.2f}{wall:>8.2f}{rate / MIB:>8.1f}{ratio:>14}",
          flush=True)


if __name__ == "__main__":
    main()

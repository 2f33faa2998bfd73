"""Benchmark: the backups of a tree as runs pile up, this checkout's sitebackup against another checkout's
(``--base-src``, a git worktree at the commit to compare with), side by side in one run.

Run: .venv/bin/python benchmarks/bench_unchanged.py --base-src ../base [--files 100000] [--size 64] [--repeat 5]

Each checkout backs the same generated tree up into its own container of one fresh in-memory Azurite, with
its own state directory: a first backup of every file, then --repeat unchanged backups (nothing changed:
what a nightly run of a quiet site costs), the two checkouts taking turns so that a load from elsewhere on
the machine hits both. Prints the median wall and CPU seconds of each, and the ratio of this checkout to the
base: the cost of what one added to a run (for sitebackup 0.2: sealing the run's record into the container
and reading the catalog).

Last, what Azurite's own answers cost there, from this process: a prefix listing of a container's sealed runs
(what reading the catalog asks) and a read of one blob's properties, each the median of five. Azurite filters
every blob it holds for a listing, whatever the prefix (Azure Storage looks the prefix up in its index): with
both checkouts' trees in it, a listing costs what the second line says, a part of the unchanged run's time that
grows with the files on Azurite only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_upload import (  # noqa: E402
    ROOT,
    Dataset,
    Run,
    azurite_server,
    compile_package,
    generate,
    last_json,
    round_robin,
    run_timed,
    sitebackup_command,
    tool_env,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-src", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64, help="bytes per file")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sitebackup-bench-data")
    args = parser.parse_args()
    source = generate(Dataset(f"unchanged-{args.files}x{args.size}", args.files, args.size, 100), args.data_dir)
    checkouts = {"sitebackup": ROOT, "sitebackup-base": args.base_src.resolve()}
    containers = {"sitebackup": "bench-this", "sitebackup-base": "bench-base"}
    for src in checkouts.values():
        compile_package(src)
    work = Path(tempfile.mkdtemp(prefix="bench-unchanged-"))
    with azurite_server(work) as azurite:
        env = tool_env(azurite, work)

        def backup(tool: str, label: str) -> Run:
            log = work / f"{tool}-{label}.log"
            cmd = sitebackup_command([str(source.root), "--container", containers[tool]],
                                     work / f"state-{tool}", [])
            seconds, cpu, rss, code = run_timed(cmd, env, log, checkouts[tool])
            done = last_json(log)
            counted = done.get("files_unchanged" if label != "first" else "files_uploaded", 0)
            note = "" if code == 0 and counted == source.files else f"exit {code}, {counted} files (log {log})"
            return Run(seconds, cpu, rss, 0.0, note)

        firsts = {tool: backup(tool, "first") for tool in checkouts}
        runs = round_robin(list(checkouts), args.repeat, lambda tool, i: backup(tool, f"unchanged-{i}"))
        listing_ms, read_ms, held = service_costs(azurite.connection_string, containers["sitebackup"])
    print(f"{source.files} files of {args.size} B, {args.repeat} unchanged runs each (medians)")
    print(f"{'run':<12} {'tool':<16} {'wall s':>8} {'cpu s':>8} {'rss MB':>8}  note")
    for tool in checkouts:
        first = firsts[tool]
        print(f"{'first':<12} {tool:<16} {first.seconds:8.2f} {first.cpu:8.2f} {first.rss_mb:8.0f}  {first.note}")
    for tool, got in runs.items():
        notes = "; ".join(r.note for r in got if r.note)
        print(f"{'unchanged':<12} {tool:<16} {statistics.median(r.seconds for r in got):8.2f} "
              f"{statistics.median(r.cpu for r in got):8.2f} {max(r.rss_mb for r in got):8.0f}  {notes}")
    wall = [statistics.median(r.seconds for r in runs[tool]) for tool in checkouts]
    cpu = [statistics.median(r.cpu for r in runs[tool]) for tool in checkouts]
    print(f"unchanged run, this / base: wall {wall[0] / wall[1]:.3f}x, cpu {cpu[0] / cpu[1]:.3f}x; "
          f"first run: wall {firsts['sitebackup'].seconds / firsts['sitebackup-base'].seconds:.3f}x")
    print(f"Azurite holding {held} blobs: a listing of a container's sealed runs {listing_ms:.1f} ms, "
          f"a blob's properties {read_ms:.1f} ms (medians of 5)")


def service_costs(connection_string: str, container: str) -> tuple[float, float, int]:
    """Milliseconds of one listing of *container*'s sealed runs and of one blob's properties read, as Azurite
    answers them now, and how many blobs (and snapshots) the Azurite holds over all its containers."""
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(connection_string) as service:
        client = service.get_container_client(container)
        some = next(iter(client.list_blobs(results_per_page=1)))
        blob = client.get_blob_client(some.name)

        def median_ms(call: Callable[[], object]) -> float:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1000

        listing = median_ms(lambda: list(client.list_blobs(name_starts_with=".sitebackup/runs/",
                                                           include=["metadata"])))
        read = median_ms(blob.get_blob_properties)
        held = sum(1 for each in service.list_containers()
                   for _ in service.get_container_client(each.name).list_blobs(include=["snapshots"]))
    return listing, read, held


if __name__ == "__main__":
    main()

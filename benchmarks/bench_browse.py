"""Benchmark: looking inside a large run (ls, find, diff) against reading that run's record once.

Run: .venv/bin/python benchmarks/bench_browse.py [--files 100000] [--changed 1000] [--repeat 3]

A generated tree of --files small files is backed up into a fresh in-memory Azurite (run 1); then --changed
files are rewritten, --changed removed and --changed added, and it is backed up again (run 2); then --changed
more are rewritten (run 3). Each command runs in its own process with a new, empty state directory (a new
machine: every record page is read from the container), the tools taking turns --repeat times:

- ``peer read``: a plain script (azure-storage-blob and json) reads the run's header, then each of its record
  pages one after another, and decodes it: the least any command over the run must do;
- ``ls RUN -c C`` (to /dev/null), and ``find`` of a base-name glob while the container holds run 1 alone;
- ``diff`` of runs 1 and 2 (no page in common: both records are read) and of runs 2 and 3 (most pages shared
  and left unread), against the peer reading run 2's record once.

Prints the medians of wall and CPU seconds, the highest peak RSS, and each command's ratio to the peer's read of
the same run's record: the figure the issue bounds (under 2x for ls, find and diff of a 100,000-file run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_upload import ROOT, Run, azurite_server, compile_package, round_robin, run_timed, tool_env  # noqa: E402

RUNS = ".sitebackup/runs/"
RECORDS = ".sitebackup/records/"


def peer_read(run_id: str, container: str) -> None:
    """The peer: read one run's sealed record whole, page after page, with the SDK and json alone."""
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    client = service.get_container_client(container)
    header = json.loads(client.download_blob(RUNS + run_id).readall())
    entries = 0
    for _page, sha256, _size in header["pages"]:
        entries += len(json.loads(client.download_blob(f"{RECORDS}{header['job']}/{sha256}").readall()))
    print(json.dumps({"entries": entries}))


def write_tree(root: Path, files: int, first: int = 0, content: bytes = b"x" * 64) -> None:
    for i in range(first, first + files):
        folder = root / f"d{i // 10000:02d}" / f"d{i // 100 % 100:02d}"
        if i % 100 == 0 or i == first:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:06d}.txt").write_bytes(content)


def path_of(root: Path, i: int) -> Path:
    return root / f"d{i // 10000:02d}" / f"d{i // 100 % 100:02d}" / f"f{i:06d}.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peer-read", nargs=2, metavar=("RUN", "CONTAINER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_read:
        peer_read(*args.peer_read)
        return
    compile_package(ROOT)
    work = Path(tempfile.mkdtemp(prefix="bench-browse-"))
    source = work / "site"
    write_tree(source, args.files)
    container = "browse"
    with azurite_server(work) as azurite:
        env = tool_env(azurite, work)
        states = iter(range(10**6))

        def sitebackup(*words: str) -> list[str]:
            return [sys.executable, "-m", "sitebackup", *words, "--state-dir", str(work / f"state-{next(states)}")]

        def backup() -> str:
            log = work / f"backup-{time.monotonic_ns()}.log"
            seconds, _cpu, _rss, code = run_timed([sys.executable, "-m", "sitebackup", str(source), "-c", container,
                                                   "--json", "--state-dir", str(work / "state")], env, log)
            assert code == 0, log.read_text()[-2000:]
            summary = json.loads(log.read_text().strip().splitlines()[-1])
            print(f"# backup {summary['instance_id']}: {seconds:.1f}s", file=sys.stderr, flush=True)
            return str(summary["instance_id"])

        def timed(commands: dict[str, list[str]]) -> dict[str, list[Run]]:
            def once(tool: str, i: int) -> Run:
                log = work / f"{tool.replace(' ', '-')}-{i}.log"
                seconds, cpu, rss, code = run_timed(commands[tool], env, log)
                return Run(seconds, cpu, rss, 0.0, "" if code == 0 else f"exit {code} (log {log})")
            return round_robin(list(commands), args.repeat, once)

        run1 = backup()
        peer = [sys.executable, str(Path(__file__).resolve()), "--peer-read"]
        first = timed({"peer read run 1": [*peer, run1, container],
                       "ls run 1": sitebackup("ls", run1, "-c", container),
                       "find f00001*": sitebackup("find", "f00001*", "-c", container)})
        for i in range(args.changed):  # rewritten, removed, added
            path_of(source, i * 7 % args.files).write_bytes(b"changed " + str(i).encode())
            path_of(source, args.files - 1 - i).unlink()
        write_tree(source, args.changed, first=args.files, content=b"new")
        run2 = backup()
        for i in range(args.changed):
            path_of(source, (i * 11 + 3) % (args.files - args.changed)).write_bytes(b"again " + str(i).encode())
        run3 = backup()
        second = timed({"peer read run 2": [*peer, run2, container],
                        "diff runs 1, 2": sitebackup("diff", run1, run2, "-c", container),
                        "diff runs 2, 3": sitebackup("diff", run2, run3, "-c", container)})
    results = {**first, **second}
    medians = {tool: statistics.median(r.seconds for r in got) for tool, got in results.items()}
    reference = {"ls run 1": "peer read run 1", "find f00001*": "peer read run 1", "diff runs 1, 2": "peer read run 2",
                 "diff runs 2, 3": "peer read run 2"}
    print(f"{args.files} files; run 2: {args.changed} rewritten, removed and added each; run 3: {args.changed} "
          f"rewritten; medians of {args.repeat}, each in a new process with an empty state directory")
    print(f"| {'what':<16} | {'wall s':>7} | {'cpu s':>7} | {'rss MB':>7} | {'x peer read':>11} | note")
    print(f"| {'-' * 16} | {'-' * 7}:| {'-' * 7}:| {'-' * 7}:| {'-' * 11}:| ---")
    for tool, got in results.items():
        ratio = f"{medians[tool] / medians[reference[tool]]:.2f}" if tool in reference else "1"
        notes = "; ".join(r.note for r in got if r.note)
        print(f"| {tool:<16} | {medians[tool]:7.2f} | {statistics.median(r.cpu for r in got):7.2f} | "
              f"{max(r.rss_mb for r in got):7.0f} | {ratio:>11} | {notes}")


if __name__ == "__main__":
    main()

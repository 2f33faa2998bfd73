"""Benchmark: `sitebackup` against plain Python uploaders, rclone and AzCopy on one in-memory Azurite.

Run: .venv/bin/python benchmarks/bench_upload.py [--dataset small,medium] [--repeat 3] [--tools ...]
(the asyncio peer needs aiohttp: `pip install -e .[bench]`).

Datasets are generated once from a fixed seed under --data-dir. Every tool runs as its own process
(wall time includes start-up, peak RSS comes from wait4 on that process), each run into a fresh
in-memory Azurite, checked for the right blob count afterwards. Peers missing from PATH are
reported as skipped rows, never silently left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

KIB, MIB, GIB = 1024, 1024 ** 2, 1024 ** 3
SEED = 20261127
THREADS = 16
IN_FLIGHT = 32
# one Put Blob per file up to this size for the Python peers: on Azurite requests cost, bytes don't
PEER_SINGLE_PUT = 256 * MIB
RUN_TIMEOUT = 1800


@dataclass(frozen=True)
class Dataset:
    name: str
    files: int
    size: int
    fanout: int  # files per directory, nested two levels deep


DATASETS = {
    "small": Dataset("small", 5000, 4 * KIB, 50),
    "medium": Dataset("medium", 300, 1 * MIB, 30),
    "large": Dataset("large", 4, 128 * MIB, 4),
    "huge": Dataset("huge", 1, 2 * GIB, 1),
    "scale": Dataset("scale", 100_000, 1 * KIB, 100),
}
TOOLS = ["sitebackup", "threaded", "threaded-md5", "asyncio", "rclone", "azcopy", "sitebackup-base"]


def generate(ds: Dataset, base: Path) -> Path:
    """Write *ds* under base/name once; a marker file says it is complete."""
    root = base / ds.name
    marker = base / f".{ds.name}.done"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(f"{SEED}-{ds.name}")
    for i in range(ds.files):
        d = i // ds.fanout
        path = root / f"d{d // 100:03d}" / f"d{d % 100:02d}" / f"f{i:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            left = ds.size
            while left:
                n = min(left, 8 * MIB)
                fh.write(rng.randbytes(n))
                left -= n
    marker.touch()
    return root


def list_files(src: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, _dirs, names in os.walk(src):
        for name in names:
            path = Path(dirpath) / name
            out.append((path, path.relative_to(src).as_posix()))
    return out


# ---- the Python peers, each run in its own process via `--peer` -------------------------------

def peer_threaded(src: Path, container: str, with_md5: bool = False) -> None:
    """16 threads, one Put Blob per file up to 256 MiB; *with_md5*: the file's MD5 as its Content-MD5,
    the integrity work sitebackup does on every file (and needs for `verify` and `--checksum`)."""
    import hashlib

    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient, ContentSettings

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2 * THREADS))
    service = BlobServiceClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], transport=RequestsTransport(session=session),
        max_single_put_size=PEER_SINGLE_PUT)
    client = service.get_container_client(container)

    def put(item: tuple[Path, str]) -> None:
        path, name = item
        settings = None
        if with_md5:
            digest = hashlib.md5()
            with open(path, "rb") as fh:
                while chunk := fh.read(MIB):
                    digest.update(chunk)
            settings = ContentSettings(content_md5=bytearray(digest.digest()))
        with open(path, "rb") as fh:
            client.upload_blob(name, fh, length=path.stat().st_size, overwrite=True, max_concurrency=4,
                               content_settings=settings)

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(put, list_files(src)):
            pass


def peer_asyncio(src: Path, container: str) -> None:
    from azure.storage.blob.aio import BlobServiceClient

    async def main() -> None:
        async with BlobServiceClient.from_connection_string(
                os.environ["AZURE_STORAGE_CONNECTION_STRING"], max_single_put_size=PEER_SINGLE_PUT) as service:
            client = service.get_container_client(container)
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def put(path: Path, name: str) -> None:
                async with gate:
                    with open(path, "rb") as fh:
                        await client.upload_blob(name, fh, length=path.stat().st_size, overwrite=True,
                                                 max_concurrency=4)

            await asyncio.gather(*(put(p, n) for p, n in list_files(src)))

    asyncio.run(main())


# ---- the harness -------------------------------------------------------------------------------

@dataclass
class Row:
    dataset: str
    tool: str
    seconds: float | None = None
    cpu: float | None = None  # the tool's own CPU seconds: steadier than wall time on a shared machine
    rss_mb: float | None = None
    note: str = ""
    server_cpu: float | None = None  # Azurite's CPU seconds for the run: what the requests cost it


def command_for(tool: str, src: Path, container: str, azurite, work: Path, extra: list[str]) -> list[str] | None:
    if tool.startswith("sitebackup"):
        state = work / f"state-{uuid.uuid4().hex[:8]}"
        return [sys.executable, "-m", "sitebackup", str(src), "--container", container, "--json",
                "--state-dir", str(state), *extra]
    if tool in ("threaded", "threaded-md5", "asyncio"):
        if tool == "asyncio":
            try:
                import aiohttp  # noqa: F401
            except ImportError:
                return None
        return [sys.executable, __file__, "--peer", tool, "--src", str(src), "--container", container]
    if tool == "rclone":
        if not shutil.which("rclone"):
            return None
        return ["rclone", "copy", str(src), f"bench:{container}", "--transfers", str(IN_FLIGHT),
                "--checkers", str(IN_FLIGHT), "--no-check-dest", "-q"]
    if tool == "azcopy":
        if not shutil.which("azcopy"):
            return None
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas
        from azurite import ACCOUNT, KEY

        sas = generate_container_sas(ACCOUNT, container, account_key=KEY,
                                     permission=ContainerSasPermissions(read=True, write=True, create=True, list=True),
                                     expiry=datetime.now(timezone.utc) + timedelta(hours=6))
        return ["azcopy", "copy", f"{src}/*", f"{azurite.endpoint}/{container}?{sas}", "--recursive",
                "--from-to=LocalBlob", "--log-level=ERROR", "--output-level=quiet"]
    raise ValueError(tool)


def account_sas() -> str:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    from azurite import ACCOUNT, KEY

    return generate_account_sas(ACCOUNT, KEY, ResourceTypes(service=True, container=True, object=True),
                                AccountSasPermissions(read=True, write=True, create=True, list=True),
                                expiry=datetime.now(timezone.utc) + timedelta(hours=6))


def tool_env(azurite, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "SITEBACKUP_", "RCLONE_"))}
    env.update(
        AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string,
        # rclone 1.60 takes only a DNS suffix as endpoint: an account SAS URL reaches Azurite's port
        RCLONE_CONFIG_BENCH_TYPE="azureblob", RCLONE_CONFIG_BENCH_SAS_URL=f"{azurite.endpoint}?{account_sas()}",
        AZCOPY_LOG_LOCATION=str(work / "azcopy"), AZCOPY_JOB_PLAN_LOCATION=str(work / "azcopy"),
    )
    return env


def run_timed(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds, peak RSS (MB) and exit code of *cmd*, measured with wait4 on the child."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        killer = threading.Timer(RUN_TIMEOUT, proc.kill)  # a peer retrying forever must not hang the run
        killer.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
        elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode


def run_once(tool: str, name: str, i: int, src: Path, work: Path, args: argparse.Namespace) -> tuple:
    """One whole-process run into a fresh in-memory Azurite: (seconds, cpu, rss, note or '')."""
    from azure.storage.blob import BlobServiceClient
    from azurite import Azurite, free_port

    # a fresh Azurite per run: a long-lived in-memory one slows down (and once stalled for
    # minutes) as deleted containers pile up in its heap
    azurite = Azurite(free_port(), work / "azurite", in_memory=True).start()
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = f"b-{tool}-{uuid.uuid4().hex[:10]}"
    client = service.get_container_client(container)
    try:
        client.create_container()
        cmd = command_for(tool, src, container, azurite, work, args.sitebackup_args)
        log = work / f"{name}-{tool}-{i}.log"
        cwd = args.base_src if tool == "sitebackup-base" else ROOT  # `-m` imports from cwd
        seconds, cpu, peak, code = run_timed(cmd, tool_env(azurite, work), log, cwd)
        count = sum(1 for _ in client.list_blob_names())
        server_cpu = cpu_seconds(azurite.process.pid)
    finally:
        service.close()
        azurite.stop()
    expected = DATASETS[name].files
    print(f"#   {tool} run {i}: {seconds:.2f}s cpu {cpu:.2f}s azurite cpu {server_cpu:.2f}s "
          f"rss {peak:.0f} MB exit {code} blobs {count}",
          file=sys.stderr, flush=True)
    note = f"run {i}: exit {code}, {count}/{expected} blobs (log {log})" if code != 0 or count != expected else ""
    return seconds, cpu, peak, note, server_cpu


def cpu_seconds(pid: int) -> float:
    """CPU time a live process has used so far (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(args: argparse.Namespace) -> list[Row]:
    from azurite import Azurite

    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    rows: list[Row] = []
    try:
        for name in args.dataset:
            ds = DATASETS[name]
            src = generate(ds, args.data_dir)
            print(f"# {name}: {ds.files} x {ds.size // KIB} KiB at {src}", file=sys.stderr, flush=True)
            present = [t for t in args.tools if command_for(t, src, "probe", Azurite(0, work), work, []) is not None]
            runs: dict[str, list[tuple]] = {t: [] for t in present}
            # round-robin over tools, so a load spike from elsewhere on the machine hits all of them
            for i in range(args.repeat):
                for tool in present:
                    runs[tool].append(run_once(tool, name, i, src, work, args))
            for tool in args.tools:
                if tool not in runs:
                    rows.append(Row(name, tool, note="skipped: not installed"))
                    continue
                seconds, cpus, rss, notes, server = zip(*runs[tool])
                rows.append(Row(name, tool, statistics.median(seconds), statistics.median(cpus), max(rss),
                                "; ".join(n for n in notes if n), statistics.median(server)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def render(rows: list[Row]) -> str:
    # "vs threaded-md5": against the peer that does the same integrity work (an MD5 per file)
    lines = ["| dataset | tool | seconds | files/s | MB/s | CPU s | Azurite CPU s | peak RSS MB | vs fastest peer "
             "| vs threaded-md5 | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        ds = DATASETS[row.dataset]
        if row.seconds is None:
            lines.append(f"| {row.dataset} | {row.tool} | | | | | | | | | {row.note} |")
            continue
        peers = [r.seconds for r in rows if r.dataset == row.dataset and not r.tool.startswith("sitebackup")
                 and r.seconds is not None and not r.note]
        ratio = f"{row.seconds / min(peers):.2f}x" if peers else ""
        same = [r.seconds for r in rows if r.dataset == row.dataset and r.tool == "threaded-md5" and r.seconds]
        same_ratio = f"{row.seconds / same[0]:.2f}x" if same else ""
        mb = ds.files * ds.size / 1e6
        lines.append(f"| {row.dataset} | {row.tool} | {row.seconds:.2f} | {ds.files / row.seconds:.0f} | "
                     f"{mb / row.seconds:.1f} | {row.cpu:.1f} | {row.server_cpu:.1f} | {row.rss_mb:.0f} | {ratio} | {same_ratio} "
                     f"| {row.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="small,medium",
                        help=f"comma-separated, from: {', '.join(DATASETS)} (default small,medium)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is reported")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sitebackup-bench-data")
    parser.add_argument("--sitebackup-args", default="", help="extra arguments for sitebackup, e.g. '--concurrency 32'")
    parser.add_argument("--base-src", type=Path,
                        help="a checkout (git worktree) whose sitebackup runs as tool 'sitebackup-base', for A/B")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state dirs)")
    parser.add_argument("--peer", choices=["threaded", "threaded-md5", "asyncio"], help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--container", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        if args.peer == "asyncio":
            peer_asyncio(args.src, args.container)
        else:
            peer_threaded(args.src, args.container, with_md5=args.peer == "threaded-md5")
        return
    args.dataset = [d for d in args.dataset.split(",") if d]
    args.tools = [t for t in args.tools.split(",") if t and (t != "sitebackup-base" or args.base_src)]
    unknown = [d for d in args.dataset if d not in DATASETS] + [t for t in args.tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown dataset or tool: {', '.join(unknown)}")
    args.sitebackup_args = args.sitebackup_args.split()
    print(render(bench(args)))


if __name__ == "__main__":
    main()

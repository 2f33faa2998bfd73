"""Benchmark: `sitebackup` backup and restore against plain Python peers, rclone and AzCopy on Azurite.

Run: .venv/bin/python benchmarks/bench_upload.py [--dataset small,medium,large] [--ops backup,restore]
     [--repeat 3] [--tree PATH] [--tools ...] [--rtt 0,40] [--mbit 100] [--write-docs]
(the asyncio peers need aiohttp: `pip install -e .[bench]`; the peers are in benchmarks/peers.py).

Datasets are generated once from a fixed seed under --data-dir; `--tree PATH` measures any directory too.
Every tool runs as its own process: wall time includes start-up, CPU (user + sys) and peak RSS come
from wait4 on that process, its waited-for children included. Runs go round-robin over the tools, so a
load spike from elsewhere on the machine hits all of them; a row is the median of --repeat runs.

- backup: each run uploads into a fresh in-memory Azurite and is checked for the right blob count.
- restore: one untimed `sitebackup` backup fills an Azurite that the dataset's restore runs then only
  read; `sitebackup restore ID DEST` (from a copy of that backup's state directory) runs beside the
  asyncio-get peer, each into a fresh DEST checked for the right files and bytes afterwards.
- million (1,000,000 sparse files of 0-1 KiB, about 100 per directory): sitebackup's scan against a
  bare scandir + stat walk of the same tree, measured in the same run: a dry run with nothing to
  compare (--ops dry-run), one full backup, then an unchanged second run and a dry run against it
  (--ops backup). With --stand-in, the full backup is replaced by a run that uploads nothing whose record
  is then written to stand for a backup of every file (the record a run writes: path, size, mtime, MD5;
  real MD5s): the unchanged runs send no request either way, and a million Put Blobs take Azurite hours
  here (its CPU per request grows with the blobs it holds: 200,000 files took 13 minutes).

--rtt: each dataset once per round-trip time (ms), the timed runs reaching Azurite through
benchmarks/delayproxy.py (half the RTT added each way, --mbit capping each direction); its rows are the
dataset's name with "@RTTms", and each run's log line gives the connections it opened and the requests it
kept in flight (mean and most) as the proxy saw them. The round-trip times take turns as the tools do (a run at
each, then the next repetition), so that a machine whose speed drifts over minutes weighs on each alike: their
ratios are what the RTT costs. RTT 0 goes straight to Azurite unless --proxied-zero: the
proxy forwards every byte in this process, and on a machine of two cores the CPU it takes is time the tool and
Azurite lose, so a 0 ms pass through it is what an RTT's rows compare with to see the round trip alone.

rclone and AzCopy are used when on PATH; tools missing are reported as skipped rows, never left out.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"  # --write-docs rewrites a block of it
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
import peers  # noqa: E402
import report  # noqa: E402
from delayproxy import behind  # noqa: E402
from report import Row  # noqa: E402

KIB, MIB, GIB = 1024, 1024 ** 2, 1024 ** 3
SEED = 20261127
RUN_TIMEOUT = 1800  # seconds, raised for large trees: a peer retrying forever must not hang the run
FILES_PER_SECOND_FLOOR = 10  # the slowest rate a run is given before it is killed (a loaded machine is slow)
SCALE_AZURITE_HEAP_MB = 8192  # a million blobs' records outgrow Node's default heap
AZURITE_STARTS, AZURITE_START_SECONDS = 3, 120


@dataclass(frozen=True)
class Dataset:
    name: str
    files: int
    size: int  # bytes per file; for a sparse dataset the largest size, sizes drawn from 0..size
    fanout: int  # files per directory, nested two levels deep
    sparse: bool = False  # content is a hole: a million files cost seconds to create and no disk


DATASETS = {
    "small": Dataset("small", 5000, 4 * KIB, 50),
    "medium": Dataset("medium", 300, 1 * MIB, 30),
    "large": Dataset("large", 4, 128 * MIB, 4),
    "huge": Dataset("huge", 1, 2 * GIB, 1),
    "scale": Dataset("scale", 100_000, 1 * KIB, 100),
    "million": Dataset("million", 1_000_000, 1 * KIB, 100, sparse=True),
}
BACKUP_TOOLS = ["sitebackup", "threaded", "threaded-md5", "asyncio", "asyncio-md5", "rclone", "azcopy",
                "sitebackup-base"]
RESTORE_TOOLS = ["sitebackup", "asyncio-get", "sitebackup-base"]
TOOLS = list(dict.fromkeys(BACKUP_TOOLS + RESTORE_TOOLS))
OPS = ["backup", "restore", "dry-run"]  # dry-run: the million dataset's first dry run


@dataclass(frozen=True)
class Source:
    """A tree to measure: a generated dataset or a directory given with --tree."""

    name: str
    root: Path
    files: int
    bytes: int


def generate(ds: Dataset, base: Path) -> Source:
    """Write *ds* under base/name once; a marker file (holding the totals) says it is complete."""
    root = base / ds.name
    marker = base / f".{ds.name}.done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        rng = random.Random(f"{SEED}-{ds.name}")
        total = 0
        for i in range(ds.files):
            d = i // ds.fanout
            folder = root / f"d{d // 100:03d}" / f"d{d % 100:02d}"
            if i % ds.fanout == 0:
                folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"f{i:06d}.bin"
            if ds.sparse:
                size = rng.randint(0, ds.size)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, size)
                os.close(fd)
                total += size
                continue
            with open(path, "wb") as fh:
                left = ds.size
                while left:
                    n = min(left, 8 * MIB)
                    fh.write(rng.randbytes(n))
                    left -= n
            total += ds.size
        marker.write_text(json.dumps({"files": ds.files, "bytes": total}))
    try:
        totals = json.loads(marker.read_text())
    except ValueError:  # a marker from before totals were kept: fixed-size files
        totals = {"files": ds.files, "bytes": ds.files * ds.size}
    return Source(ds.name, root, totals["files"], totals["bytes"])


def tree_source(path: Path) -> Source:
    files, size = peers.walk(path)
    return Source(f"tree {path.name}", path.resolve(), files, size)


# ---- commands ----------------------------------------------------------------------------------

def peer_command(tool: str, src: Path, container: str | None = None) -> list[str]:
    return [sys.executable, str(HERE / "peers.py"), tool, "--src", str(src),
            *(["--container", container] if container else [])]


def backup_command(tool: str, src: Path, container: str, azurite, state: Path, extra: list[str]) -> list[str] | None:
    """The command line of *tool* backing *src* up into *container*, or None if it is not installed."""
    if tool.startswith("sitebackup"):
        return sitebackup_command([str(src), "--container", container], state, extra)
    if tool in ("threaded", "threaded-md5", "asyncio", "asyncio-md5"):
        if tool.startswith("asyncio") and not aiohttp_installed():
            return None
        return peer_command(tool, src, container)
    if tool == "rclone":
        if not shutil.which("rclone"):
            return None
        return ["rclone", "copy", str(src), f"bench:{container}", "--transfers", str(peers.IN_FLIGHT),
                "--checkers", str(peers.IN_FLIGHT), "--no-check-dest", "-q"]
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


def sitebackup_command(args: list[str], state: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sitebackup", *args, "--json", "--state-dir", str(state), *extra]


def aiohttp_installed() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


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


# ---- measuring ---------------------------------------------------------------------------------

@dataclass
class Run:
    seconds: float
    cpu: float
    rss_mb: float
    server_cpu: float
    note: str = ""


def run_timed(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT,
              timeout: float = RUN_TIMEOUT) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + sys), peak RSS (MB) and exit code of *cmd*, from wait4 on the child:
    its rusage covers the descendants it waited for too."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # the benchmark is stopped: leave no tool running behind it
            proc.kill()
            proc.wait()
            raise
        finally:
            killer.cancel()
        elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode


def cpu_seconds(pid: int) -> float:
    """CPU time a live process has used so far (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def azurite_server(work: Path, heap_mb: int | None = None, access_log: bool = False) -> Iterator:
    """A fresh in-memory Azurite, stopped after the block; *heap_mb* raises Node's heap limit; *access_log*:
    one line per request in work/azurite/azurite.log."""
    from azurite import Azurite, free_port

    saved = os.environ.get("NODE_OPTIONS")
    if heap_mb:  # Azurite inherits our environment
        os.environ["NODE_OPTIONS"] = f"{saved or ''} --max-old-space-size={heap_mb}".strip()
    try:
        for attempt in range(AZURITE_STARTS):
            try:
                server = Azurite(free_port(), work / "azurite", in_memory=True, access_log=access_log).start(
                    timeout=AZURITE_START_SECONDS)
                break
            except RuntimeError as exc:  # a loaded machine: Node can take minutes to listen
                print(f"# Azurite start {attempt + 1}/{AZURITE_STARTS} failed: {exc}", file=sys.stderr, flush=True)
                if attempt + 1 == AZURITE_STARTS:
                    raise
    finally:
        if heap_mb:
            if saved is None:
                os.environ.pop("NODE_OPTIONS")
            else:
                os.environ["NODE_OPTIONS"] = saved
    try:
        yield server
    finally:
        server.stop()


def last_json(log: Path) -> dict:
    """The last JSON object a `sitebackup --json` run printed (its summary), or {}. Read from the log's tail:
    a dry run's log holds a line per file, and this process's RSS would count in every child's peak after it."""
    with open(log, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - 256 * 1024))
        tail = fh.read().decode(errors="replace")
    for line in reversed(tail.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return {}
    return {}


def first_json(log: Path) -> dict:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {}


def no_sockets(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: a state directory may hold a socket, which cannot be copied."""
    return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(folder, n)).st_mode)]


def timeout_for(source: Source) -> float:
    return max(RUN_TIMEOUT, source.files / FILES_PER_SECOND_FLOOR)


def log_run(label: str, run: Run, extra: str) -> None:
    print(f"#   {label}: {run.seconds:.2f}s cpu {run.cpu:.2f}s azurite cpu {run.server_cpu:.2f}s "
          f"rss {run.rss_mb:.0f} MB {extra}", file=sys.stderr, flush=True)


def median_row(source: Source, op: str, tool: str, runs: list[Run]) -> Row:
    return Row(source.name, op, tool, source.files, source.bytes,
               seconds=statistics.median(r.seconds for r in runs), cpu=statistics.median(r.cpu for r in runs),
               rss_mb=max(r.rss_mb for r in runs), server_cpu=statistics.median(r.server_cpu for r in runs),
               note="; ".join(r.note for r in runs if r.note))


K = TypeVar("K")


def round_robin(keys: list[K], repeat: int, once: Callable[[K, int], Run]) -> dict[K, list[Run]]:
    """Each key's *repeat* runs, taking turns: a run of each key, then the next repetition, each turn starting one
    key further on (A B C, B C A, C A B...): on this machine the first run of a turn was seen to cost about a
    tenth more than the others (a medium restore, the same code as either tool), and a fixed order put that on
    one key. Rotated, no key is first more than once in as many turns as there are keys: with an odd --repeat
    of at least 3 and more keys than turns, a median leaves it out; two keys want an even --repeat."""
    runs: dict[K, list[Run]] = {k: [] for k in keys}
    for i in range(repeat):
        start = i % max(1, len(keys))
        for key in keys[start:] + keys[:start]:
            runs[key].append(once(key, i))
    return runs


# ---- the benchmark -----------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.rtts: list[float] = args.rtt  # the round trips the timed runs go through, taking turns

    def direct(self, rtt: float) -> bool:
        return not rtt and not self.args.mbit and not self.args.proxied_zero

    def named(self, source: Source, rtt: float) -> Source:
        """*source* as its rows at *rtt* name it."""
        if self.direct(rtt):
            return source
        return dataclasses.replace(source, name=f"{source.name}@{rtt:g}ms" + (f",{self.args.mbit:g}Mbit"
                                                                               if self.args.mbit else ""))

    @contextlib.contextmanager
    def path(self, azurite, rtt: float) -> Iterator:
        """*azurite* as the timed runs reach it: directly, or through a delay proxy of *rtt*."""
        if self.direct(rtt):
            yield azurite
            return
        with behind(azurite, rtt / 2, self.args.mbit) as far:
            yield far

    def proxied(self, azurite) -> str:
        """What the proxy in front of *azurite* saw since it was last asked, for a run's log line."""
        proxy = getattr(azurite, "proxy", None)
        if proxy is None:
            return ""
        c = proxy.reset()
        return (f" conns {c.connections} (most open {c.most_open}) requests {c.requests}"
                f" in flight mean {c.mean_in_flight:.1f} most {c.most_in_flight}")

    def cwd(self, tool: str) -> Path:
        return self.args.base_src if tool == "sitebackup-base" else ROOT  # `-m` imports from cwd

    def tools(self, known: list[str]) -> list[str]:
        return [t for t in known if t in self.args.tools and (t != "sitebackup-base" or self.args.base_src)]

    def rows(self, source: Source) -> list[Row]:
        """The rows of *source* at each round trip: its backups, then its restores."""
        print(f"# {source.name}: {source.files} files, {source.bytes / MIB:.1f} MiB at {source.root}"
              + (f", RTT {', '.join(f'{rtt:g}' for rtt in self.rtts)} ms taking turns" if self.rtts != [0.0] else ""),
              file=sys.stderr, flush=True)
        if source.name.startswith("million"):  # measured against the walk, not against uploaders
            return [row for rtt in self.rtts for row in self.scan(self.named(source, rtt))]
        backups = self.backup(source) if "backup" in self.args.ops else {}
        restores = self.restore(source) if "restore" in self.args.ops else {}
        return [row for rtt in self.rtts for row in [*backups.get(rtt, []), *restores.get(rtt, [])]]

    def backup(self, source: Source) -> dict[float, list[Row]]:
        from azurite import Azurite

        probe = self.work / "probe"
        tools = self.tools(BACKUP_TOOLS)
        present = [t for t in tools if backup_command(t, source.root, "probe", Azurite(0, probe), probe, []) is not None]
        runs = round_robin([(rtt, t) for rtt in self.rtts for t in present], self.args.repeat,
                           lambda key, i: self.backup_once(key[1], self.named(source, key[0]), i, key[0]))
        return {rtt: [median_row(self.named(source, rtt), "backup", t, runs[rtt, t]) if (rtt, t) in runs
                      else Row(self.named(source, rtt).name, "backup", t, note="skipped: not installed") for t in tools]
                for rtt in self.rtts}

    def backup_once(self, tool: str, source: Source, i: int, rtt: float) -> Run:
        from azure.storage.blob import BlobServiceClient

        # a fresh Azurite per run: a long-lived in-memory one slows down (and once stalled for
        # minutes) as deleted containers pile up in its heap
        with azurite_server(self.work) as local, self.path(local, rtt) as azurite:
            service = BlobServiceClient.from_connection_string(local.connection_string)
            container = f"b-{tool}-{uuid.uuid4().hex[:10]}"
            client = service.get_container_client(container)
            try:
                client.create_container()
                extra = self.args.sitebackup_args + (["--no-ignore-file"] if source.name.startswith("tree") else [])
                cmd = backup_command(tool, source.root, container, azurite, self.work / f"state-{uuid.uuid4().hex[:8]}",
                                     extra)
                log = self.work / f"{source.name}-backup-{tool}-{i}.log"
                # Azurite's CPU during the run only: its own start-up (about 1.6 s here) and the count below
                # are not the tool's
                before = cpu_seconds(azurite.process.pid)
                seconds, cpu, peak, code = run_timed(cmd, tool_env(azurite, self.work), log, self.cwd(tool),
                                                     timeout_for(source))
                server_cpu = cpu_seconds(azurite.process.pid) - before
                seen = self.proxied(azurite)
                # the files' blobs: sitebackup's sealed records and job lock sit beside them under .sitebackup/
                count = sum(1 for name in client.list_blob_names() if not name.startswith(".sitebackup/"))
            finally:
                service.close()
        ok = code == 0 and count == source.files
        run = Run(seconds, cpu, peak, server_cpu, "" if ok else f"run {i}: exit {code}, {count}/{source.files} blobs (log {log})")
        log_run(f"backup {tool} {source.name} run {i}", run, f"exit {code} blobs {count}{seen}")
        return run

    def restore(self, source: Source) -> dict[float, list[Row]]:
        from azure.storage.blob import BlobServiceClient

        tools = self.tools(RESTORE_TOOLS)
        if "asyncio-get" in tools and not aiohttp_installed():
            tools.remove("asyncio-get")
        with azurite_server(self.work) as local:
            service = BlobServiceClient.from_connection_string(local.connection_string)
            try:
                # the backups restored from, untimed and straight to Azurite; the peers restore what the
                # current sitebackup wrote
                made = {variant: self.setup_backup(variant, source, service, tool_env(local, self.work))
                        for variant in ["sitebackup", *(t for t in tools if t == "sitebackup-base")]}
            finally:
                service.close()
            with contextlib.ExitStack() as paths:
                reach = {rtt: paths.enter_context(self.path(local, rtt)) for rtt in self.rtts}
                runs = round_robin([(rtt, t) for rtt in self.rtts for t in tools], self.args.repeat,
                                   lambda key, i: self.restore_once(key[1], self.named(source, key[0]), i, made,
                                                                    reach[key[0]], tool_env(reach[key[0]], self.work)))
        rows: dict[float, list[Row]] = {}
        for rtt in self.rtts:
            rows[rtt] = [median_row(self.named(source, rtt), "restore", t, runs[rtt, t]) for t in tools]
            if "asyncio-get" in self.args.tools and "asyncio-get" not in tools:
                rows[rtt].append(Row(self.named(source, rtt).name, "restore", "asyncio-get",
                                     note="skipped: aiohttp not installed"))
        return rows

    def setup_backup(self, variant: str, source: Source, service, env: dict[str, str]) -> tuple[str, str, Path]:
        """Back *source* up with *variant* for the restores to read: (container, run id, state dir)."""
        container = f"r-{variant}-{uuid.uuid4().hex[:10]}"
        service.create_container(container)
        state = self.work / f"state-{container}"
        log = self.work / f"{source.name}-restore-setup-{variant}.log"
        cmd = sitebackup_command([str(source.root), "--container", container], state, self.args.sitebackup_args)
        _s, _c, _r, code = run_timed(cmd, env, log, self.cwd(variant), timeout_for(source))
        summary = last_json(log)
        if code != 0 or summary.get("files_uploaded", 0) + summary.get("files_unchanged", 0) != source.files:
            raise SystemExit(f"the backup for the {source.name} restore failed (exit {code}); see {log}")
        return container, first_json(log)["instance_id"], state

    def restore_once(self, tool: str, source: Source, i: int, made: dict[str, tuple[str, str, Path]], azurite,
                     env: dict[str, str]) -> Run:
        dest = self.work / f"dest-{uuid.uuid4().hex[:8]}"
        log = self.work / f"{source.name}-restore-{tool}-{i}.log"
        state = None
        if tool.startswith("sitebackup"):
            _container, run_id, made_state = made[tool]
            # every restore starts from the state the backup left, not from the previous restore's
            state = self.work / f"state-{uuid.uuid4().hex[:8]}"
            shutil.copytree(made_state, state, symlinks=True, ignore=no_sockets)
            cmd = sitebackup_command(["restore", run_id, str(dest)], state, self.args.restore_args)
        else:
            dest.mkdir()
            cmd = peer_command("asyncio-get", dest, made["sitebackup"][0])
        before = cpu_seconds(azurite.process.pid)
        seconds, cpu, peak, code = run_timed(cmd, env, log, self.cwd(tool), timeout_for(source))
        server_cpu = cpu_seconds(azurite.process.pid) - before
        seen = self.proxied(azurite)
        files, size = peers.walk(dest) if dest.exists() else (0, 0)
        shutil.rmtree(dest, ignore_errors=True)
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        ok = code == 0 and (files, size) == (source.files, source.bytes)
        run = Run(seconds, cpu, peak, server_cpu,
                  "" if ok else f"run {i}: exit {code}, {files}/{source.files} files, {size}/{source.bytes} bytes (log {log})")
        log_run(f"restore {tool} {source.name} run {i}", run, f"exit {code} files {files}{seen}")
        return run

    def scan(self, source: Source) -> list[Row]:
        """sitebackup's dry runs and unchanged second run against a bare walk, with one full backup between."""
        from azure.storage.blob import BlobServiceClient

        rows: list[Row] = []
        state = self.work / "state-scan"
        container = f"s-{uuid.uuid4().hex[:10]}"
        # (op, sitebackup's extra arguments, the summary counter that must reach the file count, runs)
        steps = [("first dry-run", ["--dry-run"], "files_to_upload", self.args.repeat)] if "dry-run" in self.args.ops else []
        if "backup" in self.args.ops:  # a full backup, then the runs that compare against it
            first = ("stand-in", ["--exclude", "*"], "files_uploaded", 1) if self.args.stand_in else \
                ("backup", [], "files_uploaded", 1)
            steps += [first,
                      ("unchanged", [], "files_unchanged", self.args.repeat),
                      ("dry-run", ["--dry-run"], "files_unchanged", self.args.repeat)]
        with azurite_server(self.work, heap_mb=SCALE_AZURITE_HEAP_MB) as azurite:
            env = tool_env(azurite, self.work)
            service = BlobServiceClient.from_connection_string(azurite.connection_string)
            service.create_container(container)
            service.close()
            for op, extra, counter, repeat in steps:
                tools = ["walk", "sitebackup"] if op not in ("backup", "stand-in") else ["sitebackup"]

                def once(tool: str, i: int, op=op, extra=extra, counter=counter) -> Run:
                    log = self.work / f"{source.name}-{op.replace(' ', '-')}-{tool}-{i}.log"
                    if tool == "walk":
                        cmd = peer_command("walk", source.root)
                    else:
                        cmd = sitebackup_command([str(source.root), "--container", container, *extra], state,
                                                 self.args.sitebackup_args)
                    before = cpu_seconds(azurite.process.pid)
                    seconds, cpu, peak, code = run_timed(cmd, env, log, ROOT, timeout_for(source))
                    server_cpu = cpu_seconds(azurite.process.pid) - before
                    done = (int(log.read_text().split()[0]) if tool == "walk" and code == 0
                            else last_json(log).get(counter, 0))
                    if op == "stand-in" and code == 0:
                        run_id = last_json(log)["instance_id"]
                        # in a process of its own: a child forked later would count this one's RSS as its own
                        with multiprocessing.get_context("spawn").Pool(1) as pool:
                            done = pool.apply(stand_in, (state, run_id, source.root))
                        # the run's record is then the one written here: the (empty) one it sealed must go
                        with BlobServiceClient.from_connection_string(azurite.connection_string) as sealed:
                            blob = sealed.get_container_client(container).get_blob_client(f".sitebackup/runs/{run_id}")
                            if blob.exists():
                                blob.delete_blob()
                    ok = code == 0 and done == source.files
                    run = Run(seconds, cpu, peak, server_cpu,
                              "" if ok else f"run {i}: exit {code}, {done}/{source.files} files (log {log})")
                    log_run(f"{op} {tool} run {i}", run, f"exit {code} files {done}")
                    return run

                runs = round_robin(tools, repeat, once)
                rows += [median_row(source, op, t, runs[t]) for t in tools]
                if op in ("backup", "stand-in") and runs["sitebackup"][0].note:
                    break  # no baseline: the unchanged runs would measure a full backup
        return rows


def stand_in(state: Path, run_id: str, root: Path) -> int:
    """Write *run_id*'s record (a run that uploaded nothing) as a backup of every file under *root* writes it:
    walk order, pages of 4,096, each file's real MD5; the files recorded."""
    import hashlib

    from sitebackup.blob.workstore import LocalWorkStore
    from sitebackup.local.scan import walk
    from sitebackup.model.records import FileEntry
    from sitebackup.model.work import FileRef

    work = LocalWorkStore(state / "work")
    page: list[FileEntry] = []
    pages = files = 0
    for entry in walk(root):
        if not isinstance(entry, FileRef):
            continue
        with open(root / entry.path, "rb") as fh:
            md5 = base64.b64encode(hashlib.md5(fh.read()).digest()).decode()
        page.append(FileEntry(entry.path, entry.size, entry.mtime_ns, md5=md5))
        files += 1
        if len(page) == 4096:
            work.write_result(run_id, pages, page)
            pages, page = pages + 1, []
    if page:
        work.write_result(run_id, pages, page)
    return files


def compile_package(src: Path) -> None:
    """Byte-compile the checkout's package, as ``pip install`` does: a checkout under PYTHONDONTWRITEBYTECODE
    (set on some machines and CI images) would otherwise compile every module from source in every run,
    a quarter of a second of CPU per process the peers (one script each) do not pay."""
    import compileall

    compileall.compile_dir(src / "sitebackup", quiet=1)


def measure(args: argparse.Namespace) -> dict:
    """Run the benchmark: its rows, with when, where and how they were measured. With --save, the rows
    so far are saved after every dataset: a run that dies late keeps what it measured."""
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    for src in {ROOT, args.base_src or ROOT}:
        compile_package(src)
    bench = Bench(args, work)
    rows: list[Row] = []

    def results() -> dict:
        return {"started": started.isoformat(), "machine": report.machine(ROOT, load_start),
                "command": report.command_line(sys.argv, ROOT), "rows": [dataclasses.asdict(r) for r in rows]}

    sources = [lambda name=name: generate(dataset(name, args), args.data_dir) for name in args.dataset]
    sources += [lambda tree=tree: tree_source(tree) for tree in args.tree]
    try:
        for make in sources:
            source = make()
            rows += bench.rows(source)
            if args.save:
                args.save.write_text(json.dumps([results()], indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results()


def dataset(name: str, args: argparse.Namespace) -> Dataset:
    ds = DATASETS[name]
    if name == "million" and args.million_files != ds.files:
        ds = dataclasses.replace(ds, name=f"million-{args.million_files}", files=args.million_files)
    return ds


def saved_runs(path: Path) -> list[dict]:
    """The runs a --save file holds (a list of runs; a single run from before is taken too)."""
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Azurite and the tool running on the way out
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="small,medium",
                        help=f"comma-separated, from: {', '.join(DATASETS)} (default small,medium); may be empty with --tree")
    parser.add_argument("--million-files", type=int, default=DATASETS["million"].files,
                        help="files in the million dataset (default 1,000,000; fewer for a quick look)")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="also measure this directory (repeatable): its regular files, symlinks not followed")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated, from: backup, restore, dry-run (default all; dry-run is the million "
                             "dataset's first dry run, backup its full backup and the runs against it)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    parser.add_argument("--stand-in", action="store_true",
                        help="million dataset: a recorded stand-in for its full backup (see above), not the uploads")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is reported")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sitebackup-bench-data")
    parser.add_argument("--sitebackup-args", default="", help="extra arguments for sitebackup backups, e.g. '--concurrency 32'")
    parser.add_argument("--restore-args", default="", help="extra arguments for sitebackup restores, e.g. '--concurrency 32'")
    parser.add_argument("--base-src", type=Path,
                        help="a checkout (git worktree) whose sitebackup runs as tool 'sitebackup-base', for A/B")
    parser.add_argument("--rtt", default="0",
                        help="comma-separated round-trip times in ms, each dataset measured at each through a delay "
                             "proxy (default 0: straight to Azurite), e.g. 0,20,40,80")
    parser.add_argument("--proxied-zero", action="store_true",
                        help="RTT 0 through the proxy too (rows @0ms): on a small machine the proxy's own CPU slows the "
                             "runs behind it, so this is the baseline that leaves only the round trip to the ratios")
    parser.add_argument("--mbit", type=float, help="with the proxy: cap each direction at this many Mbit/s")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state dirs)")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the block between <!-- NAME:begin --> and <!-- NAME:end --> in docs/performance.md "
                             "with this table")
    parser.add_argument("--docs-block", default="bench", help="the NAME of that block (default bench)")
    parser.add_argument("--save", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--load", type=Path, action="append", default=[],
                        help="measure nothing: show (and with --write-docs, write) saved results; repeatable, "
                             "the runs' rows one after the other")
    args = parser.parse_args()
    args.dataset = [d for d in args.dataset.split(",") if d]
    args.ops = [o for o in args.ops.split(",") if o]
    args.tools = [t for t in args.tools.split(",") if t]
    try:
        args.rtt = [float(r) for r in args.rtt.split(",") if r]
    except ValueError:
        parser.error(f"--rtt {args.rtt}: milliseconds, comma-separated")
    if not args.rtt or any(r < 0 for r in args.rtt):
        parser.error("--rtt: one or more round-trip times of 0 ms or more")
    unknown = ([d for d in args.dataset if d not in DATASETS] + [o for o in args.ops if o not in OPS]
               + [t for t in args.tools if t not in TOOLS])
    if unknown:
        parser.error(f"unknown dataset, operation or tool: {', '.join(unknown)}")
    if not args.dataset and not args.tree and not args.load:
        parser.error("nothing to measure: give --dataset or --tree")
    for tree in args.tree:
        if not tree.is_dir():
            parser.error(f"--tree {tree}: not a directory")
    if args.write_docs and not report.MARKER_NAME.fullmatch(args.docs_block):
        parser.error("--docs-block: lowercase letters, digits and hyphens")
    args.sitebackup_args = args.sitebackup_args.split()
    args.restore_args = args.restore_args.split()
    runs = [run for path in args.load for run in saved_runs(path)] or [measure(args)]
    if args.save:
        args.save.write_text(json.dumps(runs, indent=1))
    table = report.render([Row(**r) for run in runs for r in run["rows"]])
    print(table)
    if args.write_docs:
        content = report.block(table, when=datetime.fromisoformat(runs[0]["started"]), machine_line=runs[0]["machine"],
                               commands=[run["command"] for run in runs])
        report.write_block(PERFORMANCE_PAGE, args.docs_block, content)
        print(f"# {PERFORMANCE_PAGE.relative_to(ROOT)}: block {args.docs_block!r} rewritten", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Where `sitebackup` spends its time on one dataset, backup and restore: the figures of benchmarks/PROFILE.md.

Run: .venv/bin/python benchmarks/profile_hot_paths.py [--dataset small] [--out DIR] [--top 25]
(py-spy from PyPI: `pip install -e .[bench]`; without it that pass is left out).

Each pass backs the dataset up into a fresh in-memory Azurite and restores that run into a fresh
directory, each a whole `sitebackup` process as the benchmark runs it:

1. plain, with Azurite's access log on: wall, CPU and peak RSS, the requests per file by kind, and the
   CPU of every OS thread (sampled from /proc, grouped by thread name: gRPC's C threads included);
2. under cProfile in every thread, timed by each thread's CPU clock (a parked thread costs nothing):
   the CPU by layer (each function's self time to its layer, a generic helper's such as json's handed up
   to its callers), the inclusive CPU of named entry points, and the top functions by cumulative and by
   self time with their call counts. cProfile reports the upload loop's epoll wait with a large negative
   self time: clipped to zero, the profiled threads add up to the CPU /proc measured for them;
3. under `py-spy record --nonblocking` (every thread, the process never paused): the same layers and
   entry points from whole stacks. py-spy counts a thread blocked inside a C call under one of our
   frames (a lock, a socket read) as running, so its shares are busy-or-blocked time: where cProfile and
   py-spy disagree, the difference is waiting (lock contention, network), not CPU.

Shares are turned into seconds with the plain run's CPU: the profilers' overhead is not the tool's.
Prints Markdown on stdout; the raw profiles stay in --out.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
import bench_upload  # noqa: E402

STARTUP = "start-up (imports)"
POLLING = "progress polling"
OTHER = "other (interpreter, unattributed)"
# A sample or a function belongs to the layer the first matching mark names. Contexts hold for a whole
# stack (everything under an import is start-up; everything under the watch loop, both ends of its gRPC
# calls, is polling); the other layers are decided by the innermost frame that names one.
CONTEXTS = [
    (STARTUP, ("importlib._bootstrap", "<frozen importlib")),
    (POLLING, ("watch (sitebackup/commands/hosting.py", "GetInstance (", "sitebackup/ui/")),
]
# a function of its own in cProfile: module-level code runs once, at import
MODULE_CODE = (STARTUP, ("<module>",))
LAYERS = [
    ("cancel checks", ("CancelCheck", "__call__ (sitebackup/commands/hosting.py")),
    ("pages and records (JSON files)", ("sitebackup/blob/workstore.py",)),
    ("hashing", ("hashlib", "md5", "fd_md5_b64", "file_md5")),
    ("restore file writes", ("sitebackup/local/dest.py",)),
    ("scan", ("sitebackup/local/scan.py", "sitebackup/local/filters.py")),
    ("request building and parsing (azure SDK)", ("azure/core/", "azure/storage/", "isodate/", "xml/etree",
                                                  "wsgiref/", "email/")),
    ("HTTP and event loop (aiohttp, asyncio, urllib3)", ("aiohttp/", "asyncio/", "selectors.py", "urllib3/",
                                                        "requests/", "http/client.py", "socket.py", "multidict/",
                                                        "yarl/", "ssl.py", "_asyncio", "select.epoll")),
    ("durable: SQLite store", ("sitebackup/durable/backend/store.py", "sqlite3")),
    ("durable: protobuf", ("google/protobuf", "_message", "protobuf")),
    ("durable: gRPC", ("grpc/", "cygrpc", "grpc._")),
    ("durable: orchestrator replay", ("sitebackup/workflows/backup.py", "sitebackup/workflows/restore.py",
                                      "sitebackup/workflows/window.py", "_OrchestrationExecutor",
                                      "_RuntimeOrchestrationContext", "durabletask/task.py")),
    ("durable: servicer and worker SDK", ("sitebackup/durable/", "durabletask/")),
    ("file reads and writes", ("sitebackup/local/files.py", "sitebackup/blob/upload.py", "'read' of '_io",
                               "'write' of '_io", "posix.", "builtins.open", "io.open")),
    ("sitebackup (other)", ("sitebackup/",)),
]
# a thread parked here uses no CPU: py-spy samples of it are dropped
WAITS = ("Condition.wait (", "_worker (concurrent/futures/thread.py:81)", "Event.wait (", "Thread.join (",
         "select (selectors.py", "BaseSelector.select", "EpollSelector.select", "time.sleep", "_wait_for_tstate_lock")


def classify(stack: list[str]) -> str:
    """The layer of one sample, *stack* listed from the thread's root to the innermost frame."""
    for layer, marks in CONTEXTS:
        if any(mark in frame for frame in stack for mark in marks):
            return layer
    for frame in reversed(stack):
        for layer, marks in LAYERS:
            if any(mark in frame for mark in marks):
                return layer
    return OTHER


def own_layer(label: str) -> str | None:
    """The layer one function names by itself, or None for a generic helper (its caller decides)."""
    for layer, marks in [*CONTEXTS, MODULE_CODE, *LAYERS]:
        if any(mark in label for mark in marks):
            return layer
    return None


def self_time(entry: tuple) -> float:
    """A function's self time, never below zero: cProfile reports the upload loop's epoll wait as negative
    (minus the whole run's worth); clipped, the profiled threads add up to the CPU /proc measured."""
    return max(entry[2], 0.0)


def cprofile_layers(stats: dict) -> dict[str, float]:
    """Self CPU by layer: a function's self time goes to its own layer; a generic helper's is shared out
    among its callers in proportion to what each call cost them, up the call graph (a cycle ends in OTHER)."""
    labels = {func: func_label(func) for func in stats}
    memo: dict[tuple, dict[str, float]] = {}
    active: set[tuple] = set()

    def shares(func: tuple) -> dict[str, float]:
        if func in memo:
            return memo[func]
        layer = own_layer(labels.get(func, ""))
        if layer is not None or func in active or func not in stats:
            return {layer or OTHER: 1.0}
        active.add(func)
        weights = {caller: max(entry[3], 0.0) for caller, entry in stats[func][4].items()}
        total = sum(weights.values())
        out: collections.Counter = collections.Counter()
        for caller, weight in weights.items():
            for name, share in shares(caller).items():
                out[name] += share * weight / total if total else share / len(weights)
        active.discard(func)
        memo[func] = dict(out) or {OTHER: 1.0}
        return memo[func]

    result: collections.Counter = collections.Counter()
    for func, entry in stats.items():
        tt, callers = self_time(entry), entry[4]
        if not tt:
            continue
        # the self time a helper spent on behalf of each caller is known exactly one level up
        split = {caller: self_time(e) for caller, e in callers.items()}
        parts = {func: tt} if own_layer(labels[func]) or not sum(split.values()) else \
            {caller: tt * part / sum(split.values()) for caller, part in split.items()}
        for owner, part in parts.items():
            for name, share in shares(owner).items():
                result[name] += part * share
    return dict(result)


def cprofile_inclusive(stats: dict, mark: str) -> tuple[int, float]:
    """Calls and inclusive CPU of the functions whose label holds *mark*, each counted where it is entered
    from outside the set (a match called by a match is already inside its caller's time)."""
    matching = {func for func in stats if mark in func_label(func)}
    calls, cpu = 0, 0.0
    for func in matching:
        _cc, nc, _tt, ct, callers = stats[func]
        inside = sum(max(e[3], 0.0) for caller, e in callers.items() if caller in matching)
        calls += nc - sum(e[1] for caller, e in callers.items() if caller in matching)
        cpu += max(ct, 0.0) - inside
    return calls, cpu


def _prefixes() -> list[str]:
    paths = sysconfig.get_paths()
    found = {paths["purelib"], paths["platlib"], paths["stdlib"], str(ROOT)}
    return sorted((p.rstrip("/") + "/" for p in found), key=len, reverse=True)


PREFIXES = _prefixes()


def normal(label: str) -> str:
    """A frame or function label with the install prefixes cut: azure/core/..., sitebackup/..., json/..."""
    for prefix in PREFIXES:
        label = label.replace(prefix, "")
    return label


def func_label(func: tuple) -> str:
    filename, line, name = func
    return normal(f"{name} ({filename}:{line})") if filename != "~" else name


# the entry points of each piece of work: a sample counts for every one its stack passes through
ENTRY_POINTS = [
    ("imports (start-up)", "_find_and_load (<frozen importlib._bootstrap>"),
    ("progress watch loop (client side)", "watch (sitebackup/commands/hosting.py"),
    ("GetInstance answers (backend side of the watch)", "GetInstance (sitebackup/durable/backend/servicer.py"),
    ("cancel checks", "__call__ (sitebackup/commands/hosting.py"),
    ("scan activity", "scan_source (sitebackup/workflows/copy.py"),
    ("copy activities (the activity threads)", "copy_page (sitebackup/workflows/copy.py"),
    ("small-file puts (the event loop)", "_put (sitebackup/blob/asyncput.py"),
    ("  of which reading and hashing the file", "small_file_put (sitebackup/blob/upload.py"),
    ("  of which the MD5 itself", "openssl_md5"),
    ("a blob client per file (any caller)", "get_blob_client (azure/storage/blob/"),
    ("request signing, SharedKey (any caller)", "on_request (azure/storage/blob/_shared/authentication.py"),
    ("aiohttp send (any caller)", "send (azure/core/pipeline/transport/_aiohttp.py"),
    ("content type guess", "guess_type (mimetypes.py"),
    ("restore plan activity", "plan_restore (sitebackup/workflows/fetch.py"),
    ("restore batch activities", "restore_page (sitebackup/workflows/fetch.py"),
    ("  of which the download (SDK, HTTP)", "_download_into (sitebackup/workflows/fetch.py"),
    ("  of which the MD5 check of the written file", "fd_md5_b64 (sitebackup/local/files.py"),
    ("  of which directory checks (lstat per segment, realpath)", "_parent (sitebackup/local/dest.py"),
    ("page reads", "read_page (sitebackup/blob/workstore.py"),
    ("page and record writes", "_write (sitebackup/blob/workstore.py"),
    ("orchestrator episodes (replay, worker side)", "_execute_orchestrator (durabletask/worker.py"),
    ("work-item stream (backend)", "GetWorkItems (sitebackup/durable/backend/servicer.py"),
    ("activity completions (backend)", "CompleteActivityTask (sitebackup/durable/backend/servicer.py"),
    ("orchestrator completions (backend)", "CompleteOrchestratorTask (sitebackup/durable/backend/servicer.py"),
    ("SQLite statements", "'execute' of 'sqlite3.Connection'"),
]


# ---- in the profiled process -------------------------------------------------------------------

MONITOR = "profiler-monitor"  # the sampling thread: its CPU is the wrapper's, not sitebackup's

class ThreadCpu:
    """CPU seconds of every OS thread of this process, sampled from /proc: threads that end early count too."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.last: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
                comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            except OSError:  # ended meanwhile
                continue
            name = names.get(int(tid)) or self.last.get(int(tid), (f"C thread {comm}", 0))[0]
            self.last[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / self.tick)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def groups(self) -> dict[str, float]:
        self.sample()
        out: collections.Counter = collections.Counter()
        for name, cpu in self.last.values():
            group = re.sub(r"^Thread-\d+", "Thread", re.sub(r"_\d+$", "", name))
            out[group] += cpu
        return dict(out)


def run_child(out: Path, profile: Path | None, argv: list[str]) -> None:
    """Run `sitebackup ARGV` in this process, writing per-thread CPU to *out* and, with *profile*, one
    CPU-clock cProfile per thread merged into that file."""
    import runpy

    # the package of the checkout this script is in, as `python -m sitebackup` run from it imports it: not
    # whichever checkout an editable install points at
    sys.path.insert(0, str(ROOT))
    cpu = ThreadCpu()
    monitor = threading.Thread(target=cpu.run, name=MONITOR, daemon=True)
    monitor.start()
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()
    if profile is not None:
        original = threading.Thread.run

        def run(self: threading.Thread) -> None:
            prof = cProfile.Profile(time.thread_time)
            with lock:
                profilers.append(prof)
            prof.enable()
            try:
                original(self)
            finally:
                prof.disable()

        threading.Thread.run = run  # type: ignore[method-assign]
        main = cProfile.Profile(time.thread_time)
        profilers.append(main)
        main.enable()
    written = False

    def write() -> None:
        nonlocal written
        if written:
            return
        written = True
        if profile is not None:
            main.disable()
            merged = None
            with lock:
                for prof in profilers:
                    # no disable() here: for a thread still running it would time that thread's open calls
                    # with this thread's CPU clock; the snapshot holds the calls that returned
                    prof.snapshot_stats()
                    if prof.stats:  # a thread that ran Python code
                        merged = pstats.Stats(prof) if merged is None else merged.add(prof)
            if merged is not None:
                merged.dump_stats(profile)
        cpu.done.set()
        out.write_text(json.dumps(cpu.groups()))

    # registered first, so run last: sitebackup ends with os._exit after the exit handlers
    # (commands/hosting.end_process), so code after run_module would never run
    atexit.register(write)
    sys.argv = ["sitebackup", *argv]
    code: int | str | None = 0
    try:
        runpy.run_module("sitebackup", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        write()
    sys.exit(code)


# ---- the passes --------------------------------------------------------------------------------

def requests_by_kind(lines: list[str]) -> collections.Counter:
    """Azurite access-log lines counted by request kind: method plus the ``comp``/``restype`` of the query."""
    kinds: collections.Counter = collections.Counter()
    for line in lines:
        match = re.search(r'"([A-Z]+) (\S+) HTTP', line)
        if not match:
            continue
        method, target = match.groups()
        query = dict(re.findall(r"(comp|restype)=([a-z]+)", target.partition("?")[2]))
        what = " ".join(f"{k}={v}" for k, v in sorted(query.items())) or "blob"
        kinds[f"{method} {what}"] += 1
    return kinds


def pyspy_stacks(raw: Path) -> tuple[list[tuple[list[str], int]], int]:
    """py-spy raw samples as (stack from the root, count), and the number dropped as waits."""
    stacks: list[tuple[list[str], int]] = []
    dropped = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [normal(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames or any(mark in frames[-1] for mark in WAITS):
            dropped += int(count)
            continue
        stacks.append((frames, int(count)))
    return stacks, dropped


def table(title: str, parts: dict[str, float], cpu: float, files: int, unit: str = "share") -> str:
    total = sum(parts.values()) or 1.0
    lines = [title, "", f"| layer | {unit} | est. CPU s | est. ms/file |", "| --- | ---: | ---: | ---: |"]
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        share = value / total
        lines.append(f"| {name} | {100 * share:.1f}% | {share * cpu:.2f} | {1000 * share * cpu / files:.3f} |")
    return "\n".join(lines)


class Profiler:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.source = bench_upload.generate(bench_upload.DATASETS[args.dataset], args.data_dir)
        self.measured: dict[tuple[str, str], tuple[float, float, float, int]] = {}
        self.requests: dict[str, collections.Counter] = {}
        self.threads: dict[tuple[str, str], dict[str, float]] = {}
        self.load()

    def load(self) -> None:
        """What earlier passes into the same --out measured: passes can be run (and re-run) one at a time."""
        saved = self.out / "passes.json"
        if not saved.exists():
            return
        data = json.loads(saved.read_text())
        self.measured = {tuple(k.split("/")): tuple(v) for k, v in data["measured"].items()}
        self.requests = {op: collections.Counter(kinds) for op, kinds in data["requests"].items()}
        self.threads = {tuple(k.split("/")): v for k, v in data["threads"].items()}

    def save(self) -> None:
        (self.out / "passes.json").write_text(json.dumps({
            "measured": {"/".join(k): v for k, v in self.measured.items()},
            "requests": self.requests,
            "threads": {"/".join(k): v for k, v in self.threads.items()}}, indent=1))

    def one_pass(self, mode: str) -> None:
        """Back up and restore once, both under *mode*: plain, cprofile or py-spy."""
        work = self.out / mode
        work.mkdir(parents=True, exist_ok=True)
        with bench_upload.azurite_server(work, access_log=mode == "plain") as azurite:
            from azure.storage.blob import BlobServiceClient

            env = bench_upload.tool_env(azurite, work)
            container = f"p-{uuid.uuid4().hex[:10]}"
            service = BlobServiceClient.from_connection_string(azurite.connection_string)
            service.create_container(container)
            service.close()
            access = work / "azurite" / "azurite.log"
            run_id = ""
            for op in ("backup", "restore"):
                args = [str(self.source.root), "--container", container] if op == "backup" \
                    else ["restore", run_id, str(work / "dest")]
                argv = [*args, "--json", "--state-dir", str(work / "state")]
                seen = len(access.read_text().splitlines()) if access.exists() else 0
                log = work / f"{op}.log"
                timed = bench_upload.run_timed(self.wrap(mode, op, argv), env, log, ROOT, 3600)
                shutil.rmtree(work / "dest", ignore_errors=True)
                if timed[3] != 0:
                    raise SystemExit(f"{mode} {op} failed (exit {timed[3]}): see {log}")
                self.measured[(mode, op)] = timed
                if mode == "plain":
                    self.requests[op] = requests_by_kind(access.read_text().splitlines()[seen:])
                threads = self.out / f"{mode}-{op}.threads.json"
                if threads.exists():
                    self.threads[(mode, op)] = json.loads(threads.read_text())
                if op == "backup":
                    run_id = bench_upload.first_json(log)["instance_id"]
                self.save()
                print(f"# {mode} {op}: {timed[0]:.1f}s cpu {timed[1]:.1f}s rss {timed[2]:.0f} MB",
                      file=sys.stderr, flush=True)

    def wrap(self, mode: str, op: str, argv: list[str]) -> list[str]:
        if mode == "py-spy":
            # --nonblocking: a paused process shows every thread running; unpaused, parked threads read as idle
            return [str(self.py_spy()), "record", "--nonblocking", "--subprocesses", "--full-filenames", "--format", "raw",
                    "--rate", "100", "--output", str(self.out / f"{op}.pyspy.txt"), "--", sys.executable, "-m",
                    "sitebackup", *argv]
        profile = ["--cprofile", str(self.out / f"{op}.prof")] if mode == "cprofile" else []
        return [sys.executable, __file__, "--child", str(self.out / f"{mode}-{op}.threads.json"), *profile, "--", *argv]

    @staticmethod
    def py_spy() -> Path | None:
        local = Path(sys.executable).parent / "py-spy"
        found = local if local.exists() else shutil.which("py-spy")
        return Path(found) if found else None

    # ---- reports ----

    def report(self) -> str:
        parts = [self.runs_table()]
        for op in ("backup", "restore"):
            parts += [self.thread_table(op), self.layer_tables(op), self.top(op)]
        return "\n\n".join(p for p in parts if p)

    def plain_cpu(self, op: str) -> float:
        """The plain run's CPU, less the thread sampler's."""
        sampler = self.threads.get(("plain", op), {}).get(MONITOR, 0.0)
        return self.measured.get(("plain", op), (0.0, 0.0))[1] - sampler

    def runs_table(self) -> str:
        files = self.source.files
        lines = [f"Dataset {self.source.name}: {files} files, {self.source.bytes / 2 ** 20:.1f} MiB.", "",
                 "| op | mode | seconds | CPU s | CPU ms/file | peak RSS MB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for (mode, op), (seconds, cpu, rss, _code) in sorted(self.measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lines.append(f"| {op} | {mode} | {seconds:.1f} | {cpu:.1f} | {1000 * cpu / files:.2f} | {rss:.0f} |")
        for op, kinds in self.requests.items():
            total = sum(kinds.values())
            lines += ["", f"Requests of the {op} (Azurite access log): {total}, {total / files:.3f} per file", "",
                      "| request | count | per file |", "| --- | ---: | ---: |"]
            lines += [f"| {kind} | {n} | {n / files:.3f} |" for kind, n in kinds.most_common()]
        return "\n".join(lines)

    def thread_table(self, op: str) -> str:
        groups = self.threads.get(("plain", op))
        if not groups:
            return ""
        groups = dict(groups)
        overhead = groups.pop(MONITOR, 0.0)
        total = self.plain_cpu(op)
        seen = sum(groups.values())
        lines = [f"CPU of the {op} by thread (plain run, sampled from /proc every 0.5 s: {seen:.2f} of {total:.2f} s "
                 f"seen, the rest in threads that ended between samples; the sampler's own {overhead:.2f} s left out)",
                 "", "| thread | CPU s | share |", "| --- | ---: | ---: |"]
        for name, cpu in sorted(groups.items(), key=lambda kv: -kv[1]):
            if cpu >= 0.01:
                lines.append(f"| {name} | {cpu:.2f} | {100 * cpu / (total or 1):.1f}% |")
        return "\n".join(lines)

    def layer_tables(self, op: str) -> str:
        cpu, files = self.plain_cpu(op), self.source.files
        prof, raw = self.out / f"{op}.prof", self.out / f"{op}.pyspy.txt"
        stats = pstats.Stats(str(prof)).stats if prof.exists() else None
        stacks, dropped = pyspy_stacks(raw) if raw.exists() else ([], 0)
        samples = sum(n for _s, n in stacks)
        parts = []
        if stats is not None:
            parts.append(table(f"CPU of the {op} by layer (cProfile self time on each thread's CPU clock, generic helpers "
                               f"handed up to their callers; seconds = share x the plain run's {cpu:.1f} s)",
                               cprofile_layers(stats), cpu, files))
        if stacks:
            layers: collections.Counter = collections.Counter()
            for frames, n in stacks:
                layers[classify(frames)] += n
            parts.append(table(f"The same from py-spy --nonblocking ({samples} samples kept, {dropped} of parked threads "
                               "dropped). py-spy also counts a thread blocked inside a C call under one of our frames "
                               "(a lock, a socket read) as running: these shares are busy-or-blocked time, not CPU",
                               dict(layers), cpu, files))
        if stats is None and not stacks:
            return ""
        total = sum(self_time(e) for e in stats.values()) if stats else 1.0
        lines = [f"Entry points of the {op}: inclusive CPU (cProfile) and busy samples (py-spy); they nest", "",
                 "| work | calls | CPU share | est. CPU s | est. ms/file | py-spy share |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for title, mark in ENTRY_POINTS:
            calls, inclusive = cprofile_inclusive(stats, mark) if stats else (0, 0.0)
            busy = sum(n for frames, n in stacks if any(mark in frame for frame in frames))
            if not calls and not busy:
                continue
            share = inclusive / total
            lines.append(f"| {title} | {calls} | {100 * share:.1f}% | {share * cpu:.2f} | {1000 * share * cpu / files:.3f} "
                         f"| {100 * busy / (samples or 1):.1f}% |")
        parts.append("\n".join(lines))
        return "\n\n".join(parts)

    def top(self, op: str) -> str:
        prof = self.out / f"{op}.prof"
        if not prof.exists():
            return ""
        parts = []
        for order, title in (("cumulative", "cumulative"), ("tottime", "self")):
            buffer = io.StringIO()
            stats = pstats.Stats(str(prof), stream=buffer)
            stats.sort_stats(order).print_stats(self.args.top)
            body = buffer.getvalue()
            body = body[body.find("   ncalls"):].rstrip()
            body = normal(body)
            parts.append(f"Top {self.args.top} functions of the {op} by {title} CPU time (cProfile, every thread, "
                         f"thread CPU clock; coroutines count one call per resumption):\n\n```\n{body}\n```")
        return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[3:]
        profile = Path(rest[1]) if rest[0] == "--cprofile" else None
        run_child(Path(sys.argv[2]), profile, rest[rest.index("--") + 1:])
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Azurite and the profiled run on the way out
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="small", choices=[d for d in bench_upload.DATASETS if d != "million"])
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sitebackup-bench-data")
    parser.add_argument("--out", type=Path, help="where the raw profiles go (default: a new temporary directory)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table")
    parser.add_argument("--modes", default="plain,cprofile,py-spy",
                        help="passes to run (default all three; none: report what --out holds)")
    args = parser.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(args)
    for mode in [m for m in args.modes.split(",") if m and m != "none"]:
        if mode == "py-spy" and not profiler.py_spy():
            print("# py-spy not installed: that pass is left out", file=sys.stderr)
            continue
        profiler.one_pass(mode)
    print(profiler.report())
    print(f"# raw profiles in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

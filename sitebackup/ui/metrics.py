"""``--metrics-file``: the last run of a job as Prometheus text for node_exporter's textfile collector.

A job is one command, source and destination (the ``command``, ``source`` and ``destination``
labels), so one file can serve every cron line of a host. A write reads the file, replaces only
this job's series and writes the whole file back, holding a lock so that two jobs ending together
keep each other's series: a file of this user's beside it (``.NAME.lock``), never the directory,
which any user who can read it can lock. A lock held for longer than a write takes is not waited
for: the metrics are written anyway and the user told in one line. The new text goes to a fresh
temporary in the same directory, renamed over the file: the collector never reads half a file.
Series of other programs in the file are kept as they were.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sitebackup.errors import EXIT_CODES

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

PREFIX = "sitebackup_"
JOB_LABELS = ("command", "source", "destination")
LAST_SUCCESS = PREFIX + "last_success_timestamp_seconds"
GAUGES = {
    PREFIX + "last_run_start_timestamp_seconds": "When the last run of the job started (Unix time).",
    PREFIX + "last_run_end_timestamp_seconds": "When the last run of the job ended (Unix time).",
    PREFIX + "last_run_duration_seconds": "How long the last run of the job took, start-up included.",
    PREFIX + "last_run_exit_code": "Exit code of the last run: "
                                   + ", ".join(f"{e.code} {e.name}" for e in EXIT_CODES) + ".",
    LAST_SUCCESS: "When the last run of the job that exited 0 ended (Unix time).",
}
FILES = PREFIX + "last_run_files"
BYTES = PREFIX + "last_run_bytes"
RUNS = PREFIX + "last_run_runs"
BLOBS = PREFIX + "last_run_blobs"
SNAPSHOTS = PREFIX + "last_run_snapshots"
COUNTS = {
    FILES: "Files of the last run by state, from its summary (skipped counts unchanged files too).",
    BYTES: "Bytes of the last run by state, from its summary.",
    RUNS: "Backup runs the last prune kept and removed.",
    BLOBS: "Blobs the last prune removed.",
    SNAPSHOTS: "Blob snapshots the last prune removed.",
}
# a summary counter ``KIND_STATE`` feeds family KINDS[KIND] with label state=STATE
KINDS = {"files": FILES, "bytes": BYTES, "runs": RUNS, "blobs": BLOBS, "snapshots": SNAPSHOTS}


# two jobs ending together wait for each other's write, which takes milliseconds; a lock held longer is stuck
LOCK_WAIT_SECONDS = 10.0
LOCK_POLL_SECONDS = 0.05


class MetricsFileError(Exception):
    """The metrics file cannot be read or written."""


@dataclass
class MetricsJob:
    """One command's metrics: its labels, when it started, and (once it has one) its run's summary."""

    path: Path
    command: str
    source: str
    destination: str
    started: float = field(default_factory=time.time)
    summary: Mapping[str, object] | None = None  # the flat JSON object --json prints of the run's outcome

    @property
    def labels(self) -> dict[str, str]:
        return {"command": self.command, "source": self.source, "destination": self.destination}

    def write(self, exit_code: int, ended: float | None = None) -> str | None:
        """Replace this job's series in the file with this run's; MetricsFileError when that fails. What the
        user should hear of the lock when the file was written without it (one line), else None."""
        ended = time.time() if ended is None else ended
        lock, unlocked = _lock(self.path, LOCK_WAIT_SECONDS)
        try:
            families = _read(self.path)
            values = {
                PREFIX + "last_run_start_timestamp_seconds": self.started,
                PREFIX + "last_run_end_timestamp_seconds": ended,
                PREFIX + "last_run_duration_seconds": round(ended - self.started, 3),
                PREFIX + "last_run_exit_code": exit_code,
                LAST_SUCCESS: ended if exit_code == 0 else _value(families.get(LAST_SUCCESS), self.labels),
            }
            # prometheus_client is imported here and below, on use: runs without --metrics-file never load it
            from prometheus_client import generate_latest

            text = generate_latest(_registry(families, self.labels, values, _counts(self.summary)))
            _replace(self.path, text)
        except OSError as exc:
            raise MetricsFileError(f"cannot write {str(self.path)!r}: {exc.strerror or exc}") from None
        finally:
            if lock is not None:
                os.close(lock)  # and with it the lock
        return None if unlocked is None else f"metrics written without their lock: {unlocked}"


def _lock(path: Path, wait: float) -> tuple[int | None, str | None]:
    """The lock of the metrics file taken, waiting *wait* seconds at most: the descriptor holding it, or None and
    why not. The lock is a file of this user's beside the metrics file (``.NAME.lock``, 0600), opened without
    following a symlink: the directory itself, which other users can open and lock, is never locked."""
    name = path.parent / f".{path.name}.lock"
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:  # an existing one is opened without O_CREAT: fs.protected_regular refuses that, even to root, for a
        # file another user planted in a sticky directory, and the line must say whose the file is
        try:
            fd = os.open(name, flags)
        except FileNotFoundError:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return None, f"cannot open {str(name)!r}: {exc.strerror}"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return None, f"{str(name)!r} is not a file of this user's"
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None, f"{str(name)!r} was held by another process for {wait:.0f}s"
            time.sleep(LOCK_POLL_SECONDS)


def _counts(summary: Mapping[str, object] | None) -> dict[str, dict[str, int]]:
    """{FILES: {state: n}, BYTES: {state: n}, ...} from a summary's files_*, bytes_*, runs_*, blobs_* and
    snapshots_* counters."""
    counts: dict[str, dict[str, int]] = {family: {} for family in KINDS.values()}
    for key, value in (summary or {}).items():
        kind, _, state = key.partition("_")
        if kind in KINDS and state and isinstance(value, int) and not isinstance(value, bool):
            counts[KINDS[kind]][state] = value
    return counts


def _read(path: Path) -> dict[str, Metric]:
    """The families in the file now: none if it is missing or not Prometheus text (it is replaced)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # never read through a planted symlink
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise MetricsFileError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    with open(fd, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        return {family.name: family for family in text_string_to_metric_families(text)}
    except ValueError:
        return {}


def _value(family: Metric | None, labels: dict[str, str]) -> float | None:
    for sample in family.samples if family is not None else ():
        if _job_of(sample.labels) == labels:
            return sample.value
    return None


def _job_of(labels: dict[str, str]) -> dict[str, str]:
    return {name: labels.get(name, "") for name in JOB_LABELS}


def _registry(families: dict[str, Metric], labels: dict[str, str], values: dict[str, float | None],
              counts: dict[str, dict[str, int]]) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    out: list[Metric] = []
    ours = {**GAUGES, **COUNTS}
    for name, doc in ours.items():
        extra = ("state",) if name in COUNTS else ()
        gauge = GaugeMetricFamily(name, doc, labels=[*JOB_LABELS, *extra])
        for sample in families[name].samples if name in families else ():
            if _job_of(sample.labels) != labels:  # another job's series, kept as it was
                gauge.add_metric([sample.labels.get(n, "") for n in (*JOB_LABELS, *extra)], sample.value)
        if name in COUNTS:
            for state, value in sorted(counts[name].items()):
                gauge.add_metric([*labels.values(), state], value)
        elif (own := values[name]) is not None:
            gauge.add_metric(list(labels.values()), own)
        out.append(gauge)
    out += [family for name, family in families.items() if name not in ours]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return registry


class _Families:
    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def _replace(path: Path, text: bytes) -> None:
    """Write *text* to a fresh, unguessable temporary beside *path* (O_EXCL: no planted file or symlink is
    followed) and rename it over *path*; the collector, another user, reads it: mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

"""Printers of a run's progress and results: rich bar on a TTY, plain lines for cron, NDJSON for scripts, or nothing.

Printers only render data they are given (custom-status counters and summaries); they never
ask the backend anything, so any source of progress can drive any printer. Every line they build goes
through ``escape.printable``, and the rich printer never reads data as markup. Rate and ETA are the
printers' own (``RateMeter``, from successive counters): the orchestration publishes no clocks.
Every byte count a person reads, in the bar, the summary, ``status`` and ``list``, is ``human_bytes``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TextIO

from sitebackup.model.codec import to_wire
from sitebackup.model.reports import RunStart
from sitebackup.model.work import BackupCounts, Progress, Summary, summary_to_wire
from sitebackup.ui.escape import printable

if TYPE_CHECKING:
    from rich.console import Console


def human_bytes(n: float) -> str:
    """Binary units, one decimal: the one way sitebackup shows a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_duration(delta: timedelta) -> str:
    """``1h 5m``, ``3m 12s``, ``42s``: the two largest units, for ages of runs."""
    seconds = max(0, int(delta.total_seconds()))
    values = [(seconds // 86400, "d"), (seconds // 3600 % 24, "h"), (seconds // 60 % 60, "m"), (seconds % 60, "s")]
    first = next((i for i, (n, _) in enumerate(values) if n), len(values) - 1)
    return " ".join(f"{n}{unit}" for n, unit in values[first:first + 2] if n) or "0s"


def clock_duration(seconds: float) -> str:
    """``H:MM:SS``: the ETA beside the bar."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RateMeter:
    """Bytes per second and seconds left, from the counters of successive progress statuses.

    The rate counts bytes sent or fetched (``bytes_done`` less ``bytes_skipped``: unchanged files
    move nothing) over the last *window* seconds; it is None until the samples span *min_span*.
    """

    def __init__(self, window: float = 10.0, min_span: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.min_span = min_span
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, status: Progress) -> tuple[float | None, float | None]:
        now = self.clock()
        moved = status.bytes_done - status.bytes_skipped
        self.samples.append((now, moved))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_at, first = self.samples[0]
        if now - first_at < self.min_span:
            return None, None
        rate = max(0.0, (moved - first) / (now - first_at))
        left = max(0, status.bytes_total - status.bytes_done)
        return rate, (left / rate if rate else None) if left else 0.0


# a run's kind is its orchestration's durable name (workflows.names)
KINDS = {"BackupSiteContent": "backup", "RestoreSiteContent": "restore"}


def start_verb(info: RunStart) -> str:
    if info.finished:
        return "already finished:"
    return "attached to" if info.attached else "resuming" if info.resumed else "started"


def start_line(info: RunStart) -> str:
    return printable(f"{start_verb(info)} {info.instance_id}: {info.source} -> {info.destination}")


def summary_line(summary: Summary[Any]) -> str:
    counts = summary.counts
    verb = counts.verb
    status = "CANCELLED" if summary.cancelled else summary.runtime_status or "?"
    parts = [
        f"{summary.instance_id or '?'} {status}:",
        f"{counts.files_copied}/{counts.files_total} files {verb}",
        f"({human_bytes(counts.bytes_copied)})",
    ]
    if counts.files_unchanged:
        parts.append(f"{counts.files_unchanged} unchanged ({human_bytes(counts.bytes_skipped)}),")
    if getattr(counts, "metadata_changed", 0):  # a backup's: entries whose mode, owner or target alone changed
        parts.append(f"{counts.metadata_changed} with metadata changes only,")
    other_skipped = counts.files_skipped - counts.files_unchanged
    if other_skipped:
        parts.append(f"{other_skipped} skipped,")
    parts.append(f"{counts.files_failed} failed, {summary.duration_s:.1f}s")
    return printable(" ".join(parts))


def failure_lines(summary: Summary[Any]) -> list[str]:
    """The files that failed, why the run stopped if it did, and what the user should know of how it went."""
    lines = [printable(f"FAILED {f.path}: {f.error}") for f in summary.failures]
    lines += [printable(f"sitebackup: note: {note}") for note in summary.notes]
    if summary.error:
        # the run itself stopped (a FAILED instance, or one waiting for `resume`): say why
        lines.append(printable(f"sitebackup: error: {summary.error}"))
    if summary.cancelled:
        lines.append(f"sitebackup: run {summary.instance_id} was cancelled (sitebackup cancel); "
                     "what it backed up before stays")
    listed = len(summary.failures)
    rest = summary.counts.files_failed - listed
    if rest > 0 and listed:
        lines.append(printable(f"... and {rest} more failed files (see: sitebackup status {summary.instance_id})"))
    return lines


def skipped_lines(summary: Summary[Any]) -> list[str]:
    """Notes for what was left out on purpose (symlinks, FIFOs, sockets, devices), as listed in the summary, and
    how many more there were when the list is cut short."""
    lines = [printable(f"skipped {s.path}: {s.reason}") for s in summary.skipped]
    # a backup's skipped files are the unchanged ones and those left out on purpose, each of which may be listed
    rest = summary.counts.files_skipped - summary.counts.files_unchanged - len(summary.skipped)
    if isinstance(summary.counts, BackupCounts) and rest > 0 and summary.skipped:
        lines.append(f"... and {rest} more skipped")
    return lines


class Printer:
    """Do-nothing printer: the base for the others and the one tests can use."""

    def start(self, info: RunStart) -> None: ...

    def progress(self, status: Progress) -> None: ...

    def message(self, text: str) -> None: ...

    def finish(self, summary: Summary[Any]) -> None: ...

    def close(self) -> None: ...


class PlainPrinter(Printer):
    """For cron and pipes: a start line, failure lines and one summary line; no control characters."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, quiet: bool = False):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet

    def start(self, info: RunStart) -> None:
        if not self.quiet:
            print(f"sitebackup: {start_line(info)}", file=self.out, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            print(f"sitebackup: {printable(text)}", file=self.err, flush=True)

    def finish(self, summary: Summary[Any]) -> None:
        for line in failure_lines(summary):
            print(line, file=self.err, flush=True)
        if not self.quiet:
            for line in skipped_lines(summary):
                print(line, file=self.out, flush=True)
            print(summary_line(summary), file=self.out, flush=True)


class RichPrinter(PlainPrinter):
    """A live bar on stderr, drawn from the custom-status counters."""

    def __init__(self, console: Console | None = None):
        # rich is imported only where a bar is drawn: cron runs (no terminal) never pay for it
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        super().__init__()
        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[files]}"),
            # our own byte, rate and ETA columns: rich's count decimal megabytes, the summary binary ones
            TextColumn("{task.fields[bytes]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task("scanning", total=None, files="", bytes="", rate="", eta="")
        self.meter = RateMeter()
        self.started = False

    def start(self, info: RunStart) -> None:
        from rich.text import Text

        verb = "Already finished:" if info.finished else "Resuming" if info.resumed and not info.attached \
            else info.action
        self.console.print(Text.assemble(f"{verb} ", (printable(info.source), "bold"), " -> ",
                                         (printable(info.destination), "bold"), f" ({printable(info.instance_id)})"))
        self.bar.start()
        self.started = True

    def message(self, text: str) -> None:
        self.console.print(printable(text), markup=False, highlight=False)

    def progress(self, status: Progress) -> None:
        from rich.markup import escape as escape_markup

        total = status.bytes_total or None
        done = status.bytes_done
        rate, eta = self.meter.update(status)
        # the description column is a markup template: the phase goes in escaped
        self.bar.update(self.task, description=escape_markup(printable(status.phase)),
                        completed=done, total=total,
                        files=f"{status.files_done}/{status.files_total} files",
                        bytes=f"{human_bytes(done)}/{human_bytes(status.bytes_total)}",
                        rate="" if rate is None else f"{human_bytes(rate)}/s",
                        eta="" if eta is None else f"ETA {clock_duration(eta)}")

    def finish(self, summary: Summary[Any]) -> None:
        self.close()
        for line in failure_lines(summary):
            self.console.print(line, markup=False, highlight=False)
        for line in skipped_lines(summary):
            self.console.print(line, markup=False, highlight=False)
        print(summary_line(summary), file=self.out, flush=True)

    def close(self) -> None:
        if self.started:
            self.bar.stop()
            self.started = False


class JsonPrinter(Printer):
    """NDJSON on stdout: a start event first (with the instance id), progress at most 5 a second, summary last.

    Progress events carry the status counters plus ``bytes_per_second`` and ``eta_s`` (null until known)."""

    def __init__(self, out: TextIO | None = None, interval: float = 0.2, clock: Callable[[], float] = time.monotonic):
        self.out = out or sys.stdout
        self.interval = interval
        self.clock = clock
        self.meter = RateMeter(clock=clock)
        self.last = float("-inf")

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self.out.write(json.dumps({"event": event, **data}) + "\n")
        self.out.flush()

    def start(self, info: RunStart) -> None:
        self._emit("start", to_wire(info))

    def message(self, text: str) -> None:
        self._emit("message", {"message": text})

    def progress(self, status: Progress) -> None:
        rate, eta = self.meter.update(status)  # every status is a sample, emitted or not
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit("progress", {**to_wire(status), "bytes_per_second": None if rate is None else round(rate),
                                    "eta_s": None if eta is None else round(eta, 1)})

    def finish(self, summary: Summary[Any]) -> None:
        self._emit("summary", summary_to_wire(summary))


def make_printer(*, json_output: bool = False, quiet: bool = False, tty: bool | None = None) -> Printer:
    if json_output:
        return JsonPrinter()
    if tty is None:
        tty = sys.stderr.isatty()
    if tty and not quiet:
        return RichPrinter()
    return PlainPrinter(quiet=quiet)

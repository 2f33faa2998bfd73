"""Turning command results into text for people: the status report, the runs table, the dry-run plan,
the prune report.

Paths and messages in them are data: every line is escaped (``escape.printable``) and no cell of the
runs table is read as markup.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import click

from sitebackup.model.codec import DamagedData, encode, to_wire
from sitebackup.model.reports import DryRunItem, DryRunTotals, PruneReport, RunInfo, RunRow
from sitebackup.model.work import BackupCounts, RestoreCounts, summary_from_wire
from sitebackup.ui.escape import printable
from sitebackup.ui.printers import KINDS, failure_lines, human_bytes, human_duration

if TYPE_CHECKING:
    from rich.console import Console


def status_text(info: RunInfo) -> str:
    status = info.runtime_status
    idle = timedelta(seconds=info.idle_s) if info.idle_s is not None else None
    lines = [f"{info.instance_id}  {KINDS.get(info.kind, info.kind)}  {status}"]
    if status in ("RUNNING", "PENDING") and info.worker_attached is False:
        lines[0] += f" — no worker attached; resume with: sitebackup resume {info.instance_id}"
    elif info.stalled and idle is not None:
        lines[0] += f" — STALLED: no progress for {human_duration(idle)}; is its process hung?"
    if status in ("RUNNING", "PENDING") and info.worker_attached is None:
        # the scheduler does not tell clients which workers hold an instance's work
        lines.append("  worker:       unknown with --taskhub")
    lines.append(f"  source:       {info.source}")
    lines.append(f"  destination:  {info.destination}  ({info.endpoint})")
    lines.append(f"  created:      {info.created_at}")
    if idle is not None:
        lines.append(f"  progress at:  {info.last_progress_at}  ({human_duration(idle)} ago)")
    else:
        lines.append(f"  last update:  {info.last_updated_at}  ({info.duration_s:.1f}s)")
    # a summary holds the counters; a cancelled run's output does not: they are in its last status
    output = info.output
    counts = RestoreCounts if KINDS.get(info.kind) == "restore" else BackupCounts
    try:
        summary = summary_from_wire(output, counts, "the run's summary") \
            if isinstance(output, dict) and "files_total" in output else None
    except DamagedData:
        summary = None
    progress = info.custom_status
    if summary is not None:
        done, verb = summary.counts, summary.counts.verb
        summary.instance_id = info.instance_id
        lines.append(f"  files:        {done.files_copied}/{done.files_total} {verb}, "
                     f"{done.files_skipped} skipped, {done.files_failed} failed")
        lines.append(f"  bytes:        {human_bytes(done.bytes_copied)} {verb} of {human_bytes(done.bytes_total)}")
        lines += ["  " + line for line in failure_lines(summary)]
    elif progress is not None:
        lines.append(f"  phase:        {progress.phase}")
        lines.append(f"  files:        {progress.files_done}/{progress.files_total} done, "
                     f"{progress.files_failed} failed")
        lines.append(f"  bytes:        {human_bytes(progress.bytes_done)} of {human_bytes(progress.bytes_total)}")
    if info.failure is not None:
        lines.append(f"  failure:      {info.failure.type}: {info.failure.message}")
    return "\n".join(map(printable, lines))


RUN_COLUMNS = ("id", "job", "kind", "status", "source", "destination", "files", "bytes", "started", "duration",
               "restorable")


def runs_table(rows: list[RunRow], console: Console | None = None) -> None:
    """The runs, newest first: a table on a terminal wide enough for it, otherwise tab-separated lines
    (a header first), so a pipe, a script or cron's mail gets every value in full, never cut."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    if not rows:
        click.echo("no runs recorded in this state directory", file=console.file)
        return
    lines = [[printable(row.instance_id), printable(row.job or "-"), printable(KINDS.get(row.kind, row.kind)),
              printable(row.runtime_status),
              printable(str(row.source)), printable(str(row.destination)), f"{row.files}/{row.files_total}",
              human_bytes(row.bytes), row.created_at[:19].replace("T", " "), f"{row.duration_s:.1f}s",
              printable(row.restorable or "-")]
             for row in rows]
    if console.is_terminal:
        table = Table(box=None, header_style="bold")
        for column in RUN_COLUMNS:
            table.add_column(column, no_wrap=True)
        for line in lines:
            table.add_row(*map(Text, line))  # Text: a name is never read as rich markup
        if Measurement.get(console, console.options.update_width(sys.maxsize), table).maximum <= console.width:
            console.print(table)
            return
    # no terminal, or one too narrow for every value in full
    for line in [list(RUN_COLUMNS), *lines]:
        click.echo("\t".join(line), file=console.file)


class DryRunLines:
    """The files of a ``--dry-run``, a line each as the walk reaches them (failures on stderr; unchanged files only
    when asked), or a JSON event each.

    Lines are written in batches (every ``BATCH`` lines, or when ``FLUSH_SECONDS`` have passed since the last
    write): a write per line is a system call per file when stdout is unbuffered (``python -u``,
    PYTHONUNBUFFERED), a fifth of a million-file dry run's CPU. Escaped (or JSON), they hold no control
    character. Use it as a context manager: what is held is written however the walk ends.
    """

    BATCH = 1000
    FLUSH_SECONDS = 0.25

    def __init__(self, json_output: bool, quiet: bool, unchanged: bool = False):
        self.json_output = json_output
        self.quiet = quiet
        self.unchanged = unchanged  # a line for each unchanged file too (-v); --json has every file
        self._held: list[str] = []
        self._since = time.monotonic()

    def __enter__(self) -> DryRunLines:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.flush()

    def add(self, item: DryRunItem) -> None:
        if self.json_output:
            # compact, at a fraction of json's CPU (a line per file); a name that is not ASCII gets \u escapes,
            # as in every other event, so no line carries a raw control character
            line = b'{"event":"dry_run",' + encode(item)[1:]
            self._held.append(line.decode() if line.isascii() else json.dumps(json.loads(line), separators=(",", ":")))
        elif item.action == "fail":
            self.flush()  # in order with the lines before it on a terminal showing both streams
            click.echo(printable(f"FAILED {item.path}: {item.error}"), err=True)
            return
        elif not self.quiet and (item.action != "unchanged" or self.unchanged):
            self._held.append(printable(_dry_run_line(item)))
        else:
            return
        if len(self._held) >= self.BATCH or time.monotonic() - self._since >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._held:
            sys.stdout.write("\n".join(self._held) + "\n")
            sys.stdout.flush()
            self._held.clear()
        self._since = time.monotonic()


def _dry_run_line(item: DryRunItem) -> str:
    size = human_bytes(item.size or 0)
    if item.action == "upload":
        return f"would upload {item.path} ({size}, {'changed' if item.changed else 'new'})"
    if item.action == "delete":
        what = {"dir": "directory", "symlink": "symlink"}.get(item.kind, size)
        return f"deleted {item.path} ({what}; left out of the next run's record, kept for earlier runs)"
    if item.action == "metadata":  # its content stays: the record takes what changed
        return f"would record {item.path} ({item.reason})"
    return f"{item.action} {item.path} ({item.reason or size})"


def dry_run_totals(plan: DryRunTotals, json_output: bool, quiet: bool) -> None:
    """What a ``--dry-run`` would upload and skip, after its files: the totals line or the summary event."""
    if json_output:
        click.echo(json.dumps({"event": "summary", **to_wire(plan)}))
    elif not quiet:
        click.echo(f"dry run: {plan.files_to_upload} files would be uploaded ({human_bytes(plan.bytes_to_upload)}: "
                   f"{plan.files_to_upload - plan.files_changed} new, {plan.files_changed} changed), "
                   f"{plan.files_deleted} deleted since the last run ({human_bytes(plan.bytes_deleted)}), "
                   + (f"{plan.dirs_deleted} directories and {plan.symlinks_deleted} symlinks deleted, "
                      if plan.dirs_deleted or plan.symlinks_deleted else "")
                   + f"{plan.files_unchanged} unchanged ({human_bytes(plan.bytes_skipped)}), "
                   + (f"{plan.metadata_changed} with metadata changes only, " if plan.metadata_changed else "")
                   + f"{plan.files_skipped - plan.files_unchanged} skipped, {plan.files_failed} failed")


def prune_report(report: PruneReport) -> None:
    """One line per run kept or removed, then what was (or with --dry-run would be) freed."""
    for kept in report.kept:
        click.echo(f"keep   {kept.instance_id}  {kept.created_at[:19].replace('T', ' ')}  ({', '.join(kept.reasons)})")
    for removed in report.removed:
        click.echo(f"remove {removed.instance_id}  {removed.created_at[:19].replace('T', ' ')}  ({removed.reason})")
    for run_id in report.unfinished:
        click.echo(f"leave  {run_id}  (unfinished)")
    for note in report.notes:
        click.echo(printable(f"sitebackup: note: {note}"), err=True)
    verb = "would remove" if report.dry_run else "removed"
    click.echo(f"{verb} {len(report.removed)} run(s), {report.blobs_removed} blob(s) and "
               f"{report.snapshots_removed} snapshot(s), {human_bytes(report.bytes_removed)}")

"""Turning command results into text for people: the status report, the runs table, the dry-run plan,
the prune report, the stats report, and the lines of commands that stream them (``Lines``).

Paths and messages in them are data: every line is escaped (``escape.printable``) and no cell of the
runs table is read as markup.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Self

import click

from sitebackup.model.codec import DamagedData, encode, to_wire
from sitebackup.model.records import ChangeCounts
from sitebackup.model.reports import (
    DryRunItem,
    DryRunTotals,
    PruneReport,
    RestorePlan,
    RunDetail,
    RunInfo,
    RunRow,
    StatsReport,
)
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
               "restorable", "changes")


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
              printable(row.restorable or "-"), change_counts(row.changes)]
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


class Lines:
    """Lines to stdout as a command finds them (a line per file of a --dry-run, per entry of ``ls``, per change
    of ``diff``), or their JSON objects with ``--json``.

    Lines are written in batches (every ``BATCH`` lines, or when ``FLUSH_SECONDS`` have passed since the last
    write): a write per line is a system call per file when stdout is unbuffered (``python -u``,
    PYTHONUNBUFFERED), a fifth of a million-file dry run's CPU. Escaped (or JSON), they hold no control
    character. Use it as a context manager: what is held is written however the walk ends.
    """

    BATCH = 1000
    FLUSH_SECONDS = 0.25

    def __init__(self) -> None:
        self._held: list[str] = []
        self._since = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.flush()

    def line(self, text: str | Sequence[str]) -> None:
        """One line of text, escaped; or of tab-separated fields, each escaped (a tab in one is ``\\t``)."""
        self._hold(printable(text) if isinstance(text, str) else "\t".join(map(printable, text)))

    def event(self, event: str, value: object) -> None:
        """One JSON object: ``{"event": EVENT, ...}`` and *value*'s fields."""
        # compact, at a fraction of json's CPU (a line per file); a name that is not ASCII gets \u escapes,
        # as in every other event, so no line carries a raw control character
        line = b'{"event":"' + event.encode() + b'",' + encode(value)[1:]
        self._hold(line.decode() if line.isascii() else json.dumps(json.loads(line), separators=(",", ":")))

    def _hold(self, line: str) -> None:
        self._held.append(line)
        if len(self._held) >= self.BATCH or time.monotonic() - self._since >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._held:
            sys.stdout.write("\n".join(self._held) + "\n")
            sys.stdout.flush()
            self._held.clear()
        self._since = time.monotonic()


class DryRunLines(Lines):
    """The entries of a ``--dry-run``, a line each as the walk reaches them (failures on stderr; a backup's
    unchanged files only when asked), or a JSON event each."""

    def __init__(self, json_output: bool, quiet: bool, unchanged: bool = False):
        super().__init__()
        self.json_output = json_output
        self.quiet = quiet
        self.unchanged = unchanged  # a line for each unchanged file too (-v); --json has every file

    def add(self, item: DryRunItem) -> None:
        if self.json_output:
            self.event("dry_run", item)
        elif item.action == "fail":
            self.flush()  # in order with the lines before it on a terminal showing both streams
            click.echo(printable(f"FAILED {item.path}: {item.error}"), err=True)
        elif not self.quiet and (item.action != "unchanged" or self.unchanged):
            self.line(_dry_run_line(item))


def _dry_run_line(item: DryRunItem) -> str:
    size = human_bytes(item.size or 0)
    if item.action == "upload":
        return f"would upload {item.path} ({size}, {'changed' if item.changed else 'new'})"
    if item.action == "delete":
        what = {"dir": "directory", "symlink": "symlink"}.get(item.kind, size)
        return f"deleted {item.path} ({what}; left out of the next run's record, kept for earlier runs)"
    if item.action == "metadata":  # its content stays: the record takes what changed
        return f"would record {item.path} ({item.reason})"
    if item.action in ("create", "replace"):  # a restore's
        return f"would {item.action} {item.path} ({item.reason or size})"
    return f"{item.action} {item.path} ({item.reason or size})"


def summary_event(value: object) -> None:
    """The last line of a command's NDJSON: ``{"event": "summary", ...}``."""
    click.echo(json.dumps({"event": "summary", **to_wire(value)}))


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


def run_detail(detail: RunDetail) -> str:
    """``list --container NAME RUN``: one line per fact of the sealed run."""
    changes = detail.changes
    lines = [f"{detail.run_id}  backup  {detail.status}",
             f"  job:          {detail.job_name or '-'} ({detail.job})",
             f"  host:         {detail.host}",
             f"  source:       {detail.source}",
             f"  destination:  {detail.container}/{detail.prefix}" if detail.prefix else
             f"  destination:  {detail.container}",
             f"  started:      {detail.started}",
             f"  finished:     {detail.finished}",
             f"  files:        {detail.files} ({detail.files_failed} failed: their last good copy kept)",
             f"  bytes:        {human_bytes(detail.bytes)}",
             f"  record:       {detail.pages} page(s), format {detail.format}, sealed by sitebackup {detail.tool}"]
    if changes is not None:
        lines.append(f"  changes:      {changes.added} added, {changes.removed} removed, {changes.modified} modified, "
                     f"{changes.metadata} metadata only, since {detail.baseline or 'nothing (the first run)'}")
    return "\n".join(map(printable, lines))


def restore_plan(plan: RestorePlan, json_output: bool, quiet: bool) -> None:
    """What a restore's ``--dry-run`` would do, after its files: the totals line or the summary event."""
    if json_output:
        click.echo(json.dumps({"event": "summary", **to_wire(plan)}))
    elif not quiet:
        click.echo(f"dry run: {plan.entries_to_create} entries would be created ({human_bytes(plan.bytes_to_create)}), "
                   f"{plan.entries_to_replace} replaced ({human_bytes(plan.bytes_to_replace)}), "
                   f"{plan.entries_identical} left as they are (identical, {human_bytes(plan.bytes_identical)}), "
                   f"{plan.entries_skipped} skipped, {plan.entries_failed} would fail; nothing was written")


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


def change_counts(changes: ChangeCounts | None) -> str:
    """A run's changes from its job's run before it: +added ~changed (content or metadata) -removed; - unknown."""
    if changes is None:
        return "-"
    return f"+{changes.added} ~{changes.modified + changes.metadata} -{changes.removed}"


def stats_report(report: StatsReport) -> None:
    """Aligned for people; tab-separated without a terminal (a name and its value a line, then the runs' table
    with its header)."""
    terminal = sys.stdout.isatty()
    stored = report.stored
    facts = [("container", report.container + (f" (prefix {report.prefix})" if report.prefix else "")),
             ("runs", f"{len(report.runs)} of {report.jobs} job(s)"),
             ("stored", f"{human_bytes(stored.bytes)} in {stored.blobs} blob(s) and {stored.snapshots} snapshot(s)"
                        + (f", {stored.missing} recorded version(s) missing" if stored.missing else ""))]
    if stored.record_blobs:
        facts.append(("records", f"{human_bytes(stored.record_bytes)} in {stored.record_blobs} blob(s)"))
    if report.prune is not None:
        facts.append(("prune would free", f"{human_bytes(report.prune.bytes)}: {report.prune.runs} run(s), "
                                          f"{report.prune.blobs} blob(s), {report.prune.snapshots} snapshot(s)"))
    rows = [["run", "job", "started", "files", "bytes", "changes"]] + [
        [row.run_id, row.job or "-", row.started[:19].replace("T", " "), str(row.files), human_bytes(row.bytes),
         change_counts(row.changes)] for row in report.runs]
    if not terminal:
        for line in [*map(list, facts), *rows]:
            click.echo("\t".join(map(printable, line)))
        return
    for name, value in facts:
        click.echo(printable(f"{name + ':':<18}{value}"))
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    click.echo()
    for line in rows:
        click.echo(printable("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()))

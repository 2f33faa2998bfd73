"""The ls command: every entry of a backup run's record, one full relative path a line, as restic's ``ls``;
``-l`` adds kind, mode, owner, size and modification time. Read a page at a time from the run's sealed record
(``commands.browsing``): what a new machine with the container name sees.
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.blob.naming import validate_container_name
from sitebackup.commands.browsing import Subtrees, browsing, normalize_paths
from sitebackup.commands.options import LATEST_JOB_HELP, Command, catalog_options, complete_runs, job_option, json_option
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError, exit_codes_help
from sitebackup.local.changes import long_fields
from sitebackup.model.records import FileEntry
from sitebackup.model.reports import ListingSummary
from sitebackup.ui import render

_KIND_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}


def mtime_text(mtime_ns: int, terminal: bool) -> str:
    """A recorded modification time in local time: to the second for people, ISO 8601 with its offset for scripts."""
    if not mtime_ns:
        return "-"
    when = datetime.fromtimestamp(mtime_ns // 1_000_000_000).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S") if terminal else when.isoformat()


def long_line(entry: FileEntry, terminal: bool) -> str | tuple[str, ...]:
    """``ls -l``'s line of an entry: aligned columns on a terminal, tab-separated ones otherwise (kind, mode in
    octal, owner, group, size, mtime, path, symlink target)."""
    kind, mode, owner, group, link = long_fields(entry)
    target = link or ""
    if not terminal:
        return (kind, f"{mode:04o}" if mode is not None else "-", owner or "-", group or "-", str(entry.size),
                mtime_text(entry.mtime_ns, False), entry.path, target)
    bits = stat.filemode(_KIND_BITS.get(kind, stat.S_IFREG) | (mode or 0))
    if mode is None:
        bits = bits[0] + "?" * 9
    line = f"{bits} {owner or '?':<8} {group or '?':<8} {entry.size:>12} {mtime_text(entry.mtime_ns, True)}  {entry.path}"
    return line + f" -> {target}" if target else line


def list_entries(entries: Iterable[FileEntry], chosen: Subtrees, summary: ListingSummary, out: render.Lines, *,
                 long: bool, json_output: bool, terminal: bool) -> None:
    """Each entry *chosen* as a line (or an event) to *out*, counted into *summary*, as *entries* are read."""
    for entry in entries:
        if entry.path not in chosen:
            continue
        summary.entries += 1
        summary.bytes += entry.size
        if json_output:
            out.event("entry", entry)
        else:
            out.line(long_line(entry, terminal) if long else entry.path)


def list_run(settings: StorageSettings, run_ref: str, paths: list[str], *, long: bool, json_output: bool,
             container: str | None, job: str | None, state_dir: Path, taskhub: TaskHubSettings | None) -> ListingSummary:
    """Print the run's entries under *paths* as its record is read; what was listed."""
    terminal = sys.stdout.isatty()
    chosen = Subtrees(paths)
    with browsing(settings, state_dir, taskhub, container, job) as browse:
        run = browse.open(run_ref)
        summary = ListingSummary(run_id=run.run_id)
        with render.Lines() as out:
            list_entries(browse.entries(run), chosen, summary, out, long=long, json_output=json_output,
                         terminal=terminal)
    missing = chosen.missing()
    if missing:
        raise InputError(f"not in run {run.run_id}: " + ", ".join(repr(path) for path in missing))
    return summary


@click.command("ls", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.argument("run_ref", metavar="RUN", shell_complete=complete_runs("backups"))
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--long", "-l", "long", is_flag=True, help="Also kind, mode, owner, group, size and modification time.")
@click.option("--container", "-c", help="Read the run's sealed record from this container (all a new machine needs).")
@job_option(LATEST_JOB_HELP)
@json_option("Print NDJSON: an entry event per entry (its record as sealed), a summary last.")
@catalog_options
def command(run_ref: str, paths: tuple[str, ...], long: bool, container: str | None, job: str | None,
            json_output: bool, storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """List every entry of a backup run, one full relative path a line.

    RUN is a run id, a unique prefix of one (4 characters at least), or `latest`. PATH limits the
    listing to those files and directories (and everything under them); a PATH the run does not
    hold ends the listing with exit 2. Without a terminal, -l prints tab-separated columns: kind,
    mode, owner, group, size, modification time, path, symlink target.

    \b
    Examples:
      sitebackup ls latest -c backups
      sitebackup ls 20261206T030001-4be1f2 wp-content/uploads -l
      sitebackup ls 2026120 -c backups --json | jq -r 'select(.event=="entry") | .path'
    """
    summary = list_run(storage, run_ref, normalize_paths(paths), long=long, json_output=json_output,
                       container=validate_container_name(container) if container else None, job=job,
                       state_dir=state_dir, taskhub=taskhub)
    if json_output:
        render.summary_event(summary)

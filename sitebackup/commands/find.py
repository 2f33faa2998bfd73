"""The find command: which backup runs of a container hold entries matching a pattern, and those entries.

A glob without '/' matches base names (``find -name``, restic's ``find``), one with '/' whole paths; or
``--regex``. Runs are searched newest first, each record a page at a time; a page several runs seal (an
unchanged directory) is read once, and only its matches are kept for the next run that seals it.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.blob.naming import normalize_prefix, validate_container_name
from sitebackup.commands.browsing import Browse, browsing
from sitebackup.commands.catalog import SealedRun, of_prefix
from sitebackup.commands.ls import mtime_text
from sitebackup.commands.options import Command, catalog_options, job_option, json_option
from sitebackup.commands.runref import select_jobs
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError, exit_codes_help
from sitebackup.local.filters import glob_regex
from sitebackup.model.records import FileEntry
from sitebackup.model.reports import FindSummary
from sitebackup.ui import render
from sitebackup.ui.printers import human_bytes


def matcher(patterns: list[str], regex: bool) -> Callable[[str], bool]:
    """Whether a record path matches any of *patterns* (globs, or with *regex* regular expressions searched for
    anywhere in the path)."""
    try:
        compiled = [re.compile(p) if regex else glob_regex(p) for p in patterns]
    except re.error as exc:
        raise InputError(f"invalid --regex pattern: {exc}") from None
    if regex:
        return lambda path: any(p.search(path) for p in compiled)
    return lambda path: any(p.match(path) for p in compiled)


def searched_runs(browse: Browse, prefix: str | None, job: str | None) -> list[SealedRun]:
    """The container's sealed runs to search, newest first: into *prefix*, of *job*, when given."""
    runs = browse.sealed or []
    if prefix is not None:
        runs = of_prefix(runs, prefix)
    if job is not None and runs:
        jobs = runs[0].jobs
        named = select_jobs(job, {run.entry.job for run in runs}, jobs.get, f"in container {browse.container!r}")
        runs = [run for run in runs if run.entry.job in named]
    return list(reversed(runs))


def find_in_runs(settings: StorageSettings, container: str, patterns: list[str], *, regex: bool, prefix: str | None,
                 job: str | None, json_output: bool, state_dir: Path, taskhub: TaskHubSettings | None) -> FindSummary:
    """Print each run that holds a match and its matching entries, as the records are read; what was found."""
    matches = matcher(patterns, regex)
    terminal = sys.stdout.isatty()
    summary = FindSummary(patterns=patterns)
    found_in: dict[str, list[FileEntry]] = {}  # SHA-256 of a page read already -> its matching entries
    with browsing(settings, state_dir, taskhub, container) as browse, render.Lines() as out:
        for sealed in searched_runs(browse, prefix, job):
            run = browse.open(sealed.run_id)
            assert run.header is not None  # a run of the catalog is sealed
            summary.runs_searched += 1
            shown = False
            # the pages no run searched before, read (a few ahead) in order as the seals come to them
            with contextlib.closing(browse.pages(run, seen=set(found_in))) as fresh:
                for seal in run.header.pages:
                    if seal.sha256 not in found_in:
                        digest, entries = next(fresh)
                        assert digest == seal.sha256
                        found_in[digest] = [entry for entry in entries if matches(entry.path)]
                    for entry in found_in[seal.sha256]:
                        if not shown:
                            summary.runs_matched += 1
                            shown = True
                            if terminal and not json_output:
                                out.line(f"run {run.run_id}  started {sealed.started.astimezone():%Y-%m-%d %H:%M:%S}")
                        summary.matches += 1
                        if json_output:
                            out.event("match", {"run_id": run.run_id, "started": sealed.entry.started,
                                                "kind": entry.kind, "path": entry.path, "size": entry.size,
                                                "mtime_ns": entry.mtime_ns})
                        elif terminal:
                            out.line(f"  {human_bytes(entry.size):>10}  {mtime_text(entry.mtime_ns, True)}  {entry.path}")
                        else:
                            out.line((run.run_id, entry.path, str(entry.size), mtime_text(entry.mtime_ns, False)))
    return summary


@click.command("find", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.argument("patterns", nargs=-1, required=True, metavar="PATTERN...")
@click.option("--container", "-c", required=True, help="The container whose sealed runs to search.")
@click.option("--prefix", help="Only runs into this prefix.")
@job_option("Only runs of this job: its name, id or source directory.")
@click.option("--regex", is_flag=True, help="PATTERN is a regular expression searched for in the whole path.")
@json_option("Print NDJSON: a match event per matching entry (with its run), a summary last.")
@catalog_options
def command(patterns: tuple[str, ...], container: str, prefix: str | None, job: str | None, regex: bool,
            json_output: bool, storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Find which backup runs hold files matching PATTERN.

    A PATTERN without '/' matches base names at any depth (`config.php`, `*.sql`); one with '/'
    matches whole paths from the backed-up root (`wp-content/*/config.php`, `**/cache/**`); `*`
    and `?` stop at '/', `**` crosses directories. For each run that holds a match, newest first:
    the run, then each match with its size and modification time. Without a terminal, lines
    are RUN<TAB>PATH<TAB>SIZE<TAB>MTIME and the totals go to stderr.

    \b
    Examples:
      sitebackup find wp-config.php -c backups
      sitebackup find '*.sql' 'backup-*.tar.gz' -c backups --job web01:/var/www
      sitebackup find --regex '^uploads/2026/.*\\.pdf$' -c backups --json
    """
    summary = find_in_runs(storage, validate_container_name(container), list(patterns), regex=regex,
                           prefix=normalize_prefix(prefix) if prefix is not None else None, job=job,
                           json_output=json_output, state_dir=state_dir, taskhub=taskhub)
    if json_output:
        render.summary_event(summary)
    else:
        click.echo(f"{summary.matches} match(es) in {summary.runs_matched} of {summary.runs_searched} run(s)",
                   err=not sys.stdout.isatty())

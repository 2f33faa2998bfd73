"""The diff command: what changed from one backup run to another, a line per added (``+``), removed (``-``),
modified (``M``: content) or metadata-only (``m``: mode, owner, symlink target, hard link, modification
time) entry, then the totals; unchanged entries are never printed.

The two records are read side by side in walk order (``local.changes``), a page of each at a time, and the
pages they share (an unchanged directory's entries, sealed once for both) are not read at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.blob.naming import validate_container_name
from sitebackup.commands.browsing import Subtrees, browsing, normalize_paths
from sitebackup.commands.options import LATEST_JOB_HELP, Command, catalog_options, complete_runs, job_option, json_option
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError, exit_codes_help
from sitebackup.local.changes import ADDED, METADATA, MODIFIED, REMOVED, Change, OutOfOrder, changes
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import DiffSummary
from sitebackup.ui import render
from sitebackup.ui.printers import human_bytes

_COUNTED = {ADDED: "added", REMOVED: "removed", MODIFIED: "modified", METADATA: "metadata"}


def change_line(change: Change, terminal: bool) -> str | tuple[str, str]:
    """The marker and the path; on a terminal the size too (of the new version; of the old for a removal)."""
    if not terminal:
        return change.marker, change.path
    entry = change.after or change.before
    size = f"  ({human_bytes(entry.size)})" if entry is not None and change.marker != METADATA else ""
    return f"{change.marker}  {change.path}{size}"


def diff_runs(settings: StorageSettings, ref_a: str, ref_b: str, paths: list[str], *, json_output: bool,
              container: str | None, job: str | None, state_dir: Path,
              taskhub: TaskHubSettings | None) -> DiffSummary:
    """Print the changes from run *ref_a* to run *ref_b* under *paths* as the records are read; their totals."""
    terminal = sys.stdout.isatty()
    chosen = Subtrees(paths)
    with browsing(settings, state_dir, taskhub, container, job) as browse:
        run_a, run_b = browse.open(ref_a), browse.open(ref_b)
        summary = DiffSummary(run_a=run_a.run_id, run_b=run_b.run_id)
        # a page both records seal holds the same entries in both: left out of both sides
        shared: set[str] = set()
        if run_a.header is not None and run_b.header is not None:
            shared = {seal.sha256 for seal in run_a.header.pages} & {seal.sha256 for seal in run_b.header.pages}
        before = (entry for entry in browse.entries(run_a, set(shared)) if entry.path in chosen)
        after = (entry for entry in browse.entries(run_b, set(shared)) if entry.path in chosen)
        with render.Lines() as out:
            try:
                for change in changes(before, after):
                    field = _COUNTED[change.marker]
                    setattr(summary, field, getattr(summary, field) + 1)
                    if json_output:
                        out.event("change", _wire(change))
                    else:
                        out.line(change_line(change, terminal))
            except OutOfOrder as exc:
                raise InputError(f"cannot compare runs {run_a.run_id} and {run_b.run_id}: a record is not in walk "
                                 f"order ({exc})") from None
        missing = chosen.missing()
        if missing and shared:  # unchanged paths may be in the pages left out
            unseen = Subtrees(missing)
            for digest, entries in browse.pages(run_a):
                if digest in shared:
                    for entry in entries:
                        unseen.chooses(entry.path)
            missing = unseen.missing()
    if missing:
        raise InputError(f"in neither run {run_a.run_id} nor {run_b.run_id}: "
                         + ", ".join(repr(path) for path in missing))
    return summary


def _wire(change: Change) -> dict[str, object]:
    found: dict[str, object] = {"change": change.marker, "path": change.path}
    if change.before is not None:
        found["before"] = to_wire(change.before)
    if change.after is not None:
        found["after"] = to_wire(change.after)
    return found


@click.command("diff", cls=Command, epilog=exit_codes_help(0, 2, 3, 5, 70, 130))
@click.argument("ref_a", metavar="RUN_A", shell_complete=complete_runs("backups"))
@click.argument("ref_b", metavar="RUN_B", shell_complete=complete_runs("backups"))
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--container", "-c", help="Read the runs' sealed records from this container (all a new machine needs).")
@job_option(LATEST_JOB_HELP)
@json_option("Print NDJSON: a change event per change (the entries before and after), a summary last.")
@catalog_options
def command(ref_a: str, ref_b: str, paths: tuple[str, ...], container: str | None, job: str | None,
            json_output: bool, storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Show what changed from backup run RUN_A to RUN_B.

    One line per change: `+` added, `-` removed, `M` modified (content: size or MD5, or the kind
    of entry), `m` metadata only (mode, owner, symlink target, hard link or modification time);
    then the totals (on stderr when stdout is not a terminal). Unchanged entries are never printed. PATH limits
    the comparison to those files and directories. Runs are run ids, unique prefixes (4
    characters at least) or `latest`. Without a terminal, lines are MARKER<TAB>PATH.

    \b
    Examples:
      sitebackup diff 20261205T0300 latest -c backups
      sitebackup diff 20261205T0300 20261206T0300 wp-config.php wp-content/themes
    """
    summary = diff_runs(storage, ref_a, ref_b, normalize_paths(paths), json_output=json_output,
                        container=validate_container_name(container) if container else None, job=job,
                        state_dir=state_dir, taskhub=taskhub)
    if json_output:
        render.summary_event(summary)
    else:  # after the lines a script reads, on stderr, unless a person reads them
        click.echo(f"{summary.added} added, {summary.removed} removed, {summary.modified} modified, "
                   f"{summary.metadata} metadata only", err=not sys.stdout.isatty())

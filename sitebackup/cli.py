"""The command line: click commands that parse, call one command function, render and pick the exit code.

``main`` is the one place where exceptions become exit codes and one-line messages (and, with
``--json``, one JSON error object on stdout).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from sitebackup import __version__
from sitebackup.blob import bwlimit
from sitebackup.blob.clients import ENV_ACCOUNT_URL, ENV_CONNECTION_STRING, StorageSettings
from sitebackup.blob.errors import redact
from sitebackup.blob.upload import ACCESS_TIERS
from sitebackup.commands import backup as backup_cmd
from sitebackup.commands import dryrun, manage, retention, scaleout
from sitebackup.commands import prune as prune_cmd
from sitebackup.commands import restore as restore_cmd
from sitebackup.commands import verify as verify_cmd
from sitebackup.commands.hosting import DEFAULT_STALL_AFTER, ENV_STALL_AFTER, end_process, exit_code_for
from sitebackup.durable import taskhub as taskhub_mod
from sitebackup.durable.runtime import ENV_STATE_DIR, SDK_LOGGER, backend_error, default_state_dir
from sitebackup.errors import (
    EXIT_CODES_HELP,
    EXIT_FILES_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    InputError,
    SiteBackupError,
)
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import Mismatch
from sitebackup.model.work import DEFAULT_BLOCK_SIZE, MIB, BackupCounts, PageResult, summary_to_wire
from sitebackup.ui import render
from sitebackup.ui.escape import printable
from sitebackup.ui.logfile import LogPrinter
from sitebackup.ui.metrics import MetricsFileError, MetricsJob
from sitebackup.ui.printers import make_printer
from sitebackup.workflows.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from sitebackup.workflows.names import DEFAULT_WINDOW


@dataclass
class Session:
    """What ``main`` learns about the command it ran, to act on however the command ends."""

    metrics: MetricsJob | None = None


def metrics_option(fn):
    return click.option(
        "--metrics-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
        help="After the run, whatever its exit code, write its metrics to PATH (Prometheus text for "
             "node_exporter's textfile collector; other jobs' series in the file are kept).",
    )(fn)


def start_metrics(path: Path | None, command: str, source: str, destination: str) -> MetricsJob | None:
    """With --metrics-file: the job whose metrics ``main`` writes when the command ends, however it ends."""
    if path is None:
        return None
    path = path.expanduser().absolute()
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"--metrics-file: directory {str(path.parent)!r} does not exist or is not writable")
    job = MetricsJob(path, command, source, destination)
    click.get_current_context().ensure_object(Session).metrics = job
    return job


def _destination(container: str | None, prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{container}/{prefix}" if container and prefix else container or prefix


class DefaultToBackup(click.Group):
    """``sitebackup DIR ...`` means ``sitebackup backup DIR ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["backup", *args]
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        """Command names, or, when none starts so, directories: the SOURCE of the default command."""
        items = super().shell_complete(ctx, incomplete)
        return items or [CompletionItem(incomplete, type="dir")]


def complete_dirs(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(incomplete, type="dir")]


def complete_runs(runs: str):
    """Shell completion of run ids (``manage.RUNS_FOR``) from the state directory's database, read-only.

    Completion must never print or hang: on any failure, and under --taskhub (no network while
    completing), it offers nothing."""

    def complete(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        try:
            if ctx.params.get("taskhub") or os.environ.get(taskhub_mod.ENV_TASKHUB):
                return []
            state_dir = ctx.params.get("state_dir") or default_state_dir()
            return [CompletionItem(run_id) for run_id in manage.complete_run_ids(state_dir, incomplete, runs)]
        except Exception:
            return []

    return complete


def complete_restore_args(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``restore [ID] DEST``: a backup run id first (unless --container), then DEST."""
    if ctx.params.get("container") or ctx.params.get("args"):
        return complete_dirs(ctx, param, incomplete)
    return complete_runs("backups")(ctx, param, incomplete)


def stall_after_option(fn):
    return click.option(
        "--stall-after", metavar="DURATION", default=DEFAULT_STALL_AFTER, show_default=True, envvar=ENV_STALL_AFTER,
        callback=lambda _ctx, _param, value: manage.parse_age(value),
        help=f"A live run without progress for this long (90s, 30m, 2h) is stalled [env {ENV_STALL_AFTER}].",
    )(fn)


def state_dir_option(fn):
    return click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_STATE_DIR,
        help=f"Where durable state lives [env {ENV_STATE_DIR}; default $XDG_STATE_HOME/sitebackup].",
    )(fn)


def debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show tracebacks and SDK logs (secrets redacted).")(fn)


def taskhub_option(fn):
    return click.option(
        "--taskhub", metavar="CONNECTION_STRING", envvar=taskhub_mod.ENV_TASKHUB, show_envvar=False,
        help="Use Azure Durable Task Scheduler instead of the embedded backend: "
             "Endpoint=https://...;TaskHub=NAME;Authentication=DefaultAzure "
             f"[env {taskhub_mod.ENV_TASKHUB}].",
    )(fn)


def warn_secret_on_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A key or SAS signature on the command line is readable by every local user (ps, /proc/PID/cmdline)
    while the process runs: say so, and which environment variable keeps it private."""
    if value and redact(value) != value:
        env = ENV_CONNECTION_STRING if param.name == "connection_string" else ENV_ACCOUNT_URL
        click.echo(f"sitebackup: warning: the secret in {param.opts[0]} is visible to every local user "
                   f"(ps, /proc/PID/cmdline); set {env} in the environment instead", err=True)
    return value


class RateType(click.ParamType):
    name = "RATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        try:
            return bwlimit.parse_rate(str(value))
        except SiteBackupError as exc:
            self.fail(str(exc).removeprefix("invalid --bwlimit "), param, ctx)


def bwlimit_option(fn):
    """--bwlimit: set once for the whole process, before any blob client is made."""
    return click.option(
        "--bwlimit", type=RateType(), envvar=bwlimit.ENV_BWLIMIT, expose_value=False,
        callback=lambda _ctx, _param, rate: bwlimit.set_process_limit(rate),
        help=f"Cap on blob transfers of this process, in {bwlimit.RATE_HELP} [env {bwlimit.ENV_BWLIMIT}].",
    )(fn)


def storage_options(fn):
    fn = click.option("--account-url", metavar="URL", callback=warn_secret_on_argv,
                      help=f"Account URL, with a SAS or using DefaultAzureCredential [env {ENV_ACCOUNT_URL}].")(fn)
    fn = click.option("--connection-string", metavar="STRING", callback=warn_secret_on_argv,
                      help=f"Storage connection string; wins over --account-url [env {ENV_CONNECTION_STRING}].")(fn)
    return fn


@click.group(cls=DefaultToBackup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="sitebackup")
def cli() -> None:
    """Back up a directory tree to Azure Blob Storage, durably: a killed backup resumes where it stopped.

    \b
    Examples:
      AZURE_STORAGE_CONNECTION_STRING=... sitebackup ./site --container backups
      sitebackup backup /var/www --container backups --prefix nightly/web
      sitebackup ./site --container backups --json | tail -n 1
    """


def selection_options(fn):
    """What a backup compares and leaves out, and how it runs unattended."""
    options = [
        click.option("--checksum", is_flag=True,
                     help="Compare content MD5 with the last run instead of size and modification time."),
        click.option("--force", is_flag=True, help="Upload every file, changed or not."),
        click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
                     help="Leave out paths matching a gitignore-style PATTERN (repeatable): '*.tmp', 'cache/'."),
        click.option("--include", "includes", multiple=True, metavar="PATTERN",
                     help="Keep paths matching PATTERN although an exclude matched (repeatable)."),
        click.option("--exclude-from", multiple=True, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Read exclude patterns from FILE, gitignore syntax (repeatable)."),
        click.option("--no-ignore-file", is_flag=True, help="Do not read SOURCE/.sitebackupignore."),
        click.option("--follow-symlinks", is_flag=True,
                     help="Follow symlinks to files and directories inside SOURCE (loops are skipped)."),
        click.option("--dry-run", is_flag=True,
                     help="Scan and compare only: list what would be uploaded or skipped, write nothing."),
        click.option("--no-wait", is_flag=True,
                     help="If the same backup is already running, print its id and exit 4 instead of attaching "
                          "(6 if it has made no progress for --stall-after)."),
        stall_after_option,
        click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
                     help="Append a timestamped log of the run (start, failures, summary) to PATH "
                          "(created 0600; a symlink or hard link there is refused)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("source", type=click.Path(path_type=Path), shell_complete=complete_dirs)
@click.option("--container", "-c", required=True, help="Destination container (created if missing).")
@click.option("--prefix", default="", help="Blob name prefix, e.g. nightly/web → nightly/web/css/site.css.")
@storage_options
@bwlimit_option
@click.option("--concurrency", type=click.IntRange(min=1, max=256), default=DEFAULT_WINDOW, show_default=True,
              help="Bound on parallel uploads.")
@click.option("--block-size", type=click.IntRange(min=MIN_BLOCK_SIZE // MIB, max=MAX_BLOCK_SIZE // MIB),
              default=DEFAULT_BLOCK_SIZE // MIB,
              show_default=True, metavar="MIB",
              help="Files over 4x this many MiB (at most 32 MiB) go up as parallel, resumable block ranges of this size.")
@click.option("--tier", type=click.Choice([t.lower() for t in ACCESS_TIERS], case_sensitive=False),
              help="Access tier set with every upload (default: the account's); archive blobs cannot be read "
                   "or replaced until rehydrated.")
@click.option("--json", "json_output", is_flag=True, help="Print NDJSON events on stdout; the last line is the summary.")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures.")
@selection_options
@taskhub_option
@click.option("--no-local-worker", is_flag=True,
              help="Schedule and watch only; `sitebackup worker` processes do the work.")
@click.option("--detach", is_flag=True, help="Print the run id (with --json the start event) and exit 0 at once.")
@metrics_option
@state_dir_option
@debug_option
def backup(source: Path, container: str, prefix: str, connection_string: str | None, account_url: str | None,
           concurrency: int, block_size: int, tier: str | None, json_output: bool, quiet: bool, taskhub: str | None,
           no_local_worker: bool, detach: bool, metrics_file: Path | None, state_dir: Path | None, debug: bool,
           log_file: Path | None, dry_run: bool, **selection: Any) -> None:
    """Back up SOURCE to a container (the default command).

    Every file becomes a blob named by its path relative to SOURCE.

    Re-running the same command while an earlier run of the same source and destination is
    unfinished resumes that run.

    \b
    Examples:
      sitebackup backup ./site --container backups
      sitebackup backup ./site -c backups --prefix nightly/web --concurrency 32
      sitebackup backup ./site -c backups --connection-string UseDevelopmentStorage=true
    """
    if metrics_file is not None and (dry_run or detach):
        raise click.UsageError("--metrics-file describes a finished run: not with --dry-run or --detach")
    # labelled as written on the command line: a {date} prefix stays one job, not a new series a day
    metrics = start_metrics(metrics_file, "backup", str(source.expanduser().resolve()), _destination(container, prefix))
    settings = StorageSettings.from_options(connection_string, account_url)
    request = backup_cmd.build_request(source, container, prefix, state_dir=state_dir or default_state_dir(),
                                       concurrency=concurrency, block_size=block_size * MIB, tier=_tier(tier),
                                       **selection)
    hub = _taskhub_settings(taskhub)
    if dry_run:
        with render.DryRunLines(json_output, quiet) as lines:
            plan = dryrun.plan_backup(request, settings, hub, lines.add)
        render.dry_run_totals(plan, json_output, quiet)
        sys.exit(EXIT_FILES_FAILED if plan.files_failed else 0)
    printer = make_printer(json_output=json_output, quiet=quiet or (detach and not json_output))
    if log_file is not None:
        printer = LogPrinter(printer, log_file)
    summary = backup_cmd.run_backup(request, settings, printer, taskhub=hub, local_worker=not no_local_worker,
                                    detach=detach)
    if metrics is not None:
        metrics.summary = summary_to_wire(summary)
    if detach and not json_output:
        click.echo(summary.instance_id)
    sys.exit(exit_code_for(summary))


def _tier(choice: str | None) -> str | None:
    """The --tier choice as the service spells it (Hot, Cool, Cold, Archive)."""
    return next((t for t in ACCESS_TIERS if choice and t.lower() == choice.lower()), None)


def _taskhub_settings(value: str | None) -> taskhub_mod.TaskHubSettings | None:
    return taskhub_mod.from_option(value)


@cli.command(epilog=EXIT_CODES_HELP)
@storage_options
@bwlimit_option
@taskhub_option
@click.option("--concurrency", type=click.IntRange(min=1, max=256), default=DEFAULT_WINDOW, show_default=True,
              help="Bound on parallel uploads in this worker.")
@state_dir_option
@debug_option
def worker(connection_string: str | None, account_url: str | None, taskhub: str | None, concurrency: int,
           state_dir: Path | None, debug: bool) -> None:
    """Run a worker only: work on backups scheduled elsewhere.

    Runs until Ctrl-C or SIGTERM (clean stop, exit 0). Prints one line per finished batch.
    Storage credentials come from this worker's own options or environment. Every worker must
    see the source tree at the same path.

    \b
    Examples:
      sitebackup worker --taskhub "Endpoint=https://NAME.REGION.durabletask.io;TaskHub=backups;Authentication=ManagedIdentity"
      DURABLE_TASK_SCHEDULER_CONNECTION_STRING=... sitebackup worker --concurrency 32
    """
    settings = StorageSettings.from_options(connection_string, account_url)
    hub = _taskhub_settings(taskhub)

    def on_batch(instance_id: str, result: PageResult[BackupCounts]) -> None:
        counts = result.counts
        click.echo(f"batch {instance_id} page {result.page}: {counts.files_uploaded} files uploaded, "
                   f"{counts.bytes_uploaded} bytes, {counts.files_failed} failed")

    def on_started() -> None:
        click.echo(f"sitebackup: worker started on {hub.label if hub else 'the embedded backend'}", err=True)

    scaleout.run_worker(settings, hub, state_dir or default_state_dir(), concurrency, on_batch, on_started)
    click.echo("sitebackup: worker stopped", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Loopback address to serve on, e.g. 127.0.0.1:4001 (port 0 picks a free port).")
@click.option("--allow-remote", is_flag=True, help="Also accept non-loopback addresses (no TLS: the token travels in clear!).")
@click.option("--lease-seconds", type=click.FloatRange(min=0.5), default=30.0, hidden=True,
              help="How long a lost worker's work stays claimed (testing).")
@state_dir_option
@debug_option
def serve(listen: str, allow_remote: bool, lease_seconds: float, state_dir: Path | None, debug: bool) -> None:
    """Serve the embedded backend over TCP (local scale-out testing).

    Runs until Ctrl-C or SIGTERM. The state directory is then this server's alone: other
    commands reach its runs through --taskhub.

    Plaintext. Every call must carry the token in STATE_DIR/serve.token (created 0600, kept
    across restarts; delete it for a new one), or the one in SITEBACKUP_SERVE_TOKEN if set.
    Workers and commands reach it with
    --taskhub "Endpoint=http://HOST:PORT;TaskHub=NAME;Authentication=None;TokenFile=STATE_DIR/serve.token"
    (or that string without TokenFile and the token in SITEBACKUP_SERVE_TOKEN); each task hub
    name is separate.

    \b
    Example:
      sitebackup serve --listen 127.0.0.1:4001
    """
    def on_ready(address: str, token_file: Path | None) -> None:
        token = f";TokenFile={token_file}" if token_file else ""
        hint = "" if token_file else f" with {taskhub_mod.ENV_SERVE_TOKEN} set as for this server"
        click.echo(f"sitebackup: serving on {address}: --taskhub "
                   f"\"Endpoint=http://{address};TaskHub=default;Authentication=None{token}\"{hint}", err=True)
        click.echo(address)

    scaleout.serve(listen, state_dir or default_state_dir(), allow_remote=allow_remote,
                   lease_seconds=lease_seconds, on_ready=on_ready)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("instance_id", shell_complete=complete_runs("any"))
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="Draw the live progress bar until the run finishes.")
@stall_after_option
@taskhub_option
@state_dir_option
@debug_option
def status(instance_id: str, json_output: bool, watch: bool, stall_after: timedelta, taskhub: str | None,
           state_dir: Path | None, debug: bool) -> None:
    """Show a run's status, progress and summary.

    Works from any terminal, while the run is live or after it ended.

    \b
    Examples:
      sitebackup status 20261127T225602-0dcb81
      sitebackup status 20261127T225602-0dcb81 --json
      sitebackup status 20261127T225602-0dcb81 --watch
    """
    state_dir = state_dir or default_state_dir()
    hub = _taskhub_settings(taskhub)
    if watch:
        summary = manage.watch_status(state_dir, instance_id, make_printer(json_output=json_output), hub)
        sys.exit(exit_code_for(summary))
    info = manage.status(state_dir, instance_id, hub, stall_after)
    if json_output:
        click.echo(json.dumps(to_wire(info)))
    else:
        click.echo(render.status_text(info))


@cli.command("list", epilog=EXIT_CODES_HELP)
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["RUNNING", "COMPLETED", "FAILED", "TERMINATED", "PENDING", "SUSPENDED"],
                                case_sensitive=False),
              help="Only runs with this runtime status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest runs to show.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON array.")
@taskhub_option
@state_dir_option
@debug_option
def list_(statuses: tuple[str, ...], limit: int, json_output: bool, taskhub: str | None, state_dir: Path | None,
          debug: bool) -> None:
    """List recent runs, newest first.

    \b
    Examples:
      sitebackup list
      sitebackup list --status RUNNING --status FAILED --limit 5
    """
    rows = manage.list_runs(state_dir or default_state_dir(), statuses=list(statuses), limit=limit,
                            taskhub=_taskhub_settings(taskhub))
    if json_output:
        click.echo(json.dumps(to_wire(rows)))
    else:
        render.runs_table(rows)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("instance_id", shell_complete=complete_runs("unfinished"))
@storage_options
@bwlimit_option
@click.option("--json", "json_output", is_flag=True, help="Print NDJSON events on stdout; the last line is the summary.")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures.")
@taskhub_option
@state_dir_option
@debug_option
def resume(instance_id: str, connection_string: str | None, account_url: str | None, json_output: bool,
           quiet: bool, taskhub: str | None, state_dir: Path | None, debug: bool) -> None:
    """Continue an unfinished run until it finishes.

    Same progress, summary and exit codes as the original command. Storage credentials come
    from this invocation (options or environment), never from the saved run.

    \b
    Example:
      sitebackup resume 20261127T225602-0dcb81
    """
    settings = StorageSettings.from_options(connection_string, account_url)
    summary = manage.resume(state_dir or default_state_dir(), instance_id, settings,
                            make_printer(json_output=json_output, quiet=quiet), _taskhub_settings(taskhub))
    sys.exit(exit_code_for(summary))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("instance_id", shell_complete=complete_runs("unfinished"))
@taskhub_option
@state_dir_option
@debug_option
def cancel(instance_id: str, taskhub: str | None, state_dir: Path | None, debug: bool) -> None:
    """Cancel a run.

    Uploads stop at the next file boundary (a large file at its next block range); blobs already
    written stay.

    \b
    Example:
      sitebackup cancel 20261127T225602-0dcb81
    """
    before = manage.cancel(state_dir or default_state_dir(), instance_id, _taskhub_settings(taskhub))
    if before in ("COMPLETED", "FAILED", "TERMINATED"):
        click.echo(f"{instance_id} had already finished ({before}); nothing to cancel")
    else:
        click.echo(f"{instance_id} cancelled (was {before})")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--older-than", required=True, metavar="AGE", help="Age such as 30d, 12h or 2w.")
@taskhub_option
@storage_options
@state_dir_option
@debug_option
def purge(older_than: str, taskhub: str | None, connection_string: str | None, account_url: str | None,
          state_dir: Path | None, debug: bool) -> None:
    """Remove finished runs older than AGE; completed backups are left to prune.

    Their history and run records go with them: restores, and failed or cancelled backups. Completed
    backups stay until `sitebackup prune` drops them, so that purge never makes a run prune keeps
    unrestorable. With --taskhub the run records are blobs under .sitebackup/work/ in each run's
    container: they are removed only when storage credentials (options or environment) are given,
    and kept otherwise.

    \b
    Example:
      sitebackup purge --older-than 30d
    """
    result = manage.purge(state_dir or default_state_dir(), manage.parse_age(older_than), _taskhub_settings(taskhub),
                          StorageSettings.from_options(connection_string, account_url))
    click.echo(f"purged {len(result.purged)} finished run(s) older than {older_than}")
    if result.backups_kept:
        click.echo(f"kept {len(result.backups_kept)} completed backup run(s): `sitebackup prune` decides how long "
                   "backups stay restorable")
    if result.records_kept and result.purged:
        click.echo("run records under .sitebackup/work/ in their containers were kept: "
                   "give storage credentials to remove them too", err=True)


PRUNE_EXIT_CODES = ("Exit codes: 0 pruned (or, with --dry-run, planned); 2 usage or input error; "
                    "3 destination unreachable or access denied; 4 a backup of the container is running; "
                    "5 the state directory has no room for the names the runs recorded (nothing removed).")


def keep_count(name: str, what: str):
    return click.option(f"--keep-{name}", type=click.IntRange(min=0), default=0, metavar="N",
                        help=f"Keep the newest run of each of the last N {what} that have runs.")


@cli.command(epilog=PRUNE_EXIT_CODES)
@click.option("--container", "-c", required=True, help="The destination whose backup runs to prune.")
@click.option("--prefix", default="", help="The destination's blob name prefix, as given to the backups "
                                           "({hostname}, {date} and {time} expanded the same way).")
@click.option("--keep-last", type=click.IntRange(min=0), default=0, metavar="N", help="Keep the N newest runs.")
@keep_count("hourly", "hours")
@keep_count("daily", "days")
@keep_count("weekly", "weeks")
@keep_count("monthly", "months")
@click.option("--keep-within", metavar="DURATION",
              help="Keep every run started less than DURATION (30d, 12h, 2w) before the newest run.")
@click.option("--dry-run", is_flag=True, help="List the runs, blobs and bytes that would be removed; remove nothing.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
@storage_options
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def prune(container: str, prefix: str, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, keep_within: str | None, dry_run: bool, json_output: bool, connection_string: str | None,
          account_url: str | None, metrics_file: Path | None, taskhub: str | None, state_dir: Path | None,
          debug: bool) -> None:
    """Forget old backup runs of a destination and free what only they kept.

    Keep rules as restic's forget: a run any rule keeps is kept, the newest completed run always
    is, unfinished runs are never touched, failed and cancelled runs are dropped. Dropped runs lose
    their record and history; every blob and snapshot no remaining run references goes.

    A prune that is interrupted finishes its job when run again.

    \b
    Examples:
      sitebackup prune -c backups --prefix web --keep-daily 7 --keep-weekly 4 --keep-monthly 12
      sitebackup prune -c backups --keep-last 3 --dry-run
      sitebackup prune -c backups --keep-daily 7 --metrics-file /var/lib/node_exporter/prune.prom
    """
    if metrics_file is not None and dry_run:
        raise click.UsageError("--metrics-file describes a finished prune: not with --dry-run")
    metrics = start_metrics(metrics_file, "prune", "", _destination(container, prefix))
    policy = retention.Policy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                              monthly=keep_monthly, within=manage.parse_age(keep_within) if keep_within else None)
    request = prune_cmd.prune_request(container, prefix, policy, dry_run=dry_run,
                                      state_dir=state_dir or default_state_dir())
    report = prune_cmd.run_prune(request, StorageSettings.from_options(connection_string, account_url),
                                 _taskhub_settings(taskhub))
    if metrics is not None:
        metrics.summary = {"runs_kept": len(report.kept), "runs_removed": len(report.removed),
                           "blobs_removed": report.blobs_removed, "snapshots_removed": report.snapshots_removed,
                           "bytes_removed": report.bytes_removed}
    if json_output:
        click.echo(json.dumps(to_wire(report)))
    else:
        render.prune_report(report)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("args", nargs=-1, required=True, metavar="[ID] DEST", shell_complete=complete_restore_args)
@click.option("--container", "-c", help="Restore whatever is under --prefix in this container instead of a run.")
@click.option("--prefix", default="", help="With --container: only blobs under this prefix, which is stripped.")
@click.option("--as-of", metavar="TIME",
              help="With --container: the tree the latest completed backup of the container and prefix started at "
                   "or before TIME recorded (ISO date or date and time, local unless an offset is given).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Only paths matching this glob (repeatable); a pattern without '/' matches any path component.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out paths matching this glob (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace existing files that differ (identical ones are always skipped).")
@storage_options
@bwlimit_option
@click.option("--concurrency", type=click.IntRange(min=1, max=256), default=DEFAULT_WINDOW, show_default=True,
              help="Bound on parallel download batches.")
@click.option("--json", "json_output", is_flag=True, help="Print NDJSON events on stdout; the last line is the summary.")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures.")
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def restore(args: tuple[str, ...], container: str | None, prefix: str, as_of: str | None, include: tuple[str, ...],
            exclude: tuple[str, ...], overwrite: bool, connection_string: str | None, account_url: str | None,
            concurrency: int, json_output: bool, quiet: bool, metrics_file: Path | None, taskhub: str | None,
            state_dir: Path | None, debug: bool) -> None:
    """Restore a backup run, or a container's blobs, into DEST.

    With ID, restores exactly the files that backup run recorded, in the versions it recorded
    (from blob snapshots where later runs replaced them); with --container (and --prefix) and
    --as-of TIME, the same for the latest completed run at or before TIME; with --container
    alone, whatever is stored there now.

    Files land with their recorded modification time and mode (no setuid, setgid or sticky bit;
    masked by the umask). An existing file is skipped when identical (same size and MD5) and
    otherwise left alone and reported unless --overwrite. Blob names that would escape DEST
    (absolute, '..' or empty segments, NUL, backslash) are refused and reported; no symlink
    under DEST is followed. Re-running the same command after an interruption resumes the restore.

    \b
    Examples:
      sitebackup restore 20261127T225602-0dcb81 ./restored
      sitebackup restore 20261127T225602-0dcb81 ./restored --include 'css/*' --exclude '*.log'
      sitebackup restore --container backups --prefix nightly/web ./restored --overwrite
      sitebackup restore --container backups --as-of 2026-03-01T03:00 ./restored
    """
    expected = 1 if container else 2
    if len(args) != expected:
        raise click.UsageError("give ID DEST, or --container NAME DEST")
    metrics = start_metrics(metrics_file, "restore", _destination(container, prefix) if container else args[0],
                            str(Path(args[-1]).expanduser().resolve()))
    settings = StorageSettings.from_options(connection_string, account_url)
    request = restore_cmd.validate_restore(
        args[-1], run_id=None if container else args[0], container=container, prefix=prefix, include=list(include),
        exclude=list(exclude), overwrite=overwrite, concurrency=concurrency, state_dir=state_dir or default_state_dir(),
        as_of=as_of)
    summary = restore_cmd.run_restore(request, settings, make_printer(json_output=json_output, quiet=quiet),
                                      _taskhub_settings(taskhub))
    if metrics is not None:
        metrics.summary = summary_to_wire(summary)
    sys.exit(exit_code_for(summary))


@cli.command(epilog="Exit codes: 0 every recorded blob matches; 1 some do not (listed); 2 usage or input error; "
                    "3 destination unreachable or access denied.")
@click.argument("instance_id", metavar="ID", shell_complete=complete_runs("backups"))
@click.option("--local", is_flag=True, help="Also compare with the source files on disk (size and MD5).")
@click.option("--download", is_flag=True, help="Re-hash blob content instead of trusting its Content-MD5.")
@storage_options
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object with counts and mismatches.")
@metrics_option
@taskhub_option
@state_dir_option
@debug_option
def verify(instance_id: str, local: bool, download: bool, connection_string: str | None, account_url: str | None,
           json_output: bool, metrics_file: Path | None, taskhub: str | None, state_dir: Path | None,
           debug: bool) -> None:
    """Check that a backup run's blobs are intact.

    Every blob the run recorded must be present, with the same size and Content-MD5 (and the
    access tier the run set with --tier).

    \b
    Examples:
      sitebackup verify 20261127T225602-0dcb81
      sitebackup verify 20261127T225602-0dcb81 --local --download --json
    """
    # until the run is found, its id stands for the job; then the backup job it verifies does
    metrics = start_metrics(metrics_file, "verify", instance_id, "")
    settings = StorageSettings.from_options(connection_string, account_url)
    mismatches: list[Mismatch] = []

    def listed(m: Mismatch) -> None:
        click.echo(printable(f"MISMATCH {m.path}: {m.problem}"), err=True)

    # listed as found (a run of a million changed files lists them all without holding them); --json's one
    # object carries them in a list
    report = verify_cmd.verify_run(state_dir or default_state_dir(), instance_id, settings,
                                   mismatches.append if json_output else listed, local=local, download=download,
                                   taskhub=_taskhub_settings(taskhub))
    if metrics is not None:
        metrics.source, metrics.destination = report.source, _destination(report.container, report.prefix)
        metrics.summary = to_wire(report)
    if json_output:
        click.echo(json.dumps({**to_wire(report), "mismatches": to_wire(mismatches)}))
    else:
        click.echo(f"{instance_id}: {report.files_ok}/{report.files_checked} blobs match, "
                   f"{report.files_mismatched} mismatched, {report.files_not_backed_up} not backed up by the run")
    sys.exit(EXIT_FILES_FAILED if report.files_mismatched else 0)


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    # the SDK reports reconnects and shutdown noise at WARNING/ERROR; users see our messages instead
    SDK_LOGGER.setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if not debug:
        logging.getLogger("azure").setLevel(logging.ERROR)
        # the embedded backend's failed calls (a full state disk) reach the caller, which says why in one line
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def report_error(message: str, exit_code: int, json_output: bool) -> int:
    """One line on stderr, and with ``--json`` one error object on stdout; returns *exit_code*."""
    message = printable(redact(message))
    click.echo(message, err=True)
    if json_output:
        text = message.removeprefix("sitebackup: error: ").removeprefix("Error: ")
        click.echo(json.dumps({"event": "error", "exit_code": exit_code, "message": text}))
    return exit_code


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: list[str], session: Session, debug: bool, json_output: bool) -> int:
    """Run the command line; the exit code, however the command ended."""
    try:
        cli.main(args=args, prog_name="sitebackup", standalone_mode=False, obj=session)
    except SystemExit as exc:  # commands end with sys.exit(code); so does shell completion
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_INTERNAL
    except SiteBackupError as exc:
        return report_error(f"sitebackup: error: {exc}", exc.exit_code, json_output)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return report_error("sitebackup: interrupted", EXIT_INTERRUPTED, json_output)
    except click.ClickException as exc:
        # click echoes the offending argument whole: a connection string given in the wrong place
        shown = io.StringIO()
        exc.show(file=shown)
        for line in redact(shown.getvalue()).splitlines():
            click.echo(printable(line), err=True)
        code = exc.exit_code or EXIT_USAGE
        if json_output:
            click.echo(json.dumps({"event": "error", "exit_code": code, "message": redact(exc.format_message())}))
        return code
    except Exception as exc:  # a bug: one line, unless --debug asks for the traceback
        refused = backend_error(exc)
        if refused is not None:
            return report_error(f"sitebackup: error: {refused}", refused.exit_code, json_output)
        if debug:
            import traceback

            click.echo(redact(traceback.format_exc()), err=True)
        return report_error(f"sitebackup: internal error: {redact(str(exc)) or type(exc).__name__} "
                            "(rerun with --debug for details)", EXIT_INTERNAL, json_output)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    json_output = "--json" in args
    _configure_logging(debug)
    # a stop by cron's timeout or systemd ends like Ctrl-C: workers stopped, the run resumable, metrics written
    signal.signal(signal.SIGTERM, _interrupt)
    session = Session()
    code = run(args, session, debug, json_output)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if session.metrics is not None:
        try:
            session.metrics.write(code)
        except (MetricsFileError, KeyboardInterrupt) as exc:
            click.echo(f"sitebackup: warning: metrics not written: {exc or 'interrupted'}", err=True)
    if argv is None:  # the program itself, not a caller in this process
        end_process(code)
    sys.exit(code)

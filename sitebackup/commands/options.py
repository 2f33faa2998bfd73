"""The click options several commands share, each turned into the typed value the command takes, and the
``Session`` their callbacks record into for ``cli.main``.

Storage credentials arrive as one ``StorageSettings``, --taskhub as ``TaskHubSettings | None``, --state-dir
as the directory to use (its default resolved), --json and --quiet as one ``Output``. --json and --debug
count wherever they are typed, so their callbacks record them in the ``Session``; they are eager, recorded
before any other value is checked, so a usage error later on the line is reported as they ask.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem
from durabletask import client as dt_client

from sitebackup.blob import bwlimit, inflight
from sitebackup.blob.clients import ENV_ACCOUNT_URL, ENV_CONNECTION_STRING, StorageSettings
from sitebackup.blob.errors import redact
from sitebackup.commands.hosting import DEFAULT_STALL_AFTER, ENV_STALL_AFTER, UNFINISHED
from sitebackup.durable import taskhub
from sitebackup.durable.runtime import ENV_STATE_DIR, SDK_LOGGER, default_state_dir, peek_run_ids
from sitebackup.errors import InputError, SiteBackupError
from sitebackup.model.work import DEFAULT_CONCURRENCY
from sitebackup.ui.metrics import MetricsJob
from sitebackup.ui.safepath import trusted_directory
from sitebackup.workflows.names import BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION

F = TypeVar("F", bound=Callable[..., Any])
LATEST = "latest"  # the run reference of a job's newest run (commands.runref)


@dataclass
class Session:
    """What ``main`` learns from the command line as click reads it, to act on however the command ends."""

    json_output: bool = False  # usage and other errors also go to stdout as one JSON object
    debug: bool = False  # internal errors show their traceback
    metrics: MetricsJob | None = None  # written with the exit code
    log_file: Path | None = None  # --log-file: a command that fails, however early, says why there
    command: str = ""  # the command's name, for that line


def session(ctx: click.Context) -> Session:
    return ctx.ensure_object(Session)


class Command(click.Command):
    """A sitebackup command. When the parser refuses the line before any option was processed (an unknown
    option, an option without its value), --json is still honoured: the same parser reads the line again,
    leniently, for the flags it knows."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        line = list(args)  # the parser consumes the list it is given
        try:
            return super().parse_args(ctx, args)
        except click.UsageError:
            lenient = click.Context(self, info_name=ctx.info_name, parent=ctx.parent, resilient_parsing=True,
                                    ignore_unknown_options=True)
            opts, _args, _order = self.make_parser(lenient).parse_args(line)
            if opts.get("json_output"):
                session(ctx).json_output = True
            raise


def set_log_levels(debug: bool) -> None:
    """Quiet by default; with --debug every logger, the SDKs' included (the handler redacts secrets)."""
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)
    # the SDK reports reconnects and shutdown noise at WARNING/ERROR; users see our messages instead
    SDK_LOGGER.setLevel(logging.DEBUG if debug else logging.CRITICAL)
    logging.getLogger("azure").setLevel(logging.NOTSET if debug else logging.ERROR)
    # the embedded backend's failed calls (a full state disk) reach the caller, which says why in one line
    logging.getLogger("grpc._server").setLevel(logging.NOTSET if debug else logging.CRITICAL)


def _record_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        session(ctx).debug = True
        set_log_levels(debug=True)


def debug_option(fn: F) -> F:
    return click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_record_debug,
                        help="Show tracebacks and SDK logs (secrets redacted).")(fn)


def _record_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        session(ctx).json_output = True
    return value


def json_option(help: str) -> Callable[[F], F]:
    """--json as ``json_output: bool``."""
    return click.option("--json", "json_output", is_flag=True, is_eager=True, callback=_record_json, help=help)


@dataclass(frozen=True)
class Output:
    """How a run is shown: NDJSON events (--json), or only failures (--quiet)."""

    json: bool = False
    quiet: bool = False


def output_options(command: Callable[..., None]) -> Callable[..., None]:
    """--json and --quiet of a command that shows a run, as one ``output: Output``."""

    @functools.wraps(command)
    def with_output(*, json_output: bool, quiet: bool, **params: Any) -> None:
        command(output=Output(json=json_output, quiet=quiet), **params)

    with_output = click.option("--quiet", "-q", is_flag=True, help="Print only failures.")(with_output)
    return json_option("Print NDJSON events on stdout; the last line is the summary.")(with_output)


def warn_secret_on_argv(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A key or SAS signature on the command line is readable by every local user (ps, /proc/PID/cmdline)
    while the process runs: say so, and which environment variable keeps it private."""
    if value and redact(value) != value:
        env = ENV_CONNECTION_STRING if param.name == "connection_string" else ENV_ACCOUNT_URL
        click.echo(f"sitebackup: warning: the secret in {param.opts[0]} is visible to every local user "
                   f"(ps, /proc/PID/cmdline); set {env} in the environment instead", err=True)
    return value


def storage_options(command: Callable[..., None]) -> Callable[..., None]:
    """--connection-string and --account-url (or their environment variables) as one ``storage: StorageSettings``."""

    @functools.wraps(command)
    def with_storage(*, connection_string: str | None, account_url: str | None, **params: Any) -> None:
        command(storage=StorageSettings.from_options(connection_string, account_url), **params)

    with_storage = click.option(
        "--account-url", metavar="URL", callback=warn_secret_on_argv,
        help=f"Account URL, with a SAS or using DefaultAzureCredential [env {ENV_ACCOUNT_URL}].")(with_storage)
    return click.option(
        "--connection-string", metavar="STRING", callback=warn_secret_on_argv,
        help=f"Storage connection string; wins over --account-url [env {ENV_CONNECTION_STRING}].")(with_storage)


def taskhub_option(fn: F) -> F:
    """--taskhub (or its environment variable) as ``taskhub: TaskHubSettings | None``; None: the embedded backend."""
    return click.option(
        "--taskhub", metavar="CONNECTION_STRING", envvar=taskhub.ENV_TASKHUB, show_envvar=False,
        callback=lambda _ctx, _param, value: taskhub.from_option(value),
        help="Use Azure Durable Task Scheduler instead of the embedded backend: "
             "Endpoint=https://...;TaskHub=NAME;Authentication=DefaultAzure "
             f"[env {taskhub.ENV_TASKHUB}].",
    )(fn)


def state_dir_option(fn: F) -> F:
    """--state-dir as ``state_dir: Path``, the default when not given."""
    return click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_STATE_DIR,
        callback=lambda _ctx, _param, value: value or default_state_dir(),
        help=f"Where durable state lives [env {ENV_STATE_DIR}; default $XDG_STATE_HOME/sitebackup].",
    )(fn)


def catalog_options(command: Callable[..., None]) -> Callable[..., None]:
    """Where a command that reads runs finds them: the storage account, the durable backend (--taskhub),
    the state directory, and --debug."""
    return storage_options(taskhub_option(state_dir_option(debug_option(command))))


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise InputError(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30d, 12h, 90s")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def stall_after_option(fn: F) -> F:
    return click.option(
        "--stall-after", metavar="DURATION", default=DEFAULT_STALL_AFTER, show_default=True, envvar=ENV_STALL_AFTER,
        callback=lambda _ctx, _param, value: parse_age(value),
        help=f"A live run without progress for this long (90s, 30m, 2h) is stalled [env {ENV_STALL_AFTER}].",
    )(fn)


def lock_wait_option(fn: F) -> F:
    """--lock-wait as ``lock_wait: timedelta | None``; None: refused at once."""
    return click.option(
        "--lock-wait", metavar="DURATION", callback=lambda _ctx, _param, value: parse_age(value) if value else None,
        help="When another backup or prune of the job holds its lock in the container, wait up to DURATION "
             "(90s, 10m, 2h) for it instead of exiting 4 at once.",
    )(fn)


def _set_bwlimit(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    try:
        rate = None if value is None else bwlimit.parse_rate(value)
    except SiteBackupError as exc:
        raise click.BadParameter(str(exc).removeprefix("invalid --bwlimit ")) from None
    bwlimit.set_process_limit(rate)


def bwlimit_option(fn: F) -> F:
    """--bwlimit: set once for the whole process, before any blob client is made."""
    return click.option(
        "--bwlimit", metavar="RATE", envvar=bwlimit.ENV_BWLIMIT, expose_value=False, callback=_set_bwlimit,
        help=f"Cap on blob transfers of this process, in {bwlimit.RATE_HELP} [env {bwlimit.ENV_BWLIMIT}].",
    )(fn)


def _set_max_inflight(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    if not ctx.resilient_parsing:
        inflight.set_process_window(value)


def max_inflight_option(fn: F) -> F:
    """--max-inflight: set once for the whole process, before its asyncio loop is made."""
    return click.option(
        "--max-inflight", metavar="N", type=click.IntRange(min=1, max=inflight.MAX_INFLIGHT_LIMIT),
        envvar=inflight.ENV_MAX_INFLIGHT, expose_value=False, callback=_set_max_inflight,
        help="Keep exactly N requests in flight, shared by small files and the block ranges and ranged downloads "
             "of large ones (default: the window adapts to the network: it grows while throughput grows and backs "
             "off when the service throttles or answers slower) "
             f"[env {inflight.ENV_MAX_INFLIGHT}].",
    )(fn)


def concurrency_option(help: str) -> Callable[[F], F]:
    """--concurrency, bounded the same everywhere; *help* says what it bounds in this command."""
    return click.option("--concurrency", type=click.IntRange(min=1, max=256), default=DEFAULT_CONCURRENCY,
                        show_default=True, help=help)


def _record_log_file(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and not ctx.resilient_parsing:
        session(ctx).log_file, session(ctx).command = value, ctx.info_name or ""
    return value


def log_file_option(fn: F) -> F:
    """--log-file as ``log_file: Path | None``, recorded in the ``Session`` too: a failure before the run starts
    (no credentials, an unreadable source, a refused state directory) is still a line in the log."""
    return click.option(
        "--log-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH", callback=_record_log_file,
        help="Append a timestamped log of the run (start, failures, summary, or the error that stopped it) to "
             "PATH (created 0600; a symlink or hard link there is refused).",
    )(fn)


def metrics_option(fn: F) -> F:
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
    try:  # written through its resolved directory, in which another user can replace nothing on the way
        path = Path(trusted_directory(path.parent)) / path.name
    except ValueError as exc:
        raise InputError(f"--metrics-file: {exc}") from None
    job = MetricsJob(path, command, source, destination)
    session(click.get_current_context()).metrics = job
    return job


def destination_label(container: str | None, prefix: str) -> str:
    """A destination as a metrics label: container/prefix as written on the command line."""
    prefix = prefix.strip("/")
    return f"{container}/{prefix}" if container and prefix else container or prefix


def complete_dirs(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(incomplete, type="dir")]


# which runs each command can take, for shell completion
RUNS_FOR = {
    "any": ((), ()),
    "unfinished": ((BACKUP_ORCHESTRATION, RESTORE_ORCHESTRATION), tuple(s.value for s in UNFINISHED)),
    "backups": ((BACKUP_ORCHESTRATION,), (dt_client.OrchestrationStatus.COMPLETED.value,)),
}


def complete_run_ids(state_dir: Path, prefix: str, runs: str) -> list[str]:
    """Ids of the state directory's *runs* (a ``RUNS_FOR`` key) starting with *prefix*, newest first."""
    names, statuses = RUNS_FOR[runs]
    return peek_run_ids(state_dir, prefix, names=names, statuses=statuses)


def complete_runs(runs: str) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion of run references: ``latest``, then run ids (a ``RUNS_FOR`` key) from the state directory's
    database, read-only.

    Completion must never print or hang: on any failure, and under --taskhub (no network while
    completing), it offers no run id."""

    def complete(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        latest = [CompletionItem(LATEST)] if LATEST.startswith(incomplete) else []
        try:
            if ctx.params.get("taskhub") or os.environ.get(taskhub.ENV_TASKHUB):
                return latest
            state_dir = ctx.params.get("state_dir") or default_state_dir()
            return latest + [CompletionItem(run_id) for run_id in complete_run_ids(state_dir, incomplete, runs)]
        except Exception:
            return latest

    return complete


def job_option(help: str) -> Callable[[F], F]:
    """--job NAME as ``job: str | None``."""
    return click.option("--job", metavar="NAME", help=help)


LATEST_JOB_HELP = "The job `latest` means: its name, id or source directory (needed when several jobs have runs)."

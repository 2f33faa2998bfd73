"""The command line: the click group that assembles the commands (each defined in its module under
``commands/``), logging, and ``main``, the one place where exceptions become exit codes and one-line
messages (and, with ``--json``, one JSON error object on stdout).

What ``main`` acts on (--json, --debug, the --metrics-file job) it learns from the ``Session`` the
options' callbacks record into while click reads the line.

A command's module is imported when the command is asked for (``Commands``): a nightly backup does not pay
for the import of every other command.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from types import FrameType

import click
from click.shell_completion import CompletionItem

from sitebackup import __version__
from sitebackup.blob.errors import redact
from sitebackup.commands.hosting import STOP_REQUESTED, end_process
from sitebackup.commands.options import Session, set_log_levels
from sitebackup.durable.runtime import backend_error
from sitebackup.errors import EXIT_CODES_HELP, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, SiteBackupError
from sitebackup.ui.escape import printable
from sitebackup.ui.logfile import log_failure
from sitebackup.ui.metrics import MetricsFileError

# command name -> its module under sitebackup.commands, which defines it as ``command``
COMMAND_MODULES = {"backup": "backup", "restore": "restore", "verify": "verify", "prune": "prune", "worker": "worker",
                   "serve": "serve", "status": "status", "list": "list_runs", "resume": "resume", "cancel": "cancel",
                   "purge": "purge", "check": "check", "unlock": "unlock", "ls": "ls", "diff": "diff", "find": "find",
                   "cat": "cat", "stats": "stats"}


class Commands(MutableMapping[str, click.Command]):
    """The group's commands by name, each imported from its module when it is first looked up: the names are
    known without importing anything (usage errors, typo suggestions), the command itself only when used or
    listed with its help."""

    def __init__(self, modules: dict[str, str]):
        self._modules = dict(modules)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            module = self._modules[name]  # KeyError: no such command
            self._loaded[name] = importlib.import_module(f"sitebackup.commands.{module}").command
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._modules.setdefault(name, name)
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._modules[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class DefaultToBackup(click.Group):
    """``sitebackup DIR ...`` means ``sitebackup backup DIR ...``; a first word that is no directory but close to a
    command name is taken for a typo of it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            close = [] if args[0].startswith("-") or "/" in args[0] or os.path.isdir(args[0]) else \
                _close_matches(args[0], list(self.commands))
            if close:
                raise click.UsageError(f"{args[0]!r} is neither a command nor a directory: did you mean "
                                       + " or ".join(f"`sitebackup {name}`" for name in close) + "?")
            args = ["backup", *args]
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        """Command names, or, when none starts so, directories: the SOURCE of the default command."""
        items = super().shell_complete(ctx, incomplete)
        return items or [CompletionItem(incomplete, type="dir")]


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


cli.commands = Commands(COMMAND_MODULES)


def _close_matches(word: str, names: list[str]) -> list[str]:
    import difflib  # a typo's path only

    return difflib.get_close_matches(word, names, n=3, cutoff=0.6)


def _configure_logging() -> None:
    """One handler on stderr that redacts secrets; quiet until --debug turns the levels up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    set_log_levels(debug=False)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def report_error(message: str, exit_code: int, session: Session) -> int:
    """One line on stderr, with ``--json`` one error object on stdout, with ``--log-file`` one line in the log;
    returns *exit_code*."""
    message = printable(redact(message))
    click.echo(message, err=True)
    if session.log_file is not None:
        log_failure(session.log_file, session.command, message)
    if session.json_output:
        text = message.removeprefix("sitebackup: error: ").removeprefix("Error: ")
        click.echo(json.dumps({"event": "error", "exit_code": exit_code, "message": text}))
    return exit_code


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """The first Ctrl-C or SIGTERM: stop, keeping the run resumable (``hosting.stop_now``); a second one while
    that goes on stops at once."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is _interrupt:
            signal.signal(sig, _stop_at_once)
    STOP_REQUESTED.set()
    raise KeyboardInterrupt


def _stop_at_once(_signum: int, _frame: FrameType | None) -> None:
    # what the state directory holds is committed whole: this is a kill, which a run resumes from
    os.write(2, b"sitebackup: stopped at once; the run resumes from what was saved\n")
    os._exit(EXIT_INTERRUPTED)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stoppable() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM stop the command (``_interrupt``), a second one at once. A stop by
    cron's timeout or systemd ends like Ctrl-C: workers stopped, the run resumable, metrics written. A SIGINT the
    shell made this process ignore (a background job) stays ignored. After the block SIGTERM kills again."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if previous[signal.SIGINT] is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run(args: list[str] | None, session: Session) -> int:
    """Run the command line (*args*, or the program's own when None); the exit code, however the command ended."""
    try:
        cli.main(args=args, prog_name="sitebackup", standalone_mode=False, obj=session)
    except SystemExit as exc:  # commands end with sys.exit(code); so does shell completion
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_INTERNAL
    except SiteBackupError as exc:
        return report_error(f"sitebackup: error: {exc}", exc.exit_code, session)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return report_error("sitebackup: interrupted", EXIT_INTERRUPTED, session)
    except click.ClickException as exc:
        # click echoes the offending argument whole: a connection string given in the wrong place
        shown = io.StringIO()
        exc.show(file=shown)
        for line in redact(shown.getvalue()).splitlines():
            click.echo(printable(line), err=True)
        code = exc.exit_code or EXIT_USAGE
        if session.log_file is not None:
            log_failure(session.log_file, session.command, f"error: {redact(exc.format_message())}")
        if session.json_output:
            click.echo(json.dumps({"event": "error", "exit_code": code, "message": redact(exc.format_message())}))
        return code
    except Exception as exc:  # a bug: one line, unless --debug asks for the traceback
        refused = backend_error(exc)
        if refused is not None:
            return report_error(f"sitebackup: error: {refused}", refused.exit_code, session)
        if session.debug:
            click.echo(redact(traceback.format_exc()), err=True)
        return report_error(f"sitebackup: internal error: {redact(str(exc)) or type(exc).__name__} "
                            "(rerun with --debug for details)", EXIT_INTERNAL, session)
    return 0


def main(argv: list[str] | None = None) -> None:
    _configure_logging()
    session = Session()
    with stoppable():
        code = run(argv, session)
    if session.metrics is not None:
        try:
            unlocked = session.metrics.write(code)
            if unlocked is not None:
                click.echo(printable(f"sitebackup: warning: {unlocked}"), err=True)
        except (MetricsFileError, KeyboardInterrupt) as exc:
            click.echo(f"sitebackup: warning: metrics not written: {exc or 'interrupted'}", err=True)
    if argv is None:  # the program itself, not a caller in this process
        end_process(code)
    sys.exit(code)

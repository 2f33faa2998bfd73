"""The command line: click commands that parse, call one core function, render and pick the exit code.

``main`` is the one place where exceptions become exit codes and one-line messages.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from sitebackup import __version__, runner, storage
from sitebackup.errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_USAGE, SiteBackupError
from sitebackup.orchestrations import DEFAULT_WINDOW
from sitebackup.progress import make_printer
from sitebackup.runtime import ENV_STATE_DIR, SDK_LOGGER, default_state_dir

EXIT_INTERNAL = 70


class DefaultToBackup(click.Group):
    """``sitebackup DIR ...`` means ``sitebackup backup DIR ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["backup", *args]
        return super().parse_args(ctx, args)


def state_dir_option(fn):
    return click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_STATE_DIR,
        help=f"Where durable state lives [env {ENV_STATE_DIR}; default $XDG_STATE_HOME/sitebackup].",
    )(fn)


def debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show tracebacks and SDK logs (secrets redacted).")(fn)


def storage_options(fn):
    fn = click.option("--account-url", metavar="URL",
                      help=f"Account URL, with a SAS or using DefaultAzureCredential [env {storage.ENV_ACCOUNT_URL}].")(fn)
    fn = click.option("--connection-string", metavar="STRING",
                      help=f"Storage connection string; wins over --account-url [env {storage.ENV_CONNECTION_STRING}].")(fn)
    return fn


@click.group(cls=DefaultToBackup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="sitebackup")
def cli() -> None:
    """Back up a directory tree to Azure Blob Storage, durably: a killed backup resumes where it stopped.

    \b
    Examples:
      sitebackup ./site --container backups --connection-string "$AZURE_STORAGE_CONNECTION_STRING"
      sitebackup backup /var/www --container backups --prefix nightly/web
      sitebackup ./site --container backups --json | tail -n 1
    """


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--container", "-c", required=True, help="Destination container (created if missing).")
@click.option("--prefix", default="", help="Blob name prefix, e.g. nightly/web → nightly/web/css/site.css.")
@storage_options
@click.option("--concurrency", type=click.IntRange(min=1, max=256), default=DEFAULT_WINDOW, show_default=True,
              help="Bound on parallel uploads.")
@click.option("--json", "json_output", is_flag=True, help="Print NDJSON events on stdout; the last line is the summary.")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures.")
@state_dir_option
@debug_option
def backup(source: Path, container: str, prefix: str, connection_string: str | None, account_url: str | None,
           concurrency: int, json_output: bool, quiet: bool, state_dir: Path | None, debug: bool) -> None:
    """Back up SOURCE: every file becomes a blob named by its path relative to SOURCE.

    Re-running the same command while an earlier run of the same source and destination is
    unfinished resumes that run.

    \b
    Examples:
      sitebackup backup ./site --container backups
      sitebackup backup ./site -c backups --prefix nightly/web --concurrency 32
      sitebackup backup ./site -c backups --connection-string UseDevelopmentStorage=true
    """
    settings = storage.StorageSettings.from_options(connection_string, account_url)
    request = runner.validate_request(source, container, prefix, concurrency, state_dir or default_state_dir())
    printer = make_printer(json_output=json_output, quiet=quiet)
    summary = runner.run_backup(request, settings, printer)
    sys.exit(runner.exit_code_for(summary))


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


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = storage.redact(record.getMessage())
        record.args = None
        return True


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    _configure_logging(debug)
    try:
        cli.main(args=args, prog_name="sitebackup", standalone_mode=False)
    except SiteBackupError as exc:
        click.echo(f"sitebackup: error: {storage.redact(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("sitebackup: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("sitebackup: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: one line, unless --debug asks for the traceback
        if debug:
            import traceback

            click.echo(storage.redact(traceback.format_exc()), err=True)
        click.echo(f"sitebackup: internal error: {storage.redact(str(exc)) or type(exc).__name__} "
                   "(rerun with --debug for details)", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)

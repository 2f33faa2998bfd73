"""The serve command: the embedded backend over TCP, so the Durable Task Scheduler code path runs on one
machine (local scale-out testing); every call must carry its token. Runs until SIGINT or SIGTERM."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import click

from sitebackup.commands.hosting import stop_on_signals
from sitebackup.commands.options import Command, debug_option, state_dir_option
from sitebackup.durable.taskhub import ENV_SERVE_TOKEN
from sitebackup.errors import InputError, exit_codes_help


def parse_listen(listen: str, allow_remote: bool) -> str:
    """Validate HOST:PORT; anything but loopback needs *allow_remote* (no TLS: the token travels in clear)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InputError(f"--listen must be HOST:PORT, e.g. 127.0.0.1:4001 (got {listen!r})")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            raise InputError(f"--listen host must be an IP address or localhost (got {host!r})") from None
    if not loopback and not allow_remote:
        raise InputError(f"refusing to serve on {host}: the endpoint is plaintext (its token travels unencrypted); "
                         "use a loopback address or pass --allow-remote")
    return listen


def serve(listen: str, state_dir: Path, *, allow_remote: bool, lease_seconds: float,
          on_ready: Callable[[str, Path | None], None]) -> None:
    """Serve the embedded backend for *state_dir* on TCP until stopped; *on_ready* gets the address and
    the token file clients need (None when the token came from the environment)."""
    from sitebackup.durable.backend import EmbeddedBackend
    from sitebackup.durable.backend.statedir import MIN_TOKEN

    parse_listen(listen, allow_remote)
    token = os.environ.get(ENV_SERVE_TOKEN, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN:
        raise InputError(f"{ENV_SERVE_TOKEN} must be at least {MIN_TOKEN} characters: a secret nobody can guess")
    with stop_on_signals() as stop:
        backend = EmbeddedBackend(state_dir, lease_seconds=lease_seconds)
        address = backend.start(listen=listen, token=token)
        try:
            on_ready(address, backend.token_file)
            while not stop.wait(1.0):
                if backend.damage.message is not None:  # every client gets the same error already
                    raise InputError(backend.damage.message)
        finally:
            backend.stop()


@click.command("serve", cls=Command, epilog=exit_codes_help(0, 2, 5, 70))
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Loopback address to serve on, e.g. 127.0.0.1:4001 (port 0 picks a free port).")
@click.option("--allow-remote", is_flag=True, help="Also accept non-loopback addresses (no TLS: the token travels in clear!).")
@click.option("--lease-seconds", type=click.FloatRange(min=0.5), default=30.0, hidden=True,
              help="How long a lost worker's work stays claimed (testing).")
@state_dir_option
@debug_option
def command(listen: str, allow_remote: bool, lease_seconds: float, state_dir: Path) -> None:
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
        hint = "" if token_file else f" with {ENV_SERVE_TOKEN} set as for this server"
        click.echo(f"sitebackup: serving on {address}: --taskhub "
                   f"\"Endpoint=http://{address};TaskHub=default;Authentication=None{token}\"{hint}", err=True)
        click.echo(address)

    serve(listen, state_dir, allow_remote=allow_remote, lease_seconds=lease_seconds, on_ready=on_ready)

"""Scale-out commands: ``sitebackup worker`` (work only, for any backup on the task hub) and
``sitebackup serve`` (the embedded backend over TCP, so the Durable Task Scheduler code path runs
on one machine; every call must carry its token).

Both run until SIGINT or SIGTERM and then stop cleanly; a worker also stops when its state directory
stops taking writes (disk full: ``StateFullError``). The CLI renders what they report.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sitebackup.blob.clients import StorageSettings
from sitebackup.commands.hosting import activity_deps
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import ENV_SERVE_TOKEN, TaskHubSettings
from sitebackup.errors import InputError
from sitebackup.model.work import BackupCounts, Concurrency, PageResult


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM, so the main thread can stop the worker and exit 0."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_worker(settings: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path,
               concurrency: int, on_batch: Callable[[str, PageResult[BackupCounts]], None],
               on_started: Callable[[], None]) -> None:
    """Work on every backup the backend hands out until stopped; no scheduling, no watching."""
    settings.require()
    with _stop_on_signals() as stop, open_backend(state_dir, taskhub) as runtime:
        runtime.check_access()
        deps = activity_deps(settings, Concurrency(concurrency), runtime)
        deps.on_batch = on_batch
        runtime.start_worker(deps)
        on_started()
        while not stop.wait(1.0):
            runtime.check()
        # open_backend's exit stops the worker, which first finishes the work items it holds


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
    with _stop_on_signals() as stop:
        backend = EmbeddedBackend(state_dir, lease_seconds=lease_seconds)
        address = backend.start(listen=listen, token=token)
        try:
            on_ready(address, backend.token_file)
            while not stop.wait(1.0):
                if backend.damage.message is not None:  # every client gets the same error already
                    raise InputError(backend.damage.message)
        finally:
            backend.stop()

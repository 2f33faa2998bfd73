"""The exception hierarchy every layer raises and the exit codes the CLI turns them into.

One place owns the mapping so ``--help``, README and behaviour cannot drift apart; it also owns
``write_fault``, the one test of whether an exception means "the state directory cannot be written".
"""

from __future__ import annotations

import errno
import sqlite3
from typing import NamedTuple


class ExitCode(NamedTuple):
    code: int
    name: str
    meaning: str


# The one table of exit codes: --help epilogs, the metrics' help text, docs/cli.md and the README read it.
EXIT_CODES = (
    ExitCode(0, "ok", "done: every file backed up or unchanged (restored, verified, pruned)"),
    ExitCode(1, "files-failed", "the run finished but some files failed or mismatched (listed on stderr and in --json)"),
    ExitCode(2, "usage", "usage or input error (missing source, invalid container name, no storage configured, ...)"),
    ExitCode(3, "destination", "destination unreachable, authentication failed or access denied"),
    ExitCode(4, "already-running", "the same backup is already running in another process (with --no-wait), "
                                   "or another backup or prune of the job holds its lock in the container"),
    ExitCode(5, "state-full", "the state directory is full or stopped taking writes, found as the command starts "
                              "or during a run (a run is saved): free space, then run the same command again"),
    ExitCode(6, "stalled", "the same backup is running in another process but has made no progress for "
                           "--stall-after (with --no-wait)"),
    ExitCode(7, "cancelled", "the run was cancelled (sitebackup cancel); what it uploaded before stays"),
    ExitCode(70, "internal", "internal error (a bug: rerun with --debug and report it)"),
    ExitCode(130, "interrupted", "interrupted (Ctrl-C, or SIGTERM from timeout, kill or systemd); the run is "
                                 "saved and resumable"),
)
_BY_CODE = {e.code: e for e in EXIT_CODES}

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_DESTINATION = 3
EXIT_ALREADY_RUNNING = 4
EXIT_STATE_FULL = 5
EXIT_STALLED = 6
EXIT_CANCELLED = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def exit_codes_help(*codes: int) -> str:
    """The ``Exit codes: ...`` epilog of a command that can end with *codes* (all of them when none given)."""
    chosen = [_BY_CODE[c] for c in codes] if codes else list(EXIT_CODES)
    return "Exit codes: " + "; ".join(f"{e.code} {e.meaning}" for e in chosen) + "."


EXIT_CODES_HELP = exit_codes_help()


class SiteBackupError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = EXIT_USAGE


class InputError(SiteBackupError):
    """Bad arguments or input: missing source, invalid container name, no storage configured."""

    exit_code = EXIT_USAGE


class DestinationError(SiteBackupError):
    """The blob service cannot be reached, or refuses our credentials."""

    exit_code = EXIT_DESTINATION


class AlreadyRunningError(SiteBackupError):
    """A live process is already running the same backup."""

    exit_code = EXIT_ALREADY_RUNNING

    def __init__(self, message: str, instance_id: str):
        super().__init__(message)
        self.instance_id = instance_id


class LockedError(SiteBackupError):
    """Another process holds the lock of the job in its container: a backup or prune of it is running."""

    exit_code = EXIT_ALREADY_RUNNING


class LockLost(DestinationError):
    """The job lock this process held lapsed and another process took it (the destination was out of reach, or
    this process stalled, for longer than its lease), or it was broken: this one stops changing the container."""


class StateFullError(SiteBackupError):
    """The state directory filled up (or stopped taking writes) during a run; the run is saved (*kept* says
    what a command that is not a run kept)."""

    exit_code = EXIT_STATE_FULL

    def __init__(self, state_dir: object, cause: str, instance_id: str | None = None, kept: str = "the run is saved",
                 hint: str = ""):
        again = f"run the same command again, or: sitebackup resume {instance_id}" if instance_id \
            else "run the same command again"
        super().__init__(f"state directory {state_dir} cannot be written ({cause}); {kept}: "
                         f"free space there{hint}, then {again}")


# SQLite's primary result codes and the errnos that say the disk cannot take writes: full (or over quota),
# read-only, or failing; not a busy lock, a missing file or a bug
_SQLITE_WRITE_FAULTS = {13: "database or disk is full", 10: "disk I/O error", 8: "the database is read-only"}
_OS_WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def full_disk(exc: BaseException) -> str | None:
    """Why the state directory cannot be written when *exc* says it is full (or failing), not read-only: what a
    command meets as it opens the state directory is then ``StateFullError`` (exit 5), as a run that fills it."""
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return None
    reason = write_fault(exc)
    return None if reason == _SQLITE_WRITE_FAULTS[8] else reason


def write_fault(exc: BaseException) -> str | None:
    """Why the state directory cannot be written, when *exc* says so (the cause a ``StateFullError``
    names); None for any other failure.

    The one owner of that decision for every layer that writes there: the embedded backend's SQLite
    store (durable), the work store's pages (blob) and prune's scratch database (commands). It lives
    here, at the bottom of the layers, because blob and commands must both reach it, and because it
    decides which exception a failure becomes, as this module does for exit codes.
    """
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return _SQLITE_WRITE_FAULTS.get(code & 0xFF)
        return next((reason for reason in _SQLITE_WRITE_FAULTS.values() if reason in str(exc)), None)  # Python 3.10
    if isinstance(exc, OSError) and exc.errno in _OS_WRITE_FAULTS:
        return exc.strerror or str(exc)
    return None


class StalledError(AlreadyRunningError):
    """A live process holds the same backup, but the run has made no progress for too long."""

    exit_code = EXIT_STALLED

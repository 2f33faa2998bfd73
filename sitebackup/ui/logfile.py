"""``--log-file``: a printer that tees the start line, messages, failures, skipped files and the summary of a run into
a timestamped log file while another printer draws the terminal output, and the one line of a command that
failed (``log_failure``, written by ``cli.main`` however early the failure came).

The log often lives where other users may create files (a shared log or temp directory) and is
written by root from cron: no directory on its way may be one another user can replace
(``safepath.trusted_directory``), it is opened without following a symlink, must be a regular file with a
single link (a planted hard link or FIFO is refused, never written through or waited on), and is
created owner-only. Every line is escaped (``escape.printable``).
"""

from __future__ import annotations

import errno
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sitebackup.errors import InputError
from sitebackup.model.reports import RunStart
from sitebackup.model.work import Progress, Summary
from sitebackup.ui.escape import printable
from sitebackup.ui.printers import Printer, failure_lines, skipped_lines, start_line, summary_line
from sitebackup.ui.safepath import trusted_directory

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_log(path: Path) -> TextIO:
    """*path* opened for appending, created 0600; InputError naming it when it is not a plain log file."""
    def refuse(reason: str) -> InputError:
        return InputError(f"cannot write log file {str(path)!r}: {reason}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(os.path.join(trusted_directory(path.parent.absolute()), path.name), _FLAGS, 0o600)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse("it is a symlink (not followed)") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise refuse("not a regular file") from None
        raise refuse(exc.strerror or type(exc).__name__) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise refuse("not a regular file with a single link")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def stamped(text: str) -> str:
    """A log line: local time with its offset, then *text*, escaped."""
    return f"{datetime.now().astimezone().isoformat(timespec='seconds')} {printable(text)}\n"


def log_failure(path: Path, command: str, message: str) -> None:
    """Append the one line of a command that failed (before its run started, or stopping it) to the log at *path*:
    time, command and error. A log that cannot be written is left alone: the error is on stderr already."""
    try:
        with open_log(path) as fh:
            fh.write(stamped(f"sitebackup {command}: {message.removeprefix('sitebackup: ')}"))
    except (InputError, OSError):
        pass


class LogPrinter(Printer):
    """Forwards to *inner* and appends timestamped lines to a log file: start, messages, failures, summary."""

    def __init__(self, inner: Printer, path: Path):
        self.inner = inner
        self.fh = open_log(path)

    def _log(self, text: str) -> None:
        self.fh.write(stamped(text))
        self.fh.flush()

    def start(self, info: RunStart) -> None:
        self._log(start_line(info))
        self.inner.start(info)

    def progress(self, status: Progress) -> None:
        self.inner.progress(status)

    def message(self, text: str) -> None:
        self._log(text)
        self.inner.message(text)

    def finish(self, summary: Summary[Any]) -> None:
        for line in [*failure_lines(summary), *skipped_lines(summary), summary_line(summary)]:
            self._log(line)
        self.inner.finish(summary)

    def close(self) -> None:
        self.inner.close()
        self.fh.close()

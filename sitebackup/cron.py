"""What makes a backup fit for cron: option → request wiring, --prefix templates and the --log-file log.

``expand_prefix`` runs once in the CLI process, so every page of one run (and its resume) uses
the same expanded prefix; ``LogPrinter`` tees the start line, failures and the summary of a run
into a timestamped log file while another printer draws the terminal output.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sitebackup import filters, incremental
from sitebackup.errors import InputError
from sitebackup.progress import Printer, failure_lines, summary_line

TEMPLATE_FIELDS = ("date", "time", "hostname")


def expand_prefix(template: str | None, now: datetime | None = None, hostname: str | None = None) -> str:
    """``{date}`` → YYYY-MM-DD, ``{time}`` → HHMMSS (local time), ``{hostname}`` → short host name."""
    if not template or "{" not in template:
        return template or ""
    now = now or datetime.now()
    values = {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S"),
              "hostname": hostname or socket.gethostname().split(".")[0]}
    try:
        return template.format_map(values)
    except (KeyError, ValueError, IndexError) as exc:
        raise InputError(f"invalid --prefix template {template!r}: use {{date}}, {{time}} or {{hostname}} "
                         f"({exc.__class__.__name__}: {exc})") from None


def configure(request: Any, *, checksum: bool = False, force: bool = False, excludes: tuple[str, ...] = (),
              includes: tuple[str, ...] = (), exclude_from: tuple[Path, ...] = (), no_ignore_file: bool = False,
              follow_symlinks: bool = False, no_wait: bool = False) -> Any:
    """The request with the incremental, filter, symlink and one-at-a-time options applied."""
    if checksum and force:
        raise InputError("--checksum and --force exclude each other")
    mode = incremental.MODE_FORCE if force else incremental.MODE_CHECKSUM if checksum else incremental.MODE_MTIME
    try:
        patterns = filters.patterns_for(request.source, excludes=excludes, includes=includes,
                                        exclude_from=exclude_from, use_ignore_file=not no_ignore_file)
    except OSError as exc:
        raise InputError(f"cannot read filter file {exc.filename}: {exc.strerror}") from None
    return dataclasses.replace(request, compare=mode, patterns=patterns, follow_symlinks=follow_symlinks,
                               no_wait=no_wait)


class LogPrinter(Printer):
    """Forwards to *inner* and appends timestamped lines to a log file: start, messages, failures, summary."""

    def __init__(self, inner: Printer, path: Path):
        self.inner = inner
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh: TextIO = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write log file {str(path)!r}: {exc.strerror}") from None

    def _log(self, text: str) -> None:
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        self.fh.write(f"{stamp} {text}\n")
        self.fh.flush()

    def start(self, info: dict[str, Any]) -> None:
        verb = "attached to" if info.get("attached") else "resuming" if info.get("resumed") else "started"
        self._log(f"{verb} {info['instance_id']}: {info['source']} -> {info['destination']}")
        self.inner.start(info)

    def progress(self, status: dict[str, Any]) -> None:
        self.inner.progress(status)

    def message(self, text: str) -> None:
        self._log(text)
        self.inner.message(text)

    def finish(self, summary: dict[str, Any]) -> None:
        for line in failure_lines(summary):
            self._log(line)
        self._log(summary_line(summary))
        self.inner.finish(summary)

    def close(self) -> None:
        self.inner.close()
        self.fh.close()

"""``--log-file``: a printer that tees the start line, messages, failures and the summary of a run into
a timestamped log file while another printer draws the terminal output."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sitebackup.errors import InputError
from sitebackup.ui.printers import Printer, failure_lines, start_line, summary_line


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
        self._log(start_line(info))
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

"""A finished command leaves without the interpreter's teardown (``hosting.end_process``), but never before
what it owes is done: its exit code, its exit handlers (the --log-file flush, the aio session's close), its
buffered output, and any non-daemon thread still running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.processes  # every test here runs a child interpreter

CHILD = """
import atexit, sys, threading, time
from pathlib import Path
from sitebackup.commands.hosting import end_process
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
if sys.argv[2] == "thread":
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("finished")
    threading.Thread(target=late).start()
sys.stdout.write("x" * 1000)  # less than the stream's buffer: still in it when exiting
end_process(int(sys.argv[3]))
"""


# buffered output, as a command's is when nobody set PYTHONUNBUFFERED
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def run(tmp_path: Path, mode: str, code: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), mode, str(code)], text=True, cwd=ROOT,
                          env=ENV, timeout=60, **({"capture_output": True} | kwargs))


def test_the_exit_code_handlers_and_output_survive_the_quick_exit(tmp_path):
    result = run(tmp_path, "plain", 5)
    assert result.returncode == 5, result.stderr
    assert result.stdout == "x" * 1000
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    result = run(tmp_path, "thread", 1)
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_output_that_cannot_be_written_ends_with_the_interpreters_status(tmp_path):
    # a full disk under a redirected summary: the exit says so, as Python's own exit does (status 120)
    with open("/dev/full", "w") as full:
        result = run(tmp_path, "plain", 0, capture_output=False, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 120, result.stderr
    assert (tmp_path / "atexit").read_text() == "ran"

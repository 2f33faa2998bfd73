"""The suite's fork server (tests/zygote.py) stands for ``python -m sitebackup`` only because it gives the same
answers: the same exit code, stdout and stderr as a real exec for the same arguments, environment and directory;
a run past its timeout is killed; a startup variable a fork cannot honour sends the run through a real exec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
from helpers import ROOT, wait_until

pytestmark = pytest.mark.processes


def real(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sitebackup", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", [
    ["--help"], ["restore", "--help"], ["--version"], ["no-such-command"], ["status", "abcd"], ["list", "--json"],
    ["prune", "--keep-last", "0"], ["./missing-source", "--container", "c"],
])
def test_a_forked_run_answers_as_a_real_exec(tmp_path: Path, args: list[str]):
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "HOME": str(tmp_path), "SITEBACKUP_STATE_DIR": "state",
           "COLUMNS": "97", "PYTHONUNBUFFERED": "1"}
    forked = zygote.SERVER.run(args, env, tmp_path, 120)
    assert zygote.SERVER.last_pid not in (0, os.getpid())
    expected = real(args, env, tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == \
        (expected.returncode, expected.stdout, expected.stderr)
    # the relative state directory was taken from the caller's directory, not the server's
    assert not (ROOT / "state").exists()


def test_a_run_past_its_timeout_is_killed(short_tmp: Path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "SITEBACKUP_STATE_DIR": str(short_tmp / "st")}
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.SERVER.run(["serve", "--listen", "127.0.0.1:0"], env, short_tmp, 3)  # serves until stopped
    pid = zygote.SERVER.last_pid
    assert pid

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_until(gone, "the timed-out child to be gone", timeout=30)


def test_a_startup_variable_sends_the_run_through_a_real_exec():
    assert zygote.SERVER.fits(dict(os.environ))
    assert zygote.SERVER.fits({**os.environ, "PYTHONUNBUFFERED": "1", "SITEBACKUP_STATE_DIR": "/x"})
    assert not zygote.SERVER.fits({**os.environ, "PYTHONPATH": "/elsewhere"})
    assert not zygote.SERVER.fits({**os.environ, "LC_ALL": "xx_YY.ISO-8859-1"})

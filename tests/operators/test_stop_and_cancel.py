"""Stopping and cancelling as an operator does it: SIGTERM (systemd, cron's timeout) or Ctrl-C stops a backup paced
by --bwlimit within 10 s, the process gone, and the next run resumes it exactly; a second Ctrl-C stops at once.

The 10 s is a correctness bound (systemd's stop timeout, a user's patience), not a speed figure: measured from the
signal to the process's end, on a run whose transfers at the cap would take several times that to finish.

Real processes, a real Azurite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, assert_exact, env_for, sigint_as_at_a_terminal, write_tree

from sitebackup.errors import EXIT_INTERRUPTED

MIB = 1024 * 1024
STOP_BOUND_SECONDS = 10.0


def paced_tree(root):
    """Every upload path at once: small files (the asyncio uploader), files the SDK sends in chunks, and files in
    block ranges (with --block-size 4): at 3 MiB/s a couple of minutes of transfers."""
    files = {f"small/s{i}.bin": os.urandom(MIB) for i in range(6)}
    files |= {f"mid/m{i}.bin": os.urandom(9 * MIB) for i in range(3)}
    files |= {f"big/b{i}.bin": os.urandom(24 * MIB) for i in range(2)}
    return write_tree(root, files)


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_at_a_terminal)
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "start", first
    for line in proc.stdout:  # transfers in flight: the first file done
        event = json.loads(line)
        if event["event"] == "progress" and event["phase"] == "uploading" and event["bytes_done"] > 0:
            return proc, first["instance_id"]
    raise AssertionError(f"the run ended first: {proc.wait()} {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_under_bwlimit_ends_within_10s_and_the_next_run_resumes_exactly(azurite, tmp_path, container_name,
                                                                                sig):
    src = paced_tree(tmp_path / "site")
    env = env_for(azurite.connection_string, tmp_path / "state")
    args = [str(src), "-c", container_name, "--block-size", "4"]
    proc, run_id = start([*args, "--bwlimit", "3M"], env)
    try:
        stopped_at = time.monotonic()
        proc.send_signal(sig)
        try:
            _out, err = proc.communicate(timeout=STOP_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_SECONDS:.0f}s after {sig.name}")
        gone_after = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert gone_after <= STOP_BOUND_SECONDS
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert f"resume with: sitebackup resume {run_id}" in err, err

    again = subprocess.run([sys.executable, "-m", "sitebackup", *args, "--json"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["instance_id"], summary["runtime_status"]) == (run_id, "COMPLETED"), summary
    assert summary["files_failed"] == 0 and summary["files_total"] == 11
    assert_exact(azurite.connection_string, container_name, src)


# a command whose stop would take long, under the CLI's own signal handling: the second Ctrl-C must not wait for it
SLOW_STOP = """
import sys, threading
from sitebackup import cli
with cli.stoppable():
    try:
        print("running", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)
        threading.Event().wait()
"""


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGTERM)])
def test_a_second_ctrl_c_or_sigterm_during_the_stop_ends_the_process_at_once(first, second):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STOP], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_at_a_terminal)
    try:
        assert proc.stdout.readline() == "running\n"
        proc.send_signal(first)
        assert proc.stdout.readline() == "stopping\n"
        proc.send_signal(second)
        _out, err = proc.communicate(timeout=STOP_BOUND_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err == "sitebackup: stopped at once; the run resumes from what was saved\n"

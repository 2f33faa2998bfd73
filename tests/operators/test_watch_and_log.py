"""Watching and logging a run as an operator does: `status --watch` at a terminal draws the run's own bar and ends
with the run's exit code, a command that fails before its run starts still writes its line to `--log-file`, and a
finished run asked to run again says so instead of "resuming".

Real processes, a real Azurite, a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading

from helpers import ROOT, JsonRun, env_for, run_cli, write_tree

MIB = 1024 * 1024
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run the command with a pseudo-terminal as its stdin, stdout and stderr, as at a terminal; (exit code, all
    it wrote there)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args], env={**env, "TERM": "xterm", "COLUMNS": "160"},
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal's other side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_status_watch_at_a_terminal_draws_the_runs_bar_and_ends_with_its_exit_code(azurite, tmp_path, container_name):
    files = {f"f{i}.bin": os.urandom(MIB // 2) for i in range(8)}
    src = write_tree(tmp_path / "site", files)
    env = env_for(azurite.connection_string, tmp_path / "state")
    run = JsonRun([str(src), "-c", container_name, "--bwlimit", "1M", "--concurrency", "2"], env)
    try:
        start = run.until(lambda e: e["event"] == "start")
        code, screen = run_in_pty(["status", start["instance_id"], "--watch"], env)
        backup_code, summary, err = run.finish()
    finally:
        run.kill()
    assert backup_code == 0, err
    assert code == 0, screen
    assert "━" in screen, screen  # rich's bar, drawn from the custom status
    assert f"/{len(files)} files" in screen and "4.0 MiB" in screen, screen  # the run's own figures
    assert f"{start['instance_id']} COMPLETED: {len(files)}/{len(files)} files uploaded" in screen, screen
    assert summary["runtime_status"] == "COMPLETED"


def test_a_backup_that_fails_before_it_starts_writes_its_line_to_the_log_file(azurite, tmp_path, container_name):
    log = tmp_path / "logs" / "backup.log"
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    no_credentials = env_for(None, tmp_path / "state")
    refused_state = tmp_path / "shared-state"
    refused_state.mkdir(mode=0o777)
    refused_state.chmod(0o777)  # writable by every user: refused
    cases = [
        ([str(src), "-c", container_name], no_credentials, "no storage configured"),
        ([str(tmp_path / "missing"), "-c", container_name], env_for(azurite.connection_string, tmp_path / "state"),
         "does not exist"),
        ([str(src), "-c", container_name], env_for(azurite.connection_string, refused_state), "writable by other"),
    ]
    for number, (args, env, why) in enumerate(cases, start=1):
        result = run_cli([*args, "--log-file", str(log)], env)
        assert result.returncode == 2, result.stderr
        lines = log.read_text().splitlines()
        assert len(lines) == number, lines
        assert re.fullmatch(f"{STAMP} sitebackup backup: error: .*{why}.*", lines[-1]), lines[-1]
        assert lines[-1].endswith(result.stderr.strip().removeprefix("sitebackup: ")), (lines[-1], result.stderr)


def test_resume_of_a_finished_run_says_it_had_finished_not_resuming(azurite, tmp_path, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    env = env_for(azurite.connection_string, tmp_path / "state")
    first = run_cli([str(src), "-c", container_name, "--json"], env)
    run_id = json.loads(first.stdout.splitlines()[0])["instance_id"]
    again = run_cli(["resume", run_id], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"sitebackup: already finished: {run_id}: {src} -> {container_name}"
    assert "resuming" not in again.stdout.lower()
    start = json.loads(run_cli(["resume", run_id, "--json"], env).stdout.splitlines()[0])
    assert start["finished"] is True and start["resumed"] is True


def test_a_skipped_list_cut_short_says_how_many_more_on_stdout_and_in_the_log(azurite, tmp_path, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    for i in range(25):
        os.mkfifo(src / f"pipe{i:02d}")
    log = tmp_path / "backup.log"
    result = run_cli([str(src), "-c", container_name, "--log-file", str(log)],
                     env_for(azurite.connection_string, tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len([line for line in out if line.startswith("skipped ")]) == 20
    assert "... and 5 more skipped" in out
    logged = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert len([line for line in logged if line.startswith("skipped ")]) == 20 and "... and 5 more skipped" in logged

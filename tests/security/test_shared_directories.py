"""--log-file and --metrics-file in directories other local users share: root (as cron runs sitebackup) never
writes through a directory another user can replace, and never waits unbounded on a lock another user can take.

The other user is real: a child process run as uid 65534 (``privileges.as_another_user``), in a directory under
/tmp it can reach, as a shared log or textfile-collector directory is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import write_tree
from privileges import NOBODY, as_another_user
from prometheus_client.parser import text_string_to_metric_families

from sitebackup.ui.metrics import LOCK_WAIT_SECONDS
from sitebackup.ui.safepath import trusted_directory


@pytest.fixture
def shared():
    """A directory other users can reach (0755, as /var/log or a textfile-collector directory), removed after."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="sitebackup-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(*args: str) -> None:
    subprocess.run([*as_another_user(), *args], check=True, timeout=60)


def refused(result, what: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sitebackup: error: {what}"), result.stderr
    return lines[0]


def job_sources(prom: Path) -> set[str]:
    return {s.labels["source"] for family in text_string_to_metric_families(prom.read_text()) for s in family.samples}


def test_a_directory_another_user_can_replace_is_refused_for_log_and_metrics(tmp_path, shared, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    victim = tmp_path / "root-only"  # where the other user would like root to write
    victim.mkdir(mode=0o700)
    public = shared / "public"
    public.mkdir()
    public.chmod(0o777)  # anyone may rename what is in it
    as_nobody("ln", "-s", str(victim), str(public / "logs"))

    log = refused(cli(src, "-c", container_name, "--log-file", public / "logs" / "run.log"), "cannot write log file")
    assert f"{public}/logs can be replaced by another user: {public} is writable by other users (mode 0777)" in log
    metrics = refused(cli(src, "-c", container_name, "--metrics-file", public / "logs" / "m.prom"), "--metrics-file")
    assert f"{public}/logs can be replaced by another user" in metrics
    assert list(victim.iterdir()) == []

    theirs = shared / "theirs"  # a directory of the other user's, holding one that looks like root's own
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    (theirs / "logs").mkdir()
    log = refused(cli(src, "-c", container_name, "--log-file", theirs / "logs" / "run.log"), "cannot write log file")
    assert f"{theirs}/logs can be replaced by another user: {theirs} belongs to uid {NOBODY}" in log

    sticky = shared / "sticky"  # as /tmp: others create files there, but cannot rename root's
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").mkdir()
    ok = cli(src, "-c", container_name, "--log-file", sticky / "mine" / "run.log",
             "--metrics-file", sticky / "mine" / "m.prom")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert "COMPLETED" in (sticky / "mine" / "run.log").read_text()
    assert job_sources(sticky / "mine" / "m.prom") == {str(src)}


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_another_user_holds_never_hangs_a_run_and_the_metrics_are_written(tmp_path, shared, cli,
                                                                                 container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    textfile = shared / "textfile"  # readable by everyone, as node_exporter's collector directory
    textfile.mkdir()
    prom = textfile / "sitebackup.prom"
    holder = subprocess.Popen([*as_another_user(), sys.executable, "-c", HOLD_LOCK, str(textfile)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # the other user holds a lock on the directory
        # bounded: the run must end whatever the other user holds, never hang at exit
        result = cli(src, "-c", container_name, "--metrics-file", prom, timeout=LOCK_WAIT_SECONDS + 120)
    finally:
        holder.communicate("")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert job_sources(prom) == {str(src)}


def test_a_held_or_planted_lock_file_is_waited_for_a_bounded_time_then_the_metrics_written_with_one_warning(
        tmp_path, shared, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    textfile = shared / "textfile"
    textfile.mkdir()
    textfile.chmod(0o1777)
    prom, lock = textfile / "sitebackup.prom", textfile / ".sitebackup.prom.lock"
    assert cli(src, "-c", container_name, "--metrics-file", prom).returncode == 0
    assert lock.stat().st_uid == 0 and lock.stat().st_mode & 0o777 == 0o600  # root's own lock file

    # held by a process that does not let go (root's own here: no other user can open the lock file)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        prom.unlink()
        held = cli(src, "-c", container_name, "--metrics-file", prom, timeout=LOCK_WAIT_SECONDS + 120)
    finally:
        holder.communicate("")
    assert held.returncode == 0, held.stderr
    assert held.stderr.splitlines() == [f"sitebackup: warning: metrics written without their lock: {str(lock)!r} was "
                                        f"held by another process for {LOCK_WAIT_SECONDS:.0f}s"]
    assert job_sources(prom) == {str(src)}

    lock.unlink()  # planted by the other user in the shared directory: never locked, never waited on
    as_nobody("touch", str(lock))
    prom.unlink()
    planted = cli(src, "-c", container_name, "--metrics-file", prom)
    assert planted.returncode == 0, planted.stderr
    assert planted.stderr.splitlines() == [f"sitebackup: warning: metrics written without their lock: {str(lock)!r} "
                                           "is not a file of this user's"]
    assert job_sources(prom) == {str(src)}


def test_the_walk_resolves_symlinks_as_the_kernel_does(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("a/../a/./b")
    (tmp_path / "a" / "abs").symlink_to(tmp_path / "rel")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_bytes(b"")
    for path in (tmp_path / "rel", tmp_path / "a" / "abs", tmp_path / "a" / "abs" / ".." / "b"):
        assert trusted_directory(path) == os.path.realpath(path)
    for path, why in ((tmp_path / "loop", "too many levels of symbolic links"), (tmp_path / "file", "is not a directory"),
                      (tmp_path / "missing", "No such file or directory")):
        with pytest.raises(ValueError, match=why):
            trusted_directory(path)

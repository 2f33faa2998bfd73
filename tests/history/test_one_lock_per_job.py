"""One lock per job, in the container: a backup and a prune of one job never interleave, from any state
directory; a dead holder's lock lapses (its own state directory takes it back at once); `unlock` removes a
lapsed lock and names the holder of a live one. Real CLI processes against a real Azurite; the lock itself
in process against the same Azurite."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from azure.storage.blob import BlobLeaseClient
from helpers import ForwardingProxy, JsonRun, assert_exact, env_for, run_cli, wait_until, write_tree

from sitebackup.blob import lock as joblock
from sitebackup.blob.lock import LOCKS, Claim, Holder, JobLock, locks_for_prefix, prefix_lock
from sitebackup.blob.records import ContainerRecords
from sitebackup.durable.runlock import RunLock
from sitebackup.errors import (
    EXIT_ALREADY_RUNNING,
    EXIT_DESTINATION,
    DestinationError,
    InputError,
    LockedError,
    LockLost,
)
from sitebackup.model.records import Job

HOST = socket.gethostname().split(".")[0]
MIB = 1024 * 1024


def job(name: str, prefix: str = "") -> Job:
    return Job.of(host="web01", source=f"/srv/{name}", prefix=prefix)


# ---- pure ------------------------------------------------------------------------------------------------

def test_the_holder_travels_as_ascii_metadata_and_comes_back_bounded():
    holder = Holder.here("backup", run="20261207T010203-abcdef", claim="t" * 32)
    metadata = holder.metadata()
    assert all(value.isascii() for value in metadata.values())
    assert Holder.from_metadata(metadata) == holder
    assert str(holder).startswith(f"backup (pid {os.getpid()} on {HOST}, since ")
    hostile = Holder.from_metadata({"PID": "12", "host": "h" * 5000, "command": "\x1b[31mprune"})
    assert hostile is not None and hostile.pid == 12 and len(hostile.host) == joblock.MAX_FIELD
    assert Holder.from_metadata({}) is None and Holder.from_metadata({"pid": "twelve"}) is None


def test_a_prune_locks_every_job_its_prefix_overlaps_or_else_the_prefix_itself():
    web, blog, db = job("web", "web"), job("blog", "web/blog"), job("db", "db")
    assert set(locks_for_prefix([web, blog, db], "web")) == {web.id, blog.id}
    assert set(locks_for_prefix([web, blog, db], "web/blog")) == {web.id, blog.id}
    assert set(locks_for_prefix([web, blog, db], "")) == {web.id, blog.id, db.id}
    assert locks_for_prefix([web, db], "logs") == {prefix_lock("logs"): "prefix 'logs'"}
    assert prefix_lock("logs") != prefix_lock("") and "/" not in prefix_lock("a/b")


def test_only_a_lease_azure_grants_may_be_set_for_tests(monkeypatch):
    for value in ("14", "61", "soon"):
        monkeypatch.setenv(joblock.ENV_LEASE_SECONDS, value)
        with pytest.raises(InputError):
            joblock.lease_seconds()
    monkeypatch.setenv(joblock.ENV_LEASE_SECONDS, "15")
    assert joblock.lease_seconds() == 15
    monkeypatch.delenv(joblock.ENV_LEASE_SECONDS)
    assert joblock.lease_seconds() == joblock.LEASE_SECONDS


def test_only_a_shorter_lock_poll_may_be_set_for_tests(monkeypatch):
    for value in ("0", "6", "0.5", "soon"):
        monkeypatch.setenv(joblock.ENV_POLL_SECONDS, value)
        with pytest.raises(InputError, match=joblock.ENV_POLL_SECONDS):
            joblock.poll_seconds()
    monkeypatch.setenv(joblock.ENV_POLL_SECONDS, "1")
    assert joblock.poll_seconds() == 1
    monkeypatch.delenv(joblock.ENV_POLL_SECONDS)
    assert joblock.poll_seconds() == joblock.POLL_SECONDS == 5


def test_each_holding_of_a_run_lock_knows_the_token_of_the_one_before(tmp_path):
    first = RunLock.for_prune(tmp_path, "backups", "web")
    assert first.try_acquire() and first.token and first.previous == ""
    second = RunLock.for_prune(tmp_path, "backups", "web")
    assert not second.try_acquire()  # held: nothing of it is read
    first.release()
    assert second.try_acquire() and second.previous == first.token and second.token not in ("", first.token)
    second.release()


# ---- the lock in process ---------------------------------------------------------------------------------

@pytest.fixture
def container(blob_service, container_name):
    client = blob_service.get_container_client(container_name)
    client.create_container()
    return client


def test_one_holder_at_a_time_the_refused_one_is_told_who_and_the_job_is_described_first(container):
    the_job = job("site")
    mine = JobLock(container, the_job.id, f"job {the_job.name}", "backup", job=the_job)
    theirs = JobLock(container, the_job.id, f"job {the_job.name}", "prune")
    mine.acquire(run="run-1")
    try:
        assert [j.id for j in ContainerRecords(container).jobs()] == [the_job.id]
        assert not theirs.try_acquire()
        assert theirs.other is not None and (theirs.other.command, theirs.other.run) == ("backup", "run-1")
        with pytest.raises(LockedError) as refused:
            theirs.acquire()
        assert refused.value.exit_code == EXIT_ALREADY_RUNNING
        assert f"job web01:/srv/site is locked by backup (pid {os.getpid()} on {HOST}, since " in str(refused.value)
    finally:
        mine.release()
    assert theirs.try_acquire()
    theirs.release()


def test_a_holder_named_later_is_named_once_named_returns_and_a_naming_that_fails_lets_the_lock_go(
        container, monkeypatch):
    blob = container.get_blob_client(LOCKS + "j")
    mine = JobLock(container, "j", "job j", "backup")
    mine.acquire(run="run-1", name_later=True)
    try:
        mine.named()
        holder = Holder.from_metadata(blob.get_blob_properties().metadata)
        assert holder is not None and (holder.command, holder.run, holder.pid) == ("backup", "run-1", os.getpid())
    finally:
        mine.release()

    # the naming held back until the lease is broken under it: the metadata cannot be written without the lease
    going_on = threading.Event()
    name = JobLock._name

    def held_back(self, *args):
        going_on.wait(60)
        name(self, *args)

    monkeypatch.setattr(JobLock, "_name", held_back)
    lock = JobLock(container, "j", "job j", "backup")
    lock.acquire(run="run-2", name_later=True)
    assert lock.held
    BlobLeaseClient(blob).break_lease(lease_break_period=0)
    going_on.set()
    with pytest.raises(DestinationError):
        lock.named()
    assert not lock.held
    holder = Holder.from_metadata(blob.get_blob_properties().metadata)
    assert holder is not None and holder.run == "run-1"  # never named as the holder


def test_lock_wait_asks_again_until_the_holder_lets_go(container, monkeypatch):
    monkeypatch.setattr(joblock, "POLL_SECONDS", 0.05)
    holder, waiter = (JobLock(container, "j", "job j", command) for command in ("backup", "prune"))
    holder.acquire()
    letting_go = threading.Thread(target=lambda: (wait_until(lambda: waiter.other, "the waiter to be refused"),
                                                  holder.release()))
    letting_go.start()
    try:
        waiter.acquire(timedelta(minutes=2))
        assert waiter.held
    finally:
        letting_go.join()
        waiter.release()


def test_a_lease_broken_under_the_holder_is_noticed_and_check_stops_it(container, monkeypatch):
    monkeypatch.setenv(joblock.ENV_LEASE_SECONDS, "15")  # renewed every 5 s
    lock = JobLock(container, "j", "job j", "backup")
    lock.acquire()
    try:
        lock.check()
        BlobLeaseClient(container.get_blob_client(LOCKS + "j")).break_lease(lease_break_period=0)
        wait_until(lock.lost, "the renewal to fail", timeout=60)
        with pytest.raises(LockLost) as lost:
            lock.check()
        assert lost.value.exit_code == EXIT_DESTINATION and "lost the lock of job j" in str(lost.value)
    finally:
        lock.release()


def test_a_lock_held_under_the_run_lock_token_this_process_succeeds_is_taken_at_once(container):
    # a holder that died: its lease lives on, its metadata names its token
    blob = container.get_blob_client(LOCKS + "j")
    blob.upload_blob(b"")
    dead = BlobLeaseClient(blob)
    dead.acquire(lease_duration=60)
    blob.set_blob_metadata(Holder.here("backup", claim="token-of-the-dead").metadata(), lease=dead)

    other = JobLock(container, "j", "job j", "backup")
    assert not other.try_acquire(claim=Claim(token="t2", ended="token-of-someone-else"))
    assert not other.try_acquire(claim=Claim(token="t2"))
    successor = JobLock(container, "j", "job j", "backup")
    assert successor.try_acquire(claim=Claim(token="t3", ended="token-of-the-dead"))
    try:
        assert Holder.from_metadata(blob.get_blob_properties().metadata).claim == "t3"
    finally:
        successor.release()


# ---- real processes --------------------------------------------------------------------------------------

class Gate(ForwardingProxy):
    """Logs (method, path, x-ms-lease-action) of every request; holds the first request ``hold`` matches until
    ``release`` (then forwards it, or with ``drop`` never: its client was killed meanwhile)."""

    def __init__(self, target: str):
        self.log: list[tuple[str, str, str | None]] = []
        self.hold = None
        self.drop = False
        self.held = threading.Event()
        super().__init__(target)

    def intercept(self, request, body):
        with self.lock:
            self.log.append((request.command, request.path, request.headers.get("x-ms-lease-action")))
            stop = self.hold is not None and self.hold(request.command, request.path)
            if stop:
                self.hold = None
        if stop:
            self.held.set()
            self.release.wait(300)
            if self.drop:
                return None
        return body

    def lease_acquires(self) -> int:
        with self.lock:
            return sum(action == "acquire" for _m, _p, action in self.log)


def data_put(method: str, path: str) -> bool:
    """A request that writes a backed-up file's blob (not the container, not .sitebackup/)."""
    name = path.split("?")[0]
    return method == "PUT" and name.count("/") >= 3 and "/.sitebackup/" not in name


POINTS = {
    "early": data_put,  # the run's first write of a file
    # the changed large file's new content, its old content kept as a snapshot just before
    "replacing": lambda method, path: data_put(method, path) and path.split("?")[0].endswith("/big.bin")
    and "comp=snapshot" not in path,
    "sealing": lambda method, path: method == "PUT" and "/.sitebackup/runs/" in path,  # the header, last
}


def tree_of(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def last_json(result) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def gate(azurite):
    proxy = Gate(azurite.endpoint)
    yield proxy
    proxy.close()


def through(gate: Gate, azurite, state: Path, **extra: str) -> dict[str, str]:
    """A child's environment whose every request goes through *gate* (runs are matched to their endpoint)."""
    return env_for(azurite.connection_string.replace(azurite.endpoint, gate.endpoint), state, **extra)


@pytest.mark.parametrize("point", POINTS)
def test_a_prune_while_a_backup_of_the_job_runs_is_refused_or_waits_and_the_runs_restore_exactly(
        tmp_path, azurite, gate, container_name, point):
    env = through(gate, azurite, tmp_path / "state")
    src = write_tree(tmp_path / "site", {**{f"d/f{i:02d}.txt": b"small %d" % i for i in range(30)},
                                         "big.bin": os.urandom(16 * MIB), "gone.txt": b"deleted in run 2"})
    first = run_cli([str(src), "-c", container_name, "--json"], env)
    assert first.returncode == 0, first.stderr
    (src / "big.bin").write_bytes(os.urandom(16 * MIB))
    (src / "gone.txt").unlink()
    (src / "new.txt").write_bytes(b"added in run 2")
    tree2 = tree_of(src)

    gate.hold = POINTS[point]
    backup = JsonRun([str(src), "-c", container_name], env)
    attached = waiting = None
    try:
        second = backup.until(lambda e: e["event"] == "start")["instance_id"]
        assert gate.held.wait(120), f"the backup never reached {point}"
        holder = f"locked by backup (pid {backup.proc.pid} on {HOST}, since "
        for state in ("state", "another-state"):  # this state directory or any other: the container decides
            refused = run_cli(["prune", "-c", container_name, "--keep-last", "1"], dict(
                env, SITEBACKUP_STATE_DIR=str(tmp_path / state)))
            assert refused.returncode == 4, refused.stdout + refused.stderr
            assert holder in refused.stderr and f"run {second})" in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
        if point == "early":  # a second backup of the job from the same state directory shows the run
            attached = JsonRun([str(src), "-c", container_name], env)
            start = attached.until(lambda e: e["event"] == "start")
            assert (start["instance_id"], start["attached"]) == (second, True)
        acquires = gate.lease_acquires()
        waiting = JsonRun(["prune", "-c", container_name, "--keep-last", "1", "--lock-wait", "5m"], env)
        wait_until(lambda: gate.lease_acquires() > acquires, "the waiting prune to be refused once")
        assert waiting.proc.poll() is None
        gate.release.set()
        code, summary, err = backup.finish()
        assert code == 0 and summary["runtime_status"] == "COMPLETED", err
        if attached is not None:
            code, summary, err = attached.finish()
            assert code == 0 and summary["instance_id"] == second, err
        code, report, err = waiting.finish()
        assert code == 0, err
    finally:
        gate.release.set()
        for run in (backup, attached, waiting):
            if run is not None:
                run.kill()
    # the prune read the runs once the backup had finished: the new run is kept, the first one dropped
    assert [kept["instance_id"] for kept in report["kept"]] == [second]
    assert [removed["instance_id"] for removed in report["removed"]] == [last_json(first)["instance_id"]]
    restored = run_cli(["restore", second, str(tmp_path / "restored"), "--json"], env)
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "restored") == tree2


def test_a_killed_holders_lock_lapses_for_others_its_state_directory_takes_it_back_and_unlock_clears_it(
        tmp_path, azurite, gate, container_name):
    lease = {joblock.ENV_LEASE_SECONDS: "15"}
    mine, other = through(gate, azurite, tmp_path / "mine", **lease), through(gate, azurite, tmp_path / "other", **lease)
    src = write_tree(tmp_path / "site", {f"f{i:02d}.txt": b"file %d" % i for i in range(20)})
    gate.hold, gate.drop = data_put, True
    killed = JsonRun([str(src), "-c", container_name], mine)
    try:
        run_id = killed.until(lambda e: e["event"] == "start")["instance_id"]
        assert gate.held.wait(120)
        killed.proc.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
    gate.release.set()
    holder = f"locked by backup (pid {killed.proc.pid} on {HOST}, since "

    live = run_cli(["unlock", "-c", container_name], other)
    assert live.returncode == 4 and holder in live.stderr and "left as it is" in live.stderr, live.stderr
    refused = run_cli([str(src), "-c", container_name], other)
    assert refused.returncode == 4 and holder in refused.stderr, refused.stdout + refused.stderr
    # another state directory waits for the dead holder's lease to lapse
    waited = run_cli([str(src), "-c", container_name, "--lock-wait", "2m", "--json"], other)
    assert waited.returncode == 0, waited.stderr
    assert_exact(azurite.connection_string, container_name, src)

    # the dead holder's own state directory: a backup killed again at once is resumed by `resume` at once
    again = JsonRun([str(src), "-c", container_name], mine)
    try:
        assert again.until(lambda e: e["event"] == "start")["instance_id"] == run_id
        again.proc.send_signal(signal.SIGKILL)
    finally:
        again.kill()
    resumed = run_cli(["resume", run_id, "--json"], mine)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert last_json(resumed)["runtime_status"] == "COMPLETED"

    cleared = run_cli(["unlock", "-c", container_name], mine)
    assert cleared.returncode == 0, cleared.stderr
    assert "removed the lock of job " in cleared.stdout and ": nobody holds it (last held by backup (pid" \
        in cleared.stdout, cleared.stdout
    assert run_cli(["unlock", "-c", container_name], mine).stdout.startswith("no lock to remove")


def test_the_lock_costs_a_backup_a_few_requests(tmp_path, azurite, gate, container_name):
    env = through(gate, azurite, tmp_path / "state")
    src = write_tree(tmp_path / "site", {f"f{i:02d}.txt": b"file %d" % i for i in range(20)})

    def lock_requests(since: int) -> list[tuple[str, str | None]]:
        """(what, lease action) of every request to the lock since log entry *since*, renewals left out."""
        found = []
        for method, path, action in gate.log[since:]:
            if f"/{LOCKS}" in path and action != "renew":
                found.append((path.partition("?")[2].partition("&")[0] or method, action))
        return found

    for expected in ([("comp=lease", "acquire"), ("PUT", None), ("comp=lease", "acquire"),  # created once
                      ("comp=metadata", None), ("comp=lease", "release")],
                     [("comp=lease", "acquire"), ("comp=metadata", None), ("comp=lease", "release")]):
        since = len(gate.log)
        result = run_cli([str(src), "-c", container_name], env)
        assert result.returncode == 0, result.stderr
        assert sorted(lock_requests(since), key=str) == sorted(expected, key=str)

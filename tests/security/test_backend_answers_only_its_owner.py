"""The embedded backend and `serve` answer only to their owner, with real processes: one backend
server per state directory, a token on every TCP call, bounded messages, owner-only state, a
damaged database reported (never recreated), and sockets of killed processes removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
import pytest
from google.protobuf import wrappers_pb2
from helpers import ROOT, wait_until, write_tree

from sitebackup.durable.backend import EmbeddedBackend
from sitebackup.durable.backend.guard import bearer
from sitebackup.durable.backend.store import Store

MIB = 1024 * 1024


def _spawn(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "sitebackup", *args], env=env, cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


class Served:
    """A `sitebackup serve` child on a free loopback port."""

    def __init__(self, state: Path, env: dict[str, str], out: Path):
        self.state, self.out = state, out
        self.proc = _spawn(["serve", "--listen", "127.0.0.1:0", "--state-dir", str(state)], env, out)

        def address():
            assert self.proc.poll() is None, out.read_text()
            lines = [ln for ln in out.read_text().splitlines() if ln.startswith("127.0.0.1:")]
            return lines[0] if lines else None
        self.address = wait_until(address, "serve to listen")

    @property
    def token(self) -> str:
        return (self.state / "serve.token").read_text().strip()

    def hub(self, token_file: bool = True) -> str:
        hub = f"Endpoint=http://{self.address};TaskHub=default;Authentication=None"
        return hub + (f";TokenFile={self.state / 'serve.token'}" if token_file else "")

    def stub(self) -> stubs.TaskHubSidecarServiceStub:
        channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", -1)])
        return stubs.TaskHubSidecarServiceStub(channel)


@pytest.fixture
def serve_process(tmp_path: Path, cli_env: dict[str, str]):
    servers: list[Served] = []

    def start(state: Path | None = None) -> Served:
        servers.append(Served(state or tmp_path / "served-state", cli_env, tmp_path / f"serve{len(servers)}.out"))
        return servers[-1]
    yield start
    for server in servers:
        _stop(server.proc)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr
    assert err.startswith("sitebackup: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _backup(cli, src: Path, container: str, *args) -> dict:
    result = cli(src, "--container", container, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# ---------------------------------------------------------------- one backend server per state directory


def test_serve_and_an_in_process_backend_never_share_a_state_directory(tmp_path, serve_process, cli_env, cli,
                                                                       blob_service, container_name):
    state = tmp_path / "shared-state"
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    served = serve_process(state)

    _one_line_error(cli("list", "--state-dir", state), f"state directory {state} is served by `sitebackup serve`",
                    served.address, "--taskhub")
    _one_line_error(cli(tmp_path / "site", "--container", container_name, "--state-dir", state), "--taskhub")
    container = blob_service.get_container_client(container_name)
    assert not container.exists() or not list(container.list_blobs())  # the pre-flight may create it
    second = cli("serve", "--listen", "127.0.0.1:0", "--state-dir", state, timeout=60)
    _one_line_error(second, f"state directory {state} is in use by another sitebackup process")
    # the supported way in: through the server
    assert cli("list", "--taskhub", served.hub(), "--json").stdout.strip() == "[]"
    assert _stop(served.proc) == 0

    # and the other way round: while an in-process backend works on the directory, serve is refused
    worker = _spawn(["worker", "--state-dir", str(state)], cli_env, tmp_path / "worker.out")
    try:
        wait_until(lambda: "worker started" in (tmp_path / "worker.out").read_text(), "the worker to start")
        _one_line_error(cli("serve", "--listen", "127.0.0.1:0", "--state-dir", state, timeout=60),
                        "is in use by another sitebackup process")
        listed = cli("list", "--state-dir", state)  # in-process backends share a state directory
        assert listed.returncode == 0, listed.stderr
        assert _backup(cli, tmp_path / "site", container_name, "--state-dir", state)["files_uploaded"] == 1
    finally:
        assert _stop(worker) == 0


# ---------------------------------------------------------------- serve requires its token


def test_serve_answers_only_calls_that_carry_its_token(tmp_path, serve_process, cli_env, cli, container_name):
    served = serve_process()
    token_file = served.state / "serve.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(served.token) >= 32
    banner = served.out.read_text()
    assert f"TokenFile={token_file}" in banner and served.token not in banner

    stub = served.stub()
    calls = [
        lambda md: stub.StartInstance(pb.CreateInstanceRequest(instanceId="x", name="BackupSiteContent"), metadata=md),
        lambda md: stub.GetInstance(pb.GetInstanceRequest(instanceId="x"), metadata=md),
        lambda md: stub.QueryInstances(pb.QueryInstancesRequest(query=pb.InstanceQuery()), metadata=md),
        lambda md: stub.PurgeInstances(pb.PurgeInstancesRequest(instanceId="x"), metadata=md),
        lambda md: next(iter(stub.GetWorkItems(pb.GetWorkItemsRequest(), metadata=md))),
    ]
    for metadata in ([], [bearer("not-the-token")], [("authorization", served.token)],
                     [bearer(served.token), bearer("not-the-token")]):
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call(metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, refused.value)
    assert stub.GetInstance(pb.GetInstanceRequest(instanceId="x"), metadata=[bearer(served.token)]).exists is False

    # the CLI without the token: one line, exit 2, for commands and for a worker alike
    no_token = served.hub(token_file=False)
    for args in (["list"], ["status", "some-id"], ["cancel", "some-id"],
                 [str(write_tree(tmp_path / "site", {"a.txt": b"a"})), "-c", container_name, "--no-local-worker"],
                 ["worker"]):
        _one_line_error(cli(*args, "--taskhub", no_token, timeout=60), "the task hub refused this client",
                        "TokenFile=")
    _one_line_error(cli("list", "--taskhub", f"{no_token};TokenFile={tmp_path / 'missing'}"),
                    f"cannot read TokenFile {tmp_path / 'missing'}")

    # with the token, from the file or the environment; nothing was stored by the refused calls
    assert json.loads(cli("list", "--taskhub", served.hub(), "--json").stdout) == []
    with_env = cli("list", "--taskhub", no_token, "--json", env={**cli_env, "SITEBACKUP_SERVE_TOKEN": served.token})
    assert with_env.returncode == 0 and json.loads(with_env.stdout) == [], with_env.stderr


def test_serve_can_take_its_token_from_the_environment(tmp_path, cli_env, cli):
    token = "a-token-the-operator-chose-0123456789"
    env = {**cli_env, "SITEBACKUP_SERVE_TOKEN": token}
    served = Served(tmp_path / "served-state", env, tmp_path / "serve.out")
    try:
        banner = served.out.read_text()
        assert "SITEBACKUP_SERVE_TOKEN" in banner and token not in banner
        assert not (served.state / "serve.token").exists()
        hub = served.hub(token_file=False)
        assert cli("list", "--taskhub", hub, "--json", env=env).returncode == 0
        _one_line_error(cli("list", "--taskhub", hub, env={**cli_env, "SITEBACKUP_SERVE_TOKEN": token + "x"}),
                        "the task hub refused this client")
    finally:
        assert _stop(served.proc) == 0
    weak = cli("serve", "--listen", "127.0.0.1:0", "--state-dir", tmp_path / "weak",
               env={**cli_env, "SITEBACKUP_SERVE_TOKEN": "secret"})
    _one_line_error(weak, "SITEBACKUP_SERVE_TOKEN must be at least 16 characters")


def test_serve_refuses_a_token_file_others_can_read_or_one_without_a_token(tmp_path, cli):
    state = tmp_path / "served-state"
    state.mkdir(mode=0o700)
    token_file = state / "serve.token"
    for mode, text in ((0o644, "a-token-others-could-read-0123456789\n"), (0o600, "\n"), (0o600, "short\n")):
        token_file.write_text(text)
        token_file.chmod(mode)
        refused = cli("serve", "--listen", "127.0.0.1:0", "--state-dir", state, timeout=60)
        _one_line_error(refused, f"token file {token_file} must be a regular file only this user can read")


# ---------------------------------------------------------------- message size


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_request_is_refused_before_anything_is_stored(serve_process, cli):
    served = serve_process()
    stub = served.stub()
    db = served.state / "state.db"
    stored_before = sum(p.stat().st_size for p in served.state.glob("state.db*"))
    peak_before = _peak_rss_kib(served.proc.pid)
    big = pb.CreateInstanceRequest(instanceId="big", name="BackupSiteContent",
                                   input=wrappers_pb2.StringValue(value=json.dumps("x" * (48 * MIB))))
    for metadata in ([bearer(served.token)], []):
        with pytest.raises(grpc.RpcError) as refused:
            stub.StartInstance(big, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _peak_rss_kib(served.proc.pid) - peak_before < 16 * 1024  # the 48 MiB were never held whole
    assert sum(p.stat().st_size for p in served.state.glob("state.db*")) - stored_before < MIB
    assert db.exists() and json.loads(cli("list", "--taskhub", served.hub(), "--json").stdout) == []
    small = stub.StartInstance(pb.CreateInstanceRequest(instanceId="small", name="Other"), metadata=[bearer(served.token)])
    assert small.instanceId == "small"


def _plant(state: Path, instance_id: str, name: str, payload: str) -> None:
    """An instance written straight into the store, as a version without the bound could have stored it."""
    store = Store(state / "state.db")
    try:
        store.create_instance("default", instance_id, name, input=payload)
    finally:
        store.close()


def test_an_instance_too_large_to_return_breaks_no_command_about_the_others(tmp_path, cli, cli_env, blob_service,
                                                                            container_name):
    write_tree(tmp_path / "site", {"a.txt": b"a", "b.txt": b"b"})
    first = _backup(cli, tmp_path / "site", container_name)["instance_id"]
    state = tmp_path / "state"
    padding = "p" * (5 * MIB)
    _plant(state, "too-big", "BackupSiteContent",
           json.dumps({"source": str(tmp_path / "site"), "container": container_name, "pad": padding}))

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["instance_id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {first, "too-big"} and rows["too-big"]["source"] is None
    shown = json.loads(cli("status", "too-big", "--json").stdout)
    assert shown["runtime_status"] == "PENDING" and shown["source"] is None
    assert json.loads(cli("status", first, "--json").stdout)["runtime_status"] == "COMPLETED"
    assert cli("verify", first).returncode == 0

    # another backup runs beside it (a backup hosts its own run alone: it leaves that one as it is)
    again = _backup(cli, tmp_path / "site", container_name, "--force")
    assert again["runtime_status"] == "COMPLETED" and again["files_uploaded"] == 2
    assert json.loads(cli("status", "too-big", "--json").stdout)["runtime_status"] == "PENDING"
    # a worker (which takes any run) is handed work it could not receive: that instance fails, and says why
    worker = subprocess.Popen([sys.executable, "-m", "sitebackup", "worker"], env=cli_env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def ended() -> dict | None:
            info = json.loads(cli("status", "too-big", "--json").stdout)
            return info if info["runtime_status"] != "PENDING" else None
        failed = wait_until(ended, "the worker to end the instance too large to hand over")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker.stderr.read() if worker.stderr else ""
    assert failed["runtime_status"] == "FAILED" and "message bound" in failed["failure"]["message"]
    cancelled = cli("cancel", "too-big")
    assert cancelled.returncode == 0 and "already finished (FAILED)" in cancelled.stdout
    # purge takes the failed instance; the completed backups are left to prune
    purged = cli("purge", "--older-than", "0s")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert "purged 1 " in purged.stdout and "kept 2 completed backup" in purged.stdout, purged.stdout
    assert {r["instance_id"] for r in json.loads(cli("list", "--json").stdout)} == {first, again["instance_id"]}


# ---------------------------------------------------------------- state directory ownership and modes


def _foreign(path: Path) -> None:
    """Make *path* another user's (root may: CI runs as root)."""
    assert os.geteuid() == 0, "planting another user's files needs root, as CI runs the suite"
    os.chown(path, 65534, 65534)


def test_a_state_directory_or_database_another_user_controls_is_refused(tmp_path, cli, container_name):
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    planted = tmp_path / "planted"
    with EmbeddedBackend(planted):  # a real database, with a run in it the planter wants executed
        pass
    _plant(planted, "planted-run", "RestoreSiteContent", json.dumps({"dest": str(tmp_path / "root-only")}))
    before = {p.name: p.read_bytes() for p in planted.iterdir() if p.is_file()}

    planted.chmod(0o777)  # everyone may write it
    for args in (["list"], [tmp_path / "site", "-c", container_name]):
        _one_line_error(cli(*args, "--state-dir", planted), f"state directory {planted} is writable by other users",
                        "mode 0777")
    planted.chmod(0o755)
    _foreign(planted)  # another user's
    _one_line_error(cli("list", "--state-dir", planted), f"state directory {planted} is owned by uid 65534")
    os.chown(planted, os.geteuid(), os.getegid())
    _foreign(planted / "state.db")  # our directory, their database
    _one_line_error(cli("list", "--state-dir", planted), f"state database file {planted / 'state.db'} is owned by uid")
    os.chown(planted / "state.db", os.geteuid(), os.getegid())
    (planted / "state.db").chmod(0o666)
    _one_line_error(cli("list", "--state-dir", planted), "writable by other users")
    assert not (tmp_path / "root-only").exists()
    assert {p.name: p.read_bytes() for p in planted.iterdir() if p.is_file()} == before


def test_database_and_its_wal_and_shm_are_created_owner_only_whatever_the_umask(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # pre-existing and readable by all: used, but nothing in it is
    old = os.umask(0)
    try:
        with EmbeddedBackend(state) as backend:
            backend.store.create_instance("default", "i1", "orch")  # the WAL and SHM exist now
            files = [state / n for n in ("state.db", "state.db-wal", "state.db-shm", "serve.lock")]
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old)
    (state / "state.db").chmod(0o644)  # left readable by an earlier version
    with EmbeddedBackend(state):
        assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600


# ---------------------------------------------------------------- a damaged database


def _root_page(db: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    finally:
        conn.close()


def _damage(db: Path, page: int) -> bytes:
    """4 KiB of garbage over one page, as a bad disk or a stray write would leave."""
    garbage = bytes(range(256)) * 16  # the first byte is never a valid page type
    with open(db, "r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(garbage)
    return garbage


def _still_damaged(db: Path, page: int, garbage: bytes) -> bool:
    with open(db, "rb") as fh:
        fh.seek((page - 1) * 4096)
        return fh.read(4096) == garbage


def test_a_damaged_database_is_a_one_line_error_and_left_as_it_is(tmp_path, cli, serve_process, container_name):
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    run_id = _backup(cli, tmp_path / "site", container_name)["instance_id"]
    state, db = tmp_path / "state", tmp_path / "state" / "state.db"
    pristine = tmp_path / "pristine.db"
    shutil.copy(db, pristine)
    damaged = f"state database {db} is corrupt or not a SQLite database"

    # the runs table: every command meets it
    page = _root_page(db, "instances")
    garbage = _damage(db, page)
    for args in (["list"], ["status", run_id], ["cancel", run_id], ["resume", run_id],
                 [tmp_path / "site", "-c", container_name]):
        _one_line_error(cli(*args), damaged, "left untouched", "--state-dir")
    assert _still_damaged(db, page, garbage)

    # the history: only the worker's RPCs meet it; the backup learns it through the backend
    shutil.copy(pristine, db)
    page = _root_page(db, "history")
    garbage = _damage(db, page)
    _one_line_error(cli(tmp_path / "site", "-c", container_name, "--force"), damaged)
    assert _still_damaged(db, page, garbage)

    # the same through `serve`: its clients get the message, and serve stops with it
    served = serve_process(state)
    _one_line_error(cli(tmp_path / "site", "-c", container_name, "--taskhub", served.hub(), "--force",
                        "--state-dir", tmp_path / "cli-state"), damaged)
    assert served.proc.wait(timeout=60) == 2 and damaged in served.out.read_text()
    assert _still_damaged(db, page, garbage)


def test_an_empty_database_is_reported_not_recreated(tmp_path, cli, container_name):
    write_tree(tmp_path / "site", {"a.txt": b"a"})
    _backup(cli, tmp_path / "site", container_name)
    db = tmp_path / "state" / "state.db"
    records = sorted(p.relative_to(db.parent) for p in (db.parent / "work").rglob("*"))
    assert records
    db.write_bytes(b"")
    for args in (["list"], [tmp_path / "site", "-c", container_name]):
        _one_line_error(cli(*args), f"state database {db} is corrupt", "the file is empty", "--state-dir")
    assert db.stat().st_size == 0
    assert sorted(p.relative_to(db.parent) for p in (db.parent / "work").rglob("*")) == records


def test_a_new_database_is_created_whole(tmp_path):
    """Created complete and then linked into place, so an empty state.db can only be damage."""
    with EmbeddedBackend(tmp_path / "state"):
        pass
    db = tmp_path / "state" / "state.db"
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"instances", "history", "activities"} <= tables
    assert [p.name for p in db.parent.iterdir() if p.name.startswith(".state.db")] == []


# ---------------------------------------------------------------- sockets of killed processes


def _sockets(state: Path) -> set[str]:
    sock_dir = state / "sock"
    return {p.name for p in sock_dir.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)} if sock_dir.exists() else set()


def test_sockets_of_killed_processes_are_removed_and_live_ones_kept(tmp_path, short_tmp, cli_env, cli):
    state = short_tmp / "state"
    cli_env["SITEBACKUP_STATE_DIR"] = str(state)  # `cli` runs with this same environment
    victim = _spawn(["worker", "--state-dir", str(state)], cli_env, tmp_path / "victim.out")
    dead = wait_until(lambda: _sockets(state), "the victim's socket")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert _sockets(state) == dead  # a killed process cannot clean up after itself
    assert cli("list").returncode == 0
    assert _sockets(state) == set()

    survivor = _spawn(["worker", "--state-dir", str(state)], cli_env, tmp_path / "survivor.out")
    try:
        live = wait_until(lambda: _sockets(state), "the survivor's socket")
        assert cli("list").returncode == 0
        assert _sockets(state) == live
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(state / "sock" / live.pop()))
    finally:
        assert _stop(survivor) == 0
    assert _sockets(state) == set()

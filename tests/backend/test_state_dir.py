"""State directory handling: permissions, corrupt or unwritable databases."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from privileges import without_root_powers

from sitebackup.durable.backend import EmbeddedBackend, StateDirError, statedir
from sitebackup.durable.backend.guard import bearer
from sitebackup.durable.backend.store import SCHEMA

ROOT = Path(__file__).resolve().parents[2]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_dir_and_socket_are_private(short_tmp):
    state_dir = short_tmp / "deep" / "state"
    with EmbeddedBackend(state_dir) as backend:
        assert mode(state_dir) == 0o700
        sock = backend._socket_path
        assert sock.parent == state_dir / "sock" and mode(sock) == 0o600
        assert (state_dir / "state.db").exists()
    assert not sock.exists()


def test_corrupt_database_is_reported_and_left_alone(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    garbage = b"this is not a sqlite database\n" * 200
    (state_dir / "state.db").write_bytes(garbage)
    with pytest.raises(StateDirError) as err:
        EmbeddedBackend(state_dir).start()
    message = str(err.value)
    assert "\n" not in message and "--state-dir" in message and "corrupt" in message
    assert (state_dir / "state.db").read_bytes() == garbage


def test_state_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StateDirError) as err:
        EmbeddedBackend(blocker / "state").start()
    assert "\n" not in str(err.value) and "--state-dir" in str(err.value)


def start_unprivileged(state_dir: Path) -> str:
    """Start a backend on *state_dir* in a child process that permissions apply to, return its one-line outcome.

    Root ignores permission bits (and CI runs as root), so the child runs without that power.
    """
    code = ("import sys; from pathlib import Path; from sitebackup.durable.backend import EmbeddedBackend, StateDirError\n"
            "try:\n    EmbeddedBackend(Path(sys.argv[1])).start()\nexcept StateDirError as e:\n"
            "    print('StateDirError:', e); sys.exit(3)\nprint('started')")
    cmd = [*without_root_powers(), sys.executable, "-c", code, str(state_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode in (0, 3), result.stderr
    return result.stdout.strip()


@pytest.mark.processes
def test_read_only_state_dir(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_dir.chmod(0o555)
    outcome = start_unprivileged(state_dir)
    assert outcome.startswith("StateDirError:") and "--state-dir" in outcome, outcome
    assert "\n" not in outcome


@pytest.mark.processes
def test_read_only_database_file(tmp_path):
    state_dir = tmp_path / "state"
    with EmbeddedBackend(state_dir):
        pass
    for p in [state_dir, *state_dir.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    outcome = start_unprivileged(state_dir)
    assert outcome.startswith("StateDirError:") and "--state-dir" in outcome, outcome


def test_tcp_listen_honours_taskhub_header(tmp_path):
    from durabletask import client
    from harness import QUIET

    with EmbeddedBackend(tmp_path / "state") as backend:
        pass
    backend = EmbeddedBackend(tmp_path / "state")
    token = "a-test-token-0123456789"
    address = backend.start(listen="127.0.0.1:0", token=token)
    try:
        hub_a = client.TaskHubGrpcClient(host_address=address, metadata=[("taskhub", "a"), bearer(token)],
                                         logger=QUIET)
        plain = client.TaskHubGrpcClient(host_address=address, metadata=[bearer(token)], logger=QUIET)
        iid = hub_a.schedule_new_orchestration("anything", instance_id="x")
        assert hub_a.get_orchestration_state(iid) is not None
        assert plain.get_orchestration_state(iid) is None
        hub_a.close()
        plain.close()
    finally:
        backend.stop()


def test_a_new_database_gets_its_whole_schema_in_one_transaction(tmp_path, monkeypatch):
    # a transaction per statement cost a journal and its fsyncs apiece: 0.24 s for a new state directory
    # against 0.05 s in one (benchmarks/PROFILE.md, "Fixed costs"); the spy only reads the SQL sqlite runs
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(lambda sql: statements.append(" ".join(
            line.strip() for line in sql.splitlines() if line.strip() and not line.lstrip().startswith("--")).upper()))
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    state_dir = tmp_path / "state"
    statedir.prepare(state_dir)
    db_path = statedir.database(state_dir, SCHEMA)
    monkeypatch.undo()

    creates = [i for i, sql in enumerate(statements) if sql.startswith("CREATE")]
    begins = [i for i, sql in enumerate(statements) if sql.startswith("BEGIN")]
    commits = [i for i, sql in enumerate(statements) if sql.startswith("COMMIT")]
    assert creates and len(creates) == SCHEMA.upper().count("CREATE ")
    assert len(begins) == 1 and len(commits) == 1, statements
    assert begins[0] < creates[0] and creates[-1] < commits[0], statements
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite%'")
        made = {name for (name,) in rows}
    assert len(made) == len(creates)

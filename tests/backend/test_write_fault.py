"""``write_fault``, the one test of "the state directory cannot be written", on real failures: SQLite's
(the embedded store, prune's scratch database) and the OS's (the work store's pages)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sitebackup.errors import write_fault


def _failure(action) -> BaseException:
    with pytest.raises(Exception) as caught:
        action()
    return caught.value


def test_a_full_database_is_a_write_fault(tmp_path: Path):
    db = sqlite3.connect(tmp_path / "full.db")
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 8")  # the database can grow no further: as on a full disk
    exc = _failure(lambda: [db.execute("INSERT INTO t VALUES (zeroblob(4096))") for _ in range(100)])
    assert write_fault(exc) == "database or disk is full", exc


def test_a_read_only_database_is_a_write_fault(tmp_path: Path):
    sqlite3.connect(tmp_path / "ro.db").execute("CREATE TABLE t (x)").connection.close()
    db = sqlite3.connect(f"file:{tmp_path / 'ro.db'}?mode=ro", uri=True)
    exc = _failure(lambda: db.execute("INSERT INTO t VALUES (1)"))
    assert write_fault(exc) == "the database is read-only", exc


def test_a_full_device_is_a_write_fault():
    def write() -> None:
        with open("/dev/full", "wb", buffering=0) as fh:  # every write fails with ENOSPC
            fh.write(b"x")
    exc = _failure(write)
    assert write_fault(exc) == "No space left on device", exc


def test_sqlite_without_error_codes_is_read_by_its_message():
    # Python 3.10's sqlite3 errors carry no sqlite_errorcode: the message decides
    assert write_fault(sqlite3.OperationalError("database or disk is full")) == "database or disk is full"


def test_other_failures_are_not_write_faults(tmp_path: Path):
    sqlite3.connect(tmp_path / "locked.db").execute("CREATE TABLE t (x)").connection.close()
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(tmp_path / "locked.db", timeout=0)
    locked = _failure(lambda: other.execute("INSERT INTO t VALUES (1)"))
    assert "locked" in str(locked) and write_fault(locked) is None  # busy, not unwritable
    missing = _failure(lambda: open(tmp_path / "missing" / "file", "rb"))
    assert isinstance(missing, FileNotFoundError) and write_fault(missing) is None
    assert write_fault(ValueError("a bug")) is None

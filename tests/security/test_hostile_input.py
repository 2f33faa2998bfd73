"""Hostile and odd input: every case ends in one clear line and a documented exit code, or in a
correct backup; never a traceback, never a blob outside the prefix.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from azurite import ACCOUNT, KEY, free_port
from helpers import ROOT, write_tree
from privileges import without_root_powers

from sitebackup.blob.naming import escape_name


def blobs(service: BlobServiceClient, container: str) -> dict[str, bytes]:
    client = service.get_container_client(container)
    if not client.exists():
        return {}
    return {b.name: client.download_blob(b.name).readall() for b in client.list_blobs()
            if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sitebackup: error: "), result.stderr
    return lines[0]


def test_odd_but_valid_names_are_backed_up_exactly_under_the_prefix(cli, tmp_path, blob_service, container_name):
    files = {
        "per%25cent%.txt": b"2", "hash#tag.txt": b"3", "what?.txt": b"4",
        " leading.txt": b"5", "trailing.txt ": b"6", "sp ace/in dir/f.txt": b"7", "ünï/cödé.txt": b"8",
        "a+b&c=d;e.txt": b"9", "quote'\"<>.txt": b"10", "tab\tname.txt": b"11",
    }
    src = write_tree(tmp_path / "site", files)
    result = cli(src, "-c", container_name, "--prefix", "p/q")
    assert result.returncode == 0, result.stdout + result.stderr
    # a control character (the tab) is stored escaped (tests/backup/test_control_character_names.py)
    assert blobs(blob_service, container_name) == {f"p/q/{escape_name(rel)}": data for rel, data in files.items()}
    assert escape_name("tab\tname.txt") == "tab\u201b0009name.txt"


def test_backslash_in_a_name_is_reported_not_turned_into_a_folder(cli, tmp_path, blob_service, container_name):
    # the service reads '\\' as '/': back\\slash.txt would silently become back/slash.txt
    src = write_tree(tmp_path / "site", {"back\\slash.txt": b"1", "ok.txt": b"2"})
    result = cli(src, "-c", container_name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED back\\slash.txt: file name contains '\\', which Azure Blob Storage turns into '/'" in result.stderr
    assert blobs(blob_service, container_name) == {"ok.txt": b"2"}


def test_non_utf8_name_is_reported_and_the_rest_backed_up(cli, tmp_path, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok"})
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name")
    result = cli(src, "-c", container_name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED caf\ufffd.txt: file name is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert blobs(blob_service, container_name) == {"ok.txt": b"ok"}


def test_path_over_1024_characters_is_reported_not_fatal(cli, tmp_path, blob_service, container_name):
    long_rel = "/".join(["d" * 200] * 5) + "/" + "f" * 100 + ".txt"  # 1,109 characters
    assert len(long_rel) > 1024
    src = write_tree(tmp_path / "site", {"short.txt": b"s", long_rel: b"long"})
    result = cli(src, "-c", container_name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAILED {long_rel}: blob name is {len(long_rel)} characters; Azure allows 1024" in result.stderr
    assert blobs(blob_service, container_name) == {"short.txt": b"s"}


def test_very_deep_tree_is_backed_up(cli, tmp_path, blob_service, container_name):
    deep = "/".join(["d"] * 200) + "/bottom.txt"
    src = write_tree(tmp_path / "site", {deep: b"deep", "top.txt": b"top"})
    result = cli(src, "-c", container_name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert blobs(blob_service, container_name) == {deep: b"deep", "top.txt": b"top"}


@pytest.mark.parametrize("prefix", ["..", "a/../b", "../escape", "a/./b", "a//b", "a\\..\\b", "x/..", "/../"])
def test_prefix_that_could_escape_is_refused(cli, tmp_path, blob_service, container_name, prefix):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    line = one_line_error(cli(src, "-c", container_name, "--prefix", prefix), 2)
    assert "invalid prefix" in line
    assert blobs(blob_service, container_name) == {}


@pytest.mark.parametrize("name", ["UPPER", "ab", "has_underscore", "-leading", "trailing-", "double--hyphen",
                                  "a" * 64, "dot.name", "../etc", ""])
def test_invalid_container_name_is_refused(cli, tmp_path, name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    line = one_line_error(cli(src, "-c", name), 2)
    assert "invalid container name" in line


def test_source_that_is_not_a_directory_is_refused(cli, tmp_path, container_name):
    plain = tmp_path / "file.txt"
    plain.write_bytes(b"x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "null-device"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # CI runs as root: a real device node
    for source in (plain, fifo, device, Path("/dev/null")):
        line = one_line_error(cli(source, "-c", container_name), 2)
        assert f"source '{source}' is not a directory" in line
    line = one_line_error(cli(tmp_path / "missing", "-c", container_name), 2)
    assert "does not exist" in line


def test_fifo_socket_and_device_in_the_tree_are_skipped(cli, tmp_path, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok"})
    os.mkfifo(src / "pipe")
    os.mknod(src / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    try:
        result = cli(src, "-c", container_name)  # reading the FIFO would hang: it must not be opened
    finally:
        sock.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped pipe: FIFO" in result.stdout or "pipe (FIFO)" in result.stdout, result.stdout
    assert blobs(blob_service, container_name) == {"ok.txt": b"ok"}


def test_empty_directory_is_a_successful_empty_backup(cli, tmp_path, blob_service, container_name):
    src = tmp_path / "empty"
    src.mkdir()
    result = cli(src, "-c", container_name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED: 0/0 files uploaded" in result.stdout
    assert blobs(blob_service, container_name) == {}


def test_wrong_key_is_exit_3_authentication_failed(cli, cli_env, azurite, tmp_path, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    wrong = azurite.connection_string.replace(KEY, "A" * 86 + "==")
    line = one_line_error(cli(src, "-c", container_name, env=dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=wrong)), 3)
    assert f"authentication failed at {azurite.endpoint}" in line
    assert "A" * 20 not in line


def test_a_refused_pre_flight_schedules_nothing_and_the_next_run_starts_fresh(cli, cli_env, azurite, tmp_path,
                                                                              blob_service, container_name):
    """A destination that refuses the credentials is found before anything is scheduled: no run is left
    to resume, and the next run (with the right key) starts afresh."""
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    wrong = azurite.connection_string.replace(KEY, "A" * 86 + "==")
    one_line_error(cli(src, "-c", container_name, env=dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=wrong)), 3)
    assert json.loads(cli("list", "--json").stdout) == []
    result = cli(src, "-c", container_name, "--no-wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" not in (result.stdout + result.stderr).lower()
    assert blobs(blob_service, container_name) == {"a.txt": b"a"}


def test_unreachable_host_is_exit_3_quickly(cli, cli_env, tmp_path, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    port = free_port()  # nothing listens there
    conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    # the subprocess timeout turns "minutes of retries" into a failure
    result = cli(src, "-c", container_name, env=dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=conn), timeout=30)
    line = one_line_error(result, 3)
    assert f"cannot reach the blob service at http://127.0.0.1:{port}/{ACCOUNT}" in line


@pytest.mark.parametrize("conn", ["not a connection string", "AccountName=x;AccountKey=", "DefaultEndpointsProtocol=http",
                                  "AccountName=devstoreaccount1;AccountKey=not-base64!!;BlobEndpoint=http://127.0.0.1:1/x"])
def test_malformed_connection_string_is_exit_2(cli, cli_env, tmp_path, container_name, conn):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    line = one_line_error(cli(src, "-c", container_name, env=dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=conn)), 2)
    assert "malformed" in line
    assert "not-base64" not in line


def test_corrupted_state_database_is_a_clear_error_and_left_untouched(cli, state_dir, tmp_path, blob_service,
                                                                     container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    assert cli(src, "-c", container_name).returncode == 0
    db = state_dir / "state.db"
    for extra in ("state.db-wal", "state.db-shm"):
        (state_dir / extra).unlink(missing_ok=True)
    garbage = b"this is not a database" * 1000
    db.write_bytes(garbage)
    for args in ([src, "-c", container_name], ["list"], ["status", "x"], ["resume", "x"]):
        line = one_line_error(cli(*args), 2)
        assert "corrupt or not a SQLite database" in line and "--state-dir" in line
    assert db.read_bytes() == garbage  # never silently started over
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db).execute("SELECT 1 FROM sqlite_master").fetchall()


def test_source_without_read_permission_is_reported(cli_env, tmp_path, blob_service, container_name):
    # unreadable directories inside the tree: tests/backup/test_incremental_runs.py; here the source itself
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    src.chmod(0o000)
    try:
        result = subprocess.run([*without_root_powers(), sys.executable, "-m", "sitebackup", str(src), "-c",
                                 container_name], env=cli_env, capture_output=True, text=True, timeout=120, cwd=ROOT,
                                check=False)
    finally:
        src.chmod(0o755)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"'{src}' is not readable" in result.stderr and "Traceback" not in result.stderr
    assert blobs(blob_service, container_name) == {}

"""What sitebackup prints and logs is safe whatever the names and arguments: control characters and
Rich markup in file names are escaped in every printer (plain, rich on a real pty, log file, status,
list, dry run, verify), the log file is never opened through a symlink, and secrets given on the
command line are warned about and never echoed by a usage error.
"""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from azurite import KEY
from helpers import ROOT, write_tree

from sitebackup.blob.naming import blob_name
from sitebackup.ui.escape import printable

HOSTILE = "lnk\x1b]0;X\x07\nFAILED other.txt: injected"
ESCAPED = r"lnk\x1b]0;X\x07\nFAILED other.txt: injected"
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def hostile_tree(root: Path) -> Path:
    """A site with a FIFO (skipped) and a file whose '\\' fails it, both named to fake a FAILED line."""
    src = write_tree(root, {"ok.txt": b"ok", "bad\\" + HOSTILE: b"fails: backslash"})
    os.mkfifo(src / HOSTILE)
    return src


def assert_no_fake_line(*texts: str) -> None:
    for text in texts:
        assert not RAW_CONTROL.search(text), repr(text)
        assert not any(line.lstrip().startswith("FAILED other.txt") for line in text.splitlines()), text


def test_plain_output_and_log_file_escape_names(tmp_path, cli, container_name):
    src = hostile_tree(tmp_path / "site")
    log = tmp_path / "run.log"
    result = cli(src, "-c", container_name, "--log-file", log)
    assert result.returncode == 1, result.stderr
    logged = log.read_text()
    assert_no_fake_line(result.stdout, result.stderr, logged)
    assert f"skipped {ESCAPED}: " in result.stdout
    assert f"FAILED bad\\{ESCAPED}: file name contains" in result.stderr
    assert f"FAILED bad\\{ESCAPED}: file name contains" in logged


def test_status_list_dry_run_and_verify_escape_names(tmp_path, cli, cli_env, blob_service, container_name):
    src = hostile_tree(tmp_path / "site[/]\x1b[31m")
    (src / f"{HOSTILE}.txt").write_bytes(b"uploaded")
    result = cli(src, "-c", container_name, "--json")
    assert result.returncode == 1, result.stderr
    run_id = json.loads(result.stdout.splitlines()[-1])["instance_id"]

    status = cli("status", run_id)
    runs = cli("list", env={**cli_env, "COLUMNS": "500"})  # no wrapped cells
    dry = cli(src, "-c", container_name, "--dry-run", "--force")
    blob_service.get_container_client(container_name).delete_blob(blob_name("", f"{HOSTILE}.txt"))
    verify = cli("verify", run_id)
    assert (status.returncode, runs.returncode, verify.returncode) == (0, 0, 1), \
        status.stderr + runs.stderr + verify.stderr
    assert dry.returncode in (0, 1) and "Traceback" not in dry.stderr, dry.stderr
    outputs = [status.stdout, runs.stdout, runs.stderr, dry.stdout, dry.stderr, verify.stdout, verify.stderr]
    assert_no_fake_line(*outputs)
    assert f"FAILED bad\\{ESCAPED}" in status.stdout
    assert r"site[/]\x1b[31m" in status.stdout
    assert r"site[/]\x1b[31m" in runs.stdout
    assert f"would upload {ESCAPED}.txt" in dry.stdout
    assert f"MISMATCH {ESCAPED}.txt: blob missing" in verify.stderr


def run_on_a_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr: the rich printer draws for real."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**env, "TERM": "xterm-256color", "COLUMNS": "200"}, cwd=ROOT)
    os.close(slave)
    try:
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_rich_bar_on_a_tty_takes_markup_and_control_characters_in_names_as_text(tmp_path, cli, cli_env,
                                                                                  container_name):
    src = write_tree(tmp_path / "site[/]x", {"a[/]b.txt": b"brackets", "[bold]c[/bold].txt": b"markup"})
    os.mkfifo(src / HOSTILE)  # skipped, by name
    code, out = run_on_a_pty([str(src), "-c", container_name], cli_env)
    assert code == 0, out
    assert "Traceback" not in out and "MarkupError" not in out
    assert "site[/]x" in out and ESCAPED in out
    assert "\x1b]0;X\x07" not in out  # the name's own escape sequence never reaches the terminal
    assert "2/2 files uploaded" in out
    listed = json.loads(cli("list", "--json").stdout)
    assert [run["runtime_status"] for run in listed] == ["COMPLETED"]


def test_log_file_symlink_is_refused_and_its_target_untouched(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    target = tmp_path / "root-only"
    target.write_text("precious\n")
    target.chmod(0o600)
    log = tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    log.symlink_to(target)
    result = cli(src, "-c", container_name, "--log-file", log)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"sitebackup: error: cannot write log file {str(log)!r}: it is a symlink (not followed)"]
    assert target.read_text() == "precious\n"


def test_log_file_hard_link_and_fifo_are_refused(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    target = tmp_path / "root-only"
    target.write_text("precious\n")
    os.link(target, tmp_path / "linked.log")
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("linked.log", "fifo.log"):
        result = cli(src, "-c", container_name, "--log-file", tmp_path / name, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "not a regular file" in result.stderr
    assert target.read_text() == "precious\n"


def test_new_log_file_is_owner_only_and_an_existing_one_keeps_its_mode(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    log = tmp_path / "new" / "run.log"
    assert cli(src, "-c", container_name, "--log-file", log).returncode == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    log.chmod(0o640)
    assert cli(src, "-c", container_name, "--log-file", log).returncode == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert len(log.read_text().splitlines()) == 4  # two runs: start and summary lines each


CONN = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={KEY};BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;")


@pytest.mark.parametrize("args", [
    ["backup", "SRC", "-c", "x", CONN],
    ["backup", "SRC", "-c", "backups", "--concurrency", CONN],
    ["status", "20261127T225602-0dcb81", CONN],
    ["verify", "20261127T225602-0dcb81", CONN],
])
def test_usage_errors_never_echo_a_key(tmp_path, cli, args):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    args = [str(src) if a == "SRC" else a for a in args]
    for extra in ([], ["--json"]):
        result = cli(*args, *extra)
        assert result.returncode == 2, result.stderr
        assert KEY not in result.stdout + result.stderr
        assert KEY[:16] not in result.stdout + result.stderr
        assert "AccountKey=***" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_key_or_sas_on_the_command_line_is_warned_about_without_showing_it(tmp_path, cli, cli_env):
    missing = str(tmp_path / "missing")
    sas_url = "https://acct.blob.core.windows.net/?sv=2022-11-02&ss=b&sig=c2VjcmV0c2lnbmF0dXJlLXZhbHVl"
    for option, value, env in (("--connection-string", CONN, "AZURE_STORAGE_CONNECTION_STRING"),
                               ("--account-url", sas_url, "AZURE_STORAGE_ACCOUNT_URL")):
        result = cli(missing, "-c", "backups", option, value)
        assert result.returncode == 2  # the source is missing: the warning came first
        warning, error = result.stderr.strip().splitlines()
        assert warning.startswith(f"sitebackup: warning: the secret in {option} is visible to every local user")
        assert env in warning and "does not exist" in error
        assert KEY not in result.stderr and "c2VjcmV0c2lnbmF0dXJl" not in result.stderr
    # from the environment, or without a secret, nothing to warn about
    for args in ([], ["--connection-string", "UseDevelopmentStorage=true"],
                 ["--account-url", "https://acct.blob.core.windows.net"]):
        result = cli(missing, "-c", "backups", *args)
        assert result.returncode == 2 and "warning" not in result.stderr, result.stderr
    assert "AccountKey" in cli_env["AZURE_STORAGE_CONNECTION_STRING"]


def test_printable_escapes_controls_and_keeps_text():
    assert printable("ünï/文件 [/] a b.txt") == "ünï/文件 [/] a b.txt"
    assert printable(HOSTILE) == ESCAPED
    assert printable("tab\there\r\x7f\x9b\u202e\u2028\udce9") == r"tab\there\r\x7f\x9b\u202e\u2028\udce9"
    assert printable(printable(HOSTILE)) == ESCAPED

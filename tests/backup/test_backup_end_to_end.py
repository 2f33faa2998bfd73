"""End-to-end backups through the real CLI, the embedded durable backend and a real Azurite."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from helpers import write_tree

from sitebackup.blob.clients import StorageSettings
from sitebackup.commands import backup, hosting
from sitebackup.model.codec import to_wire
from sitebackup.model.work import summary_to_wire
from sitebackup.ui.printers import Printer

ODD_TREE = {
    "index.html": b"<html>home</html>",
    "css/site.css": b"body { color: red }",
    "deep/a/b/c/d/e.txt": b"deep" * 1000,
    "empty.txt": b"",
    "with space/file name.txt": b"spaces",
    "unicode/ünïcødé-文件.txt": "ünïcødé".encode(),
    "special/a#b%c?d+e.txt": b"special characters",
    "bin/random.bin": os.urandom(300_000),
}


def blobs_of(blob_service, container: str) -> dict[str, bytes]:
    cc = blob_service.get_container_client(container)
    return {b.name: cc.download_blob(b.name).readall() for b in cc.list_blobs()
            if not b.name.startswith(".sitebackup/")}  # the run records sealed beside the files


def test_every_file_becomes_a_blob_with_bytes_md5_and_type(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", ODD_TREE)
    result = cli(src, "--container", container_name)
    assert result.returncode == 0, result.stderr
    assert blobs_of(blob_service, container_name) == ODD_TREE
    cc = blob_service.get_container_client(container_name)
    for name, data in ODD_TREE.items():
        props = cc.get_blob_client(name).get_blob_properties()
        assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest(), name
    assert cc.get_blob_client("css/site.css").get_blob_properties().content_settings.content_type == "text/css"
    assert cc.get_blob_client("index.html").get_blob_properties().content_settings.content_type == "text/html"


def test_prefix_and_explicit_backup_subcommand(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"css/site.css": b"x", "a.txt": b"a"})
    result = cli("backup", src, "--container", container_name, "--prefix", "/nightly/web/")
    assert result.returncode == 0, result.stderr
    assert sorted(blobs_of(blob_service, container_name)) == ["nightly/web/a.txt", "nightly/web/css/site.css"]


def test_json_output_start_event_and_summary_totals(tmp_path, cli, container_name):
    files = {f"d{i % 7}/f{i}.bin": os.urandom(i * 37) for i in range(120)}
    src = write_tree(tmp_path / "site", files)
    result = cli(src, "--container", container_name, "--json", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["instance_id"]
    summary = events[-1]
    assert summary["event"] == "summary"
    for key in ("instance_id", "runtime_status", "files_total", "files_uploaded", "files_skipped", "files_failed",
                "bytes_total", "bytes_uploaded", "duration_s"):
        assert key in summary
    assert summary["instance_id"] == events[0]["instance_id"]
    assert summary["runtime_status"] == "COMPLETED"
    assert summary["files_total"] == summary["files_uploaded"] == 120
    assert summary["bytes_total"] == summary["bytes_uploaded"] == sum(len(v) for v in files.values())
    assert summary["files_failed"] == 0


def test_plain_output_when_not_a_tty(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "b.txt": b"bb"})
    result = cli(src, "--container", container_name)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sitebackup: started ")
    assert "2/2 files uploaded" in lines[-1]
    assert "\x1b" not in result.stdout + result.stderr
    assert result.stderr == ""  # no SDK log lines leak into the user's terminal


class Recorder(Printer):
    def __init__(self):
        self.statuses: list[dict] = []
        self.summary: dict | None = None

    def progress(self, status):
        self.statuses.append(to_wire(status))

    def finish(self, summary):
        self.summary = summary_to_wire(summary)


def test_custom_status_moves_during_the_run(tmp_path, azurite, state_dir, container_name, monkeypatch):
    # the watcher samples the status by polling: sampled often, a run of a second or two shows how it moves on any
    # machine (at the default half second a fast run can fall between two samples)
    monkeypatch.setattr(hosting, "POLL_SECONDS", 0.05)
    files = {f"f{i:04d}.bin": os.urandom(2048) for i in range(1200)}
    src = write_tree(tmp_path / "site", files)
    request = backup.build_request(src, container_name, "", state_dir=state_dir, concurrency=2)
    settings = StorageSettings(connection_string=azurite.connection_string)
    recorder = Recorder()
    summary = backup.run_backup(request, settings, recorder)
    assert summary.counts.files_uploaded == 1200
    done = sorted({s["files_done"] for s in recorder.statuses if s.get("phase") == "uploading"})
    # the window publishes after each batch: several intermediate values, not just 0 and the total
    assert len([d for d in done if 0 < d < 1200]) >= 3, done
    assert recorder.statuses[-1]["files_done"] == 1200


def test_failed_file_is_reported_and_the_rest_complete(tmp_path, cli, blob_service, container_name):
    # a path over Azure's 1,024-character name limit fails on its own, whoever runs the test
    long_rel = "/".join(["d" * 200] * 6) + "/too-long.txt"
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok", long_rel: b"no"})
    result = cli(src, "--container", container_name)
    assert result.returncode == 1
    assert "too-long.txt" in result.stderr and "1024" in result.stderr
    assert "1/2 files uploaded" in result.stdout
    assert set(blobs_of(blob_service, container_name)) == {"ok.txt"}


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "--container", "okname"], "does not exist"),
    (["{tmp}/file.txt", "--container", "okname"], "is not a directory"),
    (["{tmp}", "--container", "Bad_Name"], "invalid container name"),
    (["{tmp}", "--container", "ab"], "invalid container name"),
    (["{tmp}", "--container", "a--b"], "invalid container name"),
    (["{tmp}", "--container", "okname", "--prefix", "a/../b"], "invalid prefix"),
])
def test_input_errors_exit_2_with_one_line(tmp_path, cli, args, message):
    (tmp_path / "file.txt").write_text("x")
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["/nonexistent", "-c", "abc"], 2, "source '/nonexistent' does not exist"),
    (["status", "no-such-run"], 2, "no run with id 'no-such-run'"),
    (["backup", "--container", "abc"], 2, "Missing argument"),  # a click usage error
])
def test_with_json_a_failing_command_prints_one_json_error_object(cli, args, code, message):
    result = cli(*args, "--json")
    assert result.returncode == code
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    event = json.loads(lines[0])
    assert event["event"] == "error" and event["exit_code"] == code and message in event["message"]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_no_storage_configured_exits_2_naming_the_options(tmp_path, cli, cli_env):
    env = {k: v for k, v in cli_env.items() if not k.startswith("AZURE_")}
    result = cli(tmp_path, "--container", "okname", env=env)
    assert result.returncode == 2
    assert "--connection-string" in result.stderr and "--account-url" in result.stderr
    assert "UseDevelopmentStorage=true" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoint_exits_3_quickly(tmp_path, cli, cli_env):
    from azurite import ACCOUNT, KEY, free_port
    port = free_port()  # nothing listens here
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=(
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"))
    result = cli(tmp_path, "--container", "okname", env=env, timeout=60)
    assert result.returncode == 3
    assert f"127.0.0.1:{port}" in result.stderr
    assert KEY not in result.stderr and "Traceback" not in result.stderr


def test_help_lists_commands_and_exit_codes(cli):
    result = cli("--help")
    assert result.returncode == 0
    assert "backup" in result.stdout
    assert "Exit codes" in result.stdout

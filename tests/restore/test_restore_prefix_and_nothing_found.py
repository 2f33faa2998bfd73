"""A restore's --prefix takes the backup's {hostname} template, refuses {date} and {time} (pointing to --as-of), and
a restore that finds nothing to restore is an error naming where it looked, never "0 files" and exit 0."""

from __future__ import annotations

import json
import socket

import pytest
from helpers import write_tree

TREE = {"index.html": b"home", "css/site.css": b"body {}"}


def restored(dest) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sitebackup: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_restore_prefix_expands_hostname_as_the_backup_did(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", TREE)
    backup = cli(src, "-c", container_name, "--prefix", "web/{hostname}")
    assert backup.returncode == 0, backup.stderr
    dest = tmp_path / "out"
    result = cli("restore", "--container", container_name, "--prefix", "web/{hostname}", dest, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert restored(dest) == TREE
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["source"] == f"{container_name}/web/{socket.gethostname().split('.')[0]}"


@pytest.mark.parametrize("template", ["web/{date}", "{time}/web", "web/{hostname}/{date}"])
def test_date_and_time_in_a_restore_prefix_point_to_as_of(tmp_path, cli, container_name, template):
    line = one_error_line(cli("restore", "--container", container_name, "--prefix", template, tmp_path / "out"))
    assert "{date} and {time} are not expanded on restore" in line and "--as-of TIME" in line
    assert not (tmp_path / "out").exists()


def test_a_restore_that_finds_nothing_names_container_and_prefix(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", TREE)
    backup = cli(src, "-c", container_name, "--prefix", "web", "--json")
    assert backup.returncode == 0, backup.stderr
    run_id = json.loads(backup.stdout.splitlines()[-1])["instance_id"]

    wrong = one_error_line(cli("restore", "--container", container_name, "--prefix", "wbe", tmp_path / "a"))
    assert wrong.startswith(f"sitebackup: error: nothing to restore: container {container_name!r}, prefix 'wbe' "
                            "holds no file;"), wrong

    empty = container_name + "-empty"  # another container (a name changed in its last letter could be the same)
    blob_service.create_container(empty)
    nothing = one_error_line(cli("restore", "--container", empty, tmp_path / "b", "--json"))
    assert f"nothing to restore: container {empty!r} holds no file;" in nothing

    filtered = one_error_line(cli("restore", run_id, tmp_path / "c", "--include", "*.png"))
    assert f"nothing to restore: run {run_id} (container {container_name!r}, prefix 'web') recorded no file that " \
           "--include/--exclude select" in filtered

    found = cli("restore", "--container", container_name, "--prefix", "web", tmp_path / "d")
    assert found.returncode == 0 and restored(tmp_path / "d") == TREE, found.stderr

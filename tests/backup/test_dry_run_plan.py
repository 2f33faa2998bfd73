"""What `backup --dry-run` tells: the files the next run would upload, new or changed, and those deleted since the
last run, with counts; the unchanged ones only with -v (--json has every file). Real processes, a real Azurite."""

from __future__ import annotations

import json
import os
import shutil

from helpers import write_tree


def test_a_dry_run_lists_new_changed_and_deleted_files_with_counts_and_unchanged_only_with_v(tmp_path, cli,
                                                                                             container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "b.txt": b"b", "c.txt": b"cc", "d/e.txt": b"e",
                                         "d/f.txt": b"ff"})
    assert cli(src, "-c", container_name).returncode == 0
    (src / "b.txt").write_bytes(b"bigger")
    (src / "n.txt").write_bytes(b"new")
    (src / "c.txt").unlink()
    (src / "d" / "f.txt").unlink()

    dry = cli(src, "-c", container_name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would upload b.txt (6 B, changed)",
        "deleted c.txt (2 B; left out of the next run's record, kept for earlier runs)",
        "would upload n.txt (3 B, new)",
        "deleted d/f.txt (2 B; left out of the next run's record, kept for earlier runs)",
        "dry run: 2 files would be uploaded (9 B: 1 new, 1 changed), 2 deleted since the last run (4 B), "
        "2 unchanged (2 B), 0 skipped, 0 failed",
    ]

    verbose = cli(src, "-c", container_name, "--dry-run", "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert [line for line in verbose.stdout.splitlines() if line.startswith("unchanged")] == [
        "unchanged a.txt (1 B)", "unchanged d/e.txt (1 B)"]
    assert len(verbose.stdout.splitlines()) == len(dry.stdout.splitlines()) + 2

    events = [json.loads(line) for line in cli(src, "-c", container_name, "--dry-run", "--json").stdout.splitlines()]
    assert [(e["action"], e["path"], e.get("changed", False)) for e in events if e["event"] == "dry_run"] == [
        ("unchanged", "a.txt", False), ("upload", "b.txt", True), ("delete", "c.txt", False),
        ("upload", "n.txt", False), ("unchanged", "d/e.txt", False), ("delete", "d/f.txt", False)]
    totals = events[-1]
    assert (totals["files_to_upload"], totals["files_changed"], totals["files_deleted"], totals["bytes_deleted"],
            totals["files_unchanged"]) == (2, 1, 2, 4, 2)

    assert cli(src, "-c", container_name, "-v").returncode == 2  # nothing to list without --dry-run


def test_directories_and_symlinks_gone_are_deleted_too_counted_apart_and_a_mode_change_would_be_recorded(
        tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a", "old/f.txt": b"f", "x": b"x"})
    (src / "empty").mkdir()
    (src / "link").symlink_to("a.txt")
    os.chmod(src / "a.txt", 0o644)
    assert cli(src, "-c", container_name).returncode == 0
    os.chmod(src / "a.txt", 0o600)
    (src / "empty").rmdir()
    (src / "link").unlink()
    shutil.rmtree(src / "old")
    (src / "x").unlink()
    write_tree(src, {"x/in.txt": b"in"})  # a directory where a file was: the file is gone, the directory new

    dry = cli(src, "-c", container_name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    kept = "left out of the next run's record, kept for earlier runs"
    assert dry.stdout.splitlines() == [
        "would record a.txt (mode 0644 -> 0600)",
        f"deleted empty (directory; {kept})",
        f"deleted link (symlink; {kept})",
        f"deleted old (directory; {kept})",
        f"deleted x (1 B; {kept})",
        f"deleted old/f.txt (1 B; {kept})",
        "would upload x/in.txt (2 B, new)",
        "dry run: 1 files would be uploaded (2 B: 1 new, 0 changed), 2 deleted since the last run (2 B), "
        "2 directories and 1 symlinks deleted, 1 unchanged (1 B), 1 with metadata changes only, 0 skipped, 0 failed",
    ]

    events = [json.loads(line) for line in cli(src, "-c", container_name, "--dry-run", "--json").stdout.splitlines()]
    assert [(e["action"], e["path"], e.get("kind", "file"), e.get("size")) for e in events
            if e["event"] == "dry_run" and e["action"] == "delete"] == [
        ("delete", "empty", "dir", None), ("delete", "link", "symlink", None), ("delete", "old", "dir", None),
        ("delete", "x", "file", 1), ("delete", "old/f.txt", "file", 1)]
    totals = events[-1]
    assert (totals["files_deleted"], totals["bytes_deleted"], totals["dirs_deleted"], totals["symlinks_deleted"],
            totals["metadata_changed"]) == (2, 2, 2, 1, 1)

    # the run the dry run described records none of them
    assert cli(src, "-c", container_name).returncode == 0
    after = cli(src, "-c", container_name, "--dry-run")
    assert after.stdout.splitlines()[-1] == (
        "dry run: 0 files would be uploaded (0 B: 0 new, 0 changed), 0 deleted since the last run (0 B), "
        "2 unchanged (3 B), 0 skipped, 0 failed")

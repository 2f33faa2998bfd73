"""What `backup --dry-run` tells: the files the next run would upload, new or changed, and those deleted since the
last run, with counts; the unchanged ones only with -v (--json has every file). Real processes, a real Azurite."""

from __future__ import annotations

import json

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

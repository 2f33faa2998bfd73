"""What a run of medium files (1 MiB) costs beside its bytes: pages per run (each one an activity and an
orchestrator episode), requests per file and what each download is checked against. Counts on real runs
against the suite's Azurite, never timings."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import many_files

from sitebackup.workflows.names import DEFAULT_WINDOW


def _pages(state: Path, instance_id: str) -> int:
    """The pages a run cut its work into: one result file each in the local work store."""
    return len(list((state / "work" / instance_id / "results").glob("*.json")))


def _instance(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["instance_id"]


def test_a_tree_is_cut_into_one_page_per_window_slot_both_ways_and_a_small_one_still_fills_it(
        tmp_path, cli, state_dir, container_name):
    files = many_files(tmp_path / "site", 300, size=1024)
    run_id = _instance(cli(tmp_path / "site", "-c", container_name, "--json"))
    restore_id = _instance(cli("restore", run_id, tmp_path / "out", "--json"))
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files
    # 300 files over a window of 16: 16 pages of 19 (they were 60 pages of 5), all in flight at once
    assert _pages(state_dir, run_id) == DEFAULT_WINDOW
    assert _pages(state_dir, restore_id) == DEFAULT_WINDOW

    many_files(tmp_path / "few", 5, size=1024)
    few_id = _instance(cli(tmp_path / "few", "-c", container_name, "--prefix", "few", "--json"))
    assert _pages(state_dir, few_id) == 5  # a page per file: as many activities as there are files


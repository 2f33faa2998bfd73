"""Restore planning and verify in bounded memory: run records read page by page in page-number order, the copies of
recorded versions looked up beside them, pages written as the record is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from sitebackup.blob.workstore import BlobWorkStore, LocalWorkStore, page_number

# ---- result files in page-number order -----------------------------------------------------------

PAGES = [0, 2, 10, 999_999, 1_000_000, 1_000_001, 12_345_678]


def test_page_number_orders_names_past_six_digits():
    names = [f"work/run/results/{page:06d}.json" for page in PAGES]
    assert sorted(names) != names  # by name, 1000000 sorts before 999999
    assert sorted(reversed(names), key=page_number) == names


@pytest.mark.parametrize("kind", ["local", "blob"])
def test_results_are_read_in_page_number_order(kind, tmp_path: Path, blob_service, container_name):
    if kind == "local":
        work = LocalWorkStore(tmp_path / "work")
    else:
        container = blob_service.create_container(container_name)
        work = BlobWorkStore(lambda instance_id: container)
    for page in reversed(PAGES):
        work.write_result("run", page, [{"path": f"p{page}"}])
    assert [r["path"] for r in work.iter_results("run")] == [f"p{page}" for page in PAGES]

"""The ``BackupSiteContent`` orchestration replayed with fake activities (tests/replay.py), on its wire contract:
the scan first, every page once through a bounded window, pages the scan finished skipped, a failed batch
retried by policy and then parked until ``resume``, continue-as-new with the counters, a large file's ranges
then its commit, the summary, and a small fixed-shape custom status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from replay import Replay

from sitebackup.errors import InputError
from sitebackup.model.codec import to_wire
from sitebackup.model.work import BackupCounts, Listed, PageResult, Planned, RangeReport, Span
from sitebackup.workflows.names import (
    BACKUP_ORCHESTRATION,
    BATCH_FIRST_RETRY_SECONDS,
    COPY_BATCH,
    ENV_BATCH_RETRY_SECONDS,
    MAX_LISTED,
    PAGES_PER_GENERATION,
    RESUME_EVENT,
    SCAN_TREE,
    WAITING_PHASE,
    batch_retry,
)

SOURCE, CONTAINER = "/srv/site", "site"


def backup_input(concurrency: int = 4) -> dict[str, Any]:
    return {"source": SOURCE, "container": CONTAINER, "prefix": "", "options": {"concurrency": concurrency}}


def scan(pages: int, done: list[list[int]] | None = None, failures: list[Listed] | None = None, **counters: Any):
    """A scan that wrote *pages* pages, *done* ([first, last + 1] ranges) of which it recorded itself."""
    counts = BackupCounts(**{"files_total": 2 * pages, "bytes_total": 200 * pages, **counters})
    return lambda inp: to_wire(Planned(pages=pages, counts=counts, done=[Span(*span) for span in done or []],
                                       failures=failures or []))


def result(page: int, **counters: Any) -> Any:
    return to_wire(PageResult(page=page, counts=BackupCounts(**counters)))


def copy(inp: dict[str, Any]) -> Any:
    """A batch of two 100-byte files, both uploaded."""
    return result(inp["page"], files_uploaded=2, bytes_uploaded=200)


def pages_copied(run: Replay) -> list[int]:
    return [inp["page"] for inp in run.inputs(COPY_BATCH)]


def test_the_scan_comes_first_then_every_page_once_and_the_summary_sums_them():
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(6), COPY_BATCH: copy}).start(backup_input())
    assert run.names()[0] == SCAN_TREE and run.names().count(SCAN_TREE) == 1
    assert run.inputs(SCAN_TREE)[0]["source"] == SOURCE
    assert sorted(pages_copied(run)) == list(range(6))
    assert all(inp["container"] == CONTAINER and inp["source"] == SOURCE for inp in run.inputs(COPY_BATCH))
    assert run.done
    out = run.output
    assert out["kind"] == BACKUP_ORCHESTRATION
    assert (out["files_total"], out["bytes_total"]) == (12, 1200)
    assert (out["files_uploaded"], out["bytes_uploaded"], out["files_failed"]) == (12, 1200, 0)
    assert out["source"] == SOURCE and out["destination"] == CONTAINER


@pytest.mark.parametrize("window", [1, 3])
def test_at_most_the_window_of_batches_is_in_flight(window: int):
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(10), COPY_BATCH: copy}).start(backup_input(window))
    assert run.most_in_flight == window
    assert sorted(pages_copied(run)) == list(range(10))


def test_pages_the_scan_recorded_itself_are_not_copied_but_counted():
    # four pages of ten unchanged files recorded by the scan, four pages of two files to copy
    fake_scan = scan(8, done=[[0, 3], [5, 6]], files_total=48, files_unchanged=40, files_skipped=40,
                     bytes_skipped=4000)
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: fake_scan, COPY_BATCH: copy}).start(backup_input())
    assert sorted(pages_copied(run)) == [3, 4, 6, 7]
    assert (run.output["files_unchanged"], run.output["bytes_skipped"]) == (40, 4000)
    assert run.output["files_uploaded"] == 8
    assert run.status["files_done"] == run.status["files_total"] == 48  # the bar reaches its total


def test_an_unchanged_tree_copies_nothing():
    fake_scan = scan(3, done=[[0, 3]], files_unchanged=6, files_skipped=6, bytes_skipped=600)
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: fake_scan, COPY_BATCH: copy}).start(backup_input())
    assert run.names() == [SCAN_TREE]
    assert run.done and run.output["files_unchanged"] == 6 and run.output["files_uploaded"] == 0


def test_a_batch_that_keeps_failing_is_retried_by_policy_then_the_run_waits_for_resume():
    failures_left = {2: 3}  # page 2 fails its three attempts, then works after the resume

    def flaky(inp: dict[str, Any]) -> Any:
        if failures_left.get(inp["page"], 0):
            failures_left[inp["page"]] -= 1
            raise ConnectionError("the destination went away")
        return copy(inp)

    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(20), COPY_BATCH: flaky}).start(backup_input(2))
    assert run.waiting
    assert pages_copied(run).count(2) == 3
    assert [d.total_seconds() for d in run.retry_delays] == [5, 10]
    assert run.status["phase"] == WAITING_PHASE
    assert "the destination went away" in run.status["error"]
    waited_at = len(run.scheduled)
    assert max(pages_copied(run)) < 19  # scheduling stopped: pages are left for after the resume

    run.raise_event(RESUME_EVENT)
    assert run.done
    assert run.scheduled[waited_at].input["page"] == 2  # the failed page goes first after the resume
    assert sorted(set(pages_copied(run))) == list(range(20))
    assert run.output["files_uploaded"] == 40 and run.output["files_failed"] == 0
    assert run.status["phase"] == "done"



def test_only_a_shorter_first_retry_may_be_set_for_tests_and_every_attempt_stays(monkeypatch):
    for value in ["0", "6", "-1", "1.5", "x"]:
        monkeypatch.setenv(ENV_BATCH_RETRY_SECONDS, value)
        with pytest.raises(InputError, match=ENV_BATCH_RETRY_SECONDS):
            batch_retry()
    monkeypatch.setenv(ENV_BATCH_RETRY_SECONDS, "1")

    def failing(inp: dict[str, Any]) -> Any:
        raise ConnectionError("the destination went away")

    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(1), COPY_BATCH: failing}).start(backup_input(1))
    assert run.waiting and pages_copied(run) == [0, 0, 0]  # the three attempts, only sooner
    assert [d.total_seconds() for d in run.retry_delays] == [1, 2]
    monkeypatch.delenv(ENV_BATCH_RETRY_SECONDS)
    assert batch_retry().first_retry_interval.total_seconds() == BATCH_FIRST_RETRY_SECONDS == 5

def test_a_run_continues_as_new_every_generation_of_pages_with_its_counters():
    pages = 2 * PAGES_PER_GENERATION + 5
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(pages), COPY_BATCH: copy}).start(backup_input(8))
    assert len(run.generations) == 3
    assert run.names().count(SCAN_TREE) == 1
    assert sorted(pages_copied(run)) == list(range(pages))
    per_generation = [sum(1 for s in run.scheduled if s.name == COPY_BATCH and s.generation == g) for g in (1, 2, 3)]
    assert per_generation == [PAGES_PER_GENERATION, PAGES_PER_GENERATION, 5]
    # every generation's counts reach the summary: they travelled with continue-as-new
    assert run.output["files_uploaded"] == 2 * pages and run.output["files_total"] == 2 * pages


def test_a_large_files_ranges_go_first_then_its_commit_with_what_they_reported():
    # page 0: small files; pages 1-3: the three ranges of one large file, whose commit is the step of page 1
    def copy_or_range(inp: dict[str, Any]) -> Any:
        page = inp["page"]
        if inp.get("commit"):
            return to_wire(PageResult(page=page, counts=BackupCounts(files_uploaded=1), commit=True))
        if page == 0:
            return copy(inp)
        index = page - 1
        report = RangeReport(first_page=1, ranges=3, range=index, block_id=f"block-{index}", sent=True)
        if index == 0:
            report.md5, report.digest = "the-md5", "the-digest"
        return to_wire(PageResult(page=page, counts=BackupCounts(bytes_uploaded=1000), range=report))

    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(4, files_total=3, bytes_total=3200),
                                        COPY_BATCH: copy_or_range}).start(backup_input(4))
    assert pages_copied(run) == [0, 1, 2, 3, 1]  # the commit only once the last range is in
    assert [bool(inp.get("commit")) for inp in run.inputs(COPY_BATCH)] == [False] * 4 + [True]
    commit = run.inputs(COPY_BATCH)[-1]["commit"]
    assert commit["blocks"] == ["block-0", "block-1", "block-2"]
    assert (commit["md5"], commit["digest"]) == ("the-md5", "the-digest")
    assert run.output["files_uploaded"] == 3 and run.output["bytes_uploaded"] == 3200


def test_failures_are_all_counted_and_listed_up_to_the_cap():
    def failing(inp: dict[str, Any]) -> Any:
        return to_wire(PageResult(page=inp["page"], counts=BackupCounts(files_uploaded=1, bytes_uploaded=100,
                                                                        files_failed=1),
                                  failures=[Listed(f"f{inp['page']}", error="unreadable")]))

    pages = MAX_LISTED + 5
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: scan(pages), COPY_BATCH: failing}).start(backup_input())
    assert run.output["files_failed"] == pages
    assert len(run.output["failures"]) == MAX_LISTED
    assert run.output["files_uploaded"] == pages


def test_the_custom_status_keeps_one_small_shape_whatever_the_tree():
    huge = scan(12, files_total=10**9, bytes_total=10**15, files_failed=10**6,
                failures=[Listed("x" * 200, error="e" * 200)] * MAX_LISTED)
    run = Replay(BACKUP_ORCHESTRATION, {SCAN_TREE: huge, COPY_BATCH: copy}).start(backup_input())
    assert [s["phase"] for s in run.statuses][0] == "scanning"
    assert {s["phase"] for s in run.statuses} == {"scanning", "uploading", "done"}
    assert len({frozenset(s) for s in run.statuses}) == 1
    assert max(len(encoded) for encoded in run.encoded_statuses) < 1024
    assert json.loads(run.encoded_statuses[-1])["files_total"] == 10**9
    files_done = [s["files_done"] for s in run.statuses]
    assert files_done == sorted(files_done) and files_done[-1] == 24 + 10**6  # failed files are done too

"""The ``RestoreSiteContent`` orchestration replayed with fake activities (tests/replay.py), on its wire contract:
the plan first, every page once through a bounded window, a failed batch parked until ``resume``,
continue-as-new with the counters, the summary and a small fixed-shape custom status."""

from __future__ import annotations

from typing import Any

from replay import Replay

from sitebackup.model.codec import to_wire
from sitebackup.model.work import Listed, PageResult, Planned, RestoreCounts
from sitebackup.workflows.names import (
    PAGES_PER_GENERATION,
    PLAN_RESTORE,
    RESTORE_BATCH,
    RESTORE_ORCHESTRATION,
    RESUME_EVENT,
    WAITING_PHASE,
)

DEST, CONTAINER = "/srv/restored", "site"


def restore_input(concurrency: int = 4) -> dict[str, Any]:
    return {"dest": DEST, "container": CONTAINER, "prefix": "", "run_id": "run-1",
            "options": {"concurrency": concurrency}}


def plan(pages: int):
    """A plan of *pages* pages of three 10-byte blobs each."""
    return lambda inp: to_wire(Planned(pages=pages, counts=RestoreCounts(files_total=3 * pages,
                                                                          bytes_total=30 * pages)))


def fetch(inp: dict[str, Any]) -> Any:
    """A page of three blobs: two restored, one skipped as already there."""
    return to_wire(PageResult(page=inp["page"], counts=RestoreCounts(files_restored=2, bytes_restored=20, files_done=3,
                                                                     bytes_done=30, files_skipped=1),
                              skipped=[Listed(f"p{inp['page']}", reason="exists")]))


def pages_fetched(run: Replay) -> list[int]:
    return [inp["page"] for inp in run.inputs(RESTORE_BATCH)]


def test_the_plan_comes_first_then_every_page_once_within_the_window_and_the_summary_sums_them():
    run = Replay(RESTORE_ORCHESTRATION, {PLAN_RESTORE: plan(7), RESTORE_BATCH: fetch}).start(restore_input(3))
    assert run.names()[0] == PLAN_RESTORE and run.names().count(PLAN_RESTORE) == 1
    assert run.inputs(PLAN_RESTORE)[0]["run_id"] == "run-1"
    assert sorted(pages_fetched(run)) == list(range(7))
    assert all(inp["dest"] == DEST and inp["container"] == CONTAINER for inp in run.inputs(RESTORE_BATCH))
    assert run.most_in_flight == 3
    out = run.output
    assert out["kind"] == RESTORE_ORCHESTRATION
    assert (out["files_total"], out["files_restored"], out["bytes_restored"]) == (21, 14, 140)
    assert (out["files_skipped"], len(out["skipped"]), out["files_failed"]) == (7, 7, 0)
    assert out["destination"] == DEST
    assert run.status["phase"] == "done"
    assert (run.status["files_done"], run.status["bytes_done"]) == (21, 210)  # the bar reaches its total


def test_a_batch_that_keeps_failing_parks_the_restore_until_resume():
    attempts: dict[int, int] = {}

    def flaky(inp: dict[str, Any]) -> Any:
        attempts[inp["page"]] = attempts.get(inp["page"], 0) + 1
        if inp["page"] == 1 and attempts[1] <= 3:
            raise ConnectionError("the blob service went away")
        return fetch(inp)

    run = Replay(RESTORE_ORCHESTRATION, {PLAN_RESTORE: plan(12), RESTORE_BATCH: flaky}).start(restore_input(2))
    assert run.waiting
    assert run.status["phase"] == WAITING_PHASE and "the blob service went away" in run.status["error"]
    assert attempts[1] == 3 and [d.total_seconds() for d in run.retry_delays] == [5, 10]
    run.raise_event(RESUME_EVENT)
    assert run.done and sorted(set(pages_fetched(run))) == list(range(12))
    assert run.output["files_restored"] == 24 and run.output["files_failed"] == 0


def test_a_restore_continues_as_new_every_generation_of_pages_with_its_counters():
    pages = PAGES_PER_GENERATION + 3
    run = Replay(RESTORE_ORCHESTRATION, {PLAN_RESTORE: plan(pages), RESTORE_BATCH: fetch}).start(restore_input(8))
    assert len(run.generations) == 2 and run.names().count(PLAN_RESTORE) == 1
    assert sorted(pages_fetched(run)) == list(range(pages))
    assert run.output["files_restored"] == 2 * pages and run.output["files_total"] == 3 * pages


def test_the_custom_status_keeps_one_small_shape():
    run = Replay(RESTORE_ORCHESTRATION, {PLAN_RESTORE: plan(5), RESTORE_BATCH: fetch}).start(restore_input())
    assert {s["phase"] for s in run.statuses} == {"planning", "restoring", "done"}
    assert len({frozenset(s) for s in run.statuses}) == 1
    assert max(len(encoded) for encoded in run.encoded_statuses) < 1024

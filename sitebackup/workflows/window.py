"""The page kit backup and restore share: cutting pages as a scan or plan goes, the bounded window of batch activities,
counters summed from results, the fixed-shape progress status and the summary.

Orchestration side only, so deterministic: no I/O, no clocks but the context's. An orchestration's state
(``model.work.RunState``) travels through continue-as-new; its counters are the workflow's own
(``BackupCounts``, ``RestoreCounts``), so both keep their words (``files_uploaded``, ``files_restored``)
on the same code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar

from durabletask import task

from sitebackup.model.codec import DamagedData, from_wire, to_wire
from sitebackup.model.work import (
    C,
    Listed,
    PageResult,
    Planned,
    Progress,
    RunState,
    Step,
    Summary,
    add_counts,
    generic,
    summary_to_wire,
)
from sitebackup.workflows.names import (
    BATCH_BYTES,
    BATCH_FILES,
    MAX_LISTED,
    PAGE_CUT_MIN,
    PAGES_PER_GENERATION,
    RESUME_EVENT,
    SCAN_HEAD,
    UNCHANGED_PAGE,
    WAITING_PHASE,
)

T = TypeVar("T")


def min_pages(window: int, shared: bool) -> int:
    """The fewest pages a run cuts its tree into: one per slot of its *window*, so a small tree still fills
    it, and no more, as every page costs an activity and an orchestrator episode replaying the generation's
    history while the event loop keeps its requests in flight whatever the size of the pages feeding it.
    When workers on other hosts take pages too (*shared*), four per slot, so that each worker gets some."""
    return window * (4 if shared else 1)


def stream_pages(items: Iterable[T], size_of: Callable[[T], int], *, min_batches: int,
                 light: Callable[[T], bool] = lambda item: False, alone: Callable[[T], bool] = lambda item: False,
                 ends_page: Callable[[T], bool] | None = None,
                 batch_files: int = BATCH_FILES, batch_bytes: int = BATCH_BYTES,
                 page_items: int = UNCHANGED_PAGE, head_items: int = SCAN_HEAD) -> Iterator[list[T]]:
    """Cut *items* into pages in their order as they come, holding one page (and the head below), not them all.

    A page holds at most ``batch_files`` items to copy and ``batch_bytes`` of theirs, and at most
    ``page_items`` in all: a *light* item (recorded without I/O) counts only there. An item that goes
    *alone*, or of ``batch_bytes`` or more, is a page of its own. The first ``head_items``
    items are held back and cut into pages of at most 1/``min_batches`` of their files each, so that the window
    of activities starts full on a small tree too; the rest go in full pages. With *ends_page*, a page that
    holds ``PAGE_CUT_MIN`` items or more also ends after an item it says ends one: where pages end then depends
    on the items, not on how many came before, so an item added or gone changes its own page and not every
    page after it (content-defined chunking, as restic and borg cut files).
    """
    it = iter(items)
    head = list(itertools.islice(it, head_items))
    heavy = sum(1 for item in head if not (light(item) or alone(item)))
    head_files = max(1, min(batch_files, math.ceil(heavy / max(1, min_batches)))) if heavy else batch_files
    current: list[T] = []
    current_files = current_bytes = 0
    for index, item in enumerate(itertools.chain(_taken(head), it)):
        limit = head_files if index < head_items else batch_files
        is_light = light(item)
        size = 0 if is_light else size_of(item)
        if alone(item) or size >= batch_bytes:
            if current:
                yield current
                current, current_files, current_bytes = [], 0, 0
            yield [item]
            continue
        if current and (len(current) >= page_items or not is_light and (
                current_files >= limit or current_bytes + size > batch_bytes)):
            yield current
            current, current_files, current_bytes = [], 0, 0
        current.append(item)
        current_files += not is_light
        current_bytes += size
        if ends_page is not None and len(current) >= PAGE_CUT_MIN and ends_page(item):
            yield current
            current, current_files, current_bytes = [], 0, 0
    if current:
        yield current


def _taken(items: list[T]) -> Iterator[T]:
    """*items* in order, each let go once yielded."""
    items.reverse()
    while items:
        yield items.pop()


class Capped:
    """A list of files capped at ``MAX_LISTED`` entries, with the count of every file added."""

    def __init__(self) -> None:
        self.items: list[Listed] = []
        self.count = 0

    def add(self, path: str, *, error: str | None = None, reason: str | None = None) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(Listed(path, error, reason))


def merge_listed(listed: list[Listed], more: list[Listed]) -> None:
    listed.extend(more[:max(0, MAX_LISTED - len(listed))])


def tally(state: RunState[C], counts: C, failures: list[Listed], skipped: list[Listed]) -> None:
    """Sum a scan, plan or batch result into *state*; its failure and skip lists are merged, capped."""
    add_counts(state.counts, counts)
    merge_listed(state.failures, failures)
    merge_listed(state.skipped, skipped)


def utc_now(ctx: task.OrchestrationContext) -> datetime:
    """The orchestration's clock (replayed as it was), as an aware UTC time."""
    now = ctx.current_utc_datetime
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


def set_progress(ctx: task.OrchestrationContext, progress: Progress) -> None:
    ctx.set_custom_status(to_wire(progress))


def begin(ctx: task.OrchestrationContext, state: RunState[C] | None, counts: type[C], phase: str, first: str,
          first_input: object) -> Generator[task.Task[Any], Any, RunState[C]]:
    """The run's state: carried over by continue-as-new, or new, counted from the *first* activity (the scan or
    the plan), which writes the pages and returns their number."""
    if state is not None:
        return state
    state = RunState(counts=counts(), started_at=utc_now(ctx).isoformat())
    set_progress(ctx, Progress.of(state.counts, phase))
    raw = yield ctx.call_activity(first, input=to_wire(first_input))
    planned: Planned[C] = from_wire(raw, generic(Planned, counts), f"the result of {first}")
    tally(state, planned.counts, planned.failures, planned.skipped)
    state.pages, state.done, state.index, state.tree = planned.pages, planned.done, planned.index, planned.tree
    state.notes = planned.notes[:MAX_LISTED]
    return state


def batch_result(raw: object, counts: type[C]) -> PageResult[C]:
    """A batch activity's result, decoded (it crossed the durable history)."""
    result: PageResult[C] = from_wire(raw, generic(PageResult, counts), "a batch activity's result")
    return result


def run_and_summarize(ctx: task.OrchestrationContext, inp: Any, state: RunState[C], window: int,
                      schedule: Callable[[Step], task.Task[Any]], on_result: Callable[[Step, Any], None], phase: str,
                      kind: str, source: str, destination: str, last: tuple[Step, str] | None = None,
                      ) -> Generator[task.Task[Any], Any, Any]:
    """This generation's pages through the window; then continue as new with *state* in the input *inp* while
    pages remain, or, once the pages are done, the *last* step (in its phase, retried and parked as a page is)
    and the summary (its wire form)."""
    def progress(phase: str) -> Progress:
        return Progress.of(state.counts, phase)

    more = yield from run_page_window(ctx, state, window, schedule, on_result, progress, phase)
    if more:
        inp.state = state
        ctx.continue_as_new(to_wire(inp))
        return None
    if last is not None:
        state.retry.append(last[0])
        yield from run_page_window(ctx, state, 1, schedule, on_result, progress, last[1])
    started = datetime.fromisoformat(state.started_at)
    set_progress(ctx, Progress.of(state.counts, "done"))
    return summary_to_wire(Summary(kind=kind, counts=state.counts, source=source, destination=destination,
                                   duration_s=round((utc_now(ctx) - started).total_seconds(), 3),
                                   failures=state.failures, skipped=state.skipped, notes=state.notes,
                                   changes=state.changes))


def run_page_window(ctx: task.OrchestrationContext, state: RunState[C], window: int,
                    schedule: Callable[[Step], task.Task[Any]], on_result: Callable[[Step, Any], None],
                    progress: Callable[[str], Progress], phase: str) -> Generator[task.Task[Any], Any, bool]:
    """Run this generation's pages (``state.next_page`` on, at most ``PAGES_PER_GENERATION``) through a window
    of at most *window* activities, publishing ``progress(phase)`` after every completion; returns whether
    pages remain for the next generation (continue as new).

    Used with ``yield from``. A step whose activity still fails after its retry policy is kept in
    ``state.retry``; scheduling stops, the window drains, and the orchestration waits in ``WAITING_PHASE``
    for the ``RESUME_EVENT`` before trying it again. A step that failed on damaged data (a page not as it was
    written, ``workflows.pages``) fails the run at once instead: trying again cannot mend it, and the next
    run starts over from a new scan.
    """
    set_progress(ctx, progress(phase))
    in_flight: list[task.Task[Any]] = []
    steps_in_flight: list[Step] = []
    _skip_done(state)
    failure: tuple[str, str] | None = None  # why the last failed step failed: (message, error type)
    last_page = min(state.pages, state.next_page + PAGES_PER_GENERATION)
    while state.next_page < last_page or in_flight or state.retry:
        if failure is None:
            while len(in_flight) < window and (state.retry or state.next_page < last_page):
                if state.retry:
                    step = state.retry.pop(0)
                else:
                    step = Step(state.next_page)
                    state.next_page += 1
                    _skip_done(state)
                in_flight.append(schedule(step))
                steps_in_flight.append(step)
        elif not in_flight:
            # everything in flight has settled: wait, with nothing leased, until someone resumes
            state.waits += 1
            waiting = progress(WAITING_PHASE)
            waiting.error, waiting.error_type, waiting.waits = failure[0], failure[1], state.waits
            set_progress(ctx, waiting)
            yield ctx.wait_for_external_event(RESUME_EVENT)
            failure = None
            set_progress(ctx, progress(phase))
            continue
        done = yield task.when_any(in_flight)
        index = in_flight.index(done)
        in_flight.pop(index)
        step = steps_in_flight.pop(index)
        if done.is_failed:
            state.retry.append(step)
            details = done.get_exception().details
            if details.error_type.rpartition(".")[2] == DamagedData.__name__:
                raise DamagedData(details.message)
            failure = (details.message, details.error_type)
            continue
        on_result(step, done.get_result())
        set_progress(ctx, progress(phase))
    return state.next_page < state.pages


def _skip_done(state: RunState[C]) -> None:
    """Move ``state.next_page`` past the pages the first activity finished itself (``state.done``, sorted, dropped
    as they are passed)."""
    while state.done and state.done[0].first <= state.next_page:
        state.next_page = max(state.next_page, state.done.pop(0).end)

"""The page kit backup and restore share: cutting pages as a scan or plan goes, the bounded window of batch activities,
counters summed from results, the fixed-shape progress status and the summary.

Orchestration side only, so deterministic: no I/O, no clocks but the context's. An orchestration's
state is a plain JSON dict (it travels through continue-as-new); a ``Tally`` names its counters and
says how they show as progress, so both workflows keep their own counter names (``files_uploaded``,
``files_restored``) on the same code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from durabletask import task

from sitebackup.workflows.names import (
    BATCH_BYTES,
    BATCH_FILES,
    MAX_LISTED,
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
                 batch_files: int = BATCH_FILES, batch_bytes: int = BATCH_BYTES,
                 page_items: int = UNCHANGED_PAGE, head_items: int = SCAN_HEAD) -> Iterator[list[T]]:
    """Cut *items* into pages in their order as they come, holding one page (and the head below), not them all.

    A page holds at most ``batch_files`` items to copy and ``batch_bytes`` of theirs, and at most
    ``page_items`` in all: a *light* item (recorded without I/O) counts only there. An item that goes
    *alone*, or of ``batch_bytes`` or more, is a page of its own. The first ``head_items`` items are
    held back and cut into pages of at most 1/``min_batches`` of their files each, so that the window of
    activities starts full on a small tree too; the rest go in full pages.
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
    if current:
        yield current


def _taken(items: list[T]) -> Iterator[T]:
    """*items* in order, each let go once yielded."""
    items.reverse()
    while items:
        yield items.pop()


class Listed:
    """A capped list of ``{"path", "error"|"reason"}`` entries, with the count of everything seen."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []
        self.count = 0

    def add(self, entry: dict[str, str]) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(entry)


def merge_listed(listed: list[dict[str, str]], more: list[dict[str, str]]) -> None:
    listed.extend(more[:max(0, MAX_LISTED - len(listed))])


@dataclass(frozen=True)
class Tally:
    """The counters of one workflow: summed from every activity result, shown as progress, summarized."""

    kind: str  # the orchestration name: printers word their lines by it
    counters: tuple[str, ...]
    files_done: tuple[str, ...]  # counters that add up to the progress bar's files done
    bytes_done: tuple[str, ...]
    hidden: tuple[str, ...] = ()  # counters for progress only, not in the summary

    def new_state(self, ctx: task.OrchestrationContext) -> dict[str, Any]:
        state: dict[str, Any] = {name: 0 for name in self.counters}
        state.update(started_at=ctx.current_utc_datetime.isoformat(), pages=0, next_page=0, retry_pages=[],
                     failures=[], skipped=[])
        return state

    def add(self, state: dict[str, Any], result: dict[str, Any]) -> None:
        """Sum a scan, plan or batch result into *state*; its failure and skip lists are merged, capped."""
        for name in self.counters:
            state[name] = state.get(name, 0) + result.get(name, 0)
        merge_listed(state["failures"], result.get("failures") or [])
        merge_listed(state["skipped"], result.get("skipped") or [])

    def status(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        """The fixed-shape custom status: small whatever the tree, so it never nears the 16 KB limit."""
        return {
            "phase": phase,
            "files_done": sum(state.get(n, 0) for n in self.files_done),
            "files_total": state["files_total"],
            "bytes_done": sum(state.get(n, 0) for n in self.bytes_done),
            "bytes_total": state["bytes_total"],
            "files_failed": state["files_failed"],
            "files_skipped": state["files_skipped"],
            "files_unchanged": state.get("files_unchanged", 0),
            "bytes_skipped": state.get("bytes_skipped", 0),
        }

    def begin(self, ctx: task.OrchestrationContext, state: dict[str, Any] | None, phase: str, first: str,
              first_input: Any) -> Generator[task.Task[Any], Any, dict[str, Any]]:
        """The run's state: carried over by continue-as-new, or new, counted from the *first* activity
        (the scan or the plan), which writes the pages and returns their number."""
        if state is not None:
            return state
        state = self.new_state(ctx)
        ctx.set_custom_status(self.status(state, phase))
        result = yield ctx.call_activity(first, input=first_input)
        self.add(state, result)
        state["pages"] = result["pages"]
        state["done"] = result.get("done") or []
        return state

    def run(self, ctx: task.OrchestrationContext, raw: dict[str, Any], state: dict[str, Any], window: int,
            schedule: Callable[[int], task.Task[Any]], on_result: Callable[[dict[str, Any]], None], phase: str,
            source: str, destination: str) -> Generator[task.Task[Any], Any, dict[str, Any] | None]:
        """This generation's pages through the window; then continue as new with *state* while pages
        remain, or return the summary."""
        more = yield from run_page_window(ctx, state, window, schedule, on_result,
                                          lambda p: self.status(state, p), phase)
        if more:
            ctx.continue_as_new({**raw, "state": state})
            return None
        return self.summary(ctx, state, source, destination)

    def summary(self, ctx: task.OrchestrationContext, state: dict[str, Any], source: str,
                destination: str) -> dict[str, Any]:
        """The orchestration's output, once its last page is done."""
        started = datetime.fromisoformat(state["started_at"])
        summary: dict[str, Any] = {"kind": self.kind}
        summary.update((name, state.get(name, 0)) for name in self.counters if name not in self.hidden)
        summary.update(source=source, destination=destination,
                       duration_s=round((ctx.current_utc_datetime - started).total_seconds(), 3),
                       failures=state["failures"], skipped=state["skipped"])
        ctx.set_custom_status(self.status(state, "done"))
        return summary


def run_page_window(ctx: task.OrchestrationContext, state: dict[str, Any], window: int,
                    schedule: Callable[[int], task.Task[Any]], on_result: Callable[[dict[str, Any]], None],
                    status: Callable[[str], dict[str, Any]], phase: str) -> Generator[task.Task[Any], Any, bool]:
    """Run this generation's pages (``state["next_page"]`` on, at most ``PAGES_PER_GENERATION``) through a
    window of at most *window* activities, publishing ``status(phase)`` after every completion; returns
    whether pages remain for the next generation (continue as new).

    Used with ``yield from``. A page whose activity still fails after its retry policy is kept in
    ``state["retry_pages"]``; scheduling stops, the window drains, and the orchestration waits in
    ``WAITING_PHASE`` for the ``RESUME_EVENT`` before trying it again.
    """
    ctx.set_custom_status(status(phase))
    in_flight: list[task.Task[Any]] = []
    pages_in_flight: list[int] = []
    state.setdefault("retry_pages", [])
    _skip_done(state)
    error: dict[str, str] | None = None
    last_page = min(state["pages"], state["next_page"] + PAGES_PER_GENERATION)
    while state["next_page"] < last_page or in_flight or state["retry_pages"]:
        if error is None:
            while len(in_flight) < window and (state["retry_pages"] or state["next_page"] < last_page):
                if state["retry_pages"]:
                    page = state["retry_pages"].pop(0)
                else:
                    page, state["next_page"] = state["next_page"], state["next_page"] + 1
                    _skip_done(state)
                in_flight.append(schedule(page))
                pages_in_flight.append(page)
        elif not in_flight:
            # everything in flight has settled: wait, with nothing leased, until someone resumes
            state["waits"] = state.get("waits", 0) + 1
            ctx.set_custom_status({**status(WAITING_PHASE), **error, "waits": state["waits"]})
            yield ctx.wait_for_external_event(RESUME_EVENT)
            error = None
            ctx.set_custom_status(status(phase))
            continue
        done = yield task.when_any(in_flight)
        index = in_flight.index(done)
        in_flight.pop(index)
        page = pages_in_flight.pop(index)
        if done.is_failed:
            state["retry_pages"].append(page)
            details = done.get_exception().details
            error = {"error": details.message, "error_type": details.error_type}
            continue
        on_result(done.get_result())
        ctx.set_custom_status(status(phase))
    return state["next_page"] < state["pages"]


def _skip_done(state: dict[str, Any]) -> None:
    """Move ``state["next_page"]`` past the pages the first activity finished itself (``state["done"]``: sorted
    [first, last + 1] ranges, dropped as they are passed)."""
    done = state.get("done")
    while done and done[0][0] <= state["next_page"]:
        state["next_page"] = max(state["next_page"], done.pop(0)[1])

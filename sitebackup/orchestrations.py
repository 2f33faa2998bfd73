"""Deterministic workflow code: the ``BackupSiteContent`` orchestration. No I/O, no clocks, no randomness.

Scan once, then keep a bounded window of copy-batch activities in flight, publishing a small
counter dict as custom status after every completion. Every ``PAGES_PER_GENERATION`` pages the
orchestration continues as new with its counters, so one instance's history stays bounded
whatever the size of the tree.

A copy batch that still fails after ``COPY_RETRY`` (the destination is down, credentials expired)
never fails the instance: the orchestration drains what is in flight, publishes phase
``waiting-destination`` with the error and waits for the ``resume`` event, then copies the failed
pages again. The CLI sees that phase, exits 3, and ``sitebackup resume`` raises the event.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from datetime import datetime, timedelta
from typing import Any

from durabletask import task

from sitebackup import blocks
from sitebackup.activities import COPY_BATCH, MAX_LISTED, SCAN_TREE

BACKUP_ORCHESTRATION = "BackupSiteContent"
PAGES_PER_GENERATION = 100
DEFAULT_WINDOW = 16

COPY_RETRY = task.RetryPolicy(
    first_retry_interval=timedelta(seconds=5),
    max_number_of_attempts=3,
    backoff_coefficient=2.0,
    max_retry_interval=timedelta(seconds=60),
)

# a request to the blob service is retried for about a minute (storage.make_service_client);
# a copy batch is then attempted three times in all, 5 s and 10 s apart, before the run waits
WAITING_PHASE = "waiting-destination"
RESUME_EVENT = "resume"

COUNTERS = ("files_total", "files_uploaded", "files_skipped", "files_failed", "bytes_total", "bytes_uploaded",
            "files_unchanged", "bytes_skipped")


def progress_status(phase: str, state: dict[str, Any]) -> dict[str, Any]:
    """The fixed-shape custom status: small whatever the tree, so it never nears the 16 KB limit."""
    return {
        "phase": phase,
        # unchanged files count as done so the bar reaches its total; summaries separate them again
        "files_done": state["files_uploaded"] + state["files_failed"] + state.get("files_unchanged", 0),
        "files_total": state["files_total"],
        "bytes_done": state["bytes_uploaded"] + state.get("bytes_skipped", 0),
        "files_unchanged": state.get("files_unchanged", 0),
        "bytes_skipped": state.get("bytes_skipped", 0),
        "bytes_total": state["bytes_total"],
        "files_failed": state["files_failed"],
        "files_skipped": state["files_skipped"],
    }


def _merge_failures(state: dict[str, Any], failures: list[dict[str, str]]) -> None:
    room = MAX_LISTED - len(state["failures"])
    if room > 0:
        state["failures"].extend(failures[:room])


def run_page_window(ctx: task.OrchestrationContext, state: dict[str, Any], window: int,
                    schedule: Callable[[int], task.Task[Any]], on_result: Callable[[dict[str, Any]], None],
                    status: Callable[[str], dict[str, Any]], phase: str) -> Generator[task.Task[Any], Any, None]:
    """Run this generation's pages (``state["next_page"]`` on, at most ``PAGES_PER_GENERATION``) through a
    window of at most *window* activities, publishing ``status(phase)`` after every completion.

    Shared by backup and restore (``yield from``). A page whose activity still fails after its
    retry policy is kept in ``state["retry_pages"]``; scheduling stops, the window drains, and the
    orchestration waits in ``WAITING_PHASE`` for the ``RESUME_EVENT`` before trying it again.
    """
    ctx.set_custom_status(status(phase))
    in_flight: list[task.Task[Any]] = []
    pages_in_flight: list[int] = []
    state.setdefault("retry_pages", [])
    error: dict[str, str] | None = None
    last_page = min(state["pages"], state["next_page"] + PAGES_PER_GENERATION)
    while state["next_page"] < last_page or in_flight or state["retry_pages"]:
        if error is None:
            while len(in_flight) < window and (state["retry_pages"] or state["next_page"] < last_page):
                if state["retry_pages"]:
                    page = state["retry_pages"].pop(0)
                else:
                    page, state["next_page"] = state["next_page"], state["next_page"] + 1
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


def backup_site_content(ctx: task.OrchestrationContext, inp: dict[str, Any]) -> Any:
    state: dict[str, Any] | None = inp.get("state")
    window = max(1, int(inp.get("options", {}).get("concurrency", DEFAULT_WINDOW)))
    if state is None:
        state = {name: 0 for name in COUNTERS}
        state.update(started_at=ctx.current_utc_datetime.isoformat(), next_page=0, failures=[], skipped=[])
        ctx.set_custom_status(progress_status("scanning", state))
        options = inp.get("options", {})
        scan = yield ctx.call_activity(SCAN_TREE, input={
            "source": inp["source"], "min_batches": 4 * window, "baseline": inp.get("baseline"),
            "compare": options.get("compare", "mtime"), "patterns": options.get("patterns", []),
            "follow_symlinks": bool(options.get("follow_symlinks")), "block_size": options.get("block_size")})
        state.update(pages=scan["pages"], files_total=scan["files_total"], bytes_total=scan["bytes_total"],
                     files_skipped=scan["files_skipped"], files_failed=scan["files_failed"],
                     skipped=scan["skipped"])
        _merge_failures(state, scan["failures"])

    def schedule(page: int) -> task.Task[Any]:
        work = {"source": inp["source"], "container": inp["container"], "prefix": inp.get("prefix", ""), "page": page}
        md5 = state.get("file_md5", {}).get(str(blocks.commit_task(page))) if page < 0 else None
        if md5:
            work["md5"] = md5
        return ctx.call_activity(COPY_BATCH, retry_policy=COPY_RETRY, input=work)

    def on_result(result: dict[str, Any]) -> None:
        if "blocks" in result:  # a range of a large file: after its last one, commit it (sitebackup.blocks)
            if result.get("md5"):  # the first range hashed the whole file: the commit needs not
                state.setdefault("file_md5", {})[str(result["blocks"]["first_page"])] = result["md5"]
            commit = blocks.count_range(state, result["blocks"])
            if commit is not None:
                state["retry_pages"].insert(0, commit)
        elif result["page"] < 0:  # a commit: its file's MD5 has served
            state.get("file_md5", {}).pop(str(blocks.commit_task(result["page"])), None)
        state["files_uploaded"] += result["files_uploaded"]
        state["bytes_uploaded"] += result["bytes_uploaded"]
        state["files_failed"] += result["files_failed"]
        # an unchanged file is a skipped one too: files_skipped = not uploaded on purpose
        for key in ("files_unchanged", "bytes_skipped"):
            state[key] = state.get(key, 0) + result.get(key, 0)
        state["files_skipped"] += result.get("files_unchanged", 0)
        _merge_failures(state, result["failures"])

    yield from run_page_window(ctx, state, window, schedule, on_result,
                               lambda phase: progress_status(phase, state), "uploading")

    if state["next_page"] < state["pages"]:
        ctx.continue_as_new({**inp, "state": state})
        return None

    started = datetime.fromisoformat(state["started_at"])
    summary = {name: state.get(name, 0) for name in COUNTERS}
    summary.update(
        source=inp["source"], destination=destination_label(inp),
        duration_s=round((ctx.current_utc_datetime - started).total_seconds(), 3),
        failures=state["failures"], skipped=state["skipped"],
    )
    ctx.set_custom_status(progress_status("done", state))
    return summary


# the worker registers orchestrators under fn.__name__: pin it to the durable name
backup_site_content.__name__ = BACKUP_ORCHESTRATION


def destination_label(inp: dict[str, Any]) -> str:
    prefix = inp.get("prefix") or ""
    return f"{inp['container']}/{prefix}" if prefix else inp["container"]

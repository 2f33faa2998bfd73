"""Restoring blobs to a directory: the ``RestoreSiteContent`` orchestration, its activities and its runner.

It mirrors the backup: one planning activity writes the blobs to fetch as numbered pages into the
work store (from a backup run's record, or from a container listing), then the orchestration keeps
a bounded window of download-batch activities in flight and continues as new every
``PAGES_PER_GENERATION`` pages. Every file is written to a temporary name next to its target, given
its recorded mode and mtime, then renamed, so a killed restore never leaves a half file under the
real name. Blob names are untrusted: a name that would land outside the destination is refused.
A batch that keeps failing (the blob service is down) parks the run in the backup's
``waiting-destination`` phase until ``resume`` or a re-run of the same command.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from durabletask import client as dt_client
from durabletask import task

from sitebackup import storage
from sitebackup.activities import BATCH_BYTES, BATCH_FILES, MAX_LISTED, ActivityDeps
from sitebackup.errors import DestinationError, InputError
from sitebackup.filters import Filter
from sitebackup.orchestrations import BACKUP_ORCHESTRATION, COPY_RETRY, DEFAULT_WINDOW, run_page_window
from sitebackup.progress import Printer
from sitebackup.runner import UNFINISHED, activity_deps, host_and_watch, new_instance_id
from sitebackup.runtime import open_backend
from sitebackup.taskhub import TaskHubSettings
from sitebackup.workstore import is_reserved

log = logging.getLogger("sitebackup.restore")

RESTORE_ORCHESTRATION = "RestoreSiteContent"
PLAN_RESTORE = "PlanRestore"
RESTORE_BATCH = "RestoreFileBatch"
# blobs over this size are fetched as ranges of RANGE_BYTES in parallel, written at their offsets
RANGE_BYTES = storage.STREAM_BLOCK_BYTES
TEMP_SUFFIX = ".sitebackup-part"

COUNTERS = ("files_total", "files_restored", "files_skipped", "files_failed", "bytes_total", "bytes_restored",
            "files_done", "bytes_done")


class UnsafeName(ValueError):
    """A blob name that would be written outside the destination, or through a symlink."""


# ----------------------------------------------------------------------------- pure helpers

def safe_relpath(name: str) -> str:
    """Return *name* as a relative path if writing it under a destination cannot escape it."""
    if not name:
        raise UnsafeName("empty name")
    if "\x00" in name:
        raise UnsafeName("name contains NUL")
    if "\\" in name:
        raise UnsafeName("name contains a backslash")
    if name.startswith("/"):
        raise UnsafeName("absolute name (starts with '/')")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeName("name has an empty, '.' or '..' segment")
    return name


def make_selector(include: list[str], exclude: list[str]) -> Callable[[str], bool]:
    """Whether a path is restored: it (or a directory above it) matches an --include pattern when any
    are given, and neither it nor a directory above it matches an --exclude pattern. Patterns are
    gitignore-style (``filters``): without a '/' they match a name at any depth."""
    wanted, unwanted = Filter(include), Filter(exclude)

    def hit(flt: Filter, relpath: str) -> bool:
        parts = relpath.split("/")
        return any(flt.excluded("/".join(parts[:i]), i < len(parts)) for i in range(1, len(parts) + 1))

    return lambda relpath: (not wanted or hit(wanted, relpath)) and not (unwanted and hit(unwanted, relpath))


def plan_pages(items: list[list[Any]], *, min_batches: int) -> list[list[list[Any]]]:
    """Cut items ``[name, relpath, size, ...]`` into pages bounded by count and bytes; big blobs go alone."""
    batch_files = max(1, min(BATCH_FILES, -(-len(items) // max(1, min_batches)))) if items else BATCH_FILES
    pages: list[list[list[Any]]] = []
    current: list[list[Any]] = []
    current_bytes = 0
    for item in items:
        size = item[2]
        if size >= BATCH_BYTES:
            pages.append([item])
            continue
        if current and (len(current) >= batch_files or current_bytes + size > BATCH_BYTES):
            pages.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        pages.append(current)
    return pages


def md5_b64(digest: bytes | bytearray | None) -> str | None:
    return base64.b64encode(bytes(digest)).decode("ascii") if digest else None


# ----------------------------------------------------------------------------- orchestration

def progress_status(phase: str, state: dict[str, Any]) -> dict[str, Any]:
    """Same fixed shape as the backup's custom status, so the same printers and ``watch`` work."""
    return {
        "phase": phase,
        "files_done": state["files_done"],
        "files_total": state["files_total"],
        "bytes_done": state["bytes_done"],
        "bytes_total": state["bytes_total"],
        "files_failed": state["files_failed"],
        "files_skipped": state["files_skipped"],
    }


def _merge(listed: list[dict[str, str]], more: list[dict[str, str]]) -> None:
    listed.extend(more[:max(0, MAX_LISTED - len(listed))])


def restore_site_content(ctx: task.OrchestrationContext, inp: dict[str, Any]) -> Any:
    state: dict[str, Any] | None = inp.get("state")
    window = max(1, int(inp.get("options", {}).get("concurrency", DEFAULT_WINDOW)))
    if state is None:
        state = {name: 0 for name in COUNTERS}
        state.update(started_at=ctx.current_utc_datetime.isoformat(), next_page=0, failures=[], skipped=[])
        ctx.set_custom_status(progress_status("planning", state))
        plan_input = {k: inp.get(k) for k in ("run_id", "container", "prefix")}
        plan_input.update(options=inp.get("options", {}), min_batches=4 * window)
        plan = yield ctx.call_activity(PLAN_RESTORE, input=plan_input)
        state.update(pages=plan["pages"], files_total=plan["files_total"], bytes_total=plan["bytes_total"],
                     files_failed=plan["files_failed"], files_done=plan["files_failed"],
                     files_skipped=plan["files_skipped"])
        _merge(state["failures"], plan["failures"])
        _merge(state["skipped"], plan["skipped"])

    def schedule(page: int) -> task.Task[Any]:
        return ctx.call_activity(RESTORE_BATCH, retry_policy=COPY_RETRY, input={
            "dest": inp["dest"], "container": inp["container"], "page": page,
            "overwrite": bool(inp.get("options", {}).get("overwrite"))})

    def on_result(result: dict[str, Any]) -> None:
        for name in ("files_restored", "bytes_restored", "files_skipped", "files_failed", "files_done", "bytes_done"):
            state[name] += result[name]
        _merge(state["failures"], result["failures"])
        _merge(state["skipped"], result["skipped"])

    yield from run_page_window(ctx, state, window, schedule, on_result,
                               lambda phase: progress_status(phase, state), "restoring")

    if state["next_page"] < state["pages"]:
        ctx.continue_as_new({**inp, "state": state})
        return None

    started = datetime.fromisoformat(state["started_at"])
    summary = {name: state[name] for name in COUNTERS if name not in ("files_done", "bytes_done")}
    summary.update(
        source=restore_source_label(inp), destination=inp["dest"],
        duration_s=round((ctx.current_utc_datetime - started).total_seconds(), 3),
        failures=state["failures"], skipped=state["skipped"],
    )
    ctx.set_custom_status(progress_status("done", state))
    return summary


restore_site_content.__name__ = RESTORE_ORCHESTRATION


def restore_source_label(inp: dict[str, Any]) -> str:
    where = f"{inp['container']}/{inp['prefix']}" if inp.get("prefix") else inp["container"]
    return f"{where} (run {inp['run_id']})" if inp.get("run_id") else where


# ----------------------------------------------------------------------------- activities

def plan_restore(deps: ActivityDeps, restore_id: str, inp: dict[str, Any]) -> dict[str, Any]:
    """List what to restore (run record or container listing), validate names, write pages."""
    options = inp.get("options") or {}
    selected = make_selector(list(options.get("include") or []), list(options.get("exclude") or []))
    prefix = inp.get("prefix") or ""
    items: list[list[Any]] = []
    failures: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    n_failed = n_skipped = 0

    def candidates():
        if inp.get("run_id"):
            for rec in deps.work.iter_results(inp["run_id"]):
                if "error" in rec:
                    yield rec["path"], None, rec
                else:
                    yield rec["path"], storage.blob_name(prefix, rec["path"]), rec
        else:
            client = deps.container_client(inp["container"])
            start = f"{prefix}/" if prefix else None
            # the SDK pages the listing (5000 names per request) behind this iterator
            for blob in client.list_blobs(name_starts_with=start, include=["metadata"]):
                if is_reserved(blob.name):  # work files of multi-host runs, not backed-up content
                    continue
                meta = blob.metadata or {}
                rec = {"size": blob.size, "md5": md5_b64(blob.content_settings.content_md5),
                       "mtime_ns": _int_or_none(meta.get(storage.META_MTIME))}
                yield blob.name[len(start or ""):], blob.name, rec

    for relpath, name, rec in candidates():
        if name is None:  # the run itself failed to back this file up
            n_skipped += 1
            if len(skipped) < MAX_LISTED:
                skipped.append({"path": relpath, "reason": f"not backed up by the run: {rec['error']}"})
            continue
        try:
            safe_relpath(relpath)
        except UnsafeName as exc:
            n_failed += 1
            if len(failures) < MAX_LISTED:
                failures.append({"path": name, "error": f"refused: {exc}"})
            continue
        if not selected(relpath):
            continue
        items.append([name, relpath, int(rec["size"]), rec.get("md5"), rec.get("mtime_ns")])
    pages = plan_pages(items, min_batches=int(inp.get("min_batches", 1)))
    for number, page in enumerate(pages):
        deps.work.write_page(restore_id, number, page)
    return {"pages": len(pages), "files_total": len(items) + n_failed, "bytes_total": sum(i[2] for i in items),
            "files_failed": n_failed, "failures": failures, "files_skipped": n_skipped, "skipped": skipped}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _safe_parent(dest: str, relpath: str) -> str:
    """Create the parent directories of *relpath* under *dest* without following symlinks."""
    current = dest
    for part in relpath.split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:  # a parallel batch made it first
                pass
            st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeName(f"{current!r} is not a directory (symlinks in the destination are not followed)")
    real_dest = os.path.realpath(dest)
    real = os.path.realpath(current)
    if real != real_dest and not real.startswith(real_dest + os.sep):
        raise UnsafeName("resolves outside the destination")
    return current


def _temp_name(parent: str, base: str) -> str:
    name = f".{base}{TEMP_SUFFIX}"
    if len(os.fsencode(name)) > 255:
        name = f".{hashlib.sha1(os.fsencode(base)).hexdigest()[:16]}{TEMP_SUFFIX}"
    return os.path.join(parent, name)


@dataclass
class Outcome:
    kind: str  # "restored", "skipped" or "failed"
    reason: str = ""
    size: int = 0


def restore_one(client: ContainerClient, dest: str, item: list[Any], *, overwrite: bool, threads: int) -> Outcome:
    name, relpath, size, md5, mtime_ns = item
    safe_relpath(relpath)
    parent = _safe_parent(dest, relpath)
    base = relpath.rsplit("/", 1)[-1]
    final = os.path.join(parent, base)
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            return Outcome("failed", "destination exists and is not a regular file")
        if md5 and st.st_size == size and storage.file_md5_b64(final) == md5:
            return Outcome("skipped", "identical file exists", size)
        if not overwrite:
            return Outcome("failed", "destination exists and differs (use --overwrite)")

    blob = client.get_blob_client(name)
    tmp = _temp_name(parent, base)
    # O_NOFOLLOW: a symlink planted at the temporary name is refused, never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            props = _download_into(blob, fd, size, threads)
        finally:
            os.close(fd)
        blob_md5 = md5_b64(props.content_settings.content_md5)
        if md5 and blob_md5 and blob_md5 != md5:
            raise _Mismatch("blob changed since the backup run (Content-MD5 differs from the run record)")
        if props.size != size:
            raise _Mismatch(f"blob is {props.size} bytes, expected {size}")
        expected = md5 or blob_md5
        if expected and storage.file_md5_b64(tmp) != expected:
            raise _Mismatch("downloaded content does not match its Content-MD5")
        meta = props.metadata or {}
        mode = meta.get(storage.META_MODE)
        # setuid/setgid are never restored: blob metadata is not trusted to mint privileged files
        os.chmod(tmp, (int(mode, 8) & 0o1777) if mode and mode.isdigit() else 0o644)
        when = mtime_ns if mtime_ns is not None else _int_or_none(meta.get(storage.META_MTIME))
        if when is not None:
            os.utime(tmp, ns=(when, when))
        os.replace(tmp, final)
    except _Mismatch as exc:
        _unlink(tmp)
        return Outcome("failed", str(exc))
    except BaseException:
        _unlink(tmp)
        raise
    return Outcome("restored", size=size)


class _Mismatch(Exception):
    pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _download_into(blob, fd: int, size: int, threads: int):
    if size <= RANGE_BYTES:
        downloader = blob.download_blob()
        os.write(fd, downloader.readall())
        return downloader.properties
    props = blob.get_blob_properties()
    # every range is pinned to the same blob version: a blob rewritten mid-restore fails, never mixes
    pinned = {"etag": props.etag, "match_condition": MatchConditions.IfNotModified}

    def fetch(offset: int) -> None:
        data = blob.download_blob(offset=offset, length=min(RANGE_BYTES, props.size - offset), **pinned).readall()
        os.pwrite(fd, data, offset)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(fetch, range(0, props.size, RANGE_BYTES)))
    os.ftruncate(fd, props.size)
    return props


def restore_page(deps: ActivityDeps, restore_id: str, page: int, dest: str, container: str,
                 overwrite: bool) -> dict[str, Any]:
    client = deps.container_client(container)
    result = {"files_restored": 0, "bytes_restored": 0, "files_skipped": 0, "files_failed": 0,
              "files_done": 0, "bytes_done": 0, "failures": [], "skipped": []}
    records: list[dict[str, Any]] = []
    for item in deps.work.read_page(restore_id, page):
        if deps.cancelled(restore_id):  # `sitebackup cancel` stops a restore at the next file boundary
            break
        try:
            outcome = restore_one(client, dest, item, overwrite=overwrite, threads=deps.large_file_threads)
        except UnsafeName as exc:
            outcome = Outcome("failed", f"refused: {exc}")
        except ResourceNotFoundError:
            outcome = Outcome("failed", "blob not found")
        except OSError as exc:
            outcome = Outcome("failed", exc.strerror or type(exc).__name__)
        except Exception as exc:
            fatal = storage.classify(exc, deps.endpoint)
            if fatal is not None:
                raise fatal from None
            outcome = Outcome("failed", storage.redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
        result["files_done"] += 1
        result["bytes_done"] += item[2]
        if outcome.kind == "restored":
            result["files_restored"] += 1
            result["bytes_restored"] += outcome.size
            records.append({"path": item[1], "size": item[2]})
        elif outcome.kind == "skipped":
            result["files_skipped"] += 1
            if len(result["skipped"]) < MAX_LISTED:
                result["skipped"].append({"path": item[1], "reason": outcome.reason})
            records.append({"path": item[1], "size": item[2], "skipped": outcome.reason})
        else:
            result["files_failed"] += 1
            if len(result["failures"]) < MAX_LISTED:
                result["failures"].append({"path": item[1], "error": outcome.reason})
            records.append({"path": item[1], "error": outcome.reason})
    deps.work.write_result(restore_id, page, records)
    return result


def build_restore_activities(deps: ActivityDeps) -> list[task.Activity[Any, Any]]:
    """The restore activities bound to *deps*, named with their durable names."""

    def plan(ctx: task.ActivityContext, inp: dict[str, Any]) -> dict[str, Any]:
        return plan_restore(deps, ctx.orchestration_id, inp)

    def batch(ctx: task.ActivityContext, inp: dict[str, Any]) -> dict[str, Any]:
        try:
            return restore_page(deps, ctx.orchestration_id, int(inp["page"]), inp["dest"], inp["container"],
                                bool(inp.get("overwrite")))
        except DestinationError:
            raise
        except Exception as exc:
            log.debug("restore batch failed", exc_info=True)
            raise RuntimeError(storage.redact(str(exc))) from None

    plan.__name__ = PLAN_RESTORE
    batch.__name__ = RESTORE_BATCH
    return [plan, batch]


# ----------------------------------------------------------------------------- runner

@dataclass
class RestoreRequest:
    dest: Path
    run_id: str | None = None
    container: str | None = None
    prefix: str = ""
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overwrite: bool = False
    concurrency: int = DEFAULT_WINDOW
    state_dir: Path = field(default_factory=Path)


def validate_restore(dest: str | Path, *, run_id: str | None, container: str | None, prefix: str | None,
                     include: list[str], exclude: list[str], overwrite: bool, concurrency: int,
                     state_dir: Path) -> RestoreRequest:
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"destination {str(dest)!r} is not a directory")
    if (run_id is None) == (container is None):
        raise InputError("give either a run ID or --container, not both")
    if run_id is not None and prefix:
        raise InputError("--prefix goes with --container; a run ID already knows its prefix")
    return RestoreRequest(dest=path.resolve(), run_id=run_id,
                          container=storage.validate_container_name(container) if container else None,
                          prefix=storage.normalize_prefix(prefix), include=list(include), exclude=list(exclude),
                          overwrite=overwrite, concurrency=concurrency, state_dir=state_dir)


def backup_run_input(client: dt_client.TaskHubGrpcClient, run_id: str) -> dict[str, Any]:
    """The orchestration input of backup *run_id*: its source, container and prefix."""
    state = client.get_orchestration_state(run_id, fetch_payloads=True)
    if state is None:
        raise InputError(f"no run with id {run_id!r} in this state directory or task hub")
    if state.name != BACKUP_ORCHESTRATION or not state.serialized_input:
        raise InputError(f"run {run_id!r} is not a backup")
    return state.get_input()


def check_container(settings: storage.StorageSettings, container: str) -> str:
    """Pre-flight: the container must exist (a restore never creates one); return the endpoint label."""
    service, label = storage.make_service_client(settings, quick=True)
    try:
        service.get_container_client(container).get_container_properties()
    except ResourceNotFoundError:
        raise InputError(f"container {container!r} does not exist at {label}") from None
    except Exception as exc:
        err = storage.classify(exc, label)
        if err is not None:
            raise err from None
        raise DestinationError(f"cannot use container {container!r} at {label}: "
                               f"{storage.redact(str(exc)).splitlines()[0]}") from None
    finally:
        service.close()
    return label


def _find_unfinished(client: dt_client.TaskHubGrpcClient, inp: dict[str, Any]) -> str | None:
    query = dt_client.OrchestrationQuery(runtime_status=UNFINISHED, fetch_inputs_and_outputs=True)
    for state in client.get_all_orchestration_states(query):
        if state.name != RESTORE_ORCHESTRATION or not state.serialized_input:
            continue
        other = state.get_input() or {}
        if all(other.get(k) == inp[k] for k in ("dest", "container", "prefix", "run_id")):
            return state.instance_id
    return None


def run_restore(request: RestoreRequest, settings: storage.StorageSettings, printer: Printer,
                taskhub: TaskHubSettings | None = None) -> dict[str, Any]:
    """Schedule (or re-attach to) a restore and host its worker until it finishes.

    Under the scheduler (*taskhub*) any worker on the task hub may take download batches, so DEST
    must be a path every worker sees, like a backup's source."""
    if not settings.configured:
        raise InputError(storage.NOT_CONFIGURED)
    with open_backend(request.state_dir, taskhub) as runtime:
        deps = activity_deps(settings, request.state_dir, request.concurrency, runtime)
        client = runtime.client()
        try:
            container, prefix = request.container, request.prefix
            if request.run_id:
                backup_inp = backup_run_input(client, request.run_id)
                container, prefix = backup_inp["container"], backup_inp.get("prefix", "")
            # first: under the scheduler the run record itself is read from the container
            endpoint = check_container(settings, container)
            if request.run_id and next(iter(deps.work.iter_results(request.run_id)), None) is None:
                raise InputError(f"run {request.run_id!r} recorded no files (nothing was copied, or it was purged)")
            request.dest.mkdir(parents=True, exist_ok=True)
            inp = {"dest": str(request.dest), "container": container, "prefix": prefix, "run_id": request.run_id,
                   "endpoint": endpoint,
                   "options": {"concurrency": request.concurrency, "overwrite": request.overwrite,
                               "include": request.include, "exclude": request.exclude}}
            # "source" is a label for `status` and `list`, which show every run's source
            inp["source"] = restore_source_label(inp)
            instance_id = _find_unfinished(client, inp)
            resumed = instance_id is not None
            if instance_id is None:
                instance_id = client.schedule_new_orchestration(RESTORE_ORCHESTRATION, input=inp,
                                                                instance_id=new_instance_id())
        finally:
            client.close()
        printer.start({"instance_id": instance_id, "source": inp["source"], "destination": inp["dest"],
                       "endpoint": endpoint, "resumed": resumed, "action": "Restoring"})
        return host_and_watch(runtime, deps, request.concurrency, instance_id, printer)

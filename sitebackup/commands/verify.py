"""The verify command: every file a backup run recorded has a stored copy with the recorded size,
Content-MD5 and access tier: the copy ``restore ID`` would read (the current blob, or the snapshot holding
that version).

A read-only check, so one listing and a plain thread pool rather than an orchestration. ``local``
also compares the source files on disk; ``download`` re-hashes that copy's content instead of
trusting its Content-MD5.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient

from sitebackup.blob.clients import StorageSettings, check_container, service_client
from sitebackup.blob.errors import ARCHIVED, classify, is_archived, one_line
from sitebackup.blob.history import Copy, choose, copies_by_name, copy_client
from sitebackup.blob.naming import blob_name
from sitebackup.commands.hosting import backup_run_input
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import DestinationError, InputError
from sitebackup.local.files import b64, file_md5_b64

DEFAULT_THREADS = 16


def _blob_problem(container: ContainerClient, copies: list[Copy], rec: dict[str, Any], download: bool) -> str | None:
    if not copies:
        return "blob missing"
    copy = choose(copies, rec["md5"])
    if copy is None:
        return "no copy with the recorded Content-MD5 (the blob was overwritten, or the version pruned)"
    if copy.size != rec["size"]:
        return f"blob size {copy.size} != recorded {rec['size']}"
    tier = getattr(copy.tier, "value", copy.tier)
    if rec.get("tier") and tier != rec["tier"]:
        return f"blob tier {tier} != recorded {rec['tier']}"
    if download:
        digest = hashlib.md5()
        try:
            for chunk in copy_client(container, copy).download_blob().chunks():
                digest.update(chunk)
        except ResourceNotFoundError:
            return "blob missing"
        if b64(digest.digest()) != rec["md5"]:
            return "blob content does not match the recorded MD5"
    return None


def _local_problem(source: Path, rec: dict[str, Any]) -> str | None:
    path = os.path.join(source, rec["path"])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "local file missing"
    except OSError as exc:
        return f"local file unreadable: {exc.strerror}"
    if st.st_size != rec["size"]:
        return f"local size {st.st_size} != recorded {rec['size']}"
    try:
        if file_md5_b64(path) != rec["md5"]:
            return "local content differs from the recorded MD5"
    except OSError as exc:
        return f"local file unreadable: {exc.strerror}"
    return None


def verify_run(state_dir: Path, run_id: str, settings: StorageSettings, *, local: bool = False,
               download: bool = False, threads: int = DEFAULT_THREADS,
               taskhub: TaskHubSettings | None = None) -> dict[str, Any]:
    settings.require()
    with open_backend(state_dir, taskhub) as runtime, service_client(settings) as (service, _label):
        work = runtime.work_store(service)
        with runtime.connected() as client:
            inp = backup_run_input(client, run_id, work)
        # first: under the scheduler the run record itself is read from the container
        check_container(settings, inp.container)
        records = list(work.iter_results(run_id))
    if not records:
        raise InputError(f"run {run_id!r} recorded no files (nothing was copied, or it was purged)")
    backed_up = [rec for rec in records if "error" not in rec]
    with service_client(settings, pool_size=threads + 4) as (service, label):
        container = service.get_container_client(inp.container)
        names = {rec["path"]: blob_name(inp.prefix, rec["path"]) for rec in backed_up}
        try:
            copies = copies_by_name(container, inp.prefix, set(names.values()))
        except Exception as exc:
            raise classify(exc, label) or DestinationError(f"cannot list {inp.container!r}: {one_line(exc)}") from None

        def check(rec: dict[str, Any]) -> dict[str, str] | None:
            name = names[rec["path"]]
            try:
                problem = _blob_problem(container, copies.get(name, []), rec, download)
            except Exception as exc:
                fatal = classify(exc, label)
                if fatal is not None:
                    raise fatal from None
                problem = f"cannot check blob: {ARCHIVED if is_archived(exc) else one_line(exc)}"
            if problem is None and local:
                problem = _local_problem(Path(inp.source), rec)
            return None if problem is None else {"path": rec["path"], "blob": name, "problem": problem}

        with ThreadPoolExecutor(max_workers=threads) as pool:
            mismatches = [m for m in pool.map(check, backed_up) if m is not None]
    return {
        "run_id": run_id, "container": inp.container, "prefix": inp.prefix, "source": inp.source,
        "local": local, "download": download,
        "files_checked": len(backed_up), "files_ok": len(backed_up) - len(mismatches),
        "files_mismatched": len(mismatches), "files_not_backed_up": len(records) - len(backed_up),
        "mismatches": mismatches,
    }

"""The verify command: every blob a backup run recorded is present with the recorded size, Content-MD5 and
access tier.

A read-only check, so a plain thread pool rather than an orchestration. ``local`` also compares
the source files on disk; ``download`` re-hashes blob content instead of trusting Content-MD5.
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
from sitebackup.blob.naming import blob_name
from sitebackup.commands.hosting import backup_run_input
from sitebackup.durable.runtime import open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import InputError
from sitebackup.local.files import b64, file_md5_b64

DEFAULT_THREADS = 16


def _blob_problem(client: ContainerClient, name: str, rec: dict[str, Any], download: bool) -> str | None:
    blob = client.get_blob_client(name)
    try:
        props = blob.get_blob_properties()
    except ResourceNotFoundError:
        return "blob missing"
    if props.size != rec["size"]:
        return f"blob size {props.size} != recorded {rec['size']}"
    tier = getattr(props.blob_tier, "value", props.blob_tier)
    if rec.get("tier") and tier != rec["tier"]:
        return f"blob tier {tier} != recorded {rec['tier']}"
    if download:
        digest = hashlib.md5()
        for chunk in blob.download_blob().chunks():
            digest.update(chunk)
        if b64(digest.digest()) != rec["md5"]:
            return "blob content does not match the recorded MD5"
    elif b64(props.content_settings.content_md5) != rec["md5"]:
        return "blob Content-MD5 differs from the recorded MD5"
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
    with open_backend(state_dir, taskhub) as runtime:
        with runtime.connected() as client:
            inp = backup_run_input(client, run_id)
        # first: under the scheduler the run record itself is read from the container
        check_container(settings, inp.container)
        with service_client(settings) as (service, _label):
            records = list(runtime.work_store(service).iter_results(run_id))
    if not records:
        raise InputError(f"run {run_id!r} recorded no files (nothing was copied, or it was purged)")
    backed_up = [rec for rec in records if "error" not in rec]
    with service_client(settings, pool_size=threads + 4) as (service, label):
        container = service.get_container_client(inp.container)

        def check(rec: dict[str, Any]) -> dict[str, str] | None:
            name = blob_name(inp.prefix, rec["path"])
            try:
                problem = _blob_problem(container, name, rec, download)
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

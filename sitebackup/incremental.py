"""Incremental runs: which earlier run is the baseline, and whether a file changed since it.

The baseline is the newest COMPLETED ``BackupSiteContent`` of the same source, container and
prefix (and endpoint) whose run record is still in the work store. Only its id travels in the
orchestration input; the scan activity reads its record from the work store. A file is
unchanged when its size and modification time equal the recorded ones (``mtime`` mode), or, in
``checksum`` mode, when its content MD5 equals the recorded MD5; ``force`` uploads everything.
"""

from __future__ import annotations

from typing import Any

from durabletask import client as dt_client

from sitebackup.workstore import WorkStore

MODE_MTIME = "mtime"
MODE_CHECKSUM = "checksum"
MODE_FORCE = "force"
MATCH_KEYS = ("source", "container", "prefix")

UPLOAD = "upload"
UNCHANGED = "unchanged"
CHECK = "check"  # same size, content must be hashed to tell


def find_baseline(client: dt_client.TaskHubGrpcClient, inp: dict[str, Any], work: WorkStore,
                  orchestration: str) -> str | None:
    query = dt_client.OrchestrationQuery(runtime_status=[dt_client.OrchestrationStatus.COMPLETED],
                                         fetch_inputs_and_outputs=True)
    candidates = []
    for state in client.get_all_orchestration_states(query):
        if state.name != orchestration or not state.serialized_input:
            continue
        other = state.get_input() or {}
        if not all(other.get(k) == inp.get(k) for k in MATCH_KEYS):
            continue
        if other.get("endpoint") and inp.get("endpoint") and other["endpoint"] != inp["endpoint"]:
            continue
        candidates.append((state.created_at, state.instance_id))
    for _created, instance_id in sorted(candidates, reverse=True):
        if work.has_results(instance_id):
            return instance_id
    return None


def load_baseline(work: WorkStore, baseline_id: str | None) -> dict[str, dict[str, Any]]:
    """path → record of every file the baseline run holds in the container (failed files excluded)."""
    if not baseline_id:
        return {}
    return {r["path"]: r for r in work.iter_results(baseline_id) if "error" not in r and "md5" in r}


def decide(size: int, mtime_ns: int, previous: dict[str, Any] | None, mode: str) -> str:
    if previous is None or mode == MODE_FORCE or previous.get("size") != size:
        return UPLOAD
    if mode == MODE_CHECKSUM:
        return CHECK
    return UNCHANGED if previous.get("mtime_ns") == mtime_ns else UPLOAD


def unchanged_record(relpath: str, previous: dict[str, Any]) -> dict[str, Any]:
    """The new run's record of a skipped file: what the container holds, carried from the baseline."""
    return {"path": relpath, "size": previous["size"], "mtime_ns": previous["mtime_ns"], "md5": previous["md5"],
            "unchanged": True}

"""Managing recorded runs from any terminal: status, list, resume, cancel and purge.

Each function opens the durable backend for the state directory, asks the standard durabletask
client, and returns plain data for the CLI to render.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from durabletask import client as dt_client

from sitebackup import storage
from sitebackup.errors import InputError
from sitebackup.orchestrations import DEFAULT_WINDOW, destination_label
from sitebackup.progress import Printer
from sitebackup.runner import TERMINAL, activity_deps, host_and_watch, summarize, watch
from sitebackup.runtime import Runtime, open_backend
from sitebackup.workstore import WorkStore

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise InputError(f"invalid age {text!r}: use a number and a unit, e.g. 30d, 12h, 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _get(client: dt_client.TaskHubGrpcClient, instance_id: str) -> dt_client.OrchestrationState:
    state = client.get_orchestration_state(instance_id, fetch_payloads=True)
    if state is None:
        raise InputError(f"no run with id {instance_id!r} in this state directory")
    return state


def describe(runtime: Runtime, state: dt_client.OrchestrationState) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict."""
    inp = state.get_input() if state.serialized_input else {}
    inp = inp if isinstance(inp, dict) else {}
    custom = state.get_custom_status() if state.serialized_custom_status else None
    output = state.get_output() if state.serialized_output else None
    info: dict[str, Any] = {
        "instance_id": state.instance_id,
        "kind": state.name,
        "runtime_status": state.runtime_status.name,
        "source": inp.get("source"),
        "destination": destination_label(inp) if "container" in inp else None,
        "endpoint": inp.get("endpoint"),
        "custom_status": custom if isinstance(custom, dict) else None,
        "output": output,
        "created_at": state.created_at.isoformat(),
        "last_updated_at": state.last_updated_at.isoformat(),
        "duration_s": round((state.last_updated_at - state.created_at).total_seconds(), 3),
        "worker_attached": None,
        "failure": None,
    }
    if state.failure_details is not None:
        info["failure"] = {"type": state.failure_details.error_type,
                           "message": storage.redact(state.failure_details.message)}
    if state.runtime_status not in TERMINAL:
        info["worker_attached"] = runtime.worker_attached(state.instance_id)
    return info


def status(state_dir: Path, instance_id: str) -> dict[str, Any]:
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            return describe(runtime, _get(client, instance_id))
        finally:
            client.close()


def watch_status(state_dir: Path, instance_id: str, printer: Printer) -> dict[str, Any]:
    """Draw progress until the run finishes, whoever works on it."""
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            _get(client, instance_id)
            summary = summarize(watch(client, instance_id, printer))
        finally:
            client.close()
    printer.finish(summary)
    return summary


def list_runs(state_dir: Path, *, statuses: list[str] | None = None, limit: int = 20) -> list[dict[str, Any]]:
    wanted = [dt_client.OrchestrationStatus[s.upper()] for s in statuses] if statuses else None
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            query = dt_client.OrchestrationQuery(runtime_status=wanted, fetch_inputs_and_outputs=True)
            states = client.get_all_orchestration_states(query)
        finally:
            client.close()
        states.sort(key=lambda s: s.created_at, reverse=True)
        rows = []
        for state in states[:limit]:
            info = describe(runtime, state)
            counters = info["output"] if isinstance(info["output"], dict) else (info["custom_status"] or {})
            rows.append({
                "instance_id": info["instance_id"], "kind": info["kind"], "runtime_status": info["runtime_status"],
                "source": info["source"], "destination": info["destination"],
                "files": counters.get("files_uploaded", counters.get("files_done", 0)),
                "files_total": counters.get("files_total", 0),
                "bytes": counters.get("bytes_uploaded", counters.get("bytes_done", 0)),
                "created_at": info["created_at"], "duration_s": info["duration_s"],
                "worker_attached": info["worker_attached"],
            })
        return rows


def resume(state_dir: Path, instance_id: str, settings: storage.StorageSettings, printer: Printer) -> dict[str, Any]:
    """Host a worker until *instance_id* finishes (or just watch, if a live process already works on it)."""
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            state = _get(client, instance_id)
        finally:
            client.close()
        info = describe(runtime, state)
        printer.start({"instance_id": instance_id, "source": info["source"], "destination": info["destination"],
                       "endpoint": info["endpoint"], "resumed": True})
        if state.runtime_status in TERMINAL:
            summary = summarize(state)
            printer.finish(summary)
            return summary
        inp = state.get_input() or {}
        if info["worker_attached"]:
            printer.message("another process is working on this run; showing its progress")
            client = runtime.client()
            try:
                summary = summarize(watch(client, instance_id, printer))
            finally:
                client.close()
            printer.finish(summary)
            return summary
        if not settings.configured:
            raise InputError(storage.NOT_CONFIGURED)
        storage.connect(settings, inp["container"])
        concurrency = int(inp.get("options", {}).get("concurrency", DEFAULT_WINDOW))
        return host_and_watch(runtime, activity_deps(settings, state_dir, concurrency, runtime), concurrency, instance_id,
                              printer)


def cancel(state_dir: Path, instance_id: str) -> str:
    """Terminate the run; returns its status before cancelling."""
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            state = _get(client, instance_id)
            if state.runtime_status not in TERMINAL:
                client.terminate_orchestration(instance_id, output={"cancelled": True}, recursive=True)
            return state.runtime_status.name
        finally:
            client.close()


def purge(state_dir: Path, older_than: timedelta) -> list[str]:
    """Remove finished runs created before now - *older_than*, with their run records."""
    cutoff = datetime.now(timezone.utc) - older_than
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            query = dt_client.OrchestrationQuery(created_time_to=cutoff, runtime_status=list(TERMINAL))
            ids = [s.instance_id for s in client.get_all_orchestration_states(query)]
            work = WorkStore(state_dir / "work")
            for instance_id in ids:
                client.purge_orchestration(instance_id, recursive=True)
                work.remove(instance_id)
            return ids
        finally:
            client.close()

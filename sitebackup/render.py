"""Turning run descriptions into text for people: the status report and the runs table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from sitebackup.progress import failure_lines, human_bytes

_KINDS = {"BackupSiteContent": "backup", "RestoreSiteContent": "restore"}


def status_text(info: dict[str, Any]) -> str:
    status = info["runtime_status"]
    lines = [f"{info['instance_id']}  {_KINDS.get(info['kind'], info['kind'])}  {status}"]
    if status in ("RUNNING", "PENDING") and info.get("worker_attached") is False:
        lines[0] += f" — no worker attached; resume with: sitebackup resume {info['instance_id']}"
    if status in ("RUNNING", "PENDING") and info.get("worker_attached") is None:
        # the scheduler does not tell clients which workers hold an instance's work
        lines.append("  worker:       unknown with --taskhub")
    lines.append(f"  source:       {info.get('source')}")
    lines.append(f"  destination:  {info.get('destination')}  ({info.get('endpoint')})")
    lines.append(f"  created:      {info['created_at']}")
    lines.append(f"  last update:  {info['last_updated_at']}  ({info['duration_s']:.1f}s)")
    counters = info.get("output") if isinstance(info.get("output"), dict) else None
    progress = info.get("custom_status") or {}
    if counters:
        verb = "restored" if "files_restored" in counters else "uploaded"  # a restore's output counts restored files
        lines.append(f"  files:        {counters.get(f'files_{verb}', 0)}/{counters.get('files_total', 0)} {verb}, "
                     f"{counters.get('files_skipped', 0)} skipped, {counters.get('files_failed', 0)} failed")
        lines.append(f"  bytes:        {human_bytes(counters.get(f'bytes_{verb}', 0))} {verb} of "
                     f"{human_bytes(counters.get('bytes_total', 0))}")
        lines += ["  " + line for line in failure_lines({**counters, "instance_id": info["instance_id"]})]
    elif progress:
        lines.append(f"  phase:        {progress.get('phase')}")
        lines.append(f"  files:        {progress.get('files_done', 0)}/{progress.get('files_total', 0)} done, "
                     f"{progress.get('files_failed', 0)} failed")
        lines.append(f"  bytes:        {human_bytes(progress.get('bytes_done', 0))} of "
                     f"{human_bytes(progress.get('bytes_total', 0))}")
    if info.get("failure"):
        lines.append(f"  failure:      {info['failure']['type']}: {info['failure']['message']}")
    return "\n".join(lines)


def runs_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not rows:
        console.print("no runs recorded in this state directory")
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "kind", "status", "source → destination", "files", "bytes", "started", "duration"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for row in rows:
        table.add_row(row["instance_id"], _KINDS.get(row["kind"], row["kind"]), row["runtime_status"],
                      f"{row['source']} → {row['destination']}", f"{row['files']}/{row['files_total']}",
                      human_bytes(row["bytes"]), row["created_at"][:19].replace("T", " "), f"{row['duration_s']:.1f}s")
    console.print(table)

"""Turning command results into text for people: the status report, the runs table, the dry-run plan, the prune
report."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sitebackup.ui.printers import KINDS, done_verb, failure_lines, human_bytes


def status_text(info: dict[str, Any]) -> str:
    status = info["runtime_status"]
    lines = [f"{info['instance_id']}  {KINDS.get(info['kind'], info['kind'])}  {status}"]
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
        verb = done_verb({"kind": info["kind"], **counters})
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
    for column in ("id", "kind", "status", "restorable", "source → destination", "files", "bytes", "started",
                   "duration"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for row in rows:
        table.add_row(row["instance_id"], KINDS.get(row["kind"], row["kind"]), row["runtime_status"],
                      row.get("restorable") or "-", f"{row['source']} → {row['destination']}",
                      f"{row['files']}/{row['files_total']}", human_bytes(row["bytes"]),
                      row["created_at"][:19].replace("T", " "), f"{row['duration_s']:.1f}s")
    console.print(table)


def dry_run_plan(plan: dict[str, Any], json_output: bool, quiet: bool) -> None:
    """What a ``--dry-run`` would upload and skip: one line (or JSON event) per file, then the totals."""
    totals = {k: v for k, v in plan.items() if k != "items"}
    if json_output:
        for item in plan["items"]:
            click.echo(json.dumps({"event": "dry_run", **item}))
        click.echo(json.dumps({"event": "summary", **totals}))
        return
    for item in plan["items"]:
        if item["action"] == "fail":
            click.echo(f"FAILED {item['path']}: {item['error']}", err=True)
        elif not quiet:
            detail = item.get("reason") or human_bytes(item.get("size", 0))
            click.echo(f"{'would upload' if item['action'] == 'upload' else item['action']} {item['path']} ({detail})")
    if not quiet:
        click.echo(f"dry run: {plan['files_to_upload']} files would be uploaded ({human_bytes(plan['bytes_to_upload'])}), "
                   f"{plan['files_unchanged']} unchanged ({human_bytes(plan['bytes_skipped'])}), "
                   f"{plan['files_skipped'] - plan['files_unchanged']} skipped, {plan['files_failed']} failed")


def prune_report(report: dict[str, Any]) -> None:
    """One line per run kept or removed, then what was (or with --dry-run would be) freed."""
    for run in report["kept"]:
        click.echo(f"keep   {run['instance_id']}  {run['created_at'][:19].replace('T', ' ')}  "
                   f"({', '.join(run['reasons'])})")
    for run in report["removed"]:
        click.echo(f"remove {run['instance_id']}  {run['created_at'][:19].replace('T', ' ')}  ({run['reason']})")
    for run_id in report["unfinished"]:
        click.echo(f"leave  {run_id}  (unfinished)")
    verb = "would remove" if report["dry_run"] else "removed"
    click.echo(f"{verb} {len(report['removed'])} run(s), {report['blobs_removed']} blob(s) and "
               f"{report['snapshots_removed']} snapshot(s), {human_bytes(report['bytes_removed'])}")

"""Pages of unchanged files recorded by the scan itself: an unchanged tree schedules no copy activity, a
changed file costs the one page that holds it, the record stays whole and in walk order, and a scan run
again after a kill leaves nothing of its first attempt in the record."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from durabletask.internal import orchestrator_service_pb2 as pb
from helpers import many_files, write_tree

from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.local.scan import walk
from sitebackup.model.codec import encode, to_wire
from sitebackup.model.records import FileEntry
from sitebackup.model.work import CopyItem, FileRef, ScanInput, UploadSpec
from sitebackup.workflows import copy
from sitebackup.workflows.names import COPY_BATCH, MAX_DONE_RANGES, SCAN_TREE, SEAL_RECORD


def scheduled(state_dir: Path, instance_id: str) -> list[str]:
    """The activities the run's orchestration scheduled, by name, from the backend's history."""
    with sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT event FROM history WHERE instance_id = ? ORDER BY seq", (instance_id,))
        events = [pb.HistoryEvent.FromString(blob) for (blob,) in rows]
    return [e.taskScheduled.name for e in events if e.HasField("taskScheduled")]


def summary_of(result) -> dict:
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_unchanged_tree_schedules_no_copy_and_a_changed_file_one_page(tmp_path, cli, state_dir, container_name):
    src = write_tree(tmp_path / "src", {f"d{i % 6}/{name}": data
                                        for i, (name, data) in enumerate(many_files(tmp_path, 600, 64).items())})
    args = [src, "-c", container_name, "--json"]
    first = summary_of(cli(*args))
    assert first["files_uploaded"] == 600
    walked = [e.path for e in walk(src) if isinstance(e, FileRef)]
    entries = [e.path for e in walk(src) if isinstance(e, (FileRef, FileEntry))]  # the directories too

    second = summary_of(cli(*args))
    assert (second["files_uploaded"], second["files_unchanged"], second["files_skipped"]) == (0, 600, 600)
    assert scheduled(state_dir, second["instance_id"]) == [SCAN_TREE, SEAL_RECORD]
    work = LocalWorkStore(state_dir / "work")
    assert [r.path for r in work.iter_results(second["instance_id"])] == entries

    (src / walked[300]).write_bytes(b"changed")
    third = summary_of(cli(*args))
    assert (third["files_uploaded"], third["files_unchanged"]) == (1, 599)
    assert scheduled(state_dir, third["instance_id"]) == [SCAN_TREE, COPY_BATCH, SEAL_RECORD]
    records = list(work.iter_results(third["instance_id"]))
    assert [r.path for r in records] == entries
    assert [r.path for r in records if r.is_file and not r.unchanged] == [walked[300]]


def test_a_scan_run_again_leaves_nothing_of_its_earlier_attempt(tmp_path: Path):
    src = write_tree(tmp_path / "src", {"a": b"1", "b/c": b"2"})
    work = LocalWorkStore(tmp_path / "work")
    work.write_result("run", 7, [FileEntry("gone", 1, 1, md5="x")])  # the killed attempt's
    out = copy.scan_source(work, "run", ScanInput(source=str(src), min_pages=1))
    assert out.pages == 1 and out.done == []
    assert list(work.iter_results("run")) == []  # the copies write the record; nothing of the first attempt


def test_the_list_of_pages_done_by_the_scan_stays_short(tmp_path: Path):
    """Unchanged pages between others each make a range; past MAX_DONE_RANGES the copies record them."""
    n = MAX_DONE_RANGES + 10
    # in each directory a new file large enough for block ranges (a page of its own), then an unchanged one
    src = write_tree(tmp_path / "src", {**{f"d{i:03d}/a": b"large" for i in range(n)},
                                        **{f"d{i:03d}/b": b"u" for i in range(n)}})
    work = LocalWorkStore(tmp_path / "work")
    work.write_result("base", 0, [FileEntry(e.path, e.size, e.mtime_ns, md5="m")
                                  for e in walk(src) if isinstance(e, FileRef) and e.path.endswith("/b")])
    out = copy.scan_source(work, "run", ScanInput(source=str(src), min_pages=1, baseline="base",
                                                  upload=UploadSpec(block_size=1)))
    # the first page recorded holds the root's and the directories' entries, the others an unchanged file each
    assert len(out.done) == MAX_DONE_RANGES and out.counts.files_unchanged == MAX_DONE_RANGES - 1
    recorded = {p for span in out.done for p in range(span.first, span.end)}
    written = {int(p.stem) for p in (tmp_path / "work" / "run" / "pages").iterdir()}
    assert recorded.isdisjoint(written) and recorded | written == set(range(out.pages))
    assert len(written) == n * 5 + 11  # five ranges of each large file, the unchanged pages past the cap
    results = list(work.iter_results("run"))
    assert [r.path for r in results if r.is_file] == [f"d{i:03d}/b" for i in range(MAX_DONE_RANGES - 1)]
    assert [r.path for r in results if not r.is_file] == [".", *(f"d{i:03d}" for i in range(n))]


def test_pages_and_records_are_written_as_json_writes_them():
    data = [CopyItem("d/é.txt", 1, 2**62, FileEntry("d/é.txt", md5="x", unchanged=True)),
            {"path": "a\nb", "size": 0, "tier": None, "nested": [CopyItem("b", 2, 3)]}, [], {}]
    assert encode(data) == json.dumps(to_wire(data), separators=(",", ":"), ensure_ascii=False).encode()

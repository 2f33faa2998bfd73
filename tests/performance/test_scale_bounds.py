"""Bounds that keep big backups cheap: history per instance, activity payloads, block-level resume, memory.

Counts and sizes only, never timings. The 100,000-file memory bound is marked slow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from helpers import RESERVED, ROOT, ForwardingProxy, wait_until, write_tree

from sitebackup.blob.workstore import LocalWorkStore as WorkStore
from sitebackup.durable.runtime import open_backend
from sitebackup.local.files import SourceTree, file_md5
from sitebackup.model.codec import to_wire
from sitebackup.model.records import FileEntry
from sitebackup.model.work import (
    BackupCounts,
    CommitOrder,
    CopyInput,
    CopyItem,
    FileRef,
    PageResult,
    RangePage,
    RangeReport,
    RunState,
    ScanInput,
    Span,
    Step,
    UploadSpec,
)
from sitebackup.workflows import blocks, copy
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.workflows.names import MAX_LISTED, PAGES_PER_GENERATION
from sitebackup.workflows.pages import chunk_hash, read_page

MIB = 1024 * 1024


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- pure logic ---------------------------------------------------------------------------------

def test_block_ids_are_deterministic_equal_length_and_distinct():
    block = os.urandom(1000)
    ids = [blocks.content_block_id(block, i) for i in range(10)]
    assert ids == [blocks.content_block_id(block, i) for i in range(10)]
    assert len(set(ids)) == 10 and len({len(i) for i in ids}) == 1
    # other bytes at the same place (a changed file, another cut) never reuse a block
    assert blocks.content_block_id(block[:-1] + bytes([block[-1] ^ 1]), 0) != ids[0]
    assert blocks.content_block_id(block[:500], 0) != ids[0]


def test_count_range_schedules_one_commit_after_the_last_range():
    state = RunState(counts=BackupCounts(), started_at="")
    info = RangeReport(first_page=7, ranges=3)
    assert [blocks.count_range(state, info) for _ in range(3)] == [None, None, Step(7, commit=True)]
    assert state.large[7].ranges_left == 0  # no range of the file left to count
    assert Step(7, commit=True) != Step(7)  # the commit of page 7's file is not page 7's copy


def test_a_failed_range_says_why_to_its_files_commit():
    """Range pages are never rewritten (their hashes are in the page index): why a range failed reaches the
    commit through the orchestration."""
    state = RunState(counts=BackupCounts(), started_at="")
    blocks.count_range(state, RangeReport(first_page=7, ranges=2, range=0, block_id="A", md5="m", digest="d"))
    failed = RangeReport(first_page=7, ranges=2, range=1, error="changed during backup")
    assert blocks.count_range(state, failed) == Step(7, commit=True)
    assert blocks.commit_order(state, 7) == CommitOrder(md5="m", blocks=["A", None], digest="d",
                                                        failed="changed during backup")


def test_scan_cuts_large_files_into_range_pages(tmp_path: Path):
    src = write_tree(tmp_path / "src", {"big.bin": b"x" * (4 * MIB + 1), "small.txt": b"s"})
    work = WorkStore(tmp_path / "work")
    out = copy.scan_source(work, "run1", ScanInput(source=str(src), min_pages=1, upload=UploadSpec(block_size=MIB)))
    # in walk order: the root's entry (recorded by the scan), five ranges of 1 MiB, then one batch with the small file
    assert out.pages == 1 + 5 + 1 and out.done == [Span(0, 1)]
    ranges = [read_page(work, "run1", p, chunk_hash(out.index, p), RangePage) for p in range(1, 6)]
    assert [r.range for r in ranges] == list(range(5))
    assert {r.first_page for r in ranges} == {1} and {r.ranges for r in ranges} == {5}
    assert read_page(work, "run1", 6, chunk_hash(out.index, 6), list[CopyItem])[0].path == "small.txt"


# ---- history and payloads -----------------------------------------------------------------------

def history(state_dir: Path, instance_id: str) -> list[pb.HistoryEvent]:
    with open_backend(state_dir) as runtime:
        client = runtime.client()
        try:
            chunks = client._stub.StreamInstanceHistory(pb.StreamInstanceHistoryRequest(instanceId=instance_id))
            return [event for chunk in chunks for event in chunk.events]
        finally:
            client.close()


def test_history_per_instance_and_payloads_stay_bounded(cli, tmp_path, container_name, state_dir):
    n = 1200
    src = write_tree(tmp_path / "src", {f"d{i % 7}/f{i:05d}.txt": b"%d" % i for i in range(n)})
    # concurrency 128 asks for a page per window slot, 128 of them: more pages than one generation holds
    result = cli(src, "--container", container_name, "--json", "--concurrency", "128")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["files_uploaded"] == n
    pages = len(list((state_dir / "work" / summary["instance_id"] / "results").glob("*.json")))
    assert pages > PAGES_PER_GENERATION  # so continue-as-new had to happen
    events = history(state_dir, summary["instance_id"])
    # the last generation holds at most PAGES_PER_GENERATION pages: ~3 events per page plus a few
    assert 0 < len(events) <= 4 * PAGES_PER_GENERATION + 20
    payloads = [e.taskScheduled.input.value for e in events if e.HasField("taskScheduled")]
    payloads += [e.taskCompleted.result.value for e in events if e.HasField("taskCompleted")]
    assert payloads and max(len(p) for p in payloads) < 4096


def test_the_first_range_hashes_the_file_and_the_commit_gets_that_md5(cli, tmp_path, container_name, state_dir,
                                                                      blob_service):
    """The whole-file MD5 is computed once, by range 0 while the other ranges upload, and handed to the
    commit through the orchestration, so the commit does not read the file again."""
    data = os.urandom(6 * MIB)
    src = write_tree(tmp_path / "src", {"big.bin": data})
    want = base64.b64encode(hashlib.md5(data).digest()).decode()
    result = cli(src, "--container", container_name, "--json", "--block-size", "1")
    assert result.returncode == 0, result.stderr
    events = history(state_dir, summary_of(result)["instance_id"])
    inputs = [json.loads(e.taskScheduled.input.value) for e in events if e.HasField("taskScheduled")]
    outputs = [json.loads(e.taskCompleted.result.value) for e in events if e.HasField("taskCompleted")]
    commits = [i for i in inputs if isinstance(i, dict) and i.get("commit")]
    assert len(commits) == 1 and commits[0]["commit"]["md5"] == want
    hashed = [o for o in outputs if isinstance(o, dict) and (o.get("range") or {}).get("md5")]
    assert len(hashed) == 1 and hashed[0]["range"]["md5"] == want  # one range hashed, not every one
    props = blob_service.get_blob_client(container_name, "big.bin").get_blob_properties()
    assert base64.b64encode(bytes(props.content_settings.content_md5)).decode() == want


def test_copy_output_stays_small_for_a_page_of_hundreds_of_failures(tmp_path):
    """A page of 300 files that all vanished: failures are capped in the output, all kept in the result file."""
    work = WorkStore(tmp_path / "work")
    items = [CopyItem(f"gone/{i:04d}-{'x' * 100}.txt", 10, 1) for i in range(300)]

    class NoClient:
        def get_blob_client(self, name):  # never reached: every file fails at open
            raise AssertionError(name)

    deps = ActivityDeps(container_client=lambda c: NoClient(), work=work, endpoint="http://x")
    with SourceTree(tmp_path / "src") as source:
        out = copy.copy_page(deps, "run1", 0, items, source, "c", "", UploadSpec())
    assert out.counts.files_failed == 300 and len(out.failures) == MAX_LISTED
    assert len(json.dumps(to_wire(out))) < 4096  # the activity's output, as the durable history holds it
    assert sum(1 for r in work.iter_results("run1") if r.error is not None) == 300


# ---- block-level resume through a counting proxy -------------------------------------------------

class CountingProxy(ForwardingProxy):
    """Counts Put Block requests (`comp=block`).

    With *hold_after*, block-list reads after the first *hold_after* wait for ``release``: a range
    activity reads the block list right before it stages, so the test decides when ranges go on.
    """

    def __init__(self, target: str, hold_after: int | None = None):
        self.staged = 0
        self.hold_after = hold_after
        self.block_lists = self.held = 0
        super().__init__(target)

    def intercept(self, request, body):
        hold = False
        with self.lock:
            if request.command == "PUT" and "comp=block&" in request.path + "&":
                self.staged += 1
            if request.command == "GET" and "comp=blocklist" in request.path and self.hold_after is not None:
                self.block_lists += 1
                hold = self.block_lists > self.hold_after
                self.held += hold
        if hold:
            self.release.wait(120)
        return body


def test_resumed_large_file_stages_only_missing_blocks(cli, cli_env, azurite, blob_service, tmp_path,
                                                        container_name):
    block = 8 * MIB  # keeps the file (and the proxy's traffic) small; the run gets --block-size 8
    size = 5 * block + 12345  # above the threshold: 6 ranges
    data = os.urandom(size)
    src = write_tree(tmp_path / "src", {"media/big.bin": data})
    st = (src / "media/big.bin").stat()
    n = blocks.range_count(size, block)
    assert size > blocks.threshold(block) and n == 6
    # an earlier run that was killed after staging ranges 0, 2 and 4
    container = blob_service.get_container_client(container_name)
    container.create_container()
    for index in (0, 2, 4):
        item = RangePage(file=FileRef("media/big.bin", size, st.st_mtime_ns), range=index, ranges=n,
                         block_size=block, first_page=0)
        with SourceTree(src) as source, source.opened("media/big.bin") as fd:
            assert blocks.stage_range(container, fd, "media/big.bin", item)[:2] == (
                min(block, size - index * block), True)

    proxy = CountingProxy(azurite.endpoint)
    try:
        env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
            azurite.endpoint, proxy.endpoint))
        result = cli(src, "--container", container_name, "--json", "--block-size", "8", env=env)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["files_uploaded"] == 1 and summary["bytes_uploaded"] == size
    assert proxy.staged == n - 3
    blob = container.get_blob_client("media/big.bin")
    assert blob.download_blob().readall() == data
    props = blob.get_blob_properties()
    assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()
    assert props.metadata["mtime_ns"] == str(st.st_mtime_ns)


def five_ranges(azurite, blob_service, tmp_path: Path, container_name: str, data: bytes):
    """big.bin (5 MiB of *data*) scanned into five 1 MiB range pages; returns (src, work store, deps, the hashes of
    the page index's chunks)."""
    src = write_tree(tmp_path / "src", {"big.bin": data})
    work = WorkStore(tmp_path / "work")
    out = copy.scan_source(work, "run1", ScanInput(source=str(src), min_pages=1, upload=UploadSpec(block_size=MIB)))
    blob_service.get_container_client(container_name).create_container()
    deps = ActivityDeps(container_client=blob_service.get_container_client, work=work, endpoint=azurite.endpoint)
    return src, work, deps, out.index


def copy_step(deps: ActivityDeps, src: Path, index: list[str], container: str, rng: int, commit: bool = False
              ) -> PageResult[BackupCounts]:
    """The copy activity of range *rng* of big.bin in run1, or (*commit*) the commit of the file whose first range it
    is, with nothing reported by the ranges (the commit hashes the file again). Page 0 is the root's entry: range
    *rng* is page 1 + *rng*."""
    page = 1 + rng
    return copy.copy_step(deps, "run1", CopyInput(source=str(src), container=container, page=page,
                                                  index=chunk_hash(index, page),
                                                  commit=CommitOrder() if commit else None))


def file_results(work: WorkStore) -> list[FileEntry]:
    """run1's record less the root's entry the scan recorded."""
    return [r for r in work.iter_results("run1") if r.is_file]


def sent(result: PageResult[BackupCounts]) -> bool:
    """Whether a range's copy staged its block (False: the service held it already)."""
    assert result.range is not None
    return result.range.sent


def test_large_file_changed_between_staging_and_commit_is_reported_failed(azurite, blob_service, tmp_path,
                                                                          container_name):
    size = 5 * MIB  # above 4 x the 1 MiB block: five ranges
    src, work, deps, index = five_ranges(azurite, blob_service, tmp_path, container_name, os.urandom(size))
    staged = [copy_step(deps, src, index, container_name, p) for p in range(5)]
    assert sum(r.counts.bytes_uploaded for r in staged) == size
    with open(src / "big.bin", "ab") as fh:
        fh.write(b"more")
    out = copy_step(deps, src, index, container_name, 0, commit=True)
    assert out.counts.files_failed == 1 and out.failures[0].error == "changed during backup"
    st = os.stat(src / "big.bin")  # a failed file's entry still records its mode and owner: no copy, no MD5
    assert [(r.path, r.md5, r.error, r.mode, r.uid) for r in file_results(work)] == \
        [("big.bin", None, "changed during backup", st.st_mode & 0o7777, st.st_uid)]
    assert not list(blob_service.get_container_client(container_name).list_blob_names())


def test_cancel_stops_the_ranges_of_a_large_file_and_a_later_run_completes_it(
        cli, cli_env, azurite, blob_service, tmp_path, container_name):
    size, n, passed, window = 16 * MIB, 16, 6, 4
    data = os.urandom(size)
    src = write_tree(tmp_path / "src", {"big.bin": data})
    # from the 7th range on, activities wait at their block-list read (before staging): the window holds 4
    proxy = CountingProxy(azurite.endpoint, hold_after=passed)
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
        azurite.endpoint, proxy.endpoint))
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "--container", container_name, "--json",
                             "--block-size", "1", "--concurrency", str(window)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        instance_id = json.loads(proc.stdout.readline())["instance_id"]
        wait_until(lambda: proxy.held == window, "the window of ranges to reach the gate")
        assert proxy.held == window and proxy.staged == passed
        result = cli("cancel", instance_id)
        assert result.returncode == 0 and "cancelled" in result.stdout
        # once the run's own process has applied the cancel, its ranges see it at their next check
        wait_until(lambda: json.loads(cli("status", instance_id, "--json").stdout)["runtime_status"] == "CANCELLED",
                   "the cancel to be applied")
        proxy.release.set()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert proc.returncode == 7, err  # cancelled
    assert json.loads(out.splitlines()[-1])["runtime_status"] == "CANCELLED"
    # the held ranges stopped without staging; nothing was committed
    assert proxy.staged == passed
    container = blob_service.get_container_client(container_name)
    committed, uncommitted = container.get_blob_client("big.bin").get_block_list("all")
    assert committed == [] and len(uncommitted) == passed < n
    assert not [name for name in container.list_blob_names() if not name.startswith(RESERVED)]  # the job's own aside

    again = cli(src, "--container", container_name, "--json", "--block-size", "1")
    assert again.returncode == 0, again.stderr
    assert summary_of(again)["files_uploaded"] == 1
    blob = container.get_blob_client("big.bin")
    assert blob.download_blob().readall() == data
    assert bytes(blob.get_blob_properties().content_settings.content_md5) == hashlib.md5(data).digest()


def test_a_cancelled_commit_commits_and_records_nothing(azurite, blob_service, tmp_path, container_name):
    src, work, deps, index = five_ranges(azurite, blob_service, tmp_path, container_name, os.urandom(5 * MIB))
    assert [sent(copy_step(deps, src, index, container_name, p)) for p in range(5)] == [True] * 5
    deps.cancelled = lambda run_id, fresh=False: True
    staged = copy_step(deps, src, index, container_name, 0)
    assert staged.counts.bytes_uploaded == 0 and staged.range == RangeReport(first_page=1, ranges=5)
    out = copy_step(deps, src, index, container_name, 0, commit=True)
    assert out.counts.files_uploaded == 0 and out.counts.files_failed == 0 and out.failures == []
    assert not list(blob_service.get_container_client(container_name).list_blob_names())
    assert file_results(work) == []


# ---- memory -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_peak_rss_for_100k_files_stays_under_400_mb(cli_env, tmp_path, container_name):
    src = tmp_path / "src"
    for i in range(100_000):
        path = src / f"d{i // 1000:03d}" / f"f{i:06d}.txt"
        if i % 1000 == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(b"%d" % i)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "--container", container_name,
                                 "--json"], env=cli_env, stdout=out, stderr=err, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the max of all children
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "err").read_text()[-2000:]
    assert json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])["files_uploaded"] == 100_000
    assert usage.ru_maxrss < 400 * 1024  # KiB on Linux


@pytest.mark.slow
def test_peak_rss_for_a_4_gib_file_stays_under_300_mb(cli_env, blob_service, tmp_path, container_name):
    size = 4 * 1024 * MIB
    path = tmp_path / "src" / "huge.bin"
    path.parent.mkdir()
    with open(path, "wb") as fh:  # sparse: random MiBs at the start, middle and end, holes between
        for offset in (0, size // 2, size - 4 * MIB):
            fh.seek(offset)
            fh.write(os.urandom(4 * MIB))
    assert path.stat().st_size == size
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(path.parent), "--container", container_name,
                                 "--json"], env=cli_env, stdout=out, stderr=err, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the max of all children
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "err").read_text()[-2000:]
    assert json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])["files_uploaded"] == 1
    props = blob_service.get_blob_client(container_name, "huge.bin").get_blob_properties()
    # 4 GiB stays in the session's Azurite otherwise: free it before the bounds are checked
    blob_service.get_container_client(container_name).delete_container()
    assert props.size == size
    assert bytes(props.content_settings.content_md5) == file_md5(path)
    print(f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB")
    assert usage.ru_maxrss < 300 * 1024  # KiB on Linux


def test_a_repeated_commit_of_a_committed_file_succeeds(azurite, blob_service, tmp_path, container_name):
    """An activity retried after its commit went through must not report the file failed."""
    data = os.urandom(5 * MIB)
    src, work, deps, index = five_ranges(azurite, blob_service, tmp_path, container_name, data)
    assert [sent(copy_step(deps, src, index, container_name, p)) for p in range(5)] == [True] * 5
    for _ in range(2):
        out = copy_step(deps, src, index, container_name, 0, commit=True)
        assert out.counts.files_uploaded == 1 and out.counts.files_failed == 0
    # ranges of the committed version are not sent again either
    assert [sent(copy_step(deps, src, index, container_name, p)) for p in range(5)] == [False] * 5
    blob = blob_service.get_blob_client(container_name, "big.bin")
    assert blob.download_blob().readall() == data
    assert file_results(work)[0].md5 == base64.b64encode(hashlib.md5(data).digest()).decode()

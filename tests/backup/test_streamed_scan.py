"""The streamed scan: walk order, the baseline read beside the walk, pages cut as the walk goes, and memory
that stays flat whatever the size of the tree (scan activity, unchanged run and dry run)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from helpers import ROOT, unseal, write_tree

from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.local import incremental
from sitebackup.local.scan import walk, walk_key
from sitebackup.model.records import FileEntry, PriorCopy
from sitebackup.model.work import CopyItem, FileRef, RangePage, ScanInput, Span, UploadSpec
from sitebackup.workflows import copy
from sitebackup.workflows.names import PAGE_CUT_MIN, UNCHANGED_PAGE
from sitebackup.workflows.pages import chunk_hash, read_page
from sitebackup.workflows.window import stream_pages

MIB = 1024 * 1024
# the goal: a million files in under 400 MB of RSS; the suite checks the same bound, scaled, on 20,000:
# what the process holds before its first file is taken from the 400 MB, and what is left is scaled
FILES = 20_000
GOAL_MB = 400
# the smaller run of a whole process: past its first pages (the scan's held-back head, a page of unchanged
# files and its record), which every run of more than a few thousand files pays once
WARM = 10_000


def share_mb(base_mb: float) -> float:
    """How much a run of FILES files may grow over *base_mb* for a million to stay under GOAL_MB."""
    return (GOAL_MB - base_mb) * FILES / 1_000_000


def flat_tree(root: Path, files: int, per_dir: int = 100) -> Path:
    """*files* empty files, *per_dir* to a directory, two levels deep (as the benchmark's million tree)."""
    for d in range(-(-files // per_dir)):
        folder = root / f"g{d // 10:03d}" / f"d{d % 10}"
        folder.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            (folder / f"f{i:03d}").touch()
    return root


def records_of(root: Path) -> list[FileEntry]:
    """A run record of every file of *root* as a backup writes it, in walk order."""
    return [FileEntry(e.path, e.size, e.mtime_ns, md5="1B2M2Y8AsgTpgAmY7PhCfg==", etag='"0x1"')
            for e in walk(root) if isinstance(e, FileRef)]


def write_record(work: LocalWorkStore, run_id: str, records: list[FileEntry], page: int = 4096) -> None:
    for start in range(0, len(records), page):
        work.write_result(run_id, start // page, records[start:start + page])


# ---- walk order and the merge-join --------------------------------------------------------------

def test_walk_key_sorts_paths_as_the_walk_yields_them(tmp_path: Path):
    names = ["a", "a.txt", "a-b", "ab", "b/x", "a/z", "a/b/c", "a/b.txt", "a/b-c/d", "Z", "é", "a/a/a/a", "0"]
    src = write_tree(tmp_path / "src", {n if "/" in n or n not in ("a", "ab") else n + "/f": b"" for n in names})
    walked = [e.path for e in walk(src) if isinstance(e, FileRef)]
    assert len(walked) == len(names)
    shuffled = random.Random(1).sample(walked, len(walked))
    assert sorted(shuffled, key=walk_key) == walked


def test_baseline_finds_each_record_in_one_pass_and_nothing_it_does_not_hold():
    records = [FileEntry(p, 1, 1, md5=p) for p in ("a", "c", "d/x", "d/y", "e/f/g")]
    records.insert(2, FileEntry("c2", error="failed"))
    read = []
    baseline = incremental.Baseline(read.append(r) or r for r in records)
    found = {p: baseline.get(p) for p in ("0", "a", "b", "c", "c2", "d/w", "d/y", "e/f/g", "z")}
    assert {p: r.md5 for p, r in found.items() if r} == {"a": "a", "c": "c", "d/y": "d/y", "e/f/g": "e/f/g"}
    assert read == records  # each record read once


def recorded(root: Path) -> list[FileEntry]:
    """A run record of *root*'s tree as a backup writes it, in walk order: its directories, symlinks and files."""
    entries = []
    for found in incremental.compare(root, patterns=[], follow_symlinks=False, baseline=(), mode="mtime"):
        if isinstance(found, incremental.Found):
            entries.append(found.entry)
        elif isinstance(found, incremental.Compared):
            entries.append(FileEntry(found.file.path, found.file.size, found.file.mtime_ns, md5="x"))
    return entries


def test_the_walk_hands_over_every_recorded_entry_it_no_longer_finds_in_walk_order(tmp_path: Path):
    src = write_tree(tmp_path / "src", {"a.txt": b"a", "gone.txt": b"g", "old/f.txt": b"f", "x": b"x", "keep/k": b"k"})
    for name in ("empty", "d"):
        (src / name).mkdir()
    (src / "link").symlink_to("a.txt")
    baseline = recorded(src)
    assert [(e.path, e.kind) for e in baseline][:4] == [(".", "dir"), ("a.txt", "file"), ("d", "dir"),
                                                        ("empty", "dir")]

    (src / "gone.txt").unlink()
    shutil.rmtree(src / "old")
    (src / "empty").rmdir()
    (src / "link").unlink()
    (src / "d").rmdir()
    (src / "d").write_bytes(b"a file where a directory was")
    (src / "x").unlink()
    write_tree(src, {"x/in.txt": b"a directory where a file was"})

    gone: list[FileEntry] = []
    walked = list(incremental.compare(src, patterns=[], follow_symlinks=False, baseline=baseline, mode="mtime",
                                      on_gone=gone.append))
    assert [(e.path, e.kind) for e in gone] == [("d", "dir"), ("empty", "dir"), ("gone.txt", "file"),
                                                ("link", "symlink"), ("old", "dir"), ("x", "file"),
                                                ("old/f.txt", "file")]
    # what took a path of another kind is new, found with no record of its own
    new = {f.file.path if isinstance(f, incremental.Compared) else f.entry.path: f.previous for f in walked}
    assert new["d"] is None and new["x"] is None and new["x/in.txt"] is None
    assert new["a.txt"] is not None and new["keep"] is not None and new["."] is not None
    # without on_gone the scan reads the record only as far as the walk goes, and hands nothing over
    assert [f.previous is None for f in incremental.compare(src, patterns=[], follow_symlinks=False,
                                                            baseline=baseline, mode="mtime")] == \
        [f.previous is None for f in walked]


def test_records_overlaid_hold_directories_and_symlinks_in_walk_order():
    cancelled = [FileEntry(".", kind="dir", mode=0o700), FileEntry("a", kind="dir", mode=0o700),
                 FileEntry("a/x", 1, md5="c")]
    baseline = [FileEntry(".", kind="dir", mode=0o755), FileEntry("a", kind="dir", mode=0o755),
                FileEntry("b", kind="symlink", target="a"), FileEntry("a/x", 1, md5="b"), FileEntry("a/y", 1, md5="b")]
    merged = list(incremental.overlaid([cancelled, baseline]))
    assert [(e.path, e.kind, e.mode, e.md5) for e in merged] == [
        (".", "dir", 0o700, None), ("a", "dir", 0o700, None), ("b", "symlink", None, None), ("a/x", "file", None, "c"),
        ("a/y", "file", None, "b")]


# ---- pages as the walk goes ---------------------------------------------------------------------

def test_stream_pages_cuts_a_small_tree_to_fill_the_window():
    rng = random.Random(7)
    for n in (0, 1, 5, 63, 64, 300, 3000):
        sizes = [rng.choice((0, 10, 1000, 3 * MIB)) for _ in range(n)]
        for min_batches in (1, 4, 64):
            pages = list(stream_pages(sizes, lambda s: s, min_batches=min_batches))
            assert [s for page in pages for s in page] == sizes
            # a page takes at most its share of the files: min_batches pages or so, whatever the sizes
            assert all(len(page) <= max(1, -(-n // min_batches)) and sum(page) <= 16 * MIB for page in pages)


def test_stream_pages_keeps_order_and_bounds_every_page():
    rng = random.Random(3)
    items = [(i, rng.random() < 0.7, rng.random() < 0.01) for i in range(30_000)]  # (n, unchanged, large)
    pages = list(stream_pages(items, lambda item: 1000, min_batches=64, light=lambda item: item[1],
                              alone=lambda item: item[2]))
    assert [item for page in pages for item in page] == items
    for page in pages:
        assert len(page) <= 4096 and sum(not light for _, light, _ in page) <= 256
        assert len(page) == 1 or not any(large for _, _, large in page)
    first = pages[:64]
    assert all(sum(not light for _, light, _ in page) <= 64 for page in first)  # the head cut smaller


def _paths(files: int) -> list[str]:
    return [f"g{i // 1000:03d}/d{i // 100 % 10}/f{i % 100:03d}" for i in range(files)]


def _cut(entries: list[FileEntry], ends_page=copy.ends_page) -> list[tuple[str, ...]]:
    light = lambda item: True  # noqa: E731 - unchanged files, as most of a quiet tree's
    return [tuple(e.path for e in page) for page in stream_pages(entries, lambda item: 0, min_batches=64,
                                                                     light=light, ends_page=ends_page)]


def test_a_backups_pages_end_at_the_same_paths_when_a_file_is_added_or_removed():
    """Pages of unchanged files end where their paths say (``copy.ends_page``), not after a count: a file added
    near the start of the tree changes its own page and at most the next, where counted pages all shift (and a
    run would seal, and send, a whole new record)."""
    paths = _paths(40_000)
    before = _cut([FileEntry(p) for p in paths])
    assert [e for page in before for e in page] == paths
    assert all(PAGE_CUT_MIN <= len(page) <= UNCHANGED_PAGE for page in before[:-1]), [len(p) for p in before]
    assert len(before) >= 40_000 // UNCHANGED_PAGE + 2  # some pages did end at a path, not at the count
    for changed in (paths[:100] + ["g000/d1/new"] + paths[100:], paths[:5000] + paths[5001:]):
        after = _cut([FileEntry(p) for p in changed])
        assert [e for page in after for e in page] == changed
        assert len(set(after) - set(before)) <= 2, (len(after), len(set(after) - set(before)))
    # cut by count alone, every page after the added file differs: what the rule above is for
    counted = _cut([FileEntry(p) for p in paths], ends_page=None)
    added = _cut([FileEntry(p) for p in paths[:100] + ["g000/d1/new"] + paths[100:]], ends_page=None)
    assert len(set(added) - set(counted)) == len(added)


def test_an_unchanged_scan_records_the_same_pages_but_the_one_a_file_was_added_to(tmp_path: Path):
    """The scan itself: of an unchanged tree with a file added near its start, every page of the record but
    the added file's (and at most the next) holds the same bytes as the scan without it wrote."""
    src = flat_tree(tmp_path / "src", 20_000)
    work = LocalWorkStore(tmp_path / "work")
    write_record(work, "base", records_of(src))

    def pages_of(run_id: str) -> tuple[int, set[bytes]]:
        out = copy.scan_source(work, run_id, ScanInput(source=str(src), min_pages=1, baseline="base"))
        return out.pages, {data for _page, data in work.result_pages(run_id)}

    n_before, before = pages_of("quiet")
    (src / "g000" / "d0" / "f000a").write_bytes(b"new")
    n_after, after = pages_of("added")
    assert n_before >= 20_000 // UNCHANGED_PAGE + 1 and len(before) == n_before
    assert len(after) == n_after - 1  # the new file's page goes to a copy; the others are recorded here
    assert len(before - after) <= 2, (n_before, n_after, len(before - after))


def test_stream_pages_holds_back_only_its_head():
    pulled = []

    def items():
        for i in range(100_000):
            pulled.append(i)
            yield i

    first = next(iter(stream_pages(items(), lambda item: 1, min_batches=64)))
    assert len(first) == 64 and len(pulled) <= 4096 + 1


def test_scan_pages_mix_new_unchanged_and_large_files_in_walk_order(tmp_path: Path):
    """Pages follow the walk whatever each file needs, so the results (the run's record) are in walk order."""
    src = write_tree(tmp_path / "src", {"a/1": b"1", "a/big": b"x" * (4 * MIB + 1), "a/b/2": b"22", "c": b"3"})
    work = LocalWorkStore(tmp_path / "work")
    base = [r if r.path != "a/big" else msgspec.structs.replace(r, size=5) for r in records_of(src) if r.path != "a/1"]
    write_record(work, "base", base)  # a/1 is new, a/big changed
    out = copy.scan_source(work, "run", ScanInput(source=str(src), min_pages=1, baseline="base",
                                                  upload=UploadSpec(block_size=MIB)))
    assert out.pages == 1 + 5 + 1
    first = read_page(work, "run", 0, chunk_hash(out.index, 0), list[CopyItem])
    # the directories' entries ride along, recorded as the walk found them (light: no copy)
    assert [(i.path, i.previous is None) for i in first] == [(".", False), ("a", False), ("c", False), ("a/1", True),
                                                            ("a/b", False)]
    assert [i.previous.kind for i in first if i.previous] == ["dir", "dir", "file", "dir"]
    # the last page holds only an unchanged file: recorded by the scan, no page to copy
    assert out.done == [Span(6, 7)] and (out.counts.files_unchanged, out.counts.bytes_skipped) == (1, 2)
    assert not (tmp_path / "work" / "run" / "pages" / "000006.json").exists()
    assert [(r.path, r.unchanged) for r in work.iter_results("run")] == [("a/b/2", True)]
    ranges = [read_page(work, "run", p, chunk_hash(out.index, p), RangePage) for p in range(1, 6)]
    assert {r.file.path for r in ranges} == {"a/big"} and {r.first_page for r in ranges} == {1}
    previous = ranges[0].previous  # kept as a snapshot when replaced, and the record's copy should the file fail
    assert previous is not None and PriorCopy.of(previous) == PriorCopy("1B2M2Y8AsgTpgAmY7PhCfg==", '"0x1"')
    # on disk, a range page names its file [path, size, mtime] and the baseline's entry of it
    raw = json.loads((tmp_path / "work" / "run" / "pages" / "000001.json").read_text())
    assert raw["file"][0] == "a/big" and raw["previous"]["md5"] == previous.md5


def test_record_of_a_mixed_run_is_in_walk_order_and_the_next_run_finds_every_file(tmp_path, cli, state_dir,
                                                                                   container_name):
    files = {f"d{i % 3}/s{i % 2}/f{i}": str(i).encode() for i in range(12)}
    src = write_tree(tmp_path / "src", {**files, "top": b"t", "d1/big": os.urandom(4 * MIB + 1)})
    args = [src, "-c", container_name, "--json", "--block-size", "1"]
    assert cli(*args).returncode == 0
    (src / "d0" / "s0" / "f0").write_bytes(b"changed")
    (src / "d2" / "new").write_bytes(b"new")
    (src / "d1" / "big").write_bytes(os.urandom(4 * MIB + 2))
    second = cli(*args)
    summary = json.loads(second.stdout.splitlines()[-1])
    assert (summary["files_uploaded"], summary["files_unchanged"]) == (3, 12), second.stderr
    paths = [r.path for r in LocalWorkStore(state_dir / "work").iter_results(summary["instance_id"])]
    assert paths == [e.path for e in walk(src) if isinstance(e, (FileRef, FileEntry))]
    third = json.loads(cli(*args).stdout.splitlines()[-1])
    assert (third["files_uploaded"], third["files_unchanged"]) == (0, 15)


# ---- memory: a bound that does not grow with the tree -------------------------------------------

# VmHWM, not ru_maxrss: that counts the RSS of the process that forked the child too (the test runner's)
PEAK_KB = """
def peak_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
"""

SCAN_IN_A_CHILD = PEAK_KB + """
import json, sys
from pathlib import Path
from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.model.work import ScanInput
from sitebackup.workflows import copy
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak from here on: the scan's, not the imports'
before = peak_kb()
out = copy.scan_source(LocalWorkStore(Path(sys.argv[2])), "run", ScanInput(source=sys.argv[1], min_pages=64,
                                                                           baseline="base"))
print(json.dumps({"files_total": out.counts.files_total, "pages": out.pages, "before_kb": before,
                  "grew_kb": peak_kb() - before}))
"""

# the command itself, telling its peak RSS as it exits
CLI_IN_A_CHILD = PEAK_KB + """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(peak_kb())))
sys.argv[0] = "sitebackup"
runpy.run_module("sitebackup", run_name="__main__")
"""


def scan_in_a_child(src: Path, work: Path) -> dict:
    """The scan of *src* against a record of every file it holds, in a child: its result and RSS growth."""
    shutil.rmtree(work, ignore_errors=True)
    write_record(LocalWorkStore(work), "base", records_of(src))
    child = subprocess.run([sys.executable, "-c", SCAN_IN_A_CHILD, src, work], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


@pytest.mark.processes
def test_scan_of_an_unchanged_tree_grows_rss_by_no_more_than_its_share_of_the_bound(tmp_path: Path):
    """The scan of an unchanged run of FILES files against one of 5,000: what the other files add stays within
    their share of the goal."""
    flat_tree(tmp_path / "src" / "a", 5_000)
    small = scan_in_a_child(tmp_path / "src", tmp_path / "work")
    flat_tree(tmp_path / "src" / "b", FILES - 5_000)
    large = scan_in_a_child(tmp_path / "src", tmp_path / "work")
    assert (small["files_total"], large["files_total"]) == (5_000, FILES)
    # unchanged files: large pages, ended where a path says so once they hold PAGE_CUT_MIN (copy.ends_page)
    assert -(-FILES // UNCHANGED_PAGE) <= large["pages"] <= -(-FILES // PAGE_CUT_MIN)
    share = share_mb(small["before_kb"] / 1024) * (FILES - 5_000) / FILES
    assert (large["grew_kb"] - small["grew_kb"]) / 1024 < share, (small, large)


def peak_rss_mb(args: list[str], env: dict[str, str], out: Path) -> tuple[int, float]:
    """Run sitebackup with stdout to *out*; its exit code and its peak RSS."""
    peak = out.with_suffix(".peak")
    with open(out, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", CLI_IN_A_CHILD, peak, *args], env=env, stdout=fh,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, int(peak.read_text()) / 1024


def stand_for(state_dir: Path, run_id: str, src: Path) -> None:
    """Make *run_id*'s record that of a run of every file *src* holds now (the seed file's line kept)."""
    work = LocalWorkStore(state_dir / "work")
    kept = {r.path: r for r in work.iter_results(run_id)}
    for page in (state_dir / "work" / run_id / "results").iterdir():
        page.unlink()
    write_record(work, run_id, [kept.get(r.path, r) for r in records_of(src)])


def test_unchanged_run_and_dry_run_grow_by_no_more_than_their_share_of_the_bound(tmp_path, cli_env, state_dir,
                                                                                 container_name):
    """An unchanged run and a dry run of FILES files against one of WARM: the RSS they add for the other files
    stays within those files' share of the goal. The record of each baseline stands for a run of the whole
    tree (written here: uploading the files would take minutes); one page in flight (--concurrency 1), as the
    pages in flight are bounded by the window, not by the tree."""
    src = write_tree(tmp_path / "src", {"seed": b"s"})
    # one malloc arena: glibc keeps what a thread freed in that thread's arena, so which worker thread ran
    # each page would show as growth; it is bounded by the threads, not the files
    cli_env = {**cli_env, "MALLOC_ARENA_MAX": "1"}
    args = [str(src), "-c", container_name, "--json", "--concurrency", "1"]

    def runs(n: int, baseline: str) -> tuple[float, float, str]:
        unseal(cli_env["AZURE_STORAGE_CONNECTION_STRING"], container_name, baseline)
        stand_for(state_dir, baseline, src)
        code, dry = peak_rss_mb([*args, "--dry-run"], cli_env, tmp_path / f"dry{n}")
        lines = (tmp_path / f"dry{n}").read_text().splitlines()
        assert code == 0 and len(lines) == n + 2 and json.loads(lines[-1])["files_unchanged"] == n + 1
        code, run = peak_rss_mb(args, cli_env, tmp_path / f"run{n}")
        summary = json.loads((tmp_path / f"run{n}").read_text().splitlines()[-1])
        assert code == 0 and (summary["files_unchanged"], summary["files_uploaded"]) == (n + 1, 0)
        return dry, run, summary["instance_id"]

    assert peak_rss_mb(args, cli_env, tmp_path / "seed")[0] == 0
    seed_id = json.loads((tmp_path / "seed").read_text().splitlines()[-1])["instance_id"]
    flat_tree(src / "a", WARM)
    dry_small, run_small, small_id = runs(WARM, seed_id)
    flat_tree(src / "b", FILES - WARM)
    dry_large, run_large, _ = runs(FILES, small_id)
    share = share_mb(min(dry_small, run_small)) * (FILES - WARM) / FILES
    assert dry_large - dry_small < share and run_large - run_small < share, (dry_small, dry_large, run_small, run_large)

"""Restore planning and verify in bounded memory: run records read page by page in page-number order, the copies of
recorded versions looked up beside them, pages written as the record is read."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, ContentSettings, generate_container_sas
from azurite import ACCOUNT, KEY, Azurite
from helpers import ROOT, RecordingProxy, replace_blob, unseal, write_tree

from sitebackup.blob import history
from sitebackup.blob.workstore import BlobWorkStore, LocalWorkStore, page_number
from sitebackup.local.scan import walk_key
from sitebackup.model.records import FileEntry

# ---- result files in page-number order -----------------------------------------------------------

PAGES = [0, 2, 10, 999_999, 1_000_000, 1_000_001, 12_345_678]


def test_page_number_orders_names_past_six_digits():
    names = [f"work/run/results/{page:06d}.json" for page in PAGES]
    assert sorted(names) != names  # by name, 1000000 sorts before 999999
    assert sorted(reversed(names), key=page_number) == names


@pytest.mark.parametrize("kind", ["local", "blob"])
def test_results_are_read_in_page_number_order(kind, tmp_path: Path, blob_service, container_name):
    if kind == "local":
        work = LocalWorkStore(tmp_path / "work")
    else:
        container = blob_service.create_container(container_name)
        work = BlobWorkStore(lambda instance_id: container)
    for page in reversed(PAGES):
        work.write_result("run", page, [FileEntry(f"p{page}")])
    assert [r.path for r in work.iter_results("run")] == [f"p{page}" for page in PAGES]


# ---- the copies of recorded versions, looked up beside the record --------------------------------

EMPTY_MD5 = base64.b64encode(hashlib.md5(b"").digest()).decode()


def put(container, name: str, data: bytes) -> None:
    container.upload_blob(name, data, overwrite=True,
                          content_settings=ContentSettings(content_md5=bytearray(hashlib.md5(data).digest())))


def list_requests(proxy: RecordingProxy) -> int:
    return sum(1 for method, path, _ in proxy.requests if method == "GET" and "comp=list" in path)


# a prefix's files among its directories' trees in name order ("a-b" < "a.txt" < "a/…" < "a0"), one directory
# over the page size, small trees under it and beside it, and names outside the prefix that sort next to it
TREE = ["p/a-b", "p/a.txt", "p/a0", "p/z", *(f"p/a/f{i:03d}" for i in range(30)), "p/a/s1/x", "p/a/s1/y",
        "p/a/s1/z", "p/a/s2/1", "p/a/s2/2", "p/a/s2/deep/1", "p/a/s2/deep/2", "p/b/1", "p/b/x/1", "p/b/x/2",
        "p-x", "q/p/a.txt"]
GONE = ["p/gone", "p/a/gone", "p/a/s1/gone", "p/b/x/gone"]  # recorded, no copy left in the container


@pytest.fixture
def tree_container(blob_service, container_name):
    container = blob_service.create_container(container_name)
    for name in TREE:
        put(container, name, name.encode())
    # replaced content kept as snapshots, as a backup run keeps it
    for name in ("p/a/f005", "p/b/x/1", "p/a0"):
        replace_blob(container, name, b"new " + name.encode(), keep=True)
    return container


def in_walk_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda name: walk_key(name.removeprefix("p/")))


def truth(container) -> dict[str, set[tuple[str | None, str | None]]]:
    found: dict[str, set] = {}
    for copy in history.list_copies(container):
        found.setdefault(copy.name, set()).add((copy.snapshot, copy.md5))
    return found


def looked_up(lookup: history.CopyLookup, names: list[str]) -> dict[str, set[tuple[str | None, str | None]]]:
    return {name: {(copy.snapshot, copy.md5) for copy in lookup.copies(name)} for name in names}


def test_lookup_in_record_order_finds_every_copy_with_a_request_per_tree_of_a_page(tree_container, azurite):
    proxy = RecordingProxy(azurite.endpoint)
    try:
        service = BlobServiceClient.from_connection_string(
            azurite.connection_string.replace(azurite.endpoint, proxy.endpoint))
        container = service.get_container_client(tree_container.container_name)
        names = in_walk_order([n for n in TREE if n.startswith("p/")] + GONE)
        found = looked_up(history.CopyLookup(container, "p", page_size=10), names)
        paged = list_requests(proxy)
        proxy.requests.clear()
        whole = looked_up(history.CopyLookup(container, "p"), names)
        assert list_requests(proxy) == 1  # a prefix of one page: one listing, as it held everything
    finally:
        proxy.close()
    expected = truth(tree_container)
    assert found == whole == {name: expected.get(name, set()) for name in names}
    assert len(found["p/a/f005"]) == len(found["p/a0"]) == 2 and found["p/a/gone"] == set()
    # p/ and p/a/ are over a page: each listed whole once (its first page), then its own entries read beside the
    # record (p/ in one page, p/a/ in four), where p/gone and p/a/gone are passed and looked up alone;
    # s1, s2 (with deep) and b are held whole
    assert paged == (1 + 1 + 1) + (1 + 4 + 1) + 1 + 1 + 1, paged


def test_lookup_out_of_record_order_costs_requests_not_answers(tree_container):
    names = [n for n in TREE if n.startswith("p/")] + GONE
    shuffled = random.Random(5).sample(names, len(names))
    expected = truth(tree_container)
    assert looked_up(history.CopyLookup(tree_container, "p", page_size=10), shuffled) == \
        {name: expected.get(name, set()) for name in names}


# ---- memory: planning and verifying a run of many files grow by no more than their share ------------

# the goal: a million files in under 400 MB of RSS; checked, scaled, on FILES files against SMALL (both over a
# listing page of 5,000 entries): 12,000 in the default suite, 20,000 in the slow one
SMALL = 5_000
GOAL_MB = 400

# VmHWM, not ru_maxrss: that counts the RSS of the process that forked the child too (the test runner's)
PEAK_KB = """
def peak_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
"""

PLAN_IN_A_CHILD = PEAK_KB + """
import json, os, sys
from pathlib import Path
from azure.storage.blob import BlobServiceClient
from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.workflows import fetch
from sitebackup.workflows.activity import ActivityDeps
from sitebackup.model.work import PlanInput, RestoreOptions
container, work, run_id = sys.argv[1:]
service = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
deps = ActivityDeps(container_client=service.get_container_client, work=LocalWorkStore(Path(work)), endpoint="test")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak from here on: the plan's, not the imports'
before = peak_kb()
out = fetch.plan_restore(deps, "restore-" + run_id, PlanInput(container=container, run_id=run_id, min_pages=64,
                                                             options=RestoreOptions(concurrency=16)))
print(json.dumps({"files_total": out.counts.files_total, "files_failed": out.counts.files_failed, "pages": out.pages,
                  "before_kb": before, "grew_kb": peak_kb() - before}))
"""

# the command itself, telling its peak RSS as it exits
CLI_IN_A_CHILD = PEAK_KB + """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(peak_kb())))
sys.argv[0] = "sitebackup"
runpy.run_module("sitebackup", run_name="__main__")
"""


def share_mb(base_mb: float, files: int) -> float:
    """What the *files* - SMALL more files may add over *base_mb* for a million to stay under GOAL_MB."""
    return (GOAL_MB - base_mb) * (files - SMALL) / 1_000_000


def tree_names(top: str, files: int) -> list[str]:
    """*files* paths under *top*, 100 to a directory, two levels deep (the benchmark's million tree), in walk order."""
    return [f"{top}/g{d // 10:03d}/d{d % 10}/f{i:03d}" for d in range(-(-files // 100))
            for i in range(min(100, files - d * 100))]


async def put_empty(azurite: Azurite, container: str, names: list[str]) -> None:
    """Empty blobs at *names*, as a backup stores them (with their MD5), fast: bare PUTs under one container SAS,
    sparing each request the SDK's pipeline and a signature of its own."""
    sas = generate_container_sas(ACCOUNT, container, account_key=KEY, permission=ContainerSasPermissions(create=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    headers = {"x-ms-blob-type": "BlockBlob", "x-ms-version": "2021-08-06", "x-ms-blob-content-md5": EMPTY_MD5}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:

        async def one(name: str) -> None:
            async with session.put(f"{azurite.endpoint}/{container}/{quote(name)}?{sas}", data=b"",
                                   headers=headers) as response:
                assert response.status == 201, await response.text()

        await asyncio.gather(*map(one, names))


def record_run(state_dir: Path, run_id: str, paths: list[str]) -> None:
    """Make *run_id*'s record that of a run that backed up *paths* (empty files), 4,096 records a page."""
    results = state_dir / "work" / run_id / "results"
    for page in results.iterdir():
        page.unlink()
    work = LocalWorkStore(state_dir / "work")
    records = [{"path": p, "size": 0, "mtime_ns": 1, "md5": EMPTY_MD5, "etag": '"0x1"'} for p in paths]
    for start in range(0, len(records), 4096):
        work.write_result(run_id, start // 4096, records[start:start + 4096])


@pytest.mark.parametrize("files", [12_000, pytest.param(20_000, marks=pytest.mark.slow)])
def test_plan_and_verify_of_a_run_grow_by_no_more_than_their_share_of_the_bound(files, tmp_path, cli, cli_env, azurite,
                                                                                state_dir, container_name):
    """Planning the restore of a run of *files* files and verifying it, against a run of SMALL: the RSS the other
    files add stays within their share of the goal, and the plan lists trees, not files. The run's record is
    written here over a real run's (backing the files up would take minutes); the blobs are real."""
    seed = cli(write_tree(tmp_path / "src", {"seed": b"s"}), "-c", container_name, "--json")
    assert seed.returncode == 0, seed.stderr
    run_id = json.loads(seed.stdout.splitlines()[-1])["instance_id"]
    small, more = tree_names("a", SMALL), tree_names("b", files - SMALL)
    asyncio.run(put_empty(azurite, container_name, small + more))
    # one malloc arena: glibc keeps what a thread freed in that thread's arena (verify checks on a pool)
    env = {**cli_env, "MALLOC_ARENA_MAX": "1"}

    unseal(azurite.connection_string, container_name, run_id)

    def measure(paths: list[str], proxy: RecordingProxy | None = None) -> tuple[dict, float]:
        record_run(state_dir, run_id, paths)
        plan_env = env if proxy is None else {**env, "AZURE_STORAGE_CONNECTION_STRING":
                                              azurite.connection_string.replace(azurite.endpoint, proxy.endpoint)}
        child = subprocess.run([sys.executable, "-c", PLAN_IN_A_CHILD, container_name, state_dir / "work", run_id],
                               env=plan_env, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert child.returncode == 0, child.stderr
        plan = json.loads(child.stdout)
        assert (plan["files_total"], plan["files_failed"]) == (len(paths), 0)
        peak = tmp_path / "verify.peak"
        verified = subprocess.run([sys.executable, "-c", CLI_IN_A_CHILD, peak, "verify", run_id, "--json"], env=env,
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["files_ok"] == len(paths)
        return plan, int(peak.read_text()) / 1024

    plan_small, verify_small = measure(small)
    proxy = RecordingProxy(azurite.endpoint)
    try:
        plan_large, verify_large = measure(small + more, proxy)
    finally:
        proxy.close()
    share = share_mb(min(plan_small["before_kb"] / 1024, verify_small), files)
    assert (plan_large["grew_kb"] - plan_small["grew_kb"]) / 1024 < share, (plan_small, plan_large)
    assert verify_large - verify_small < share, (verify_small, verify_large)
    # the prefix, a/ and b/ are over a page (5,000 entries): each listed once; then every g*/ tree whole
    assert list_requests(proxy) <= 3 + files // 1000, proxy.requests

"""What the container's catalog costs in requests, counted at a proxy in front of Azurite: an unchanged backup
seals its record with a few requests whatever the tree (no page sent), and a restore on a new machine reads the
run's header once per use and each record page once (no timings asserted)."""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import RecordingProxy, env_for, run_cli, write_tree

from sitebackup.blob.records import HeaderCache
from sitebackup.model.codec import DamagedData
from sitebackup.model.records import RunRecord

RESERVED = ".sitebackup/"


def instance(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["instance_id"]


def catalog_requests(proxy: RecordingProxy, container: str) -> Counter[tuple[str, str]]:
    """(method, what) of every request about the reserved prefix: a listing of a folder, or a blob's folder."""
    prefix = f"{urlsplit(proxy.endpoint).path}/{container}/"
    found: Counter[tuple[str, str]] = Counter()
    for method, path, _headers in proxy.requests:
        parts = urlsplit(path)
        name = unquote(parts.path).removeprefix(prefix)
        if "comp=list" in parts.query and f"prefix={RESERVED}" in unquote(parts.query):
            folder = unquote(parts.query).split(f"prefix={RESERVED}")[1].split("&")[0]
            found[(method, "list " + folder)] += 1
        elif name.startswith(RESERVED):
            found[(method, name.removeprefix(RESERVED).split("/")[0])] += 1
    return found


def other_requests(proxy: RecordingProxy, container: str) -> list[tuple[str, str]]:
    """(method, query) of every request that ``catalog_requests`` leaves out: none about the reserved prefix."""
    prefix = f"{urlsplit(proxy.endpoint).path}/{container}"
    found = []
    for method, path, _headers in proxy.requests:
        parts = urlsplit(path)
        if unquote(parts.path).removeprefix(prefix).removeprefix("/").startswith(RESERVED) or \
                f"prefix={RESERVED}" in unquote(parts.query):
            continue
        found.append((method, parts.query))
    return found


def test_an_unchanged_backup_seals_its_record_in_a_few_requests_whatever_the_tree(tmp_path: Path, azurite,
                                                                                  container_name):
    src = write_tree(tmp_path / "site", {f"d{i % 7}/f{i:04d}.txt": f"file {i}".encode() for i in range(600)})
    proxy = RecordingProxy(azurite.endpoint)
    env = env_for(azurite.connection_string.replace(azurite.endpoint, proxy.endpoint), tmp_path / "state")
    try:
        for _ in range(2):  # the second run records every file unchanged: the third seals the same pages
            instance(run_cli([str(src), "-c", container_name, "--json"], env))
        proxy.requests.clear()
        instance(run_cli([str(src), "-c", container_name, "--json"], env))
    finally:
        proxy.close()
    assert catalog_requests(proxy, container_name) == Counter({
        ("GET", "list runs/"): 1,  # the catalog: which runs of the job are sealed (the baseline)
        # whose prefix is whose: the job's own descriptor is not read (without --job the job is this one whatever
        # it says), so in a container of one job the listing alone tells
        ("GET", "list jobs/"): 1,
        # the baseline's header, read once by the scan beside the walk: the seal, in the same process, knows from it
        # what pages the baseline holds
        ("GET", "runs"): 1,
        ("PUT", "runs"): 1,  # the header, last
        ("PUT", "locks"): 3,  # the job's lock: the lease taken, its holder written, the lease given back
    })  # and no record page: the container holds them all already
    # and beside the catalog, what the run sent before it had a catalog: the pre-flight's creation of the container
    assert other_requests(proxy, container_name) == [("PUT", "restype=container")]


def test_a_restore_on_a_new_machine_reads_the_header_and_each_page_once(tmp_path: Path, azurite, container_name):
    files = {f"d{i % 5}/f{i:04d}.txt": f"file {i}".encode() for i in range(300)}
    src = write_tree(tmp_path / "site", files)
    run_id = instance(run_cli([str(src), "-c", container_name, "--json"],
                              env_for(azurite.connection_string, tmp_path / "state")))
    proxy = RecordingProxy(azurite.endpoint)
    env = env_for(azurite.connection_string.replace(azurite.endpoint, proxy.endpoint), tmp_path / "new-state")
    try:
        restored = run_cli(["restore", run_id, str(tmp_path / "out"), "-c", container_name, "--json"], env)
    finally:
        proxy.close()
    instance(restored)
    assert {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()} \
        == set(files)
    counted = catalog_requests(proxy, container_name)
    assert counted[("GET", "list runs/")] == 1
    assert counted[("GET", "list jobs/")] == 0  # no later run of the job to name: its descriptor is not needed
    assert counted[("GET", "pruned")] == 1  # is there a tombstone: once
    assert counted[("GET", "runs")] == 1  # the header: once, to find the run (the plan, in the same process, has it)
    assert counted[("GET", "records")] == len(list((tmp_path / "state" / "work" / run_id / "results").glob("*.json")))


def test_a_process_reads_a_sealed_header_once_and_keeps_no_failed_or_missing_one():
    cache = HeaderCache()
    record = RunRecord(tool="t", run_id="R", job="j", host="h", source="/s", container="c", started="", finished="")
    reads: list[str] = []

    def read(run_id: str) -> RunRecord:
        reads.append(run_id)
        return record

    assert cache.read("R", lambda: read("R")) is record and cache.read("R", lambda: read("R")) is record
    assert reads == ["R"]
    assert cache.read("S", lambda: None) is None and cache.read("S", lambda: read("S")) is record  # none: asked again

    def damaged() -> RunRecord:
        raise DamagedData("the sealed record of run T is damaged")

    with pytest.raises(DamagedData):
        cache.read("T", damaged)
    assert cache.read("T", lambda: read("T")) is record and reads == ["R", "S", "T"]  # a failure is not kept
    # a read under way (the prefetch) is waited for by the next, not sent again
    started, go = threading.Event(), threading.Event()

    def slow() -> RunRecord:
        started.set()
        assert go.wait(10)
        return read("U")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.read, "U", slow)
        assert started.wait(10)
        second = pool.submit(cache.read, "U", lambda: read("U again"))
        go.set()
        assert first.result(10) is record and second.result(10) is record
    assert reads == ["R", "S", "T", "U"]

"""What a run of medium files (1 MiB) costs beside its bytes: pages per run (each one an activity and an
orchestrator episode), requests per file and what each download is checked against. Counts on real runs
against the suite's Azurite, never timings."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from helpers import RecordingProxy, assert_nothing_leaks, env_for, many_files, run_cli, secret_forms, write_tree

from sitebackup.model.work import DEFAULT_CONCURRENCY

KIB = 1024


def _pages(state: Path, instance_id: str) -> int:
    """The pages a run cut its work into: one result file each in the local work store."""
    return len(list((state / "work" / instance_id / "results").glob("*.json")))


def _instance(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["instance_id"]


def test_a_tree_is_cut_into_one_page_per_window_slot_both_ways_and_a_small_one_still_fills_it(
        tmp_path, cli, state_dir, container_name):
    files = many_files(tmp_path / "site", 300, size=1024)
    run_id = _instance(cli(tmp_path / "site", "-c", container_name, "--prefix", "all", "--json"))
    restore_id = _instance(cli("restore", run_id, tmp_path / "out", "--json"))
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files
    # 300 files over a window of 16: 16 pages of 19 (they were 60 pages of 5), all in flight at once
    assert _pages(state_dir, run_id) == DEFAULT_CONCURRENCY
    assert _pages(state_dir, restore_id) == DEFAULT_CONCURRENCY

    many_files(tmp_path / "few", 5, size=1024)
    few_id = _instance(cli(tmp_path / "few", "-c", container_name, "--prefix", "few", "--json"))
    assert _pages(state_dir, few_id) == 5  # a page per file: as many activities as there are files


def test_a_restore_gets_each_file_in_one_request_under_a_read_only_sas_that_never_leaves_memory(
        tmp_path, azurite, container_name):
    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(256 * KIB + i) for i in range(24)}
    files["odd name ü+%.txt"] = b"odd"
    src = write_tree(tmp_path / "site", files)
    os.chmod(src / "d1" / "f01.bin", 0o640)
    state = tmp_path / "state"
    proxy = RecordingProxy(azurite.endpoint)
    env = env_for(azurite.connection_string.replace(azurite.endpoint, proxy.endpoint), state)
    try:
        run_id = _instance(run_cli([str(src), "-c", container_name, "--json"], env))
        proxy.requests.clear()
        restored = run_cli(["restore", run_id, str(tmp_path / "out"), "--debug", "--json"], env)
    finally:
        proxy.close()
    _instance(restored)
    out = tmp_path / "out"
    for name, data in files.items():
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_mtime_ns == (src / name).stat().st_mtime_ns
        assert (out / name).stat().st_mode & 0o777 == (src / name).stat().st_mode & 0o777
    prefix = f"{urlsplit(proxy.endpoint).path}/{container_name}/"
    gets = [(name, query, headers) for method, path, headers in proxy.requests
            for name, query in [(unquote(urlsplit(path).path).removeprefix(prefix), parse_qs(urlsplit(path).query))]
            # the run's sealed record is read too: tests/performance/test_catalog_requests.py counts that
            if method == "GET" and "restype" not in query and not name.startswith(".sitebackup/")]
    assert Counter(name for name, _query, _headers in gets) == Counter(list(files))  # one GET per file, nothing else
    for _name, query, headers in gets:
        assert "Authorization" not in headers  # no SharedKey signature per request
        assert query["sp"] == ["r"] and query["sr"] == ["c"]  # reads this container's blobs, nothing more
    sigs = {query["sig"][0] for _name, query, _headers in gets}
    assert len(sigs) == 1  # signed once for the run
    assert_nothing_leaks(secret_forms(*sigs), [restored.stdout, restored.stderr], [state])

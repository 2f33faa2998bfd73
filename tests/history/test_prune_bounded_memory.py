"""Prune in bounded memory: the names runs need in a temporary database beside the listing, copies deleted as
the listing goes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from azure.storage.blob import BlobServiceClient
from helpers import ROOT, ForwardingProxy, env_for, run_cli, run_cli_peak, unseal, wait_until, write_tree

from sitebackup.blob.history import Copy
from sitebackup.blob.workstore import LocalWorkStore, page_number
from sitebackup.commands.prune import IN_FLIGHT, SCHEMA, delete_copies, needed_beside, unneeded
from sitebackup.errors import EXIT_DESTINATION, EXIT_STATE_FULL
from sitebackup.model.records import FileEntry

# the goal: a million files in under 400 MB of RSS; checked, scaled, on 20,000 names against 5,000
NAMES = 20_000
SMALL = 5_000
GOAL_MB = 400
MD5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()


def summary_of(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def tree_names(count: int) -> list[str]:
    """*count* paths, 100 to a directory, in walk order."""
    return [f"www/site{d // 10:03d}/assets/dir{d % 10}/file-{i:03d}.html" for d in range(-(-count // 100))
            for i in range(min(100, count - d * 100))]


def add_records(state_dir: Path, run_id: str, paths: list[str]) -> None:
    """Add to *run_id*'s record pages of files backed up at *paths* (4,096 records a page): a record that
    stands for a large tree without uploading it."""
    work = LocalWorkStore(state_dir / "work")
    first = 1 + max(page_number(p.name) for p in (state_dir / "work" / run_id / "results").iterdir())
    records = [FileEntry(p, 1, 1, md5=MD5, etag='"0x1"') for p in paths]
    for start in range(0, len(records), 4096):
        work.write_result(run_id, first + start // 4096, records[start:start + 4096])


def two_runs(cli, tmp_path: Path, container: str, prefix: str, unsealed: str | None = None) -> tuple[str, str]:
    """Two runs to *prefix*: the second deletes old.txt and changes same.txt, so the first alone needs the
    blob old.txt and the snapshot of same.txt. With *unsealed* (the connection string), the first run's sealed
    record is removed before the second runs: its record is then the state directory's alone (as a run of a
    version before sealing), which the second run keeps as it found it."""
    src = write_tree(tmp_path / prefix, {"old.txt": b"old", "same.txt": b"same v1"})
    first = summary_of(cli(src, "-c", container, "--prefix", prefix, "--json"))["instance_id"]
    if unsealed is not None:
        unseal(unsealed, container, first)
    (src / "old.txt").unlink()
    (src / "same.txt").write_bytes(b"same v2, longer")
    second = summary_of(cli(src, "-c", container, "--prefix", prefix, "--json"))["instance_id"]
    return first, second


def test_prune_of_a_destination_of_NAMES_names_grows_by_no_more_than_its_share_of_the_bound(
        tmp_path, cli, cli_env, state_dir, container_name):
    """A prune of runs recording NAMES names against one of SMALL: the RSS the other names add stays within
    their share of the goal. The records stand for trees of that size (the blobs are few: the records, which
    name every file, are what grows)."""
    env = {**cli_env, "MALLOC_ARENA_MAX": "1"}

    def measure(prefix: str, count: int) -> float:
        runs = two_runs(cli, tmp_path, container_name, prefix, unsealed=cli_env["AZURE_STORAGE_CONNECTION_STRING"])
        unseal(cli_env["AZURE_STORAGE_CONNECTION_STRING"], container_name, runs[1])  # the first is already
        for run_id in runs:
            add_records(state_dir, run_id, tree_names(count))
        result, peak = run_cli_peak(["prune", "-c", container_name, "--prefix", prefix, "--keep-last", "1", "--json"],
                                    env, tmp_path / f"{prefix}.peak")
        report = summary_of(result)
        assert [r["instance_id"] for r in report["removed"]] == [runs[0]]
        assert (report["blobs_removed"], report["snapshots_removed"]) == (1, 1), report
        return peak

    small = measure("small", SMALL)
    large = measure("large", NAMES)
    share = (GOAL_MB - small) * (NAMES - SMALL) / 1_000_000
    assert large - small < share, (small, large, share)


# ---- the temporary database: owner-only while it lives, gone on every way out ---------------------

class HoldDeletes(ForwardingProxy):
    """Holds each DELETE until ``release``; with ``refuse`` set, answers it 403 instead."""

    def __init__(self, target: str):
        self.held = 0
        self.refuse = False
        super().__init__(target)

    def intercept(self, request, body):
        if request.command == "DELETE":
            if self.refuse:
                request.reply_error(403, "AuthorizationPermissionMismatch")
                return None
            with self.lock:
                self.held += 1
            self.release.wait(120)
        return body


def scratch(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(".prune-*"))


def test_the_temporary_database_is_owner_only_and_gone_after_a_dry_run_a_failure_and_a_prune(
        tmp_path, cli, cli_env, azurite, state_dir, blob_service, container_name):
    proxy = HoldDeletes(azurite.endpoint)
    try:
        # every command goes through the proxy: runs are matched to the endpoint they were made with
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string.replace(
            azurite.endpoint, proxy.endpoint)}
        first, _second = two_runs(lambda *args: cli(*args, env=env), tmp_path, container_name, "p")
        before = copies(blob_service, container_name)
        args = [sys.executable, "-m", "sitebackup", "prune", "-c", container_name, "--prefix", "p", "--keep-last", "1",
                "--json"]

        dry = summary_of(run_cli(args[3:] + ["--dry-run"], env))
        assert (dry["blobs_removed"], dry["snapshots_removed"]) == (1, 1) and scratch(state_dir) == []

        proxy.refuse = True
        refused = run_cli(args[3:], env)
        assert refused.returncode == EXIT_DESTINATION and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and scratch(state_dir) == []
        assert copies(blob_service, container_name) == before

        proxy.refuse = False
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: proxy.held or proc.poll() is not None, "a DELETE to be held", timeout=60)
            [db] = scratch(state_dir)
            st = db.stat()
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
            proxy.release.set()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        report = json.loads(out)
        assert [r["instance_id"] for r in report["removed"]] == [first]
        assert (report["blobs_removed"], report["snapshots_removed"], report["bytes_removed"]) == \
            (dry["blobs_removed"], dry["snapshots_removed"], dry["bytes_removed"])
        assert scratch(state_dir) == []
        after = copies(blob_service, container_name)
        assert "p/old.txt" not in after and len(after["p/same.txt"]) == 1
    finally:
        proxy.close()


def copies(blob_service, container: str) -> dict[str, list[tuple[str | None, str | None]]]:
    found: dict[str, list] = {}
    for blob in blob_service.get_container_client(container).list_blobs(include=["snapshots"]):
        if not blob.name.startswith(".sitebackup/"):
            found.setdefault(blob.name, []).append((blob.snapshot, blob.etag))
    return found


def test_a_state_disk_too_full_for_the_temporary_database_ends_in_exit_5_and_deletes_nothing(
        tmp_path, azurite, blob_service, container_name, mount_point):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True)
    state = mount_point / "state"
    env = env_for(azurite.connection_string, state)
    first, _second = two_runs(lambda *args: run_cli(list(map(str, args)), env), tmp_path, container_name, "p",
                              unsealed=azurite.connection_string)
    unseal(azurite.connection_string, container_name, _second)  # the first is already
    for run_id in (first, _second):
        add_records(state, run_id, tree_names(SMALL))
    before = copies(blob_service, container_name)
    filler = mount_point / "filler"
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
    # room for the backend's own writes, not for a database of the runs' names
    os.truncate(filler, filler.stat().st_size - 256 * 1024)

    args = ["prune", "-c", container_name, "--prefix", "p", "--keep-last", "1"]
    full = run_cli(args, env)
    assert full.returncode == EXIT_STATE_FULL and "Traceback" not in full.stderr, full.stderr
    [line] = full.stderr.strip().splitlines()
    assert line.startswith(f"sitebackup: error: state directory {state} cannot be written (") and \
        "nothing was removed" in line, line
    assert copies(blob_service, container_name) == before
    assert LocalWorkStore(state / "work").pruned(first) is None and scratch(state) == []

    filler.unlink()
    report = summary_of(run_cli([*args, "--json"], env))
    assert [r["instance_id"] for r in report["removed"]] == [first]
    assert (report["blobs_removed"], report["snapshots_removed"]) == (1, 1) and scratch(state) == []


# ---- the table read beside the listing ----------------------------------------------------------

def table(tmp_path: Path, rows: list[tuple[str, str]]) -> sqlite3.Connection:
    db = sqlite3.connect(tmp_path / "needed.db")
    db.execute(SCHEMA)
    db.executemany("INSERT OR IGNORE INTO needed VALUES (?, ?)", rows)
    return db


def c(name: str, snapshot: str | None, md5: str) -> Copy:
    return Copy(name, snapshot, md5, 1)


def test_names_the_listing_orders_otherwise_than_utf8_are_still_found_at_a_query_each(tmp_path):
    # UTF-16 (JavaScript's string order) puts an astral character (a surrogate pair, D800-DFFF) before U+E000-FFFF;
    # UTF-8 and code points put it after
    bmp, astral, plain, foreign = "d/\ue000.txt", "d/\U0001f600.txt", "d/z.txt", "d/\uffee-other"
    db = table(tmp_path, [(bmp, "old"), (bmp, "new"), (astral, "kept"), (plain, ""), (plain, "v2")])
    queries: list[str] = []
    db.set_trace_callback(queries.append)
    assert sorted([bmp, astral]) == [bmp, astral] and bmp.encode("utf-16-be") > astral.encode("utf-16-be")
    listing = [(plain, [c(plain, None, "v2"), c(plain, "s1", "v1")]), (astral, [c(astral, None, "kept")]),
               (bmp, [c(bmp, None, "new"), c(bmp, "s1", "old"), c(bmp, "s0", "older")]),
               (foreign, [c(foreign, None, "x")])]
    assert sorted(listing, key=lambda group: group[0].encode("utf-16-be")) == listing
    found = {copies[0].name: md5s for copies, md5s in needed_beside(listing, db)}
    assert found == {astral: {"kept"}, bmp: {"old", "new"}, plain: {"v2"}}
    # the table was read past bmp and foreign beside astral: each is looked up alone
    assert [q for q in queries if "WHERE name =" in q] == [
        f"SELECT md5 FROM needed WHERE name = '{name}'" for name in (bmp, foreign)], queries
    decided = {name: unneeded(copies, found[name]) for name, copies in listing if name in found}
    assert decided == {astral: [], bmp: [c(bmp, "s0", "older")], plain: [c(plain, "s1", "v1")]}


def test_reading_beside_a_listing_in_order_costs_one_query_and_finds_what_a_dict_does(tmp_path):
    rng = random.Random(7)
    alphabet = ["a", "b", "/", "-", "é", "\u4e2d", "\ue000", "\U0001f600"]
    names = sorted({"".join(rng.choices(alphabet, k=rng.randint(1, 8))) for _ in range(4000)})
    rows = [(name, rng.choice(["m1", "m2", ""])) for name in rng.sample(names, 2000) for _ in range(rng.randint(1, 3))]
    db = table(tmp_path, rows)
    queries: list[str] = []
    db.set_trace_callback(queries.append)
    expected: dict[str, set[str]] = {}
    for name, md5 in rows:
        expected.setdefault(name, set()).update({md5} - {""})
    listed = sorted(rng.sample(names, 2500), key=lambda name: name.encode())
    found = {copies[0].name: md5s for copies, md5s in needed_beside(((n, [c(n, None, "m1")]) for n in listed), db)}
    assert found == {name: expected[name] for name in listed if name in expected}
    assert len(queries) == 1, queries[:5]


# ---- deletes as the listing goes, a bounded number waiting ---------------------------------------

class CountDeletes(ForwardingProxy):
    """Holds DELETEs until ``release``; counts those it forwarded."""

    def __init__(self, target: str):
        self.forwarded = 0
        super().__init__(target)

    def intercept(self, request, body):
        if request.command == "DELETE":
            self.release.wait(120)
            with self.lock:
                self.forwarded += 1
        return body


def test_deletes_follow_the_listing_with_at_most_IN_FLIGHT_waiting(azurite, blob_service, container_name):
    blob_service.create_container(container_name)
    proxy = CountDeletes(azurite.endpoint)
    pulled = 0

    def listing():
        """A name's doomed copy at a time, as the sweep yields them; the deletes answer once IN_FLIGHT wait."""
        nonlocal pulled
        for i in range(IN_FLIGHT + 40):
            pulled += 1
            with proxy.lock:
                waiting = pulled - 1 - proxy.forwarded
            assert waiting <= IN_FLIGHT, (pulled, proxy.forwarded)
            if pulled == IN_FLIGHT + 1:
                proxy.release.set()
            yield [Copy(f"gone/{i:04d}", None, "x", 1, '"0x1"')]  # never stored: NotFound is done

    try:
        service = BlobServiceClient.from_connection_string(
            azurite.connection_string.replace(azurite.endpoint, proxy.endpoint))
        delete_copies(service.get_container_client(container_name), listing(), "test")
    finally:
        proxy.close()
    assert pulled == proxy.forwarded == IN_FLIGHT + 40


def test_a_killed_prune_leaves_its_database_to_the_next_one_which_spares_a_live_prune_s(
        tmp_path, cli, cli_env, azurite, state_dir, container_name):
    proxy = HoldDeletes(azurite.endpoint)
    try:
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string.replace(
            azurite.endpoint, proxy.endpoint)}
        first, _second = two_runs(lambda *args: cli(*args, env=env), tmp_path, container_name, "p")
        args = ["prune", "-c", container_name, "--prefix", "p", "--keep-last", "1", "--json"]
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", *args], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: proxy.held or proc.poll() is not None, "a DELETE to be held", timeout=60)
            [live] = scratch(state_dir)
            assert summary_of(run_cli([*args, "--dry-run"], env))["dry_run"]
            assert scratch(state_dir) == [live]  # the live prune's, locked: spared
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert scratch(state_dir) == [live]  # a kill runs no finally
        proxy.release.set()
        report = summary_of(run_cli(args, env))
        assert [r["instance_id"] for r in report["removed"]] == [first]
        assert scratch(state_dir) == []
    finally:
        proxy.close()

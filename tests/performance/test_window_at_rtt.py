"""Requests in flight at a real round-trip time: a backup and a restore of small files, reaching Azurite through
benchmarks/delayproxy.py with 40 ms added per round trip, keep a window of requests going (counted at the proxy)
and reuse their connections (counted too); --max-inflight widens the window past the one it starts at, and a narrow
one bounds a large file's block ranges and ranged downloads too, and the Put Blobs of files over the single-put
size; a restore on a new machine reads its record's pages several at a time, and a backup's seal sends them more
at once than its threads would, on connections its uploads opened. On loopback a request costs well under a
millisecond, so a run that waits one request at a time looks fast there; at 40 ms it is bound by how many it
keeps in flight. How far the adaptive window grows depends on the machine's CPU: blob.inflight's own tests count
that on a simulated path."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from urllib.parse import unquote

from helpers import ROOT, many_files

from sitebackup.blob.records import READ_AHEAD
from sitebackup.blob.upload import SINGLE_PUT_BYTES
from sitebackup.model.work import Concurrency

sys.path.insert(0, str(ROOT / "benchmarks"))
import delayproxy  # noqa: E402

FILES = 600
ONE_WAY_MS = 20
# the window of requests starts at 32 and adapts from there: most of that must be used at once
LEAST_MOST_IN_FLIGHT = 24
# a fixed wider window (--max-inflight): most of it used at once, more than the 32 the window starts at
FIXED = 64
LEAST_MOST_IN_FLIGHT_FIXED = 40
# connections beside the window's, kept alive and reused: the few a run opens for its records and lock, and
# the pages its seal sends at once
SPARE_CONNECTIONS = 16
# a backup of as many files cuts its tree into more pages than its seal's threads would send at once
SEALED_FILES = 200
# a window narrower than the large file's ranges (and than the threads of one ranged download)
NARROW = 2
BLOCK_MIB = 2
LARGE_MIB = 32


def summary(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def most_at_once(timeline, kind: Callable[[str], bool]) -> tuple[int, int]:
    """(the most requests of *kind* (by their first line) in flight at once at the proxy, how many there were)."""
    asked: dict[int, bool] = {}  # connection -> whether its request in flight is of the kind
    now = most = count = 0
    for _t, delta, text, connection in timeline:
        if delta > 0:
            asked[connection] = kind(text)
            if asked[connection]:
                now, count = now + 1, count + 1
                most = max(most, now)
        elif asked.pop(connection, False):
            now -= 1
    return most, count


def widest_window(result) -> int:
    """The widest the run's window of requests was: where it starts, or as far as its --debug log says it grew."""
    grown = [int(to) for to in re.findall(r"requests in flight: window \d+ -> (\d+)", result.stderr)]
    return max([Concurrency().requests, *grown])


def test_a_backup_and_a_restore_at_40_ms_keep_a_window_in_flight_on_reused_connections(
        tmp_path, cli, cli_env, azurite, container_name):
    src = tmp_path / "site"
    many_files(src, FILES, size=1024)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string}
        backup = cli(src, "--container", container_name, "--json", "--debug", env=env)
        assert backup.returncode == 0, backup.stderr
        up = far.proxy.reset()
        run_id = summary(backup)["instance_id"]
        restore = cli("restore", run_id, tmp_path / "dest", "--json", "--debug", env=env)
        assert restore.returncode == 0, restore.stderr
        down = far.proxy.reset()
    assert summary(backup)["files_uploaded"] == FILES and summary(restore)["files_restored"] == FILES
    assert up.requests >= FILES and down.requests >= FILES
    assert up.most_in_flight >= LEAST_MOST_IN_FLIGHT, up
    assert down.most_in_flight >= LEAST_MOST_IN_FLIGHT, down
    # a connection per request of the widest window the run kept, reused from one request to the next. The
    # window, not what the proxy sees in flight, is what the connections answer to: a client short of CPU holds
    # a connection for a request of its window it has not put on the wire yet, or whose answer it has not read
    assert up.connections <= widest_window(backup) + SPARE_CONNECTIONS, (up, widest_window(backup))
    assert down.connections <= widest_window(restore) + SPARE_CONNECTIONS, (down, widest_window(restore))


def test_max_inflight_keeps_a_wider_fixed_window_in_flight(tmp_path, cli, cli_env, azurite, container_name):
    src = tmp_path / "site"
    many_files(src, FILES, size=1024)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string}
        backup = cli(src, "--container", container_name, "--json", "--max-inflight", FIXED, env=env)
        assert backup.returncode == 0, backup.stderr
        up = far.proxy.reset()
        restore = cli("restore", summary(backup)["instance_id"], tmp_path / "dest", "--json",
                      env={**env, "SITEBACKUP_MAX_INFLIGHT": str(FIXED)})
        assert restore.returncode == 0, restore.stderr
        down = far.proxy.reset()
    assert summary(backup)["files_uploaded"] == FILES and summary(restore)["files_restored"] == FILES
    for counts in (up, down):
        assert LEAST_MOST_IN_FLIGHT_FIXED <= counts.most_in_flight <= FIXED + SPARE_CONNECTIONS, counts
        assert counts.connections <= FIXED + SPARE_CONNECTIONS, counts


def test_a_restore_on_a_new_machine_reads_record_pages_several_at_a_time(tmp_path, cli, cli_env, state_dir, azurite,
                                                                        container_name):
    src = tmp_path / "site"
    many_files(src, FILES, size=64)
    backup = cli(src, "--container", container_name, "--json")
    assert backup.returncode == 0, backup.stderr
    run_id = summary(backup)["instance_id"]
    assert len(list((state_dir / "work" / run_id / "results").glob("*.json"))) > READ_AHEAD
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        far.proxy.timeline = []
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string,
               "SITEBACKUP_STATE_DIR": str(tmp_path / "new-state")}
        restore = cli("restore", run_id, tmp_path / "dest", "-c", container_name, "--json", env=env)
        assert restore.returncode == 0, restore.stderr
        timeline = list(far.proxy.timeline)
    assert summary(restore)["files_restored"] == FILES
    # the plan reads the record's pages before any file is downloaded, and nothing else but the catalog then: the
    # requests in flight from its first page request to its last are page requests
    pages = [i for i, (_t, delta, text, _conn) in enumerate(timeline)
             if delta > 0 and text.startswith("GET ") and "/.sitebackup/records/" in unquote(text)]
    assert len(pages) > READ_AHEAD
    in_flight = most = 0
    for i, (_t, delta, _text, _conn) in enumerate(timeline[:pages[-1] + 1]):
        in_flight += delta
        if i >= pages[0]:
            most = max(most, in_flight)
    assert most >= READ_AHEAD - 1, most


def test_a_backups_seal_sends_its_record_pages_together_on_the_connections_its_uploads_opened(
        tmp_path, cli, cli_env, state_dir, azurite, container_name):
    src = tmp_path / "site"
    many_files(src, SEALED_FILES, size=64)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        far.proxy.timeline = []
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string}
        backup = cli(src, "--container", container_name, "--json", env=env)
        assert backup.returncode == 0, backup.stderr
        timeline = list(far.proxy.timeline)
    run_id = summary(backup)["instance_id"]
    pages = len(list((state_dir / "work" / run_id / "results").glob("*.json")))
    assert pages > Concurrency().sealing

    def is_page(text: str) -> bool:
        return text.startswith("PUT ") and "/.sitebackup/records/" in unquote(text)

    most, count = most_at_once(timeline, is_page)
    assert count == pages and most > Concurrency().sealing, (most, count)
    # each on a connection open before the seal's first page: none paid a new connection's handshake
    first = next(i for i, (_t, delta, text, _conn) in enumerate(timeline) if delta > 0 and is_page(text))
    opened = max(conn for _t, _delta, _text, conn in timeline[:first])
    assert all(conn <= opened for _t, delta, text, conn in timeline if delta > 0 and is_page(text)), opened


def test_a_narrow_window_bounds_the_put_blobs_of_files_over_the_single_put_size(tmp_path, cli, cli_env, azurite,
                                                                               container_name):
    """Files over the single-put size and under the range threshold each go in one Put Blob from an activity
    thread: in a slot of the window too (on the old code, every page's file was in flight at once)."""
    src = tmp_path / "site"
    src.mkdir()
    files = {f"m{i}.bin": os.urandom(SINGLE_PUT_BYTES + 512 * 1024) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        far.proxy.timeline = []
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string,
               "SITEBACKUP_MAX_INFLIGHT": str(NARROW)}
        backup = cli(src, "--container", container_name, "--json", env=env)
        assert backup.returncode == 0, backup.stderr
        up = list(far.proxy.timeline)
    assert summary(backup)["files_uploaded"] == len(files)
    puts = most_at_once(up, lambda text: text.startswith("PUT ") and re.search(r"/m\d\.bin[ ?]", unquote(text)) is not None)
    assert puts[1] == len(files) and 1 <= puts[0] <= NARROW, puts
    restore = cli("restore", summary(backup)["instance_id"], tmp_path / "dest", "--json")
    assert restore.returncode == 0, restore.stderr
    assert {name: (tmp_path / "dest" / name).read_bytes() for name in files} == files


def test_a_narrow_window_bounds_the_block_ranges_and_ranged_gets_of_a_large_file(tmp_path, cli, cli_env, azurite,
                                                                                container_name):
    src = tmp_path / "site"
    src.mkdir()
    data = os.urandom(LARGE_MIB * 1024 * 1024)
    (src / "big.bin").write_bytes(data)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        far.proxy.timeline = []
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string,
               "SITEBACKUP_MAX_INFLIGHT": str(NARROW)}
        backup = cli(src, "--container", container_name, "--json", "--block-size", BLOCK_MIB, env=env)
        assert backup.returncode == 0, backup.stderr
        up, far.proxy.timeline = far.proxy.timeline, []
        restore = cli("restore", summary(backup)["instance_id"], tmp_path / "dest", "--json", env=env)
        assert restore.returncode == 0, restore.stderr
        down = list(far.proxy.timeline)
    assert summary(backup)["files_uploaded"] == 1 and summary(restore)["files_restored"] == 1
    assert (tmp_path / "dest" / "big.bin").read_bytes() == data
    put_blocks = most_at_once(up, lambda text: re.search(r"[?&]comp=block(&| )", text) is not None)
    assert put_blocks[1] == LARGE_MIB // BLOCK_MIB and 1 <= put_blocks[0] <= NARROW, put_blocks
    gets = most_at_once(down, lambda text: text.startswith("GET ") and "big.bin" in unquote(text))
    # one GET per range of the restore's (8 MiB), more of them than the window holds
    assert gets[1] > NARROW and 1 <= gets[0] <= NARROW, gets

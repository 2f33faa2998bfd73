"""The benchmark's own logic: its tables, the docs/performance.md blocks it rewrites, its datasets and its walk."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import ROOT

BENCH = ROOT / "benchmarks"


def load(name: str):
    """A benchmark module imported by path (benchmarks/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


report = load("report")
peers = load("peers")
bench_upload = load("bench_upload")
profile = load("profile_hot_paths")


def row(op: str, tool: str, seconds: float | None, cpu: float = 1.0, files: int = 1000, size: int = 4 * 2 ** 20,
        note: str = ""):
    return report.Row("small", op, tool, files, size, seconds=seconds, cpu=cpu, rss_mb=100.0, server_cpu=2.0, note=note)


def cells(table: str, tool: str, op: str = "backup") -> dict[str, str]:
    header = table.splitlines()[0].split("|")[1:-1]
    for line in table.splitlines()[2:]:
        values = [c.strip() for c in line.split("|")[1:-1]]
        if values[1] == op and values[2] == tool:
            return dict(zip([h.strip() for h in header], values))
    raise AssertionError(f"no row for {tool} {op}")


def test_ratios_are_against_the_fastest_and_the_same_work_peer_of_the_same_operation():
    table = report.render([
        row("backup", "sitebackup", 12.0), row("backup", "asyncio", 10.0), row("backup", "asyncio-md5", 15.0),
        row("restore", "sitebackup", 9.0), row("restore", "asyncio-get", 6.0),
    ])
    assert cells(table, "sitebackup")["vs fastest peer"] == "1.20x"
    assert cells(table, "sitebackup")["vs same-work peer"] == "0.80x"
    assert cells(table, "sitebackup", "restore")["vs fastest peer"] == "1.50x"
    assert cells(table, "sitebackup", "restore")["vs same-work peer"] == "1.50x"
    # a peer is compared with the other peers, never with itself
    assert cells(table, "asyncio-md5")["vs same-work peer"] == ""
    assert cells(table, "asyncio-get", "restore")["vs fastest peer"] == ""


def test_a_failed_or_skipped_run_is_no_yardstick():
    table = report.render([row("backup", "sitebackup", 12.0), row("backup", "asyncio", 1.0, note="run 0: exit 1"),
                           row("backup", "threaded", 6.0), report.Row("small", "backup", "rclone", note="skipped")])
    assert cells(table, "sitebackup")["vs fastest peer"] == "2.00x"
    assert cells(table, "rclone")["note"] == "skipped"
    assert cells(table, "rclone")["seconds"] == ""


def test_cpu_per_file_and_per_mib():
    table = report.render([row("backup", "sitebackup", 10.0, cpu=8.0, files=4000, size=16 * 2 ** 20)])
    got = cells(table, "sitebackup")
    assert got["CPU ms/file"] == "2.00"
    assert got["CPU ms/MiB"] == "500.0"
    assert got["files/s"] == "400"
    # under a MiB moved, a per-MiB figure would mean nothing
    tiny = report.render([row("dry-run", "walk", 1.0, files=10, size=1000)])
    assert cells(tiny, "walk", "dry-run")["CPU ms/MiB"] == ""


def test_replace_block_keeps_the_markers_and_everything_around_them():
    text = "intro\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\noutro\n<!-- other:begin -->x<!-- other:end -->\n"
    out = report.replace_block(text, "bench", "| new |\n")
    assert out == "intro\n<!-- bench:begin -->\n| new |\n<!-- bench:end -->\noutro\n<!-- other:begin -->x<!-- other:end -->\n"
    assert report.replace_block(out, "bench", "| new |") == out  # idempotent


@pytest.mark.parametrize("text", [
    "no markers at all",
    "<!-- bench:begin --> only the start",
    "<!-- bench:end --> backwards <!-- bench:begin -->",
    "<!-- bench:begin -->a<!-- bench:end --><!-- bench:begin -->b<!-- bench:end -->",
])
def test_replace_block_refuses_missing_doubled_or_backwards_markers(text: str):
    with pytest.raises(ValueError):
        report.replace_block(text, "bench", "table")


def test_the_performance_page_has_each_benchmark_block_once_and_the_readme_none():
    assert bench_upload.PERFORMANCE_PAGE == ROOT / "docs" / "performance.md"
    text = bench_upload.PERFORMANCE_PAGE.read_text(encoding="utf-8")
    for name in ("bench", "bench-scale", "bench-rtt"):
        report.replace_block(text, name, "x")  # raises unless the markers are there, once each, in order
    assert "<!-- bench" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_write_block_rewrites_only_that_block(tmp_path: Path):
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntext\n", encoding="utf-8")
    report.write_block(page, "bench", "| new |")
    assert page.read_text(encoding="utf-8") == "# Performance\n<!-- bench:begin -->\n| new |\n<!-- bench:end -->\ntext\n"


def test_block_names_date_machine_and_command():
    when = datetime(2026, 11, 30, 12, 5, tzinfo=timezone.utc)
    text = report.block("| t |", when=when, machine_line="2 cores (CPU X)", commands=["python b.py --repeat 3"])
    assert "2026-11-30 12:05 UTC" in text
    assert "2 cores (CPU X)" in text
    assert "Command: `python b.py --repeat 3`" in text
    two = report.block("| t |", when=when, machine_line="m", commands=["python b.py a", "python b.py b"])
    assert "Command: `python b.py a`, then `python b.py b`" in two
    assert "| t |" in text
    assert "noisy" in text  # the caption says to read ratios, not seconds


def test_machine_line_names_cores_python_and_azurite():
    line = report.machine(ROOT, (1.5, 1.0, 0.5))
    assert f"{os.cpu_count()} cores" in line
    assert "Python 3." in line
    assert "Azurite 3." in line
    assert "load average 1.5 at the start" in line


def test_command_line_is_quoted_and_relative_to_the_repository():
    line = report.command_line([str(BENCH / "bench_upload.py"), "--tree", "/srv/my site", "--repeat", "3"], ROOT)
    assert line.endswith("benchmarks/bench_upload.py --tree '/srv/my site' --repeat 3")


def test_round_trip_times_take_turns_as_the_tools_do():
    """--rtt: a run at each round trip, then the next repetition, so a machine's drift weighs on each alike; each
    turn starting one further on, so that none is always the first of a turn."""
    order = []

    def once(key, i):
        order.append((*key, i))
        return bench_upload.Run(1.0, 1.0, 1.0, 1.0)

    keys = [(rtt, tool) for rtt in (0.0, 40.0) for tool in ("sitebackup", "asyncio-md5")]
    runs = bench_upload.round_robin(keys, 5, once)
    assert order == [(*key, i) for i in range(5) for key in keys[i % 4:] + keys[:i % 4]]
    assert [order[i * 4][:2] for i in range(5)] == [keys[0], keys[1], keys[2], keys[3], keys[0]]
    assert {key: len(r) for key, r in runs.items()} == {key: 5 for key in keys}


def test_saved_runs_read_back_as_a_list_whatever_was_saved(tmp_path: Path):
    run = {"started": "2026-11-30T12:00:00+00:00", "machine": "m", "command": "c",
           "rows": [dataclasses.asdict(row("backup", "sitebackup", 1.0))]}
    (tmp_path / "one.json").write_text(json.dumps(run))
    (tmp_path / "list.json").write_text(json.dumps([run, run]))
    assert bench_upload.saved_runs(tmp_path / "one.json") == [run]
    assert bench_upload.saved_runs(tmp_path / "list.json") == [run, run]
    assert report.Row(**run["rows"][0]) == row("backup", "sitebackup", 1.0)


def test_walk_counts_regular_files_and_bytes_without_following_symlinks(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"12345")
    (tmp_path / "a" / "b" / "two").write_bytes(b"xy")
    (tmp_path / "link").symlink_to(tmp_path / "a" / "one")
    (tmp_path / "dirlink").symlink_to(tmp_path / "a")
    os.mkfifo(tmp_path / "fifo")
    assert peers.walk(tmp_path) == (2, 7)
    assert sorted(name for _path, name in peers.regular_files(tmp_path)) == ["a/b/two", "a/one"]


def test_md5_b64_takes_either_form_the_sdk_reports():
    digest = bytes(range(16))
    assert peers.md5_b64(bytearray(digest)) == "AAECAwQFBgcICQoLDA0ODw=="
    assert peers.md5_b64("AAECAwQFBgcICQoLDA0ODw==") == "AAECAwQFBgcICQoLDA0ODw=="
    assert peers.md5_b64(None) is None


def test_a_sparse_dataset_is_generated_once_with_its_totals(tmp_path: Path):
    ds = bench_upload.Dataset("tiny", 250, 1024, 100, sparse=True)
    source = bench_upload.generate(ds, tmp_path)
    assert (source.files, source.bytes) == peers.walk(source.root)
    assert source.files == 250
    assert 0 < source.bytes <= 250 * 1024
    # about `fanout` files per directory, two levels deep
    folders = {p.parent for p, _name in peers.regular_files(source.root)}
    assert len(folders) == 3
    # a hole, not data: no blocks on disk
    assert sum(p.stat().st_blocks for p, _ in peers.regular_files(source.root)) == 0
    (source.root / "d000" / "d00" / "f000000.bin").unlink()
    assert bench_upload.generate(ds, tmp_path) == source  # the marker says it is done: not rewritten


def test_a_fixed_size_dataset_from_an_old_marker_counts_files_times_size(tmp_path: Path):
    ds = bench_upload.Dataset("old", 3, 100, 3)
    (tmp_path / ".old.done").touch()
    assert bench_upload.generate(ds, tmp_path).bytes == 300


def test_profile_layers_take_the_innermost_frame_that_says_what_the_work_is():
    classify = profile.classify
    worker = "_execute_activity (durabletask/worker.py:900)"
    assert classify([worker, "copy_page (sitebackup/workflows/copy.py:1)", "write_result (sitebackup/blob/workstore.py:1)",
                     "dump (json/__init__.py:1)"]) == "pages and records (JSON files)"
    assert classify([worker, "put_many (sitebackup/blob/asyncput.py:1)", "small_file_put (sitebackup/blob/upload.py:1)",
                     "<built-in method _hashlib.openssl_md5>"]) == "hashing"
    assert classify(["_run (asyncio/events.py:1)", "send (azure/core/pipeline/policies/_retry_async.py:1)"]) \
        == "request building and parsing (azure SDK)"
    # a generic helper names no layer: its caller does
    assert classify([worker, "dumps (json/__init__.py:1)"]) == "durable: servicer and worker SDK"
    assert classify(["run (threading.py:1)", "dumps (json/__init__.py:1)"]) == profile.OTHER


def test_profile_contexts_hold_for_the_whole_stack():
    classify = profile.classify
    assert classify(["<module> (sitebackup/__main__.py:1)", "_find_and_load (<frozen importlib._bootstrap>:1)",
                     "<module> (grpc/__init__.py:1)"]) == profile.STARTUP
    assert classify(["<module> (sitebackup/__main__.py:1)", "main (sitebackup/cli.py:1)",
                     "watch (sitebackup/commands/hosting.py:1)", "get_orchestration_state (durabletask/client.py:1)",
                     "_blocking (grpc/_channel.py:1)"]) == profile.POLLING
    # the main thread's root is module code too: that alone is no start-up
    assert classify(["<module> (sitebackup/__main__.py:1)", "main (sitebackup/cli.py:1)",
                     "_blocking (grpc/_channel.py:1)"]) == "durable: gRPC"


def test_pyspy_stacks_drop_parked_threads_and_cut_install_prefixes(tmp_path: Path):
    site = profile.PREFIXES[-1]  # any install prefix
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        'process 1:"python -m sitebackup";run (threading.py:1);_put (sitebackup/blob/asyncput.py:70) 7',
        'process 1:"python -m sitebackup";run (threading.py:1);Condition.wait (threading.py:327) 5',
        f"run (threading.py:1);send ({site}azure/core/pipeline/_base.py:9) 3",
        "not a sample line",
    ]))
    stacks, dropped = profile.pyspy_stacks(raw)
    assert dropped == 5
    assert stacks == [(["run (threading.py:1)", "_put (sitebackup/blob/asyncput.py:70)"], 7),
                      (["run (threading.py:1)", "send (azure/core/pipeline/_base.py:9)"], 3)]


def test_cprofile_layers_hand_a_helpers_self_time_to_its_callers_layers():
    md5 = ("~", 0, "<built-in method _hashlib.openssl_md5>")
    dumps = ("/lib/json/__init__.py", 1, "dumps")
    write = ("/x/sitebackup/blob/workstore.py", 1, "_write")
    worker = ("/x/durabletask/worker.py", 1, "_execute_activity")
    loads = ("/lib/json/__init__.py", 2, "loads")
    loop = ("/lib/json/decoder.py", 3, "raw_decode")
    poll = ("~", 0, "<method 'poll' of 'select.epoll' objects>")
    # (calls, primitive calls, self time, cumulative time, {caller: (calls, calls, self time, cumulative)})
    stats = {
        md5: (10, 10, 2.0, 2.0, {}),
        write: (5, 5, 0.5, 3.5, {worker: (5, 5, 0.5, 3.5)}),
        worker: (5, 5, 1.0, 8.0, {}),
        dumps: (8, 8, 4.0, 4.0, {write: (2, 2, 3.0, 3.0), worker: (6, 6, 1.0, 1.0)}),
        # a recursive helper with no other caller: OTHER, never an endless loop
        loads: (1, 1, 0.5, 0.5, {loop: (1, 1, 0.5, 0.5)}),
        loop: (1, 1, 0.5, 0.5, {loads: (1, 1, 0.5, 0.5)}),
        # cProfile's negative wait: counted as nothing
        poll: (3, 3, -9.0, -9.0, {}),
    }
    layers = profile.cprofile_layers(stats)
    assert layers["hashing"] == pytest.approx(2.0)
    assert layers["pages and records (JSON files)"] == pytest.approx(0.5 + 3.0)
    assert layers["durable: servicer and worker SDK"] == pytest.approx(1.0 + 1.0)
    assert layers[profile.OTHER] == pytest.approx(1.0)
    assert sum(layers.values()) == pytest.approx(8.5)


def test_cprofile_inclusive_counts_a_nested_match_once():
    outer = ("sitebackup/blob/workstore.py", 1, "_write")
    inner = ("sitebackup/blob/workstore.py", 9, "_write")  # a second function matching the same mark
    caller = ("sitebackup/workflows/copy.py", 1, "copy_page")
    stats = {
        outer: (4, 4, 1.0, 5.0, {caller: (4, 4, 1.0, 5.0)}),
        inner: (6, 6, 2.0, 2.0, {outer: (2, 2, 1.0, 1.5), caller: (4, 4, 1.0, 0.5)}),
        caller: (1, 1, 0.1, 9.0, {}),
    }
    calls, cpu = profile.cprofile_inclusive(stats, "_write (sitebackup/blob/workstore.py")
    assert calls == 4 + 4
    assert cpu == pytest.approx(5.0 + 0.5)


def test_requests_are_counted_by_kind_from_the_access_log():
    lines = [
        '127.0.0.1 - - [30/Nov/2026:13:23:13 +0000] "PUT /devstoreaccount1/c?restype=container HTTP/1.1" 201 -',
        '127.0.0.1 - - [30/Nov/2026:13:23:13 +0000] "PUT /devstoreaccount1/c/x/y.txt HTTP/1.1" 201 -',
        '127.0.0.1 - - [30/Nov/2026:13:23:13 +0000] "PUT /devstoreaccount1/c/big?comp=block&blockid=QQ HTTP/1.1" 201 -',
        '127.0.0.1 - - [30/Nov/2026:13:23:13 +0000] "GET /devstoreaccount1/c/x/y.txt HTTP/1.1" 206 2',
        "Azurite Blob service is closing...",
    ]
    assert profile.requests_by_kind(lines) == {"PUT restype=container": 1, "PUT blob": 1, "PUT comp=block": 1,
                                               "GET blob": 1}


# ---- the delay proxy ---------------------------------------------------------------------------

delayproxy = load("delayproxy")


@contextlib.contextmanager
def echo_server():
    """A TCP server on loopback answering each chunk it reads with the same bytes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def round_trip(port: int, payload: bytes) -> float:
    """Seconds from sending *payload* through the proxy on *port* to having all of it back."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.monotonic()
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += conn.recv(65536)
        assert got == payload
        return time.monotonic() - start


def test_the_delay_proxy_adds_its_delay_each_way_and_counts_connections_and_requests_in_flight():
    clients = 4
    with echo_server() as port, delayproxy.DelayProxy("127.0.0.1", port, delay_ms=40) as proxy:
        arrived = threading.Barrier(clients)

        def one(i: int) -> float:
            arrived.wait()
            return round_trip(proxy.port, b"x" * (100 + i))

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            took = list(pool.map(one, range(clients)))
        counts = proxy.reset()
    # a lower bound: the delay is a sleep each way, which can be longer on a loaded machine, never shorter
    assert min(took) >= 0.080, took
    assert counts.connections == clients and counts.requests == clients
    assert counts.most_in_flight == clients and counts.in_flight == 0
    assert proxy.counts.connections == 0  # reset started the count again


def test_a_new_connection_pays_a_handshake_round_trip_before_its_first_request():
    with echo_server() as port, delayproxy.DelayProxy("127.0.0.1", port, delay_ms=40) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            start = time.monotonic()
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
            first = time.monotonic() - start
    # lower bounds (a sleep is never shorter): the handshake's round trip, then the request's
    assert first >= 0.160, first


def test_the_delay_proxy_caps_each_direction_at_its_rate():
    payload = b"y" * 250_000
    with echo_server() as port, delayproxy.DelayProxy("127.0.0.1", port, mbit=8) as proxy:  # 1 MB/s each way
        took = round_trip(proxy.port, payload)
    # the bytes cross the capped link up, then down; the two overlap chunk by chunk, so at least one crossing
    assert took >= 0.25, took


def test_behind_points_endpoint_and_connection_string_at_the_proxy():
    from azurite import Azurite

    server = Azurite(10999, Path("/nonexistent"))
    with delayproxy.behind(server, 5) as far:
        assert f"127.0.0.1:{far.port}/" in far.endpoint and "10999" not in far.endpoint
        assert f"BlobEndpoint={far.endpoint};" in far.connection_string and "10999" not in far.connection_string

"""Honest plain output: whole values without a terminal, escaped names, one set of byte units, and
rate and ETA computed by the printers from successive statuses."""

from __future__ import annotations

import io
import json
import os
import socket

from helpers import write_tree
from msgspec.structs import replace
from rich.console import Console

from sitebackup.model.reports import RunRow, RunStart
from sitebackup.model.work import BackupCounts, Progress, Summary
from sitebackup.ui.escape import printable
from sitebackup.ui.printers import JsonPrinter, RateMeter, RichPrinter, human_bytes, summary_line
from sitebackup.ui.render import runs_table

MIB = 1024 * 1024


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_list_without_a_terminal_prints_every_value_whole_tab_separated(tmp_path, cli, container_name):
    src = write_tree(tmp_path / ("a-rather-long-directory-name-" * 4) / "site", {"a.txt": b"a", "b.txt": b"bb"})
    prefix = "nightly/" + "web-" * 20
    run = json.loads(cli(src, "-c", container_name, "--prefix", prefix, "--json").stdout.splitlines()[-1])
    result = cli("list")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split("\t") == ["id", "job", "kind", "status", "source", "destination", "files", "bytes", "started",
                                  "duration", "restorable", "changes"]
    fields = row.split("\t")
    assert fields[:7] == [run["instance_id"], f"{socket.gethostname().split('.')[0]}:{src}", "backup", "COMPLETED",
                          str(src), f"{container_name}/{prefix.rstrip('/')}", "2/2"]
    assert fields[7] == "3 B" and fields[10] == "yes" and "…" not in result.stdout
    assert fields[11] == "+3 ~0 -0"  # the first run added its two files and the root directory


def test_the_table_is_drawn_only_on_a_terminal_wide_enough_for_every_value():
    row = RunRow(instance_id="20261127T225602-0dcb81", kind="BackupSiteContent", runtime_status="COMPLETED",
                 restorable=None, source="/srv/" + "x" * 100, destination="backups/[bold]web", files=545,
                 files_total=545, bytes=3 * MIB, created_at="2026-11-27T22:56:02+00:00", duration_s=12.0,
                 worker_attached=None)
    wide, narrow = io.StringIO(), io.StringIO()
    runs_table([row], Console(file=wide, force_terminal=True, width=300, color_system=None))
    assert "backups/[bold]web" in wide.getvalue() and "\t" not in wide.getvalue()  # whole, never markup
    runs_table([row], Console(file=narrow, force_terminal=True, width=80, color_system=None))
    assert narrow.getvalue().splitlines()[1].split("\t")[4:6] == [row.source, row.destination]


def test_names_are_escaped_in_plain_lines(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"ok.txt": b"ok"})
    os.mkfifo(src / "evil\x1b[31mred\nFAILED fake")  # a FIFO is skipped, by name
    result = cli(src, "-c", container_name)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    assert "skipped evil\\x1b[31mred\\nFAILED fake: FIFO" in result.stdout.splitlines()


def test_printable_escapes_what_a_terminal_or_tsv_reader_acts_on():
    assert printable("a\tb\nc\rd\x1be\u202ef") == "a\\tb\\nc\\rd\\x1be\\u202ef"
    assert printable("ünïcødé 文件 a b") == "ünïcødé 文件 a b"
    assert printable("bad-\udcff") == "bad-\\udcff"


def test_bar_and_summary_show_the_same_binary_units():
    out = io.StringIO()
    printer = RichPrinter(Console(file=out, force_terminal=True, width=200, color_system=None))
    printer.start(RunStart(instance_id="x", source="/s", destination="c"))
    printer.progress(Progress(phase="uploading", files_done=1, files_total=2, bytes_done=4_000_000,
                              bytes_total=8_000_000))
    printer.close()
    assert "3.8 MiB/7.6 MiB" in out.getvalue() and " MB" not in out.getvalue()
    done = BackupCounts(files_uploaded=1, files_total=1, bytes_uploaded=4_000_000)
    assert "(3.8 MiB)" in summary_line(Summary(kind="BackupSiteContent", counts=done))
    assert human_bytes(4_000_000) == "3.8 MiB"


def test_rate_counts_moved_bytes_over_a_sliding_window_and_eta_the_bytes_left():
    clock = FakeClock()
    meter = RateMeter(window=10, min_span=1, clock=clock)
    status = Progress(phase="uploading", bytes_total=100 * MIB, bytes_done=0, bytes_skipped=0)
    assert meter.update(status) == (None, None)
    clock.now += 2
    # 20 MiB unchanged (skipped, nothing moved) and 4 MiB sent in 2 s
    rate, eta = meter.update(replace(status, bytes_done=24 * MIB, bytes_skipped=20 * MIB))
    assert rate == 2 * MIB and eta == 38
    for _ in range(20):  # later, 1 MiB a second: the old fast start leaves the window
        clock.now += 1
        status = replace(status, bytes_done=status.bytes_done + MIB, bytes_skipped=20 * MIB)
        rate, eta = meter.update(status)
    assert rate == MIB
    assert meter.update(replace(status, bytes_done=100 * MIB))[1] == 0.0


def test_json_progress_events_carry_rate_and_eta():
    clock = FakeClock()
    out = io.StringIO()
    printer = JsonPrinter(out, clock=clock)
    for second in range(4):
        printer.progress(Progress(phase="uploading", bytes_total=10 * MIB, bytes_done=second * MIB))
        clock.now += 1
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(events) == 4
    assert (events[0]["bytes_per_second"], events[0]["eta_s"]) == (None, None)
    assert (events[-1]["bytes_per_second"], events[-1]["eta_s"]) == (MIB, 7.0)


def test_a_real_run_reports_its_rate_under_the_cap(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {f"f{i}.bin": os.urandom(MIB // 2) for i in range(8)})
    result = cli(src, "-c", container_name, "--bwlimit", "1M", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert all("bytes_per_second" in e and "eta_s" in e for e in progress)
    rates = [e["bytes_per_second"] for e in progress if e["bytes_per_second"] is not None]
    # the last estimate spans most of the run: bytes moved over time, under the cap but for its burst
    assert rates and 0 < rates[-1] <= 1.2 * MIB

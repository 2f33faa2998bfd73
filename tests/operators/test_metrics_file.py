"""--metrics-file: Prometheus text for node_exporter's textfile collector, written after every run
whatever its exit code (errors, Ctrl-C, SIGTERM), one file shared by several jobs without losing series."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from azurite import free_port
from helpers import ROOT, write_tree
from prometheus_client.parser import text_string_to_metric_families

from sitebackup.ui.metrics import MetricsFileError, MetricsJob

MIB = 1024 * 1024


def series(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(metric, sorted labels) -> value, through prometheus_client's own text parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def job_values(path: Path, command: str, source: str, destination: str) -> dict[str, float]:
    """metric (with its state label, if any) -> value, for one job."""
    out = {}
    for (name, labels), value in series(path).items():
        labels = dict(labels)
        if (labels.pop("command"), labels.pop("source"), labels.pop("destination")) == (command, source, destination):
            out[name + (f"[{labels['state']}]" if labels else "")] = value
    return out


def test_jobs_sharing_a_file_keep_each_others_series_and_failures_keep_the_last_success(
        tmp_path, cli, cli_env, azurite, container_name):
    prom = tmp_path / "textfile" / "sitebackup.prom"
    prom.parent.mkdir()
    src = write_tree(tmp_path / "site", {"a.txt": b"aaaa", "b/c.txt": b"cc", "d.bin": b"d" * MIB})
    first = cli(src, "-c", container_name, "--prefix", "web/{date}", "--metrics-file", prom, "--json")
    assert first.returncode == 0, first.stderr
    other = cli(src, "-c", container_name + "x", "--metrics-file", prom)
    assert other.returncode == 0, other.stderr

    web = job_values(prom, "backup", str(src), f"{container_name}/web/{{date}}")  # the template, not today's date
    assert web["sitebackup_last_run_exit_code"] == 0
    assert web["sitebackup_last_run_files[uploaded]"] == 3 and web["sitebackup_last_run_files[failed]"] == 0
    assert web["sitebackup_last_run_bytes[uploaded]"] == MIB + 6 and web["sitebackup_last_run_bytes[skipped]"] == 0
    assert web["sitebackup_last_run_start_timestamp_seconds"] <= web["sitebackup_last_run_end_timestamp_seconds"]
    assert web["sitebackup_last_success_timestamp_seconds"] == web["sitebackup_last_run_end_timestamp_seconds"]
    assert web["sitebackup_last_run_duration_seconds"] >= 0
    assert job_values(prom, "backup", str(src), container_name + "x")["sitebackup_last_run_files[uploaded]"] == 3
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644  # node_exporter runs as another user
    # no temporary left behind; the lock file stays (node_exporter reads only *.prom files)
    assert sorted(os.listdir(prom.parent)) == [".sitebackup.prom.lock", "sitebackup.prom"]

    # the same job again, its destination unreachable: exit 3, no counters, the last success kept
    down = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string.replace(
        f":{azurite.port}/", f":{free_port()}/")}
    failed = cli(src, "-c", container_name, "--prefix", "web/{date}", "--metrics-file", prom, env=down)
    assert failed.returncode == 3, failed.stderr
    after = job_values(prom, "backup", str(src), f"{container_name}/web/{{date}}")
    assert after["sitebackup_last_run_exit_code"] == 3
    assert not any(name.startswith(("sitebackup_last_run_files", "sitebackup_last_run_bytes")) for name in after)
    assert after["sitebackup_last_success_timestamp_seconds"] == web["sitebackup_last_success_timestamp_seconds"]
    assert job_values(prom, "backup", str(src), container_name + "x")["sitebackup_last_run_exit_code"] == 0

    # a usage error is an exit path too
    bad = cli(src, "-c", "Bad_Name", "--metrics-file", prom)
    assert bad.returncode == 2
    usage = job_values(prom, "backup", str(src), "Bad_Name")
    assert usage["sitebackup_last_run_exit_code"] == 2
    assert set(usage) == {"sitebackup_last_run_exit_code", "sitebackup_last_run_start_timestamp_seconds",
                          "sitebackup_last_run_end_timestamp_seconds", "sitebackup_last_run_duration_seconds"}


def test_restore_and_verify_write_their_own_series(tmp_path, cli, container_name):
    prom = tmp_path / "m.prom"
    src = write_tree(tmp_path / "site", {"a.txt": b"aaaa", "b.txt": b"bb"})
    run = json.loads(cli(src, "-c", container_name, "--json").stdout.splitlines()[-1])["instance_id"]
    assert cli("restore", run, tmp_path / "out", "--metrics-file", prom).returncode == 0
    assert cli("verify", run, "--metrics-file", prom).returncode == 0
    restore = job_values(prom, "restore", run, str(tmp_path / "out"))
    assert restore["sitebackup_last_run_files[restored]"] == 2 and restore["sitebackup_last_run_exit_code"] == 0
    verify = job_values(prom, "verify", str(src), container_name)  # labelled as the backup job it verifies
    assert verify["sitebackup_last_run_files[ok]"] == 2 and verify["sitebackup_last_run_files[mismatched]"] == 0

    assert cli("verify", "no-such-run", "--metrics-file", prom).returncode == 2
    assert job_values(prom, "verify", "no-such-run", "")["sitebackup_last_run_exit_code"] == 2


def test_prune_writes_the_runs_blobs_and_bytes_it_removed(tmp_path, cli, container_name):
    prom = tmp_path / "m.prom"
    src = write_tree(tmp_path / "site", {"a.txt": b"first", "b.txt": b"bb"})
    assert cli(src, "-c", container_name).returncode == 0
    (src / "a.txt").write_bytes(b"second version")  # run 2 keeps run 1's a.txt as a snapshot
    (src / "b.txt").unlink()  # and drops b.txt from its record
    assert cli(src, "-c", container_name).returncode == 0
    assert cli("prune", "-c", container_name, "--keep-last", "1", "--metrics-file", prom).returncode == 0
    pruned = job_values(prom, "prune", "", container_name)
    assert pruned["sitebackup_last_run_exit_code"] == 0
    assert (pruned["sitebackup_last_run_runs[kept]"], pruned["sitebackup_last_run_runs[removed]"]) == (1, 1)
    assert pruned["sitebackup_last_run_blobs[removed]"] == 1  # b.txt
    assert pruned["sitebackup_last_run_snapshots[removed]"] == 1  # the first a.txt
    assert pruned["sitebackup_last_run_bytes[removed]"] == len(b"first") + len(b"bb")
    assert cli("prune", "-c", container_name, "--keep-last", "1", "--dry-run", "--metrics-file", prom).returncode == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_writes_exit_code_130(tmp_path, cli_env, container_name, sig):
    prom = tmp_path / "m.prom"
    src = write_tree(tmp_path / "site", {f"f{i}.bin": b"x" * MIB for i in range(8)})
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "-c", container_name, "--json",
                             "--bwlimit", "1M", "--metrics-file", str(prom)], env=cli_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "start"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (err, out[-3000:])
    assert "interrupted" in err
    values = job_values(prom, "backup", str(src), container_name)
    assert values["sitebackup_last_run_exit_code"] == 130
    assert "sitebackup_last_success_timestamp_seconds" not in values


def test_the_merge_keeps_other_programs_series_replaces_garbage_and_survives_concurrent_writers(tmp_path):
    prom = tmp_path / "m.prom"
    prom.write_text('# TYPE node_custom gauge\nnode_custom{x="1"} 42\n')
    MetricsJob(prom, "backup", "/src", "c1").write(0)
    assert series(prom)[("node_custom", (("x", "1"),))] == 42

    def writer(n: int) -> None:
        for _ in range(10):
            MetricsJob(prom, "backup", f"/src{n}", "c").write(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = {dict(labels)["source"]: value for (name, labels), value in series(prom).items()
             if name == "sitebackup_last_run_exit_code"}
    assert codes == {"/src": 0, "/src0": 0, "/src1": 1, "/src2": 2, "/src3": 3}

    prom.write_text("this is { not prometheus text\n")
    MetricsJob(prom, "backup", "/src", "c1").write(1)
    assert {dict(labels)["source"] for (_n, labels) in series(prom)} == {"/src"}


def test_a_planted_symlink_is_neither_read_nor_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("token 12345\n")
    prom = tmp_path / "m.prom"
    prom.symlink_to(secret)
    with pytest.raises(MetricsFileError, match="cannot read"):
        MetricsJob(prom, "backup", "/src", "c").write(0)
    assert secret.read_text() == "token 12345\n"


def test_metrics_file_problems_are_reported_without_changing_the_exit_code(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    missing = cli(src, "-c", container_name, "--metrics-file", tmp_path / "nowhere" / "m.prom")
    assert missing.returncode == 2 and "--metrics-file" in missing.stderr
    (tmp_path / "m.prom").symlink_to(tmp_path / "elsewhere.prom")
    linked = cli(src, "-c", container_name, "--metrics-file", tmp_path / "m.prom")
    assert linked.returncode == 0
    assert "sitebackup: warning: metrics not written" in linked.stderr
    for flag in ("--dry-run", "--detach"):
        result = cli(src, "-c", container_name, "--metrics-file", tmp_path / "x.prom", flag)
        assert result.returncode == 2 and "not with --dry-run or --detach" in result.stderr

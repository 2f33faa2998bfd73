"""--bwlimit: the rate syntax, the token bucket's pacing, and real backups and restores held to the cap.

The end-to-end tests time a few MiB against a low cap and assert only a lower bound (a loaded
machine can make a run slower, never faster than the cap allows).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests
from helpers import write_tree

from sitebackup.blob import bwlimit
from sitebackup.blob.bwlimit import Limiter, PacedAdapter, parse_rate
from sitebackup.blob.clients import StorageSettings, make_service_client
from sitebackup.errors import InputError

KIB, MIB = 1024, 1024 * 1024


@pytest.mark.parametrize("text, rate", [("512K", 512 * KIB), ("10M", 10 * MIB), ("1G", 1024 * MIB),
                                        ("1.5m", 3 * MIB // 2), ("10MiB", 10 * MIB), ("2kb", 2 * KIB),
                                        ("65536", 65536), ("0", None), ("off", None)])
def test_rates_are_bytes_per_second_in_binary_units(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "10X", "-1M", "1e6", "100"])
def test_malformed_or_tiny_rates_are_refused(text):
    with pytest.raises(InputError, match="--bwlimit"):
        parse_rate(text)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_callers_queue_for_the_rate_and_idle_credit_is_capped_at_the_burst():
    clock = FakeClock()
    limiter = Limiter(1000, burst=100, clock=clock)
    # no credit at start, and concurrent takers each wait for everything taken before them
    assert [limiter.reserve(250) for _ in range(4)] == [0.25, 0.5, 0.75, 1.0]
    clock.now = 1.0  # all four paid
    assert limiter.reserve(0) == 0.0
    clock.now = 60.0  # a long idle saves no more than the burst
    assert limiter.reserve(100) == 0.0
    assert limiter.reserve(100) == pytest.approx(0.1)


def test_async_acquire_sleeps_in_the_loop_for_its_share():
    limiter = Limiter(64 * KIB, burst=1)

    async def take() -> float:
        start = time.monotonic()
        await asyncio.gather(*(limiter.acquire_async(16 * KIB) for _ in range(4)))
        return time.monotonic() - start

    assert asyncio.run(take()) >= 0.9  # 64 KiB at 64 KiB/s


def test_clients_are_paced_only_while_a_limit_is_set():
    settings = StorageSettings(connection_string="UseDevelopmentStorage=true")

    def adapter() -> requests.adapters.HTTPAdapter:
        client, _label = make_service_client(settings)
        try:
            return client._config.transport.session.get_adapter("http://127.0.0.1/")
        finally:
            client.close()

    assert type(adapter()) is requests.adapters.HTTPAdapter  # nothing added to the hot path
    bwlimit.set_process_limit(MIB)
    try:
        assert isinstance(adapter(), PacedAdapter)
        assert adapter().limiter is bwlimit.process_limiter()  # one bucket for every client of the process
    finally:
        bwlimit.set_process_limit(None)
    assert type(adapter()) is requests.adapters.HTTPAdapter


def test_backup_and_restore_stay_under_the_cap_on_every_upload_path(tmp_path, cli, cli_env, blob_service,
                                                                    container_name):
    # with --block-size 4: a small file (asyncio uploader), a 9 MiB file (the SDK's chunked upload)
    # and a 17 MiB file in block ranges; the restore fetches the big one in ranges too
    files = {"small.txt": b"s" * 1000, "mid.bin": b"m" * (9 * MIB), "big.bin": b"b" * (17 * MIB)}
    src = write_tree(tmp_path / "site", files)
    total = sum(len(v) for v in files.values())
    rate = 16 * MIB

    start = time.monotonic()
    result = cli(src, "-c", container_name, "--block-size", "4", "--bwlimit", "16M", "--json")
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["bytes_uploaded"] == total
    assert elapsed >= 0.9 * total / rate, elapsed
    assert summary["duration_s"] >= 0.9 * total / rate, summary

    env = {**cli_env, "SITEBACKUP_BWLIMIT": "16M"}  # the environment variable sets it too
    start = time.monotonic()
    restored = cli("restore", summary["instance_id"], tmp_path / "out", "--json", env=env)
    elapsed = time.monotonic() - start
    assert restored.returncode == 0, restored.stderr
    assert elapsed >= 0.9 * total / rate, elapsed
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files


@pytest.mark.parametrize("command", [["backup", "."], ["restore", "x", "y"], ["resume", "x"], ["worker"]])
def test_a_bad_rate_is_a_usage_error_on_every_command_that_takes_it(cli, command):
    result = cli(*command, "--bwlimit", "lots")
    assert result.returncode == 2
    assert "Invalid value for '--bwlimit'" in result.stderr and "Traceback" not in result.stderr

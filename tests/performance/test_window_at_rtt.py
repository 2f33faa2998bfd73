"""Requests in flight at a real round-trip time: a backup and a restore of small files, reaching Azurite through
benchmarks/delayproxy.py with 40 ms added per round trip, keep a window of requests going (counted at the proxy)
and reuse their connections (counted too). On loopback a request costs well under a millisecond, so a run that
waits one request at a time looks fast there; at 40 ms it is bound by how many it keeps in flight."""

from __future__ import annotations

import json
import sys

from helpers import ROOT, many_files

sys.path.insert(0, str(ROOT / "benchmarks"))
import delayproxy  # noqa: E402

FILES = 600
ONE_WAY_MS = 20
# the upload and download windows are 32 requests: most of it must be used at once
LEAST_MOST_IN_FLIGHT = 24
# the window's connections, kept alive and reused, and the few a run opens for its records and lock
MOST_CONNECTIONS = 48


def summary(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_backup_and_a_restore_at_40_ms_keep_a_window_in_flight_on_reused_connections(
        tmp_path, cli, cli_env, azurite, container_name):
    src = tmp_path / "site"
    many_files(src, FILES, size=1024)
    with delayproxy.behind(azurite, ONE_WAY_MS) as far:
        env = {**cli_env, "AZURE_STORAGE_CONNECTION_STRING": far.connection_string}
        backup = cli(src, "--container", container_name, "--json", env=env)
        assert backup.returncode == 0, backup.stderr
        up = far.proxy.reset()
        run_id = summary(backup)["instance_id"]
        restore = cli("restore", run_id, tmp_path / "dest", "--json", env=env)
        assert restore.returncode == 0, restore.stderr
        down = far.proxy.reset()
    assert summary(backup)["files_uploaded"] == FILES and summary(restore)["files_restored"] == FILES
    assert up.requests >= FILES and down.requests >= FILES
    assert up.most_in_flight >= LEAST_MOST_IN_FLIGHT, up
    assert down.most_in_flight >= LEAST_MOST_IN_FLIGHT, down
    assert up.connections <= MOST_CONNECTIONS, up
    assert down.connections <= MOST_CONNECTIONS, down

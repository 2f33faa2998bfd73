"""Restoring a run no later backup followed reads the current blobs without listing the container: a request
per file. A blob another writer replaced since is still found by its recorded Content-MD5 (the snapshot kept)
or failed as pruned, and a run a later backup followed is planned from listings as before.
Real CLI processes, the embedded backend and a real Azurite behind a logging proxy."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ForwardingProxy, replace_blob, write_tree


class Log(ForwardingProxy):
    def __init__(self, target: str):
        self.requests: list[tuple[str, str]] = []
        super().__init__(target)

    def intercept(self, request, body):
        with self.lock:
            self.requests.append((request.command, request.path))
        return body

    def listings(self, container: str) -> int:
        with self.lock:
            # of the files: the catalog of sealed runs is listed too (tests/performance/test_catalog_requests.py)
            return sum(1 for method, path in self.requests
                       if method == "GET" and f"/{container}?" in path and "comp=list" in path
                       and "prefix=.sitebackup%2F" not in path)


def summary(result) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def through(proxy: Log, azurite, cli_env: dict, cli):
    # every command through the proxy: runs are matched to the endpoint they were made with
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
        azurite.endpoint, proxy.endpoint))
    return lambda *args: cli(*args, env=env)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_newest_run_restores_without_a_listing_and_a_replaced_blob_is_still_found(
        tmp_path, cli, cli_env, azurite, blob_service, container_name):
    proxy = Log(azurite.endpoint)
    run = through(proxy, azurite, cli_env, cli)
    try:
        files = {f"d{i % 4}/sub{i % 3}/f{i:03d}.txt": b"content %d" % i for i in range(40)}
        src = write_tree(tmp_path / "site", files)
        other = write_tree(tmp_path / "other", {"x.txt": b"elsewhere"})
        result = run(src, "--container", container_name, "--prefix", "web", "--json")
        assert result.returncode == 0, result.stderr
        run_id = summary(result)["instance_id"]
        # a later backup of names that cannot be the run's does not count
        assert run(other, "--container", container_name, "--prefix", "webs", "--json").returncode == 0

        before = proxy.listings(container_name)
        result = run("restore", run_id, tmp_path / "all", "--json")
        assert result.returncode == 0, result.stderr
        assert files_of(tmp_path / "all") == files
        assert proxy.listings(container_name) == before  # the run's record and a GET per file: no listing

        cc = blob_service.get_container_client(container_name)
        replace_blob(cc, "web/d0/sub0/f000.txt", b"another writer, snapshot kept", keep=True)
        replace_blob(cc, "web/d1/sub1/f001.txt", b"another writer, nothing kept", keep=False)
        before = proxy.listings(container_name)
        result = run("restore", run_id, tmp_path / "dest", "--json")
        out = summary(result)
        assert result.returncode == 1, result.stderr  # the one version no copy holds any more
        assert [f["path"] for f in out["failures"]] == ["d1/sub1/f001.txt"]
        assert "pruned" in out["failures"][0]["error"]
        restored = files_of(tmp_path / "dest")
        assert restored == {k: v for k, v in files.items() if k != "d1/sub1/f001.txt"}  # f000 from its snapshot
        # a listing of its copies for each blob found replaced as it was fetched, none for the other 38
        assert proxy.listings(container_name) - before == 2
    finally:
        proxy.close()


def test_a_run_a_later_backup_followed_is_planned_from_listings(tmp_path, cli, cli_env, azurite, container_name):
    proxy = Log(azurite.endpoint)
    run = through(proxy, azurite, cli_env, cli)
    try:
        files = {f"f{i:02d}.txt": b"one %d" % i for i in range(10)}
        src = write_tree(tmp_path / "site", files)
        result = run(src, "--container", container_name, "--json")
        assert result.returncode == 0, result.stderr
        first = summary(result)["instance_id"]
        for i in range(5):
            (src / f"f{i:02d}.txt").write_bytes(b"two %d!" % i)
        assert run(src, "--container", container_name, "--json").returncode == 0

        before = proxy.listings(container_name)
        result = run("restore", first, tmp_path / "dest", "--json")
        assert result.returncode == 0, result.stderr
        assert files_of(tmp_path / "dest") == files  # the replaced five from their snapshots
        assert proxy.listings(container_name) - before >= 1  # the plan listed the copies
    finally:
        proxy.close()

"""Every run restorable: replaced content kept as snapshots, restore and verify of any run, --as-of, prune,
content-derived block ids. Real CLI processes, the embedded backend and a real Azurite."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, ForwardingProxy, replace_blob, wait_until, write_tree

from sitebackup.blob.history import PRUNED, Copy
from sitebackup.blob.naming import overlaps
from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.commands.prune import unneeded
from sitebackup.model.work import CommitOrder, FetchInput, Listed, PlanInput, RestoreOptions
from sitebackup.workflows import blocks, fetch
from sitebackup.workflows.activity import ActivityDeps

MIB = 1024 * 1024
BASE_NS = 1_600_000_000_123_456_789


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def backup(cli, src: Path, container: str, *extra: str) -> str:
    result = cli(src, "--container", container, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return summary_of(result)["instance_id"]


def tree_of(root: Path) -> dict[str, tuple[bytes, int]]:
    """relpath -> (bytes, mtime_ns) of every file under *root*."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def set_mtimes(root: Path) -> None:
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        os.utime(path, ns=(BASE_NS + i * 1_000_000_007,) * 2)


def restore(cli, run_id: str, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("restore", run_id, dest, "--json", *extra)


def copies(blob_service, container: str) -> dict[str, list[tuple[str | None, str]]]:
    """blob name -> [(snapshot or None, Content-MD5)] of everything outside the reserved prefix."""
    found: dict[str, list] = {}
    for blob in blob_service.get_container_client(container).list_blobs(include=["snapshots"]):
        if not blob.name.startswith(".sitebackup/"):
            md5 = base64.b64encode(bytes(blob.content_settings.content_md5)).decode()
            found.setdefault(blob.name, []).append((blob.snapshot, md5))
    return found


def md5_of(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


V1 = {"a.txt": b"alpha version 1", "b.txt": b"bravo, deleted later", "d.txt": b"delta 1",
      "keep/e.txt": b"echo never changes", "keep/f.bin": os.urandom(50_000)}


def two_runs(tmp_path: Path, cli, container: str) -> tuple[Path, str, str, dict, dict]:
    """Run 1 of V1; then `a` gets other bytes of the same size with its mtime set back (run 2 uses --checksum),
    `d` a new mtime and content, `b` is deleted and `c` added. Returns (source, run 1, run 2, tree 1, tree 2)."""
    src = write_tree(tmp_path / "site", V1)
    set_mtimes(src)
    tree1 = tree_of(src)
    first = backup(cli, src, container)
    a_stat = (src / "a.txt").stat()
    (src / "a.txt").write_bytes(b"ALPHA VERSION 2")
    assert (src / "a.txt").stat().st_size == a_stat.st_size
    os.utime(src / "a.txt", ns=(a_stat.st_mtime_ns, a_stat.st_mtime_ns))
    (src / "d.txt").write_bytes(b"delta 2, longer")
    os.utime(src / "d.txt", ns=(BASE_NS + 99_000_000_000,) * 2)
    (src / "b.txt").unlink()
    (src / "c.txt").write_bytes(b"charlie is new")
    tree2 = tree_of(src)
    second = backup(cli, src, container, "--checksum")
    return src, first, second, tree1, tree2


def test_every_run_restores_its_own_tree_and_prune_frees_only_what_dropped_runs_needed(
        tmp_path, cli, blob_service, container_name):
    _src, first, second, tree1, tree2 = two_runs(tmp_path, cli, container_name)
    stored = copies(blob_service, container_name)
    # the replaced versions of a and d are snapshots; b's blob stays until retention removes it
    for name, old, new in (("a.txt", V1["a.txt"], b"ALPHA VERSION 2"), ("d.txt", V1["d.txt"], b"delta 2, longer")):
        assert sorted(stored[name], key=lambda copy: copy[0] or "") == [(None, md5_of(new))] + [
            (next(snap for snap, _md5 in stored[name] if snap), md5_of(old))], name
    assert stored["b.txt"] == [(None, md5_of(V1["b.txt"]))]
    assert all(len(stored[name]) == 1 for name in ("keep/e.txt", "keep/f.bin", "c.txt"))

    for run_id, tree, name in ((first, tree1, "one"), (second, tree2, "two")):
        result = restore(cli, run_id, tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert tree_of(tmp_path / name) == tree, name
        verified = cli("verify", run_id, "--download", "--json")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["files_ok"] == len(tree)
    rows = {r["instance_id"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows[first]["restorable"] == rows[second]["restorable"] == "yes"

    before = copies(blob_service, container_name)
    dry = cli("prune", "-c", container_name, "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert [r["instance_id"] for r in plan["removed"]] == [first]
    assert [r["instance_id"] for r in plan["kept"]] == [second]
    # a's and d's old versions, and b
    assert (plan["blobs_removed"], plan["snapshots_removed"]) == (1, 2)
    assert plan["bytes_removed"] == len(V1["a.txt"]) + len(V1["d.txt"]) + len(V1["b.txt"])
    text = cli("prune", "-c", container_name, "--keep-last", "1", "--dry-run")
    assert f"remove {first}" in text.stdout and "would remove 1 run(s), 1 blob(s) and 2 snapshot(s)" in text.stdout
    assert copies(blob_service, container_name) == before
    assert restore(cli, first, tmp_path / "one-again").returncode == 0

    pruned = cli("prune", "-c", container_name, "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["removed"][0]["instance_id"] == first
    after = copies(blob_service, container_name)
    assert "b.txt" not in after
    assert after["a.txt"] == [(None, md5_of(b"ALPHA VERSION 2"))]
    assert after["d.txt"] == [(None, md5_of(b"delta 2, longer"))]
    gone = restore(cli, first, tmp_path / "one-gone")
    assert gone.returncode == 2 and "pruned" in gone.stderr, gone.stderr
    assert "Traceback" not in gone.stderr
    assert cli("verify", first).returncode == 2
    result = restore(cli, second, tmp_path / "two-again")
    assert result.returncode == 0, result.stderr
    assert tree_of(tmp_path / "two-again") == tree2
    assert cli("verify", second, "--download").returncode == 0
    assert [r["instance_id"] for r in json.loads(cli("list", "--json").stdout)
            if r["kind"] == "BackupSiteContent"] == [second]
    # nothing left to do
    again = json.loads(cli("prune", "-c", container_name, "--keep-last", "1", "--json").stdout)
    assert (again["removed"], again["blobs_removed"], again["snapshots_removed"]) == ([], 0, 0)


def test_restore_as_of_a_time_restores_the_latest_run_started_by_then(tmp_path, cli, container_name):
    _src, first, second, tree1, tree2 = two_runs(tmp_path, cli, container_name)
    rows = {r["instance_id"]: r for r in json.loads(cli("list", "--json").stdout)}
    # list shows start times in UTC; the first run's own start time is "at or before" it, the second's is not
    at_first = cli("restore", "-c", container_name, "--as-of", rows[first]["created_at"] + "+00:00",
                   tmp_path / "at-first", "--json")
    assert at_first.returncode == 0, at_first.stderr
    assert f"(run {first})" in json.loads(at_first.stdout.splitlines()[0])["source"]
    assert tree_of(tmp_path / "at-first") == tree1
    latest = cli("restore", "-c", container_name, "--as-of", "2999-01-01", tmp_path / "now", "--json")
    assert latest.returncode == 0, latest.stderr
    assert tree_of(tmp_path / "now") == tree2
    none = cli("restore", "-c", container_name, "--as-of", "2000-01-01", tmp_path / "never")
    assert none.returncode == 2 and "no completed backup" in none.stderr
    assert cli("restore", first, tmp_path / "x", "--as-of", "2000-01-01").returncode == 2
    assert cli("restore", "-c", container_name, "--as-of", "yesterday", tmp_path / "x").returncode == 2


def test_a_name_written_outside_the_baseline_is_kept_as_a_snapshot(tmp_path, cli, cli_env, blob_service,
                                                                  container_name):
    """A run without a baseline (another state directory here) finds the names taken: the conditional put is
    refused; content of another version is kept as a snapshot, the very same version is left as it is, and
    the first state directory's run still restores."""
    src = write_tree(tmp_path / "site", {"x.txt": b"first", "y.txt": b"same", "big.bin": os.urandom(5 * MIB)})
    first = backup(cli, src, container_name, "--block-size", "1")
    (src / "x.txt").write_bytes(b"second")
    other_env = dict(cli_env, SITEBACKUP_STATE_DIR=str(tmp_path / "other-state"))
    assert cli(src, "--container", container_name, "--block-size", "1", env=other_env).returncode == 0
    stored = copies(blob_service, container_name)
    assert {md5 for _s, md5 in stored["x.txt"]} == {md5_of(b"first"), md5_of(b"second")}
    assert len(stored["y.txt"]) == len(stored["big.bin"]) == 1
    result = restore(cli, first, tmp_path / "back")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "x.txt").read_bytes() == b"first"


def test_force_run_of_a_large_file_whose_bytes_changed_under_the_same_size_and_mtime(tmp_path, cli, container_name):
    """Content block ids: --force re-sends the changed block, the commit's MD5 is of the bytes staged,
    and both runs restore exactly and pass verify --download."""
    data = bytearray(os.urandom(5 * MIB + 123))
    src = write_tree(tmp_path / "site", {"big.bin": bytes(data)})
    st = (src / "big.bin").stat()
    first = backup(cli, src, container_name, "--block-size", "1")
    data[3 * MIB + 7] ^= 0xFF
    (src / "big.bin").write_bytes(bytes(data))
    os.utime(src / "big.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    result = cli(src, "--container", container_name, "--json", "--block-size", "1", "--force")
    assert result.returncode == 0, result.stderr
    second = summary_of(result)["instance_id"]
    for run_id, name in ((first, "one"), (second, "two")):
        restored = restore(cli, run_id, tmp_path / name)
        assert restored.returncode == 0, restored.stderr
        verified = cli("verify", run_id, "--download")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert (tmp_path / "two" / "big.bin").read_bytes() == bytes(data)
    assert (tmp_path / "one" / "big.bin").read_bytes() != bytes(data)
    assert (tmp_path / "one" / "big.bin").stat().st_mtime_ns == st.st_mtime_ns
    # and a --checksum run sees the file as it is: unchanged
    checked = cli(src, "--container", container_name, "--json", "--block-size", "1", "--checksum")
    assert summary_of(checked)["files_unchanged"] == 1


def test_content_block_ids_name_bytes_and_index_with_one_length():
    ids = [blocks.content_block_id(bytes([i]) * 100, i) for i in range(10)]
    assert len(set(ids)) == 10 and {len(i) for i in ids} == {56}
    assert blocks.content_block_id(b"x" * 100, 3) == blocks.content_block_id(bytearray(b"x" * 100), 3)
    assert blocks.content_block_id(b"x" * 100, 3) != blocks.content_block_id(b"x" * 99 + b"y", 3)
    assert blocks.content_block_id(b"x" * 100, 3) != blocks.content_block_id(b"x" * 100, 4)


def test_hash_blocks_gives_the_ranges_ids_and_the_whole_md5(tmp_path):
    data = os.urandom(3 * MIB + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    st = path.stat()
    with open(path, "rb") as fh:
        md5, ids = blocks.hash_blocks(fh.fileno(), st.st_size, st.st_mtime_ns, MIB)
    assert md5 == md5_of(data)
    assert ids == [blocks.content_block_id(data[i * MIB:(i + 1) * MIB], i) for i in range(4)]


def test_a_commit_refuses_ids_that_do_not_match_the_bytes_the_md5_was_hashed_from():
    ids = [blocks.content_block_id(b"a", 0), blocks.content_block_id(b"b", 1)]
    good = CommitOrder(md5="md5", blocks=ids, digest=blocks.ids_digest(ids))
    assert blocks.reported(good, 2) == ("md5", ids)
    assert blocks.reported(CommitOrder(md5="md5", blocks=[ids[0], None], digest=blocks.ids_digest(ids)), 2) is None
    assert blocks.reported(CommitOrder(blocks=ids), 2) is None
    other = [ids[0], blocks.content_block_id(b"c", 1)]
    try:
        blocks.reported(CommitOrder(md5="md5", blocks=other, digest=blocks.ids_digest(ids)), 2)
    except blocks.FileChangedError:
        pass
    else:
        raise AssertionError("a staged block of other bytes was accepted")


# ---- prune's sweep, pure --------------------------------------------------------------------------

def c(snapshot: str | None, md5: str) -> Copy:
    return Copy("n", snapshot, md5, 10, "etag")


def test_unneeded_keeps_one_copy_per_needed_version_and_the_base_while_a_snapshot_stays():
    base, old, older, dup = c(None, "v3"), c("2026-01-02T00:00:00.0000000Z", "v2"), \
        c("2026-01-01T00:00:00.0000000Z", "v1"), c("2026-01-03T00:00:00.0000000Z", "v3")
    everything = [base, old, older, dup]
    assert unneeded(everything, {"v3", "v2", "v1"}) == [dup]  # the current blob holds v3
    assert unneeded(everything, {"v3"}) == [dup, old, older]
    assert set(unneeded(everything, set())) == set(everything)
    # v1 still needed: the base cannot go without its snapshots, so it stays though no run needs it
    assert unneeded(everything, {"v1"}) == [dup, old]
    # of two snapshots of one version the newest stays
    twin = c("2026-01-05T00:00:00.0000000Z", "v1")
    assert unneeded([base, older, twin], {"v1"}) == [older]


def test_prefixes_overlap_when_their_names_can_meet():
    assert overlaps("", "web") and overlaps("web", "") and overlaps("web", "web")
    assert overlaps("web", "web/a") and overlaps("web/a", "web")
    assert not overlaps("web", "webs") and not overlaps("web/a", "web/b")


# ---- prune across destinations, usage -------------------------------------------------------------

def test_prune_of_one_prefix_leaves_other_prefixes_and_foreign_blobs(tmp_path, cli, blob_service, container_name):
    # two jobs of one container never share names: one writes under "one", the other under "nested"
    one = write_tree(tmp_path / "one", {"f.txt": b"one v1"})
    other = write_tree(tmp_path / "other", {"g.txt": b"other"})
    backup(cli, one, container_name, "--prefix", "one")
    backup(cli, other, container_name, "--prefix", "nested")
    (one / "f.txt").write_bytes(b"one v2!")
    backup(cli, one, container_name, "--prefix", "one")
    cc = blob_service.get_container_client(container_name)
    cc.upload_blob("one/not-ours.txt", b"someone else's")
    result = cli("prune", "-c", container_name, "--prefix", "one", "--keep-last", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["removed"]) == 1 and report["snapshots_removed"] == 1 and report["blobs_removed"] == 0
    names = {name for name in copies(blob_service, container_name)}
    assert names == {"one/f.txt", "nested/g.txt", "one/not-ours.txt"}


def test_prune_usage_errors_are_one_line(cli, container_name):
    for args in (["prune", "-c", container_name],  # no rule
                 ["prune", "-c", "Bad_Name", "--keep-last", "1"],
                 ["prune", "-c", container_name, "--keep-within", "soon"],
                 ["prune", "-c", container_name, "--keep-last", "1", "--prefix", "a/../b"]):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_purge_leaves_completed_backups_to_prune(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    run_id = backup(cli, src, container_name)
    restored = restore(cli, run_id, tmp_path / "dest")
    assert restored.returncode == 0, restored.stderr
    purged = cli("purge", "--older-than", "0s")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 " in purged.stdout and "kept 1 completed backup run(s)" in purged.stdout
    assert restore(cli, run_id, tmp_path / "again").returncode == 0


# ---- through a proxy: requests counted, deletes held ------------------------------------------------

class Proxy(ForwardingProxy):
    """Logs (method, path and query, If-Match, If-None-Match) of every request.

    Once ``pass_deletes`` is set, DELETE requests after that many more wait until ``release`` and are never
    forwarded (the client is killed meanwhile)."""

    def __init__(self, target: str):
        self.pass_deletes: int | None = None
        self.deletes = 0
        self.held = 0
        self.log: list[tuple[str, str, str | None, str | None]] = []
        super().__init__(target)

    def intercept(self, request, body):
        with self.lock:
            self.log.append((request.command, request.path, request.headers.get("If-Match"),
                             request.headers.get("If-None-Match")))
            hold = False
            if request.command == "DELETE" and self.pass_deletes is not None:
                self.deletes += 1
                hold = self.deletes > self.pass_deletes
                self.held += hold
        if hold:
            self.release.wait(120)
            return None  # the client was killed meanwhile: never forwarded
        return body


def test_prune_killed_while_deleting_then_run_again_finishes_and_kept_runs_restore(
        tmp_path, cli, cli_env, azurite, blob_service, container_name):
    # every command goes through the proxy: runs are matched to the endpoint they were made with
    proxy = Proxy(azurite.endpoint)
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
        azurite.endpoint, proxy.endpoint))
    run = via(proxy, azurite, cli_env, cli)
    try:
        old = {f"old/f{i:03d}.txt": b"old %d" % i for i in range(60)}
        src = write_tree(tmp_path / "site", {**old, "stays.txt": b"stays", "changes.txt": b"changes v1"})
        first = backup(run, src, container_name)
        for name in old:
            (src / name).unlink()
        (src / "changes.txt").write_bytes(b"changes v2")
        second = backup(run, src, container_name)
        tree2 = tree_of(src)

        proxy.pass_deletes = 10
        proc = subprocess.Popen([sys.executable, "-m", "sitebackup", "prune", "-c", container_name, "--keep-last", "1"],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: proxy.held or proc.poll() is not None, "a DELETE to be held", timeout=60, interval=0.1)
            assert proxy.held and proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()
        proxy.pass_deletes = None
        proxy.release.set()
        left = copies(blob_service, container_name)
        assert 0 < sum(name.startswith("old/") for name in left) < len(old)  # killed half way

        # the killed prune's decision stands even if the rules asked now would keep the run
        rerun = run("prune", "-c", container_name, "--keep-last", "5", "--json")
        assert rerun.returncode == 0, rerun.stderr
        report = json.loads(rerun.stdout)
        assert [r["instance_id"] for r in report["removed"]] == [first]
        assert "earlier prune" in report["removed"][0]["reason"]
        assert set(copies(blob_service, container_name)) == {"stays.txt", "changes.txt"}
        assert len(copies(blob_service, container_name)["changes.txt"]) == 1
        result = restore(run, second, tmp_path / "two")
        assert result.returncode == 0, result.stderr
        assert tree_of(tmp_path / "two") == tree2
        assert "pruned" in restore(run, first, tmp_path / "one").stderr
    finally:
        proxy.close()


def via(proxy: Proxy, azurite, cli_env: dict, cli):
    env = dict(cli_env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
        azurite.endpoint, proxy.endpoint))
    return lambda *args: cli(*args, env=env)


def test_unchanged_files_cost_no_request_and_a_changed_file_one_snapshot(tmp_path, cli, cli_env, azurite,
                                                                        container_name):
    proxy = Proxy(azurite.endpoint)
    run = via(proxy, azurite, cli_env, cli)
    try:
        files = {f"f{i:02d}.txt": b"version one of %d" % i for i in range(20)}
        src = write_tree(tmp_path / "site", files)
        backup(run, src, container_name)
        for i in range(5):  # changed
            (src / f"f{i:02d}.txt").write_bytes(b"version two of %d!" % i)
        for i in range(5, 8):  # touched: same bytes, new mtime
            os.utime(src / f"f{i:02d}.txt", ns=(BASE_NS + i, BASE_NS + i))
        proxy.log.clear()
        backup(run, src, container_name)
        on_files = [(method, path, if_match, if_none) for method, path, if_match, if_none in proxy.log
                    if f"/{container_name}/f" in path]
        snapshots = [path for method, path, _m, _n in on_files if "comp=snapshot" in path]
        puts = [(path, if_match) for method, path, if_match, _n in on_files if method == "PUT" and "comp=" not in path]
        assert sorted(p.split("?")[0].rsplit("/", 1)[-1] for p in snapshots) == [f"f{i:02d}.txt" for i in range(5)]
        assert len(puts) == 8
        # the touched ones replace the blob only while it is what the last run wrote: no snapshot needed
        assert sum(1 for _path, if_match in puts if if_match) == 3
        assert len(on_files) == len(snapshots) + len(puts)  # nothing read, nothing asked of the 12 unchanged
    finally:
        proxy.close()


def test_a_blob_replaced_after_the_restore_was_planned_is_read_from_the_snapshot_kept(
        tmp_path, cli, azurite, blob_service, container_name, state_dir):
    src = write_tree(tmp_path / "site", {"x.txt": b"one", "y.txt": b"why"})
    run_id = backup(cli, src, container_name)
    deps = ActivityDeps(container_client=blob_service.get_container_client, work=LocalWorkStore(state_dir / "work"),
                        endpoint=azurite.endpoint)
    cc = blob_service.get_container_client(container_name)

    options = RestoreOptions(concurrency=1)
    planned = fetch.plan_restore(deps, "r1", PlanInput(container=container_name, run_id=run_id, options=options))
    assert planned.pages == 2 and [(span.first, span.end) for span in planned.tree] == [(1, 2)]  # files, then the tree
    replace_blob(cc, "x.txt", b"two", keep=True)
    replace_blob(cc, "y.txt", b"not why", keep=False)
    (tmp_path / "dest").mkdir()
    out = fetch.restore_page(deps, "r1", FetchInput(dest=str(tmp_path / "dest"), container=container_name, page=0,
                                                    index=planned.index[0]))
    assert out.counts.files_restored == 1
    assert (tmp_path / "dest" / "x.txt").read_bytes() == b"one"
    assert out.failures == [Listed("y.txt", error=PRUNED)]
    # planned now, the missing version is reported by the plan
    plan = fetch.plan_restore(deps, "r2", PlanInput(container=container_name, run_id=run_id, options=options))
    assert plan.failures == [Listed("y.txt", error=PRUNED)] and plan.counts.files_total == 2

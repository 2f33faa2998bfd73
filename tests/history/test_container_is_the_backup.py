"""The container is the backup: every run seals its record into the container, so a new machine with only the
credentials and the container name lists, restores (by id or as of a time), verifies and prunes; jobs keep two
sources apart; a damaged record page, local or in the container, is named and survived. Real CLI processes,
the embedded backend and a real Azurite."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from helpers import ForwardingProxy, env_for, write_tree

from sitebackup.model.codec import FORMAT_VERSION

FILES = {"a.txt": b"alpha 1", "b.txt": b"bravo, removed later", "sub/deep/c.html": b"<p>charlie</p>",
         "keep.bin": bytes(range(256)) * 40}


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def two_runs(tmp_path: Path, cli, container: str, *extra: str) -> tuple[Path, list[str], list[dict[str, bytes]]]:
    src = write_tree(tmp_path / "site", FILES)
    first = cli(src, "-c", container, "--json", *extra)
    assert first.returncode == 0, first.stderr
    tree1 = tree_of(src)
    (src / "a.txt").write_bytes(b"alpha 2, longer")
    (src / "b.txt").unlink()
    (src / "new.txt").write_bytes(b"new in run 2")
    second = cli(src, "-c", container, "--json", *extra)
    assert second.returncode == 0, second.stderr
    return src, [summary_of(first)["instance_id"], summary_of(second)["instance_id"]], [tree1, tree_of(src)]


def test_a_new_machine_lists_restores_verifies_and_prunes_from_the_container_alone(tmp_path, cli, azurite,
                                                                                      container_name):
    src, (run1, run2), (tree1, tree2) = two_runs(tmp_path, cli, container_name)
    # the disk died: a new state directory, the same credentials and container name
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")

    listed = cli("list", "--container", container_name, "--json", env=fresh)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["instance_id"] for row in rows] == [run2, run1]
    assert {row["job"] for row in rows} == {rows[0]["job"]} and rows[0]["job"].endswith(f":{src}")
    assert rows[0]["files"] == len(tree2) and rows[1]["files"] == len(tree1)

    restored = cli("restore", run1, tmp_path / "r1", "--container", container_name, "--json", env=fresh)
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "r1") == tree1

    between = rows[1]["created_at"]  # run 1's start: "as of" it is run 1, not run 2
    as_of = cli("restore", "--container", container_name, "--as-of", between, tmp_path / "asof", "--json", env=fresh)
    assert as_of.returncode == 0, as_of.stderr
    assert tree_of(tmp_path / "asof") == tree1

    verified = cli("verify", run2, "--container", container_name, "--json", env=fresh)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["files_ok"] == len(tree2)

    pruned = cli("prune", "-c", container_name, "--keep-last", "1", "--json", env=fresh)
    assert pruned.returncode == 0, pruned.stderr
    assert [run["instance_id"] for run in json.loads(pruned.stdout)["removed"]] == [run1]
    gone = cli("restore", run1, tmp_path / "gone", "--container", container_name, env=fresh)
    assert gone.returncode == 2 and "was pruned" in gone.stderr
    again = cli("restore", run2, tmp_path / "r2", "--container", container_name, env=fresh)
    assert again.returncode == 0, again.stderr
    assert tree_of(tmp_path / "r2") == tree2
    assert [row["instance_id"] for row in json.loads(cli("list", "-c", container_name, "--json",
                                                        env=fresh).stdout)] == [run2]


def test_a_run_unknown_here_needs_its_container(tmp_path, cli, azurite, blob_service, container_name):
    blob_service.create_container(container_name)
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")
    result = cli("restore", "20261207T000000-abcdef", tmp_path / "dest", env=fresh)
    assert result.returncode == 2 and "--container" in result.stderr and "Traceback" not in result.stderr
    result = cli("restore", "20261207T000000-abcdef", tmp_path / "dest", "-c", container_name, env=fresh)
    assert result.returncode == 2 and "no sealed record" in result.stderr


def test_an_unchanged_run_seals_its_record_without_sending_a_page(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {f"d{i % 3}/f{i}.txt": f"file {i}".encode() for i in range(40)})
    runs = [summary_of(cli(src, "-c", container_name, "--json"))["instance_id"] for _ in range(3)]
    cc = blob_service.get_container_client(container_name)
    headers = [json.loads(cc.download_blob(f".sitebackup/runs/{run}").readall()) for run in runs]
    pages = [{page[1] for page in header["pages"]} for header in headers]
    # run 2 records its files unchanged (other bytes than run 1's record); run 3 records exactly what run 2 did
    assert pages[2] == pages[1]
    stored = {b.name.rsplit("/", 1)[1] for b in cc.list_blobs(name_starts_with=".sitebackup/records/")}
    assert stored == pages[0] | pages[1]
    assert headers[2]["files"] == 40 and headers[2]["source"] == str(src) and headers[2]["format"] == FORMAT_VERSION


def test_two_sources_into_one_prefix_are_two_jobs_and_the_second_is_refused(tmp_path, cli, blob_service,
                                                                            container_name):
    first = write_tree(tmp_path / "a", {"same.txt": b"from a", "only-a.txt": b"a"})
    second = write_tree(tmp_path / "b", {"same.txt": b"from b"})
    assert cli(first, "-c", container_name, "--prefix", "web").returncode == 0
    cc = blob_service.get_container_client(container_name)
    before = {b.name: b.etag for b in cc.list_blobs()}
    refused = cli(second, "-c", container_name, "--prefix", "web")
    assert refused.returncode == 2, refused.stderr
    assert str(first) in refused.stderr and "another job" in refused.stderr
    nested = cli(second, "-c", container_name, "--prefix", "web/b")  # its names could meet the first job's
    assert nested.returncode == 2, nested.stderr
    assert {b.name: b.etag for b in cc.list_blobs()} == before  # nothing of the first job touched

    assert cli(second, "-c", container_name, "--prefix", "other").returncode == 0
    (first / "only-a.txt").write_bytes(b"a, run 2")
    (second / "same.txt").write_bytes(b"from b, run 2")
    assert cli(first, "-c", container_name, "--prefix", "web").returncode == 0
    assert cli(second, "-c", container_name, "--prefix", "other").returncode == 0
    for prefix in ("web", "other"):
        pruned = cli("prune", "-c", container_name, "--prefix", prefix, "--keep-last", "1", "--json")
        assert pruned.returncode == 0, pruned.stderr
        assert len(json.loads(pruned.stdout)["kept"]) == 1 and len(json.loads(pruned.stdout)["removed"]) == 1
    rows = json.loads(cli("list", "-c", container_name, "--json").stdout)
    assert sorted(row["destination"] for row in rows) == [f"{container_name}/other", f"{container_name}/web"]


def test_a_named_job_continues_on_another_host_or_path(tmp_path, cli, azurite, container_name):
    src = write_tree(tmp_path / "site", {"f.txt": b"v1"})
    first = cli(src, "-c", container_name, "--job", "web", "--json")
    assert first.returncode == 0, first.stderr
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")
    second = cli(moved, "-c", container_name, "--job", "web", "--json", env=fresh)
    assert second.returncode == 0, second.stderr
    assert summary_of(second)["files_unchanged"] == 1  # its baseline is the job's sealed run, read from the container
    rows = json.loads(cli("list", "-c", container_name, "--json", env=fresh).stdout)
    assert [row["job"] for row in rows] == ["web", "web"]


def test_damaged_records_are_named_and_survived(tmp_path, cli, cli_env, state_dir, blob_service, container_name):
    src, (run1, run2), (tree1, tree2) = two_runs(tmp_path, cli, container_name)
    # a damaged page of the baseline's record in the state directory: the next backup reads its sealed copy
    page = sorted((state_dir / "work" / run2 / "results").glob("*.json"))[0]
    page.write_bytes(b'[{"path":"../../etc/passwd","size":1}]')
    plain = cli("verify", run2)  # a note is one line on stderr without --json
    assert plain.returncode == 0 and "sitebackup: note: record page 0" in plain.stderr
    # restore and verify of that run read the container's copy too, and say so
    verified = cli("verify", run2, "--json")
    assert verified.returncode == 0, verified.stderr
    assert "is damaged" in verified.stderr and json.loads(verified.stdout)["files_ok"] == len(tree2)
    third = cli(src, "-c", container_name, "--json")
    assert third.returncode == 0, third.stderr
    notes = summary_of(third)["notes"]
    assert len(notes) == 1 and notes[0].startswith(f"record page 0 of run {run2} in the state directory is damaged")
    assert summary_of(third)["files_unchanged"] == len(tree2)
    # sealed, the third run is the next baseline: the state directory's copy of run 2 (damaged or not) goes
    assert not (state_dir / "work" / run2).exists()

    # a damaged page in the container: the run is named, never half-restored, and the other runs go on
    cc = blob_service.get_container_client(container_name)
    header = json.loads(cc.download_blob(f".sitebackup/runs/{run1}").readall())
    job = header["job"]
    assert not (state_dir / "work" / run1).exists()  # let go once run 2 was sealed: no local copy to fall back on
    for seal in header["pages"]:
        cc.upload_blob(f".sitebackup/records/{job}/{seal[1]}", b"[]", overwrite=True)
    broken = cli("restore", run1, tmp_path / "r1")
    assert broken.returncode != 0, broken.stderr
    assert f"of run {run1} is damaged" in broken.stderr and "Traceback" not in broken.stderr
    assert not any((tmp_path / "r1").rglob("*.txt"))
    restored = cli("restore", run2, tmp_path / "r2")
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "r2") == tree2

    # prune goes on: the damaged run is dropped and named, the copies only it held are left in place
    pruned = cli("prune", "-c", container_name, "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert {run["instance_id"] for run in report["removed"]} == {run1, run2}
    assert len(report["notes"]) == 1 and f"of run {run1} is damaged" in report["notes"][0]
    run3 = summary_of(third)["instance_id"]
    assert cli("restore", run3, tmp_path / "r3").returncode == 0 and tree_of(tmp_path / "r3") == tree2

    # a run whose header is missing is not in the catalog: restore says so, list leaves it out
    cc.delete_blob(f".sitebackup/runs/{run3}")
    fresh = env_for(cli_env["AZURE_STORAGE_CONNECTION_STRING"], tmp_path / "new-state")
    missing = cli("restore", run3, tmp_path / "r3b", "-c", container_name, env=fresh)
    assert missing.returncode == 2 and "no sealed record" in missing.stderr
    listed = json.loads(cli("list", "-c", container_name, "--json", env=fresh).stdout)
    assert run3 not in [row["instance_id"] for row in listed]


class RefusePuts(ForwardingProxy):
    """Refuses every upload of one blob name, as the service refuses a request it finds invalid."""

    def __init__(self, target: str, name: str):
        self.name = name
        super().__init__(target)

    def intercept(self, request, body):
        if request.command == "PUT" and request.path.split("?")[0].endswith("/" + self.name):
            request.reply_error(400, "InvalidInput")
            return None
        return body


def test_a_file_that_fails_keeps_its_last_good_copy_in_the_run(tmp_path, cli, azurite, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a, good version", "b.txt": b"b"})
    first = cli(src, "-c", container_name, "--json")
    assert first.returncode == 0, first.stderr
    (src / "a.txt").write_bytes(b"a, the version the service refuses")
    (src / "b.txt").write_bytes(b"b, changed")
    proxy = RefusePuts(azurite.endpoint, "a.txt")
    try:
        env = env_for(azurite.connection_string.replace(azurite.endpoint, proxy.endpoint), tmp_path / "state2")
        second = cli(src, "-c", container_name, "--json", env=env)
    finally:
        proxy.close()
    assert second.returncode == 1  # a file failed
    run2 = summary_of(second)["instance_id"]
    assert [f["path"] for f in summary_of(second)["failures"]] == ["a.txt"]
    restored = cli("restore", run2, tmp_path / "out", "-c", container_name, "--json")
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == {"a.txt": b"a, good version", "b.txt": b"b, changed"}
    notes = summary_of(restored)["notes"]
    assert len(notes) == 1 and "a.txt" in notes[0] and "last run that backed them up" in notes[0]
    assert cli("verify", run2, "-c", container_name).returncode == 0

"""The state directory is a cache of the container's sealed records, not a second archive: once a backup is sealed,
the copies it holds of the job's older sealed runs go (restore, verify and list read those from the container),
and a copy that goes while a reader uses it is read from the container from there on. Real CLI processes, the
embedded backend and a real Azurite."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_tree

from sitebackup.blob.records import ContainerRecords
from sitebackup.model.codec import decode
from sitebackup.model.records import FileEntry


def backup(cli, src: Path, container: str) -> str:
    result = cli(src, "--container", container, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["instance_id"]


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_state_directory_keeps_its_copy_of_the_newest_sealed_run_only(tmp_path, cli, state_dir, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"one", "b/c.txt": b"charlie"})
    runs, trees = [], []
    for text in (b"two", b"three, longer", b"four"):
        runs.append(backup(cli, src, container_name))
        trees.append(tree_of(src))
        (src / "a.txt").write_bytes(text)
        (src / f"new-{len(runs)}.txt").write_bytes(text)
    work = state_dir / "work"
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == [runs[2]]

    # the runs whose copies went are restored, verified and listed from the container, by id alone
    for i, run in enumerate(runs):
        restored = cli("restore", run, tmp_path / f"r{i}")
        assert restored.returncode == 0, restored.stderr
        assert tree_of(tmp_path / f"r{i}") == trees[i]
    verified = cli("verify", runs[0], "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["files_ok"] == len(trees[0])
    listed = json.loads(cli("list", "--json").stdout)
    assert {row["instance_id"]: row["restorable"] for row in listed if row["kind"] == "BackupSiteContent"} == \
        {run: "yes" for run in runs}
    # and the next backup still finds its baseline here: what changed since the third run is all it sends
    again = cli(src, "--container", container_name, "--json")
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert again.returncode == 0, again.stderr
    assert (summary["files_uploaded"], summary["files_unchanged"]) == (2, len(tree_of(src)) - 2)  # a.txt, new-3.txt
    held = {p.name for p in work.iterdir() if p.is_dir()}
    assert summary["instance_id"] in held and not held & set(runs)


def test_a_copy_that_goes_while_it_is_read_is_read_from_the_container_from_there_on(tmp_path, cli, state_dir,
                                                                                   blob_service, container_name):
    # new files: a record page per 256 of them, so the record has several pages
    src = write_tree(tmp_path / "site", {f"d{i % 5}/f{i:04d}.txt": f"file {i}".encode() for i in range(700)})
    run = backup(cli, src, container_name)
    records = ContainerRecords(blob_service.get_container_client(container_name))
    header = records.header(run)
    assert header is not None and len(header.pages) >= 3
    results = state_dir / "work" / run / "results"
    local = sorted(results.glob("*.json"), key=lambda path: int(path.stem))
    whole = [entry.path for path in local for entry in decode(path.read_bytes(), list[FileEntry], "page")]

    def cached_then_gone():
        yield 0, local[0].read_bytes()
        raise FileNotFoundError(local[1])  # a later backup let the copy go between two pages

    read = [entry.path for entry in records.entries(header, cached=cached_then_gone())]
    assert read == whole and len(read) == 700 + 6  # the files, the five directories and the root

"""Nothing read back from the work store drives a local effect unverified.

A work page is read only when its bytes hash as its run's page index says (the index's chunk hashes travel
through the durable history), and a backup opens source files only beneath its source root, by descriptor,
following no symlink out of it, whatever a page names. Pure tests for the helpers; Azurite and real processes
where the attack needs them (the ``--taskhub`` attack on a page in the container is in
tests/backend/test_scale_out.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, HoldingProxy, wait_until, write_tree

from sitebackup.blob.errors import file_error
from sitebackup.blob.naming import RESERVED_PREFIX
from sitebackup.blob.upload import SINGLE_PUT_BYTES, upload_file
from sitebackup.blob.workstore import BlobWorkStore, LocalWorkStore
from sitebackup.local.files import FileChangedError, SourceTree, UnsafePath, check_unchanged, read_whole
from sitebackup.model.codec import DamagedData, encode
from sitebackup.model.work import CopyInput, CopyItem, FetchInput, FetchItem, PageIndex, ScanInput, UploadSpec
from sitebackup.workflows import copy, fetch, pages
from sitebackup.workflows.activity import ActivityDeps


def read(tree: SourceTree, relpath: str) -> bytes:
    with tree.opened(relpath) as fd:
        return read_whole(fd)[0]


# ---- opening source files beneath the root --------------------------------------------------------

def test_a_source_tree_opens_only_regular_files_beneath_its_root(tmp_path):
    src = write_tree(tmp_path / "src", {"a.txt": b"a", "d/e/f.txt": b"f"})
    outside = write_tree(tmp_path / "outside", {"f.txt": b"secret"})
    os.mkfifo(src / "pipe")
    with SourceTree(src) as tree:
        assert read(tree, "a.txt") == b"a" and read(tree, "d/e/f.txt") == b"f" and read(tree, "a.txt") == b"a"
        for bad in ("../outside/f.txt", "d/e/../../../outside/f.txt", "/etc/passwd", str(outside / "f.txt"),
                    "d//e/f.txt", "./a.txt", "", "d/e/"):
            with pytest.raises(UnsafePath, match="not a relative path beneath the source"):
                tree.open(bad)
        with pytest.raises(UnsafePath, match="not a regular file"):
            tree.open("pipe")  # refused, never waiting for a writer
        with pytest.raises(UnsafePath, match="not a regular file"):
            tree.open("d/e")
        with pytest.raises(FileNotFoundError):
            tree.open("d/missing.txt")
        with pytest.raises(NotADirectoryError):
            tree.open("a.txt/x")


def test_no_symlink_is_followed_without_follow_symlinks_and_none_out_of_the_source_with_it(tmp_path):
    src = write_tree(tmp_path / "src", {"a.txt": b"a", "d/e/f.txt": b"f"})
    outside = write_tree(tmp_path / "outside", {"f.txt": b"secret"})
    (src / "inner.txt").symlink_to("a.txt")
    (src / "escape.txt").symlink_to(outside / "f.txt")
    (src / "d" / "in").symlink_to("e")
    (src / "d" / "out").symlink_to(outside)
    with SourceTree(src) as tree:
        for path in ("inner.txt", "escape.txt", "d/in/f.txt", "d/out/f.txt"):
            with pytest.raises(UnsafePath) as refused:
                tree.open(path)
            assert file_error(refused.value, "x") == "a symlink in its path (not followed)"
    with SourceTree(src, follow_symlinks=True) as tree:
        assert read(tree, "inner.txt") == b"a" and read(tree, "d/in/f.txt") == b"f"
        for path in ("escape.txt", "d/out/f.txt"):
            with pytest.raises(UnsafePath, match="symlink points outside the source"):
                tree.open(path)
    # the root itself is the user's SOURCE: a link to it is opened as given
    (tmp_path / "root-link").symlink_to(src)
    with SourceTree(tmp_path / "root-link", follow_symlinks=True) as tree:
        assert read(tree, "d/in/f.txt") == b"f"
        with pytest.raises(UnsafePath, match="outside the source"):
            tree.open("d/out/f.txt")


def test_a_directory_swapped_for_a_symlink_is_not_walked_through(tmp_path):
    src = write_tree(tmp_path / "src", {"a/x.txt": b"x", "b/y.txt": b"y"})
    write_tree(tmp_path / "outside", {"y.txt": b"secret"})
    with SourceTree(src) as tree:
        assert read(tree, "a/x.txt") == b"x"
        (src / "b").rename(tmp_path / "b-moved")
        (src / "b").symlink_to(tmp_path / "outside")
        with pytest.raises(UnsafePath, match="a symlink in its path"):
            tree.open("b/y.txt")


def test_the_unchanged_checks_work_on_the_descriptor(tmp_path):
    src = write_tree(tmp_path / "src", {"a.txt": b"before"})
    with SourceTree(src) as tree, tree.opened("a.txt") as fd:
        st = check_unchanged(fd, 6, os.fstat(fd).st_mtime_ns)
        (src / "a.txt").rename(src / "b.txt")  # a rename changes nothing of the file open
        (src / "a.txt").write_bytes(b"another file")
        assert read_whole(fd)[0] == b"before"
        with open(src / "b.txt", "ab") as fh:
            fh.write(b" and after")
        with pytest.raises(FileChangedError):
            check_unchanged(fd, st.st_size, st.st_mtime_ns)


def test_a_streamed_upload_sends_the_file_whole_again_after_keeping_a_snapshot(blob_service, tmp_path,
                                                                              container_name):
    """The second put of a file read through one descriptor (after the first found other content there and
    kept it as a snapshot) sends the file from its start."""
    data = os.urandom(SINGLE_PUT_BYTES + 1)  # streamed, not read whole
    src = write_tree(tmp_path / "src", {"m.bin": data})
    container = blob_service.get_container_client(container_name)
    container.create_container()
    container.upload_blob("m.bin", b"other content")
    with SourceTree(src) as tree:
        done = upload_file(container, tree, "m.bin", "m.bin", UploadSpec())
    assert container.download_blob("m.bin").readall() == data
    assert done.md5 == base64.b64encode(hashlib.md5(data).digest()).decode()
    kept = [b for b in container.list_blobs(include=["snapshots"]) if b.snapshot]
    assert [container.get_blob_client("m.bin", snapshot=kept[0].snapshot).download_blob().readall()] == [
        b"other content"]


# ---- pages read only as written --------------------------------------------------------------------

def test_pages_are_read_only_with_the_hash_their_index_lists(tmp_path, monkeypatch):
    monkeypatch.setattr(pages, "PAGES_PER_INDEX", 4)  # three chunks out of eleven page numbers
    work = LocalWorkStore(tmp_path / "work")
    writer = pages.PageWriter(work, "R")
    written = {page: [CopyItem(f"{tmp_path.name}/f{page}", page, page)] for page in (0, 1, 3, 4, 5, 9)}
    for page, items in written.items():
        writer.write(page, items)
    index = writer.close(11)
    assert len(index) == 3
    for page, items in written.items():
        assert pages.read_page(work, "R", page, pages.chunk_hash(index, page), list[CopyItem]) == items
    disk = tmp_path / "work" / "R"
    assert work.write_page("R", 20, [CopyItem("x", 1, 1)]) == hashlib.sha256(
        (disk / "pages" / "000020.json").read_bytes()).hexdigest()
    for page in (2, 6, 10):  # numbers of pages the scan recorded itself: no page to read
        with pytest.raises(DamagedData, match=f"work page {page} of run R is not in the run's page index"):
            pages.read_page(work, "R", page, pages.chunk_hash(index, page), list[CopyItem])

    forged = encode([CopyItem("../../etc/shadow", 1, 1)])
    (disk / "pages" / "000003.json").write_bytes(forged)
    with pytest.raises(DamagedData, match="work page 3 of run R is damaged: its SHA-256"):
        pages.read_page(work, "R", 3, pages.chunk_hash(index, 3), list[CopyItem])
    (disk / "pages" / "000004.json").unlink()
    with pytest.raises(DamagedData, match="work page 4 of run R is missing"):
        pages.read_page(work, "R", 4, pages.chunk_hash(index, 4), list[CopyItem])
    # an index chunk rewritten to list the forged page is refused too
    (disk / "index" / "000000.json").write_bytes(encode(PageIndex(first=0, pages=[hashlib.sha256(forged).hexdigest()])))
    with pytest.raises(DamagedData, match="page index 0 of run R is damaged"):
        work.read_index("R", 0, index[0])
    # a run whose orchestration carries no index (an earlier version's) reads no page
    with pytest.raises(DamagedData, match="work page 0 of run R has no SHA-256 to check it against"):
        pages.read_page(work, "R", 0, pages.chunk_hash([], 0), list[CopyItem])


@pytest.mark.parametrize("named", ["../../etc/shadow", "OUTSIDE", "excluded.txt"])
def test_a_copy_refuses_a_page_rewritten_in_the_container(azurite, blob_service, tmp_path, container_name, named):
    """A page rewritten to name a path out of the source, an absolute one, or a file of the source the scan
    did not list (left out by the user): the copy refuses the page, and nothing is uploaded."""
    src = write_tree(tmp_path / "site", {"f1.txt": b"1", "f2.txt": b"2", "excluded.txt": b"left out"})
    outside = write_tree(tmp_path / "outside", {"shadow": b"root only"})
    named = str(outside / "shadow") if named == "OUTSIDE" else named
    container = blob_service.get_container_client(container_name)
    container.create_container()
    work = BlobWorkStore(lambda run_id: container)
    planned = copy.scan_source(work, "run1", ScanInput(source=str(src), patterns=["excluded.txt"]))
    assert planned.pages == 1 and planned.counts.files_total == 2
    container.upload_blob(f"{RESERVED_PREFIX}work/run1/pages/000000.json", encode([CopyItem(named, 9, 1)]),
                          overwrite=True)
    deps = ActivityDeps(container_client=blob_service.get_container_client, work=work, endpoint=azurite.endpoint)
    with pytest.raises(DamagedData, match="work page 0 of run run1 is damaged"):
        copy.copy_step(deps, "run1", CopyInput(source=str(src), container=container_name, page=0,
                                               index=planned.index[0]))
    assert [n for n in container.list_blob_names() if not n.startswith(RESERVED_PREFIX)] == []


def test_a_restore_refuses_a_page_rewritten_after_its_plan(tmp_path):
    work = LocalWorkStore(tmp_path / "work")
    writer = pages.PageWriter(work, "r1")
    writer.write(0, [FetchItem("a.txt", "a.txt", 1, None, None)])
    [index] = writer.close(1)
    (tmp_path / "work" / "r1" / "pages" / "000000.json").write_bytes(
        encode([FetchItem("x", "../../root/.bashrc", 1, None, None)]))

    class NoClient:
        def get_blob_client(self, *args, **kwargs):  # never reached: the page is refused first
            raise AssertionError(args)

    deps = ActivityDeps(container_client=lambda c: NoClient(), work=work, endpoint="http://x")
    (tmp_path / "dest").mkdir()
    with pytest.raises(DamagedData, match="work page 0 of run r1 is damaged"):
        fetch.restore_page(deps, "r1", FetchInput(dest=str(tmp_path / "dest"), container="c", page=0, index=index))
    assert list((tmp_path / "dest").iterdir()) == []


# ---- in a real run ---------------------------------------------------------------------------------

def _held_backup(src: Path, container: str, env: dict[str, str], azurite, proxy: HoldingProxy, *extra: str
                 ) -> tuple[subprocess.Popen, str]:
    """A backup through *proxy* (in front of *azurite*) with a window of one page, started and held at its first
    page's uploads; returns the process and the run id."""
    env = dict(env, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(azurite.endpoint,
                                                                                      proxy.endpoint))
    proc = subprocess.Popen([sys.executable, "-m", "sitebackup", str(src), "--container", container, "--json",
                             "--concurrency", "1", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    run_id = json.loads(proc.stdout.readline())["instance_id"]
    wait_until(lambda: proxy.held >= 1, "the first page's uploads to be held")
    return proc, run_id


def _uploaded(blob_service, container: str) -> dict[str, bytes]:
    client = blob_service.get_container_client(container)
    return {name: client.download_blob(name).readall() for name in client.list_blob_names()
            if not name.startswith(RESERVED_PREFIX)}


# with --concurrency 1 the first page holds 256 files (workflows.names.BATCH_FILES): page 1 comes after them
FIRST_PAGE = {f"a/f{i:03d}.txt": b"%d" % i for i in range(256)}


def test_a_damaged_local_work_page_is_named_and_never_used(tmp_path, azurite, cli, cli_env, blob_service,
                                                           container_name, state_dir):
    later = {"b/one.txt": b"1", "b/two.txt": b"2"}
    src = write_tree(tmp_path / "site", {**FIRST_PAGE, **later})
    write_tree(tmp_path / "outside", {"secret.txt": b"not to be uploaded"})
    proxy = HoldingProxy(azurite.endpoint, lambda path: f"/{container_name}/a/" in path)
    try:
        proc, run_id = _held_backup(src, container_name, cli_env, azurite, proxy)
        page = state_dir / "work" / run_id / "pages" / "000001.json"
        assert {item[0] for item in json.loads(page.read_text())} == set(later)  # [path, size, mtime, ...]
        page.write_bytes(encode([CopyItem("../outside/secret.txt", 18, 1)]))
        proxy.release.set()
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.close()
    assert proc.returncode == 1, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["runtime_status"] == "FAILED"
    assert summary["error"].startswith(f"work page 1 of run {run_id} is damaged: ")
    assert "\n" not in summary["error"] and "Traceback" not in err
    assert _uploaded(blob_service, container_name) == FIRST_PAGE  # nothing of the damaged page, nothing outside
    # the run is over: the next backup scans again and completes
    again = cli(src, "--container", container_name, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["runtime_status"] == "COMPLETED"
    assert _uploaded(blob_service, container_name) == {**FIRST_PAGE, **later}


@pytest.mark.parametrize("follow", [False, True])
def test_a_symlink_swapped_in_after_the_scan_fails_its_files_and_the_rest_goes_on(
        tmp_path, azurite, cli_env, blob_service, container_name, follow):
    later = {"b/one.txt": b"1", "b/two.txt": b"2"}
    src = write_tree(tmp_path / "site", {**FIRST_PAGE, **later})
    outside = write_tree(tmp_path / "outside", {"one.txt": b"secret one", "two.txt": b"secret two"})
    proxy = HoldingProxy(azurite.endpoint, lambda path: f"/{container_name}/a/" in path)
    try:
        proc, _ = _held_backup(src, container_name, cli_env, azurite, proxy, *(["--follow-symlinks"] if follow else []))
        (src / "b").rename(tmp_path / "b-moved")
        (src / "b").symlink_to(outside)  # after the scan listed b/one.txt and b/two.txt
        proxy.release.set()
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.close()
    assert proc.returncode == 1, err
    summary = json.loads(out.splitlines()[-1])
    reason = "symlink points outside the source" if follow else "a symlink in its path (not followed)"
    assert summary["runtime_status"] == "COMPLETED" and summary["files_uploaded"] == len(FIRST_PAGE)
    assert summary["failures"] == [{"path": "b/one.txt", "error": reason}, {"path": "b/two.txt", "error": reason}]
    assert _uploaded(blob_service, container_name) == FIRST_PAGE

"""Backup input that must be refused up front or reported for what it is: prefix templates limited to
their documented fields, prefixes no blob can live under, and a large file changed under its ranges.
"""

from __future__ import annotations

import os
from datetime import datetime

import pytest
from helpers import write_tree

from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.commands.backup import expand_prefix
from sitebackup.errors import InputError
from sitebackup.model.work import (
    BackupCounts,
    CommitOrder,
    CopyInput,
    Listed,
    PageResult,
    RunState,
    ScanInput,
    Span,
    UploadSpec,
)
from sitebackup.workflows import blocks, copy
from sitebackup.workflows.activity import ActivityDeps

MIB = 1024 * 1024
NOW = datetime(2026, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("template", [
    "{hostname.__class__}", "{hostname.__class__.__mro__}", "{date[0]}", "{date!r}", "{time:>20}", "{}", "{0}",
    "{nope}", "snap/{date", "snap/{date}}/x",
])
def test_prefix_templates_accept_only_the_documented_fields(template):
    with pytest.raises(InputError, match="use {date}, {time} or {hostname}"):
        expand_prefix(template, NOW, "web1")


def test_prefix_templates_expand_fields_and_keep_braces_doubled():
    assert expand_prefix("{hostname}/{date}/{time}", NOW, "web1") == "web1/2026-03-04/050607"
    assert expand_prefix("{{literal}}/{date}", NOW, "web1") == "{literal}/2026-03-04"
    assert expand_prefix("a}b", NOW, "web1") == "a}b"  # no template: taken as it is


@pytest.mark.parametrize(("prefix", "message"), [
    ("{hostname.__class__}", "invalid --prefix template"),
    (".sitebackup", "is reserved for sitebackup's work files"),
    ("/.sitebackup/work/", "is reserved for sitebackup's work files"),
    ("p" * 1023, "1023 characters leave no room for a file name"),
])
def test_a_prefix_no_blob_can_have_is_a_usage_error_before_anything_is_sent(tmp_path, cli, blob_service,
                                                                            container_name, prefix, message):
    src = write_tree(tmp_path / "site", {f"f{i}.txt": b"x" for i in range(5)})
    for extra in ([], ["--dry-run"]):
        result = cli(src, "-c", container_name, "--prefix", prefix, *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("sitebackup: error: ") and message in line and "<class" not in line
    assert not blob_service.get_container_client(container_name).exists()


def test_the_longest_prefix_that_leaves_room_for_a_name_is_accepted(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"f": b"x"})
    prefix = "p" * 1022
    result = cli(src, "-c", container_name, "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    assert [name for name in blob_service.get_container_client(container_name).list_blob_names()
            if not name.startswith(".sitebackup/")] == [f"{prefix}/f"]


def test_a_large_file_changed_while_its_ranges_upload_is_reported_changed(azurite, blob_service, tmp_path,
                                                                          container_name):
    """The file changes under range 2, then gets its scanned size and mtime back (a copy that keeps
    times): the commit's own check passes, yet the file is not the one the other ranges read. The ranges'
    reports reach the commit as the orchestration hands them on (``blocks.count_range``, ``commit_order``)."""
    src = write_tree(tmp_path / "src", {"big.bin": os.urandom(5 * MIB)})
    path = src / "big.bin"
    scanned = path.stat()
    work = LocalWorkStore(tmp_path / "work")
    planned = copy.scan_source(work, "run1", ScanInput(source=str(src), min_pages=1,
                                                       upload=UploadSpec(block_size=MIB)))  # five 1 MiB range pages
    blob_service.get_container_client(container_name).create_container()
    deps = ActivityDeps(container_client=blob_service.get_container_client, work=work, endpoint=azurite.endpoint)
    state = RunState(counts=BackupCounts(), started_at="")

    assert planned.done == [Span(0, 1)]  # the root directory's entry, recorded by the scan: the ranges follow

    def copy_step(page: int, commit: CommitOrder | None = None) -> PageResult[BackupCounts]:
        result = copy.copy_step(deps, "run1", CopyInput(source=str(src), container=container_name, page=page + 1,
                                                        index=planned.index[0], commit=commit))
        if result.range is not None:
            blocks.count_range(state, result.range)
        return result

    def staged(page: int) -> bool:
        result = copy_step(page)
        assert result.range is not None
        return result.range.sent

    first = copy_step(0)
    assert first.range is not None and first.range.sent and staged(1)
    path.write_bytes(os.urandom(5 * MIB))
    changed = copy_step(2)
    # the range staged nothing, and a range never fails the file itself
    assert changed.range is not None and changed.range.block_id is None and changed.counts.files_failed == 0
    assert changed.range.error == "changed during backup"
    os.utime(path, ns=(scanned.st_atime_ns, scanned.st_mtime_ns))
    assert [staged(p) for p in (3, 4)] == [True, True]

    out = copy_step(0, blocks.commit_order(state, 1))
    assert out.counts.files_failed == 1 and out.counts.files_uploaded == 0
    assert out.failures == [Listed("big.bin", error="changed during backup")]
    assert [(r.path, r.error, r.md5) for r in work.iter_results("run1")] == \
        [(".", None, None), ("big.bin", "changed during backup", None)]
    assert not list(blob_service.get_container_client(container_name).list_blob_names())

"""The on-disk and on-the-wire formats of the run model are pinned: what an earlier version wrote still loads,
what this one writes is byte for byte what is documented, and what does not decode as the model says is a
clear error naming what was read (pure logic: no processes, no service)."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sitebackup.blob.workstore import MAX_PAGE_BYTES, LocalWorkStore
from sitebackup.model.codec import FORMAT_VERSION, DamagedData, decode, encode, from_wire, to_wire
from sitebackup.model.records import FileEntry, Meta, PriorCopy, PruneMark, check_relpath, target_bytes, target_text
from sitebackup.model.work import (
    BackupCounts,
    BackupInput,
    CopyItem,
    CopyPage,
    FetchItem,
    Progress,
    RangePage,
    RestoreCounts,
    RunLabel,
    Summary,
    summary_from_wire,
    summary_to_wire,
)

# A record page as every version since incremental runs writes it: an uploaded file, one with a tier, an
# unchanged one carried forward, and a failed one.
RECORD_PAGE = (b'[{"path":"index.html","size":31,"mtime_ns":1764000000123456789,"md5":"1B2M2Y8AsgTpgAmY7PhCfg==",'
               b'"etag":"\\"0x8DE1\\""},'
               b'{"path":"img/a.jpg","size":20000,"mtime_ns":1764000000000000000,"md5":"QUJD","tier":"Cool"},'
               b'{"path":"css/site.css","size":33,"mtime_ns":1,"md5":"REVG","etag":"\\"0x1\\"","unchanged":true},'
               b'{"path":"a\\\\b","error":"file name contains \'\\\\\', which Azure Blob Storage turns into \'/\'"}]')


def test_a_record_page_of_an_earlier_version_loads_and_is_written_back_the_same():
    entries = decode(RECORD_PAGE, list[FileEntry], "a record page")
    assert [e.path for e in entries] == ["index.html", "img/a.jpg", "css/site.css", "a\\b"]
    assert entries[0] == FileEntry("index.html", 31, 1764000000123456789, "1B2M2Y8AsgTpgAmY7PhCfg==", etag='"0x8DE1"')
    assert entries[1].tier == "Cool" and entries[2].unchanged and entries[3].error and not entries[3].stored
    assert [e.stored for e in entries] == [True, True, True, False]
    assert encode(entries) == RECORD_PAGE


# A record page of format 2: the tree (a directory, a symlink, modes, owners, a hard link), defaults omitted.
TREE_PAGE = (b'[{"path":"a","size":3,"mtime_ns":5,"md5":"QQ==","mode":420,"uid":1234,"gid":2345,"user":"web",'
             b'"group":"www"},'
             b'{"path":"b","size":3,"mtime_ns":5,"md5":"QQ==","mode":420,"uid":0,"gid":0,"link":"a"},'
             b'{"path":"cur","mtime_ns":7,"kind":"symlink","mode":511,"uid":0,"gid":0,"target":"releases/r42"},'
             b'{"path":"odd","kind":"symlink","target":"\\u0000/w==\"},'
             b'{"path":"cache","mtime_ns":9,"kind":"dir","mode":1005}]')


def test_a_record_page_of_format_2_carries_the_tree_and_round_trips():
    entries = decode(TREE_PAGE, list[FileEntry], "a record page")
    assert [e.kind for e in entries] == ["file", "file", "symlink", "symlink", "dir"]
    assert (entries[0].mode, entries[0].uid, entries[0].gid, entries[0].user, entries[0].group) == \
        (0o644, 1234, 2345, "web", "www")
    assert entries[1].link == "a" and entries[1].is_file and not entries[2].is_file
    assert target_bytes(entries[2].target or "") == b"releases/r42" and target_bytes(entries[3].target or "") == b"\xff"
    assert entries[4].mode == 0o1755 and not entries[4].stored
    assert encode(entries) == TREE_PAGE
    # a format-1 entry is a plain file with nothing recorded of its metadata
    old = decode(RECORD_PAGE, list[FileEntry], "a record page")[0]
    assert (old.kind, old.mode, old.uid, old.gid, old.user, old.target, old.link) == ("file", *[None] * 6)


@pytest.mark.parametrize("raw", [b"a", b"/etc", b"../../x", b"\xff\xfe", "r\u00e9".encode(), b"caf\xe9/x", b"z"])
def test_a_symlink_target_round_trips_byte_for_byte(raw):
    text = target_text(raw)
    assert target_bytes(text) == raw
    assert decode(encode([FileEntry("l", kind="symlink", target=text)]), list[FileEntry], "p")[0].target == text


@pytest.mark.parametrize("fields, what", [
    ('"kind":"fifo"', "an unknown kind"),
    ('"mode":4096', "a mode beyond the permission bits"),
    ('"mode":-1', "a negative mode"),
    ('"uid":-1', "a negative uid"),
    ('"gid":4294967296', "a gid beyond 32 bits"),
    ('"user":""', "an empty user name"),
    ('"group":"a\\u0000b"', "a group name with a NUL"),
    ('"kind":"symlink"', "a symlink without a target"),
    ('"target":"x"', "a file with a target"),
    ('"kind":"symlink","target":""', "an empty target"),
    ('"kind":"symlink","target":"a\\u0000b"', "a target with a NUL"),
    ('"kind":"symlink","target":"\\u0000!!"', "a target that is not base64"),
    ('"kind":"symlink","target":"\\u0000YQ=="', "a UTF-8 target in the binary form"),
    ('"kind":"dir","md5":"QQ=="', "a directory with content"),
    ('"kind":"dir","size":3', "a directory with a size"),
    ('"kind":"symlink","target":"x","link":"a"', "a symlink that is a hard link"),
])
def test_an_entry_whose_tree_fields_do_not_validate_is_damaged(fields, what):
    with pytest.raises(DamagedData, match="record page 1 of run R is damaged"):
        decode(b'[{"path":"p",' + fields.encode() + b"}]", list[FileEntry], "record page 1 of run R")


def test_work_pages_are_compact_arrays_that_round_trip():
    copy_page = b'[["new.txt",3,7,null,false,false],' \
                b'["seen.txt",5,9,{"path":"seen.txt","size":5,"mtime_ns":8,"md5":"QQ=="},true,false],' \
                b'["changed.txt",4,2,{"path":"changed.txt","size":3,"mtime_ns":1,"md5":"QQ==","etag":"\\"0x2\\""},false,true]]'
    items = decode(copy_page, CopyPage, "a copy page")  # type: ignore[arg-type]
    # a page of the previous format loads; this one writes each file's metadata last (null: none)
    assert isinstance(items, list) and encode(items) == copy_page.replace(b"],[", b",null],[").replace(b"]]", b",null]]")
    assert items[0] == CopyItem("new.txt", 3, 7) and items[0].prior is None
    assert items[1].previous == FileEntry("seen.txt", 5, 8, "QQ==") and items[1].check
    assert items[2].changed and items[2].prior == PriorCopy("QQ==", '"0x2"')
    range_page = b'{"file":["big.bin",99,5],"range":1,"ranges":3,"block_size":33,"first_page":4,' \
                 b'"previous":{"path":"big.bin","size":98,"mtime_ns":1,"md5":"QQ=="}}'
    page = decode(range_page, CopyPage, "a range page")  # type: ignore[arg-type]
    assert isinstance(page, RangePage) and page.file.path == "big.bin" and page.previous is not None
    assert encode(page) == range_page.replace(b"5],", b"5,null],")
    with_meta = b'[["x.sh",1,2,null,false,false,[493,1234,2345,"web","www",null]],' \
                b'["y.sh",1,2,null,false,false,[493,1234,2345,null,null,"x.sh"]]]'
    items = decode(with_meta, CopyPage, "a copy page")  # type: ignore[arg-type]
    assert isinstance(items, list) and encode(items) == with_meta
    assert items[0].meta == Meta(0o755, 1234, 2345, "web", "www") and items[1].meta and items[1].meta.link == "x.sh"
    fetch = decode(b'[["p/a","a",3,"QQ==",7,null],["p/b","b",1,null,null,"2026-12-01T00:00:00.0000000Z"]]',
                   list[FetchItem], "a restore page")
    assert fetch[1].snapshot and fetch[1].md5 is None


def test_summaries_progress_and_inputs_of_earlier_runs_load():
    old_output = {"kind": "BackupSiteContent", "files_total": 2, "files_uploaded": 1, "files_skipped": 1,
                  "files_failed": 0, "bytes_total": 9, "bytes_uploaded": 4, "files_unchanged": 1, "bytes_skipped": 5,
                  "source": "/srv/a", "destination": "c/p", "duration_s": 1.5,
                  "failures": [], "skipped": [{"path": "l", "reason": "symlink (not followed)"}]}
    summary = summary_from_wire(old_output, BackupCounts, "a summary")
    assert summary.counts.files_uploaded == 1 and summary.skipped[0].reason == "symlink (not followed)"
    wire = summary_to_wire(summary)
    assert {k: wire[k] for k in old_output} == old_output  # every key scripts read, flat as before
    restore = summary_from_wire({"kind": "RestoreSiteContent", "files_total": 3, "files_restored": 3,
                                 "bytes_restored": 30}, RestoreCounts, "a summary")
    assert restore.counts.files_copied == 3 and restore.counts.verb == "restored"
    status = from_wire({"phase": "uploading", "files_done": 1, "files_total": 2, "bytes_done": 3, "bytes_total": 4,
                        "files_failed": 0, "files_skipped": 0, "files_unchanged": 0, "bytes_skipped": 0}, Progress, "p")
    assert status.files_done == 1 and status.error is None
    # an input of an earlier version (tier and block size among the options) still names where it went
    old_input = {"source": "/srv/a", "container": "c", "prefix": "p", "endpoint": "http://x",
                 "options": {"concurrency": 16, "compare": "mtime", "patterns": [], "follow_symlinks": False,
                             "block_size": 33554432, "tier": None, "shared": False},
                 "baseline": None, "state": {"files_total": 3, "pages": 1, "retry_pages": [-2]}}
    label = from_wire(old_input, RunLabel, "an input")
    assert (label.source, label.destination, label.endpoint) == ("/srv/a", "c/p", "http://x")
    assert from_wire({**old_input, "state": None}, BackupInput, "an input").options.concurrency == 16


def test_a_summary_carries_every_counter_and_field_on_the_wire():
    wire = summary_to_wire(Summary(kind="BackupSiteContent", counts=BackupCounts()))
    assert list(wire)[:3] == ["instance_id", "kind", "runtime_status"]
    assert set(BackupCounts.__struct_fields__) <= set(wire) and "counts" not in wire


@pytest.mark.parametrize("data, what", [
    (b'[{"path":"../etc/passwd","size":1}]', "a path that climbs out of its root"),
    (b'[{"path":"/etc/passwd","size":1}]', "an absolute path"),
    (b'[{"path":"a//b","size":1}]', "an empty segment"),
    (b'[{"path":"a","size":"1"}]', "a size that is not a number"),
    (b'[{"size":1}]', "no path"),
    (b'{"path":"a"}', "an object where a list belongs"),
    (b'[{"path":"a"', "truncated JSON"),
])
def test_a_record_page_that_does_not_decode_is_damaged_and_named(data, what):
    with pytest.raises(DamagedData) as caught:
        decode(data, list[FileEntry], "record page 7 of run R")
    assert str(caught.value).startswith("record page 7 of run R is damaged: "), what
    assert caught.value.exit_code == 2


def test_the_work_store_names_a_damaged_page_and_refuses_an_oversized_one(tmp_path):
    store = LocalWorkStore(tmp_path / "work")
    store.write_result("R", 0, [FileEntry("a", 1, 2, "QQ==")])
    (tmp_path / "work" / "R" / "results" / "000001.json").write_bytes(b'[{"path":"../x"}]')
    entries = store.iter_results("R")
    assert next(entries).path == "a"
    with pytest.raises(DamagedData, match="record page 1 of run R is damaged"):
        next(entries)
    with open(tmp_path / "work" / "R" / "results" / "000001.json", "wb") as fh:
        fh.truncate(MAX_PAGE_BYTES + 1)
    with pytest.raises(DamagedData, match=f"over the {MAX_PAGE_BYTES}"):
        list(store.iter_results("R"))
    # a prune mark that does not decode is no mark (the run is not taken for pruned by a damaged file)
    store.mark_pruned("R", PruneMark(at="2026-12-07T00:00:00+00:00", container="c"))
    assert store.pruned("R") == PruneMark(at="2026-12-07T00:00:00+00:00", container="c")


def test_the_wire_form_is_plain_json_and_round_trips():
    item = CopyItem("a", 1, 2, FileEntry("a", 1, 2, "QQ==", etag="e"), True, False)
    assert from_wire(json.loads(json.dumps(to_wire([item]))), list[CopyItem], "page") == [item]
    assert FORMAT_VERSION == 2
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"path": ".."}, FileEntry)


# ---- the recorded path check: its fast form refuses exactly what the plain one does -------------

def plain_relpath_refused(path: str) -> bool:
    """The check as first written: every '/'-separated part looked at."""
    return (not path or path.startswith("/") or "\x00" in path
            or any(part in ("", ".", "..") for part in path.split("/")))


# paths made of the characters that matter here, so that dots, slashes and NULs meet in every arrangement
relpaths = st.lists(st.sampled_from(["a", "b.", ".", "..", "/", "\x00", "é"]), max_size=12).map("".join)


@given(relpaths)
def test_the_recorded_path_check_refuses_what_a_part_by_part_check_refuses(path):
    try:
        check_relpath(path)
        refused = False
    except ValueError:
        refused = True
    assert refused == plain_relpath_refused(path), path

"""File names with control characters (ESC, BEL, newline, DEL, C1) back up and restore exactly, stored under
escaped blob names that never break a listing of the container; ordinary names are stored as they are.

Azurite answers 500 to every listing of a container holding a blob whose name has a C0 control character
(ESC, BEL, ...), and Azure's naming rules refuse them: one such file would break every restore of the container.
"""

from __future__ import annotations

import json
import os

import pytest
from azure.storage.blob import BlobServiceClient
from helpers import write_tree
from hypothesis import given
from hypothesis import strategies as st

from sitebackup.blob.naming import ESCAPE_MARK, blob_name, escape_name, normalize_prefix, unescape_name
from sitebackup.errors import InputError

ESCAPED = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0xFFFE, 0xFFFF)]
# names mostly made of the characters that matter: the escaped ones, the mark, hex digits and '/'
names = st.text(st.sampled_from([*ESCAPED, ESCAPE_MARK, "0", "1", "B", "F", "7", "/", "a", "é", "\u241b"]) | st.characters())
ordinary = st.text(st.characters(blacklist_characters=[*ESCAPED, ESCAPE_MARK], blacklist_categories=["Cs"]))


@given(names)
def test_escaping_is_reversible(name):
    assert unescape_name(escape_name(name)) == name


@given(names)
def test_an_escaped_name_holds_no_control_character_and_keeps_its_folders(name):
    escaped = escape_name(name)
    assert not set(escaped) & set(ESCAPED)
    assert escaped.split("/") == [escape_name(part) for part in name.split("/")]


@given(ordinary)
def test_ordinary_names_are_unchanged_both_ways(name):
    assert escape_name(name) == name
    assert unescape_name(name) == name


@given(names, names)
def test_two_names_never_share_a_blob(a, b):
    if a != b:
        assert escape_name(a) != escape_name(b)


def test_the_escaped_form_is_the_mark_and_four_hex_digits():
    assert blob_name("p", "a\x1b[31mb/c\nd") == "p/a\u201b001B[31mb/c\u201b000Ad"
    assert escape_name("\u201b") == "\u201b201B"
    assert unescape_name("a\u201b0041 \u201bx \u201b001b") == "a\u201b0041 \u201bx \u201b001b"  # not ones we write


@pytest.mark.parametrize("prefix", ["web\x1b", "a\nb", "x\x85"])
def test_a_prefix_with_a_control_character_is_refused(prefix):
    with pytest.raises(InputError, match="control characters"):
        normalize_prefix(prefix)


TREE = {
    "ok.txt": b"ordinary",
    "esc\x1b[31mred.txt": b"escape sequence",
    "bell\x07/new\nline.txt": b"in a folder with a BEL",
    "tab\there\rcr.txt": b"tab and carriage return",
    "del\x7f and c1 \x85 \x9b.txt": b"DEL and C1",
    "nonchar \ufffe\uffff.txt": b"U+FFFE and U+FFFF",
    "mark \u201b001B literal.txt": b"the escape mark itself",
    "pictures \u241b.txt": b"a control picture is ordinary",
}


def test_control_characters_round_trip_and_the_container_still_lists(tmp_path, cli, blob_service: BlobServiceClient,
                                                                    container_name):
    src = write_tree(tmp_path / "site", TREE)
    backup = cli(src, "-c", container_name, "--prefix", "web", "--json")
    assert backup.returncode == 0, backup.stdout + backup.stderr
    run_id = json.loads(backup.stdout.splitlines()[-1])["instance_id"]

    client = blob_service.get_container_client(container_name)
    listed = {b.name for b in client.list_blobs() if not b.name.startswith(".sitebackup/")}
    assert listed == {f"web/{escape_name(name)}" for name in TREE}
    assert "web/ok.txt" in listed and "web/pictures \u241b.txt" in listed

    listing = cli("list", "--container", container_name)
    assert listing.returncode == 0 and run_id in listing.stdout, listing.stderr
    for args in ([run_id, tmp_path / "by-run"], ["--container", container_name, "--prefix", "web", tmp_path / "by-name"]):
        restore = cli("restore", *args)
        assert restore.returncode == 0, restore.stdout + restore.stderr
        dest = args[-1]
        restored = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert restored == TREE
    verify = cli("verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_directories_and_symlinks_with_control_characters_come_back_and_are_listed_escaped(tmp_path, cli,
                                                                                         container_name):
    src = write_tree(tmp_path / "site", {"bell\x07/in.txt": b"in a folder with a BEL"})
    (src / "empty\x1b[31m").mkdir()
    (src / "link\nname").symlink_to("bell\x07/in.txt")
    (src / "target\x1b").symlink_to("a\x1b[2Jtarget\n")  # dangling: the target is data, byte for byte
    backup = cli(src, "-c", container_name, "--json")
    assert backup.returncode == 0, backup.stdout + backup.stderr
    run_id = json.loads(backup.stdout.splitlines()[-1])["instance_id"]

    dest = tmp_path / "by-run"
    restore = cli("restore", run_id, dest)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert (dest / "empty\x1b[31m").is_dir() and not any((dest / "empty\x1b[31m").iterdir())
    assert os.readlink(dest / "link\nname") == "bell\x07/in.txt"
    assert (dest / "link\nname").read_bytes() == b"in a folder with a BEL"
    assert os.readlink(dest / "target\x1b") == "a\x1b[2Jtarget\n"
    local = cli("verify", run_id, "--local")  # compares the source with the record
    assert local.returncode == 0, local.stdout + local.stderr

    (src / "empty\x1b[31m").rmdir()
    (src / "link\nname").unlink()
    dry = cli(src, "-c", container_name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    kept = "left out of the next run's record, kept for earlier runs"
    assert dry.stdout.splitlines()[:2] == [f"deleted empty\\x1b[31m (directory; {kept})",
                                           f"deleted link\\nname (symlink; {kept})"]

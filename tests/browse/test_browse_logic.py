"""The pure logic under ls, diff, find, cat and the run references, without processes or a service: references
resolved (prefixes, ``latest``, jobs), two records compared in one pass as a dictionary would (and memory
that holds a page, not the run), find's patterns, cat's text test, PATH arguments, and the did-you-mean of a
first word close to a command name."""

from __future__ import annotations

import gc
import io
import json
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sitebackup.blob.lock import host_name
from sitebackup.cli import run
from sitebackup.commands import backup, ls
from sitebackup.commands.browsing import Subtrees, normalize_paths
from sitebackup.commands.cat import looks_binary
from sitebackup.commands.find import matcher
from sitebackup.commands.options import Session
from sitebackup.commands.runref import Candidate, resolve
from sitebackup.errors import EXIT_USAGE, InputError
from sitebackup.local.changes import ADDED, METADATA, MODIFIED, REMOVED, OutOfOrder, changes, compare, count
from sitebackup.local.scan import walk_key
from sitebackup.model.records import ROOT, FileEntry, Job
from sitebackup.model.reports import ListingSummary
from sitebackup.ui import render

T0 = datetime(2026, 12, 6, 3, tzinfo=timezone.utc)
JOBS = {"j1": Job(id="j1", name="web01:/var/www", host=host_name(), source="/var/www"),
        "j2": Job(id="j2", name="db", host="db01", source="/srv/db"),
        "j3": Job(id="j3", name="elsewhere:/var/www", host="elsewhere", source="/var/www")}


def runs(*specs: tuple[str, int, str]) -> list[Candidate]:
    return [Candidate(run_id, T0 + timedelta(hours=hour), job) for run_id, hour, job in specs]


# ---- run references

def test_a_whole_id_or_a_unique_prefix_of_four_characters_or_more_names_a_run():
    found = runs(("20261206T030001-aaaaaa", 0, "j1"), ("20261207T030001-bbbbbb", 24, "j1"))
    assert resolve("20261206T030001-aaaaaa", found) == "20261206T030001-aaaaaa"
    assert resolve("20261207", found) == "20261207T030001-bbbbbb"
    with pytest.raises(InputError, match="at least 4 characters"):
        resolve("202", found)
    with pytest.raises(InputError, match="no run with id '2027' here"):
        resolve("2027", found)


def test_an_ambiguous_prefix_names_its_runs_newest_first_and_no_more_than_ten():
    many = runs(*((f"20261206T0300{i:02d}-abcdef", i, "j1") for i in range(14)))
    with pytest.raises(InputError) as refused:
        resolve("20261206", many, where="in container 'c'")
    message = str(refused.value)
    assert "is ambiguous: 14 runs in container 'c' start with it" in message and "and 4 more" in message
    assert message.index("20261206T030013") < message.index("20261206T030012")  # newest first
    assert "20261206T030003" not in message and "\n" not in message


def test_latest_is_the_newest_run_of_the_only_job_or_of_the_job_named():
    one_job = runs(("r1", 0, "j1"), ("r3", 2, "j1"), ("r2", 1, "j1"))
    assert resolve("latest", one_job, job_of=JOBS.get) == "r3"
    two_jobs = [*one_job, *runs(("d1", 5, "j2"))]
    with pytest.raises(InputError) as refused:
        resolve("latest", two_jobs, job_of=JOBS.get)
    assert "2 jobs" in str(refused.value) and "web01:/var/www (latest r3)" in str(refused.value) \
        and "db (latest d1)" in str(refused.value) and "--job" in str(refused.value)
    assert resolve("latest", two_jobs, job="db", job_of=JOBS.get) == "d1"
    assert resolve("latest", two_jobs, job="j1", job_of=JOBS.get) == "r3"
    with pytest.raises(InputError, match="no completed backup here of job 'nope'"):
        resolve("latest", two_jobs, job="nope", job_of=JOBS.get)
    with pytest.raises(InputError, match="no completed backup"):
        resolve("latest", [])


def test_latest_of_a_source_directory_is_this_hosts_job_of_it():
    found = runs(("mine", 0, "j1"), ("theirs", 1, "j3"), ("db", 2, "j2"))
    assert resolve("latest", found, job="/var/www", job_of=JOBS.get) == "mine"
    assert resolve("latest", found, job="/var/www/", job_of=JOBS.get) == "mine"
    not_here = {**JOBS, "j1": Job(id="j1", name="other:/var/www", host="other", source="/var/www")}
    with pytest.raises(InputError, match="names 2 jobs"):
        resolve("latest", found, job="/var/www", job_of=not_here.get)


# ---- changes between two records

def entry(path: str, **fields: object) -> FileEntry:
    kind = fields.get("kind", "file")
    md5 = fields.pop("md5", "QQ==" if kind == "file" else None)
    return FileEntry(path, md5=md5, **fields)  # type: ignore[arg-type]


def test_content_is_modified_metadata_alone_is_metadata_and_a_directorys_time_is_neither():
    base = entry("a", size=1, mtime_ns=5, mode=0o644, uid=1, user="www")
    assert compare(base, entry("a", size=1, mtime_ns=5, mode=0o644, uid=1, user="www")) is None
    assert compare(base, entry("a", size=1, mtime_ns=5, md5="Qg==", mode=0o644, uid=1, user="www")) == MODIFIED
    assert compare(base, entry("a", size=2, mtime_ns=5, mode=0o644, uid=1, user="www")) == MODIFIED
    assert compare(base, entry("a", kind="symlink", target="b", mtime_ns=5)) == MODIFIED
    assert compare(base, entry("a", size=1, mtime_ns=5, mode=0o600, uid=1, user="www")) == METADATA
    assert compare(base, entry("a", size=1, mtime_ns=5, mode=0o644, uid=2, user="www")) == METADATA
    assert compare(base, entry("a", size=1, mtime_ns=6, mode=0o644, uid=1, user="www")) == METADATA
    assert compare(entry("l", kind="symlink", target="x"), entry("l", kind="symlink", target="y")) == METADATA
    assert compare(entry("d", kind="dir", mtime_ns=1), entry("d", kind="dir", mtime_ns=2)) is None
    assert compare(entry("d", kind="dir", mode=0o755), entry("d", kind="dir", mode=0o700)) == METADATA


PATHS = st.lists(st.sampled_from(["a", "b", "a/c", "a/d", "a/c/e", "b/f", "b/f/g", "z", "a/z", "a/c/z"]),
                 unique=True)
VERSIONS = st.sampled_from([("QQ==", 1, 0o644), ("Qg==", 1, 0o644), ("QQ==", 1, 0o600), ("QQ==", 2, 0o644)])


def record(paths: list[str], versions: list[tuple[str, int, int]]) -> list[FileEntry]:
    files = [FileEntry(path, size=size, md5=md5, mode=mode) for path, (md5, size, mode) in zip(paths, versions)]
    return sorted([FileEntry(ROOT, kind="dir"), *files], key=lambda e: walk_key(e.path))


@given(PATHS, PATHS, st.lists(VERSIONS, min_size=10, max_size=10), st.lists(VERSIONS, min_size=10, max_size=10))
@settings(max_examples=300)
def test_one_pass_finds_what_a_dictionary_of_both_records_finds(before_paths, after_paths, v1, v2):
    before, after = record(before_paths, v1), record(after_paths, v2)
    old, new = {e.path: e for e in before}, {e.path: e for e in after}
    expected = {(REMOVED, p) for p in old.keys() - new.keys()} | {(ADDED, p) for p in new.keys() - old.keys()} | \
        {(compare(old[p], new[p]), p) for p in old.keys() & new.keys() if compare(old[p], new[p])}
    found = list(changes(iter(before), iter(after)))
    assert {(c.marker, c.path) for c in found} == expected
    assert [walk_key(c.path) for c in found] == sorted(walk_key(c.path) for c in found)  # in walk order
    assert sum(count(found)) == len(found)


def test_a_record_out_of_walk_order_is_refused_never_compared_wrong():
    out_of_order = [entry("b"), entry("a"), entry("c")]
    with pytest.raises(OutOfOrder):
        list(changes([entry("a"), entry("c")], out_of_order))


def synthetic(pages: int, per_page: int = 1000, changed_every: int = 0) -> Iterator[FileEntry]:
    """A record of pages x per_page files made as it is read (nothing of it is held)."""
    for page in range(pages):
        for i in range(per_page):
            n = page * per_page + i
            md5 = "Qg==" if changed_every and n % changed_every == 0 else "QQ=="
            yield FileEntry(f"d{page:05d}/f{i:04d}.txt", size=n, mtime_ns=n, md5=md5)


class Sink:
    """A stdout that keeps nothing it is given, and counts the lines."""

    lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)

    def flush(self) -> None:
        pass


def peak_bytes(work, pages: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        work(pages)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_comparing_and_listing_hold_memory_of_a_page_not_of_the_run(monkeypatch):
    """What grows with the run (10x the entries) must not grow what is held: peaks stay within a bound."""
    monkeypatch.setattr("sys.stdout", Sink())

    def diff(pages: int) -> None:
        for _ in changes(synthetic(pages), synthetic(pages, changed_every=7)):
            pass

    def listing(pages: int) -> None:
        with render.Lines() as out:
            ls.list_entries(synthetic(pages), Subtrees([]), ListingSummary(run_id="r"), out, long=True,
                            json_output=False, terminal=False)

    for work in (diff, listing):
        small, large = peak_bytes(work, 5), peak_bytes(work, 50)
        assert large < 2 * small + 256 * 1024, (work.__name__, small, large)
    assert sys.stdout.lines == 55_000  # every entry listed (and the diffs ran through)


# ---- find, cat, PATH arguments

@pytest.mark.parametrize("patterns, regex, hits, misses", [
    (["b.bin"], False, ["b.bin", "sub/b.bin", "a/b/c/b.bin"], ["b.bin.old", "sub/ab.bin", "b.bin/x"]),
    (["*.html"], False, ["i.html", "sub/deeper/c.html"], ["c.html/x", "c.htm"]),
    (["sub/*/c.html"], False, ["sub/deeper/c.html"], ["sub/c.html", "sub/a/b/c.html", "x/sub/deeper/c.html"]),
    (["**/cache/**"], False, ["a/cache/x", "cache/y/z"], ["cache", "a/cachex/y"]),
    (["^uploads/2026/.*\\.pdf$"], True, ["uploads/2026/a/b.pdf"], ["x/uploads/2026/b.pdf", "uploads/2025/b.pdf"]),
    (["config"], True, ["wp-config.php", "a/config/b"], ["conf"]),
])
def test_find_patterns_match_base_names_or_whole_paths(patterns, regex, hits, misses):
    matches = matcher(patterns, regex)
    assert all(matches(path) for path in hits) and not any(matches(path) for path in misses)


def test_a_bad_regex_is_one_clear_line():
    with pytest.raises(InputError, match="invalid --regex pattern"):
        matcher(["(unclosed"], True)


@pytest.mark.parametrize("head, binary", [
    (b"<p>plain text</p>\n\ttabbed\r\n", False), ("ni\u00f1o \u65e5\u672c\n".encode(), False),
    ("\u65e5".encode()[:2], False),  # a character cut at the end of the sample
    (b"\x00\x01\x02", True), (b"text then \x1b[2J clear", True), (b"\x7f", True), (b"\xff\xfe\x00a", True),
    ("evil \u202e txt".encode(), True), (b"caf\xe9 latin-1", True),
])
def test_what_a_terminal_is_spared(head, binary):
    assert looks_binary(head) is binary


def test_path_arguments_choose_subtrees_and_name_those_that_chose_nothing():
    assert normalize_paths(["./sub/", "/a//b", ".", ""]) == ["sub", "a/b", "", ""]
    with pytest.raises(InputError, match="without '..'"):
        normalize_paths(["sub/../../etc"])
    chosen = Subtrees(["sub", "a.txt", "nope"])
    assert [p for p in [".", "a.txt", "sub", "sub/x", "subway", "sub2/x", "b/a.txt"] if p in chosen] == \
        ["a.txt", "sub", "sub/x"]
    assert chosen.missing() == ["nope"]
    assert all(p in Subtrees([]) for p in (".", "x/y")) and Subtrees([""]).missing() == []


def test_tab_separated_fields_are_escaped_one_by_one(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    with render.Lines() as lines:
        lines.line(("M", "a\tb\nc"))
        lines.event("entry", FileEntry("caf\u00e9\x1b"))
    first, second = out.getvalue().splitlines()
    assert first == "M\ta\\tb\\nc" and json.loads(second) == {"event": "entry", "path": "caf\u00e9\x1b"}
    assert "\x1b" not in out.getvalue() and second.isascii()


# ---- did you mean

def test_a_first_word_close_to_a_command_name_is_not_taken_for_a_source(tmp_path, capsys, monkeypatch):
    assert run(["lss", "latest"], Session()) == EXIT_USAGE
    assert "'lss' is neither a command nor a directory: did you mean `sitebackup ls`?" in capsys.readouterr().err
    assert run(["stat", "x"], Session()) == EXIT_USAGE
    assert "`sitebackup stats` or `sitebackup status`" in capsys.readouterr().err
    for word, meant in (("chek", "check"), ("unlok", "unlock"), ("canel", "cancel"), ("verfy", "verify")):
        assert run([word, "x"], Session()) == EXIT_USAGE, word  # every command counts, not only those of #30
        assert f"did you mean `sitebackup {meant}`?" in capsys.readouterr().err, word
    # a directory of that name is backed up as it always was; so is a path, or a word close to no command
    seen = []
    monkeypatch.setattr(backup, "run_backup", lambda request, *a, **k: seen.append(request.source) or _done())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lss").mkdir()
    for word in ("lss", "./lss"):
        assert run([word, "-c", "abc", "--connection-string", "UseDevelopmentStorage=true", "--state-dir",
                    str(tmp_path / "state")], Session()) == 0
    assert seen == [tmp_path / "lss", tmp_path / "lss"]
    assert run(["/no/such/site", "-c", "abc"], Session()) == EXIT_USAGE
    assert "did you mean" not in capsys.readouterr().err


def _done():
    from sitebackup.model.work import BackupCounts, Summary

    return Summary(kind="BackupSiteContent", counts=BackupCounts(), runtime_status="COMPLETED")

"""Looking inside a backup without restoring it: ls, diff, find, cat, stats, run references (unique prefixes,
``latest``), restore --dry-run and list's changes, read from the container's sealed records (a new machine with
only the credentials and the container name sees the same). Real CLI processes, the embedded backend, a real
Azurite."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from azure.storage.blob import ContentSettings
from helpers import env_for, wait_until, write_tree

from sitebackup.blob.naming import escape_name
from sitebackup.ui.escape import printable

DIRS = [".", "caf\u00e9", "sub", "sub/deeper"]  # the record holds the tree: its directories too
RUN1 = {"a.txt": b"alpha 1\n", "sub/b.bin": bytes(range(256)) * 8, "sub/deeper/c.html": b"<p>charlie</p>\n",
        "caf\u00e9/\u65e5\u672c.txt": "ni\u00f1o \u65e5\u672c\n".encode(), "keep.txt": b"kept as it is\n"}


def run_id_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["instance_id"]


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def two_runs(tmp_path, cli, container_name):
    """Run 1 of RUN1, then run 2 with a.txt changed, sub/b.bin removed and new.txt added (in another second, so
    the two ids differ in their first 16 characters)."""
    src = write_tree(tmp_path / "site", RUN1)
    run1 = run_id_of(cli(src, "-c", container_name, "--json"))
    (src / "a.txt").write_bytes(b"alpha 2, longer\n")
    (src / "sub" / "b.bin").unlink()
    (src / "new.txt").write_bytes(b"new in run 2\n")
    wait_until(lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") != run1[:15], "the next second")
    run2 = run_id_of(cli(src, "-c", container_name, "--json"))
    assert run1[:16] != run2[:16]
    return src, run1, run2, tree_of(src)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def test_ls_diff_find_cat_stats_and_restore_read_the_runs(tmp_path, cli, azurite, container_name, two_runs):
    src, run1, run2, tree2 = two_runs
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")  # a new machine
    c = ["-c", container_name]

    # ls: every file of run 1, a full relative path a line; the same from the container alone
    assert ok(cli("ls", run1)).stdout.splitlines() == sorted([*RUN1, *DIRS], key=_walk_order)
    assert ok(cli("ls", run1, *c, env=fresh)).stdout.splitlines() == sorted([*RUN1, *DIRS], key=_walk_order)
    assert ok(cli("ls", run2, "sub", *c, env=fresh)).stdout.splitlines() == ["sub", "sub/deeper", "sub/deeper/c.html"]
    entries = [json.loads(line) for line in ok(cli("ls", "latest", *c, "--json", env=fresh)).stdout.splitlines()]
    assert {e["path"] for e in entries if e["event"] == "entry" and e.get("kind", "file") == "file"} == set(tree2)
    assert entries[-1] == {"event": "summary", "run_id": run2, "entries": len(tree2) + len(DIRS),
                           "bytes": sum(map(len, tree2.values()))}
    [long] = ok(cli("ls", run1, "-l", "keep.txt", *c, env=fresh)).stdout.splitlines()
    kind, _mode, _user, _group, size, mtime, path, target = long.split("\t")
    assert (kind, size, path, target) == ("file", str(len(RUN1["keep.txt"])), "keep.txt", "")
    assert datetime.fromisoformat(mtime).timestamp() == int((src / "keep.txt").stat().st_mtime)

    # diff: exactly the three changes, nothing unchanged; totals after them
    diff = ok(cli("diff", run1, run2, *c, env=fresh))
    assert sorted(diff.stdout.splitlines()) == sorted(["M\ta.txt", "-\tsub/b.bin", "+\tnew.txt"])
    assert "1 added, 1 removed, 1 modified, 0 metadata only" in diff.stderr
    events = [json.loads(line) for line in ok(cli("diff", run1[:16], "latest", *c, "--json", env=fresh)).stdout.splitlines()]
    assert {(e["change"], e["path"]) for e in events if e["event"] == "change"} == {("M", "a.txt"), ("-", "sub/b.bin"),
                                                                                  ("+", "new.txt")}
    assert events[-1] | {"event": "summary"} == {"event": "summary", "run_a": run1, "run_b": run2, "added": 1,
                                                 "removed": 1, "modified": 1, "metadata": 0}
    assert ok(cli("diff", run1, run2, "keep.txt", *c, env=fresh)).stdout == ""  # an unchanged path: no line, no error
    assert ok(cli("diff", run2, run2, *c, env=fresh)).stdout == ""

    # find: which runs hold b.bin (run 1 only), the whole path of a pattern with '/'
    found = ok(cli("find", "b.bin", *c, env=fresh))
    assert [line.split("\t")[:3] for line in found.stdout.splitlines()] == [[run1, "sub/b.bin", str(len(RUN1["sub/b.bin"]))]]
    found = ok(cli("find", "sub/*/*.html", "*.txt", *c, "--json", env=fresh)).stdout.splitlines()
    matches = [json.loads(line) for line in found]
    both = ("sub/deeper/c.html", "keep.txt", "a.txt", "caf\u00e9/\u65e5\u672c.txt")
    assert {(m["run_id"], m["path"]) for m in matches if m["event"] == "match"} == \
        {(run, path) for run in (run1, run2) for path in both} | {(run2, "new.txt")}
    assert matches[-1]["runs_matched"] == 2 and matches[-1]["runs_searched"] == 2
    by_job = ok(cli("find", "--regex", "b\\.bi", *c, "--job", str(src), "--prefix", "", env=fresh))
    assert [line.split("\t")[:2] for line in by_job.stdout.splitlines()] == [[run1, "sub/b.bin"]]
    elsewhere = ok(cli("find", "b.bin", *c, "--prefix", "elsewhere/", env=fresh))
    assert elsewhere.stdout == "" and "0 match(es) in 0 of 0 run(s)" in elsewhere.stderr

    # cat: the exact bytes, a non-ASCII path too; --json carries them in base64 with the check's verdict
    assert ok(cli("cat", run1, "sub/deeper/c.html", *c, env=fresh)).stdout == RUN1["sub/deeper/c.html"].decode()
    raw = subprocess.run(cli_args("cat", run1[:16], "caf\u00e9/\u65e5\u672c.txt", *c), env=fresh, capture_output=True,
                         cwd=_root())
    assert raw.returncode == 0 and raw.stdout == RUN1["caf\u00e9/\u65e5\u672c.txt"], raw.stderr
    binary = subprocess.run(cli_args("cat", run1, "sub/b.bin", *c), env=fresh, capture_output=True, cwd=_root())
    assert binary.stdout == RUN1["sub/b.bin"]  # not a terminal: any bytes
    # to a terminal, bytes that are not plain text are refused before any is written, unless --force
    terminal, stdout = pty.openpty()
    try:
        refused = subprocess.run(cli_args("cat", run1, "sub/b.bin", *c), env=fresh, stdout=stdout,
                                 stderr=subprocess.PIPE, cwd=_root())
        assert refused.returncode == 2 and b"not plain text" in refused.stderr and _drained(terminal) == b""
        forced = subprocess.run(cli_args("cat", run1, "sub/b.bin", "--force", *c), env=fresh, stdout=stdout,
                                stderr=subprocess.PIPE, cwd=_root())
        assert forced.returncode == 0 and len(_drained(terminal)) >= len(RUN1["sub/b.bin"]), forced.stderr
    finally:
        os.close(terminal)
        os.close(stdout)
    carried = json.loads(ok(cli("cat", run1, "a.txt", *c, "--json", env=fresh)).stdout)
    assert base64.b64decode(carried["content_base64"]) == RUN1["a.txt"] and carried["verified"] is True

    # stats: of the container and of a run
    stats = json.loads(ok(cli("stats", *c, "--json", env=fresh)).stdout)
    assert [row["run_id"] for row in stats["runs"]] == [run2, run1]
    assert stats["runs"][0]["changes"] == {"added": 1, "removed": 1, "modified": 1, "metadata": 0}
    assert stats["stored"]["blobs"] == len(set(RUN1) | set(tree2)) and stats["stored"]["snapshots"] == 1  # a.txt's run 1
    one = json.loads(ok(cli("stats", run1, *c, "--json", env=fresh)).stdout)
    assert one["runs"][0]["files"] == len(RUN1) and one["stored"]["snapshots"] == 1 and one["stored"]["missing"] == 0
    assert stats["prune"] is None
    ok(cli("stats", *c, "--keep-last", "1", env=fresh))
    freed = json.loads(ok(cli("stats", *c, "--keep-last", "1", "--json", env=fresh)).stdout)["prune"]
    # keeping run 2 alone frees run 1, sub/b.bin's copy and a.txt's snapshot (what prune's dry run says)
    assert freed == {"runs": 1, "blobs": 1, "snapshots": 1, "bytes": len(RUN1["sub/b.bin"]) + len(RUN1["a.txt"])}
    assert [row["run_id"] for row in json.loads(ok(cli("stats", *c, "--json", env=fresh)).stdout)["runs"]] == \
        [run2, run1]  # nothing was removed

    # list: what each run changed, filters, one run in full
    rows = json.loads(ok(cli("list", *c, "--json", env=fresh)).stdout)
    assert [row["changes"] for row in rows] == [{"added": 1, "removed": 1, "modified": 1, "metadata": 0},
                                                {"added": len(RUN1) + len(DIRS), "removed": 0, "modified": 0,
                                                 "metadata": 0}]
    here = json.loads(ok(cli("list", "--json")).stdout)  # this state directory's runs: from their summaries
    assert [(row["instance_id"], row["changes"]) for row in here] == [(row["instance_id"], row["changes"]) for row in rows]
    assert json.loads(ok(cli("list", *c, "--since", "yesterday", "--json", env=fresh)).stdout) == rows
    assert json.loads(ok(cli("list", *c, "--since", "2999-01-01", "--json", env=fresh)).stdout) == []
    assert json.loads(ok(cli("list", *c, "--status", "completed", "--json", env=fresh)).stdout) == rows
    assert json.loads(ok(cli("list", *c, "--status", "FAILED", "--json", env=fresh)).stdout) == []
    assert json.loads(ok(cli("list", *c, "--job", str(src), "--host", rows[0]["job"].split(":")[0], "--json",
                             env=fresh)).stdout) == rows
    detail = json.loads(ok(cli("list", *c, run2[:16], "--json", env=fresh)).stdout)
    assert detail["run_id"] == run2 and detail["baseline"] == run1 and detail["files"] == len(tree2)

    # restore latest is run 2's tree; a dry run of run 1 by a 16-character prefix writes nothing, lists sub/b.bin
    ok(cli("restore", "latest", tmp_path / "latest"))
    assert tree_of(tmp_path / "latest") == tree2
    planned = ok(cli("restore", run1[:16], tmp_path / "dry", "--dry-run", *c, env=fresh))
    assert not (tmp_path / "dry").exists()
    assert "would create sub/b.bin (2.0 KiB)" in planned.stdout.splitlines()
    assert f"{len(RUN1) + len(DIRS)} entries would be created" in planned.stdout
    over = [json.loads(line) for line in ok(cli("restore", run1[:16], tmp_path / "latest", "--dry-run", "--json",
                                                "--overwrite")).stdout.splitlines()]
    assert {(e["action"], e["path"]) for e in over if e["event"] == "dry_run"} == {
        ("replace", "a.txt"), ("create", "sub/b.bin"), ("identical", "sub/deeper/c.html"), ("identical", "keep.txt"),
        ("identical", "caf\u00e9/\u65e5\u672c.txt")} | {("identical", path) for path in DIRS}
    assert tree_of(tmp_path / "latest") == tree2  # a dry run with --overwrite replaces nothing either


def test_wrong_references_and_paths_are_clear_errors(tmp_path, cli, azurite, container_name, two_runs):
    _src, run1, run2, _tree = two_runs
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")
    c = ["-c", container_name]
    for env in (None, fresh):  # the state directory's runs, and the container's
        ambiguous = cli("ls", run1[:4], *c, env=env)
        assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr
        assert run1 in ambiguous.stderr and run2 in ambiguous.stderr and len(ambiguous.stderr.splitlines()) == 1
        unknown = cli("ls", "29991231T000000-000000", *c, env=env)
        assert unknown.returncode == 2 and "run '29991231T000000-000000' has no sealed record" in unknown.stderr
    unknown = cli("status", "29991231T000000-000000")
    assert unknown.returncode == 2 and "no run with id '29991231T000000-000000'" in unknown.stderr
    short = cli("status", run1[:3])
    assert short.returncode == 2 and "at least 4 characters" in short.stderr
    missing = cli("ls", run1, "no/such/file", *c, env=fresh)
    assert missing.returncode == 2 and "not in run" in missing.stderr and "'no/such/file'" in missing.stderr
    assert cli("cat", run1, "no-such.txt", *c, env=fresh).returncode == 2
    assert cli("cat", run1, "sub", *c, env=fresh).returncode == 2
    assert cli("diff", run1, run2, "nowhere", *c, env=fresh).returncode == 2
    # status, verify and cancel take references too
    assert json.loads(ok(cli("status", run2[:16], "--json")).stdout)["instance_id"] == run2
    assert json.loads(ok(cli("verify", "latest", *c, "--json", env=fresh)).stdout)["run_id"] == run2
    assert run1 in ok(cli("cancel", run1[:16])).stdout


def test_cat_of_a_copy_whose_bytes_no_longer_match_the_record_fails_after_the_bytes(tmp_path, cli, azurite,
                                                                                    blob_service, container_name):
    src = write_tree(tmp_path / "site", {"page.html": b"<p>the real page</p>\n"})
    run = run_id_of(cli(src, "-c", container_name, "--json"))
    blob = blob_service.get_container_client(container_name).get_blob_client("page.html")
    recorded = blob.get_blob_properties().content_settings.content_md5
    # same size, other bytes, the recorded Content-MD5 claimed: only the bytes can tell
    blob.upload_blob(b"<p>the fake page</p>\n", overwrite=True)
    blob.set_http_headers(ContentSettings(content_md5=recorded))
    result = subprocess.run(cli_args("cat", run, "page.html", "-c", container_name),
                            env=env_for(azurite.connection_string, tmp_path / "new"), capture_output=True, cwd=_root())
    assert result.returncode == 1 and result.stdout == b"<p>the fake page</p>\n"
    assert b"do not match" in result.stderr and len(result.stderr.splitlines()) == 1
    assert hashlib.md5(result.stdout).digest() != bytes(recorded)


def cli_args(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "sitebackup", *args]


def _drained(terminal: int) -> bytes:
    """What a pseudo-terminal's program wrote to it (it has exited)."""
    os.set_blocking(terminal, False)
    got = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def _root() -> Path:
    return Path(__file__).resolve().parents[2]


def _walk_order(path: str) -> tuple[str, ...]:
    if path == ".":
        return ()
    *dirs, name = path.split("/")
    return (*("1" + d for d in dirs), "0" + name)


def test_names_with_control_characters_are_read_from_their_escaped_blobs_and_printed_escaped(
        tmp_path, cli, azurite, blob_service, container_name):
    red, broken = "evil\x1b[31m\tname.txt", "sub/line\nbreak\x85.txt"
    files = {red: b"red\n", broken: b"two\n", "plain.txt": b"plain\n"}
    src = write_tree(tmp_path / "site", files)
    run1 = run_id_of(cli(src, "-c", container_name, "--json"))
    stored = {blob.name for blob in blob_service.get_container_client(container_name).list_blobs()
              if not blob.name.startswith(".sitebackup/")}
    assert stored == {escape_name(path) for path in files} and red not in stored  # the blobs' names are escaped
    (src / red).write_bytes(b"red, rewritten\n")
    wait_until(lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") != run1[:15], "the next second")
    run2 = run_id_of(cli(src, "-c", container_name, "--json"))
    fresh = env_for(azurite.connection_string, tmp_path / "new-state")
    c = ["-c", container_name]

    # ls and diff: a line per entry, the name escaped in it; --json carries the name itself
    assert set(ok(cli("ls", run1, *c, env=fresh)).stdout.splitlines()) == \
        {".", "sub", "plain.txt", printable(red), printable(broken)}
    assert {json.loads(line).get("path") for line in ok(cli("ls", run1, *c, "--json", env=fresh)).stdout.splitlines()} \
        == {".", "sub", *files, None}  # None: the summary
    assert ok(cli("diff", run1, run2, *c, env=fresh)).stdout.splitlines() == ["M\t" + printable(red)]
    [change] = [e for e in map(json.loads, ok(cli("diff", run1, run2, *c, "--json", env=fresh)).stdout.splitlines())
                if e["event"] == "change"]
    assert (change["change"], change["path"]) == ("M", red)
    # find by the name as it is; cat of both versions, each from its own copy under the escaped name
    found = [json.loads(line) for line in ok(cli("find", "evil*", *c, "--json", env=fresh)).stdout.splitlines()]
    assert {(m["run_id"], m["path"]) for m in found if m["event"] == "match"} == {(run1, red), (run2, red)}
    for run, expected in ((run1, b"red\n"), (run2, b"red, rewritten\n")):
        got = subprocess.run(cli_args("cat", run, red, *c), env=fresh, capture_output=True, cwd=_root())
        assert got.returncode == 0 and got.stdout == expected, got.stderr
    got = subprocess.run(cli_args("cat", run1, broken, *c), env=fresh, capture_output=True, cwd=_root())
    assert got.returncode == 0 and got.stdout == files[broken], got.stderr
    # stats finds every recorded copy (none missing), run 1's red.txt as the snapshot run 2 kept
    stats = json.loads(ok(cli("stats", *c, "--json", env=fresh)).stdout)
    assert stats["stored"]["blobs"] == len(files) and stats["stored"]["snapshots"] == 1
    assert stats["stored"]["missing"] == 0

    # a dry run of the container's blobs (no run) names the files as the restore would write them
    ok(cli("restore", run2, tmp_path / "back", *c, env=fresh))
    planned = [json.loads(line) for line in ok(cli("restore", tmp_path / "back", *c, "--dry-run", "--json",
                                                   env=fresh)).stdout.splitlines()]
    assert {(e["action"], e["path"]) for e in planned if e["event"] == "dry_run"} == \
        {("identical", path) for path in files}


def test_a_dry_run_that_would_restore_nothing_ends_as_the_restore_would(tmp_path, cli, azurite, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a\n"})
    run = run_id_of(cli(src, "-c", container_name, "--json"))
    c = ["-c", container_name]
    for args, where in (((run, "--include", "nothing*"), f"run {run} (container '{container_name}') recorded no file "
                                                         "that --include/--exclude select"),
                        (("--prefix", "wbe"), f"container '{container_name}', prefix 'wbe' holds no file")):
        real = cli("restore", *args, tmp_path / "real", *c)
        dry = cli("restore", *args, tmp_path / "dry", *c, "--dry-run")
        assert real.returncode == dry.returncode == 2, (real.stderr, dry.stderr)
        assert f"nothing to restore: {where}" in real.stderr.splitlines()[-1]
        assert dry.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]
        assert not (tmp_path / "dry").exists()

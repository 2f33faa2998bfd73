"""A restore is a working site: symlinks, empty directories, owners, modes, hard links and directory times come
back as the run recorded them (issue 29). The real CLI, the embedded backend and a real Azurite; owners need
root, which CI has: without it those tests skip, saying why."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import ROOT, RecordingProxy, env_for, run_cli, unseal, write_tree

from sitebackup.blob.workstore import LocalWorkStore
from sitebackup.local.dest import OwnerIds
from sitebackup.model.records import FileEntry, Meta

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="giving files other owners needs root (CI runs as root)")
UID, GID = 1234, 2345
NOBODY = 65534
BASE_NS = 1_700_000_000_123_456_789


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def backup(cli, src: Path, container: str, *extra: str) -> str:
    result = cli(src, "-c", container, "--json", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return summary_of(result)["instance_id"]


def php_site(tmp_path: Path) -> Path:
    """A typical PHP deployment: a release symlinked as current, links into shared/, storage/ owned by the web
    server's user, empty upload and cache directories, an executable deploy script, a private .env, a hard-linked
    pair, absolute and dangling links; every mtime (directories' and links' too) to the nanosecond."""
    src = write_tree(tmp_path / "site", {
        "releases/r41/index.php": b"<?php echo 41;",
        "releases/r42/index.php": b"<?php echo 42;",
        "releases/r42/deploy.sh": b"#!/bin/sh\necho deploy\n",
        "shared/config.php": b"<?php return ['db' => 'x'];",
        "storage/logs/app.log": b"log line\n",
        ".env": b"APP_KEY=secret\n",
        "assets/logo.png": b"\x89PNG" + bytes(range(256)),
    })
    os.link(src / "assets" / "logo.png", src / "assets" / "logo-copy.png")
    for empty in ("uploads/2026", "cache", "private"):
        (src / empty).mkdir(parents=True)
    (src / "current").symlink_to("releases/r42")  # relative, to a directory
    (src / "releases" / "r42" / "config.php").symlink_to("../../shared/config.php")
    (src / "hostname").symlink_to("/etc/hostname")  # absolute: data, never followed
    (src / "dangling").symlink_to("does/not/exist")
    modes = {"releases/r42/deploy.sh": 0o755, ".env": 0o644, "shared/config.php": 0o600, "storage": 0o750,
             "private": 0o700, "releases": 0o755, "cache": 0o2775, "assets/logo.png": 0o640}
    for rel, mode in modes.items():
        os.chmod(src / rel, mode)
    if os.geteuid() == 0:
        for rel in ("storage", "storage/logs", "storage/logs/app.log", "cache"):
            os.chown(src / rel, UID, GID)
        os.chown(src / "current", UID, GID, follow_symlinks=False)
    paths = sorted((p for p in src.rglob("*")), key=lambda p: -len(p.parts))  # deepest first: a directory last
    for i, path in enumerate([*paths, src]):
        when = BASE_NS + i * 1_000_000_007
        os.utime(path, ns=(when, when), follow_symlinks=False)
    return src


def lstats(root: Path) -> dict[str, tuple]:
    """relpath ('.' for the root) -> (type, permission bits, uid, gid, mtime_ns, link target, bytes) of every
    entry, links not followed."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        kind = stat.S_IFMT(st.st_mode)
        out[path.relative_to(root).as_posix()] = (
            kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
            os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
            path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


@ROOT_ONLY
def test_a_restored_site_is_the_tree_that_was_backed_up(tmp_path, cli, container_name):
    src = php_site(tmp_path)
    before = lstats(src)
    run1 = backup(cli, src, container_name)
    os.chmod(src / ".env", 0o600)  # a change of mode alone: no new content, a new record
    run2 = backup(cli, src, container_name)

    dest = tmp_path / "restored"
    result = cli("restore", run2, dest, "--json", umask=0)
    summary = summary_of(result)
    assert result.returncode == 0 and summary["files_failed"] == 0, result.stdout + result.stderr
    expected = {**before, ".env": (*before[".env"][:1], 0o600, *before[".env"][2:])}
    assert lstats(dest) == expected
    assert (dest / "assets" / "logo.png").stat().st_ino == (dest / "assets" / "logo-copy.png").stat().st_ino
    assert (summary["dirs_restored"], summary["symlinks_restored"]) == (12, 4)
    assert stat.S_IMODE((dest / "cache").stat().st_mode) == 0o2775  # setgid: the owner was restored too

    earlier = tmp_path / "earlier"
    assert cli("restore", run1, earlier, "--json").returncode == 0
    assert stat.S_IMODE((earlier / ".env").stat().st_mode) == 0o644
    assert lstats(earlier) == before


def test_links_and_empty_directories_come_back_without_root_too(tmp_path, cli, container_name):
    """The tree but owners, as any user restores it: symlinks as they were, empty directories, hard links, modes
    exactly whatever the umask, directory mtimes."""
    src = php_site(tmp_path)
    run_id = backup(cli, src, container_name)
    dest = tmp_path / "restored"
    result = cli("restore", run_id, dest, "--json", "--no-owner", umask=0o077)
    assert result.returncode == 0, result.stdout + result.stderr
    got = lstats(dest)
    want = lstats(src)
    assert set(got) == set(want)
    for rel, (kind, mode, _uid, _gid, mtime, target, data) in want.items():
        expected_mode = 0o777 if kind == stat.S_IFLNK else mode & 0o777  # no setgid without the owner
        assert got[rel][:2] == (kind, expected_mode) and got[rel][4:] == (mtime, target, data), rel
    assert all(st[2:4] == (os.geteuid(), os.getegid()) for st in got.values())
    assert (dest / "current" / "index.php").read_bytes() == b"<?php echo 42;"  # a working link once restored
    again = cli("restore", run_id, dest, "--json", "--no-owner")  # into itself: every file is there already
    summary = summary_of(again)
    assert again.returncode == 0 and (summary["files_restored"], summary["files_failed"]) == (0, 0), again.stdout
    assert summary["files_skipped"] == summary["files_total"] == 8 and lstats(dest) == got
    pair = dest / "assets" / "logo.png", dest / "assets" / "logo-copy.png"
    os.unlink(pair[1])
    shutil.copy2(pair[0], pair[1])  # the pair as two files of the same content: skipped, linked by --overwrite
    kept = summary_of(cli("restore", run_id, dest, "--json", "--no-owner"))
    assert (kept["files_skipped"], kept["files_failed"]) == (8, 0) and pair[0].stat().st_ino != pair[1].stat().st_ino
    linked = summary_of(cli("restore", run_id, dest, "--json", "--no-owner", "--overwrite"))
    assert (linked["files_restored"], linked["files_skipped"], linked["files_failed"]) == (1, 7, 0)
    assert pair[0].stat().st_ino == pair[1].stat().st_ino
    assert not (dest / "hostname").exists() or os.path.realpath(dest / "hostname") == "/etc/hostname"


def test_owners_are_this_hosts_by_name_where_it_has_the_name_else_the_recorded_ids():
    root_user, root_group = pwd.getpwuid(0).pw_name, grp.getgrgid(0).gr_name
    ids = OwnerIds()
    assert ids.of(Meta(0o644, UID, GID, root_user, root_group)) == (0, 0)
    assert ids.of(Meta(0o644, UID, GID, "no-such-user-29", root_group)) == (UID, 0)
    assert ids.of(Meta(0o644, UID, GID, None, "no-such-group-29")) == (UID, GID)
    assert ids.of(Meta(0o644, None, GID)) == (-1, GID)  # -1: chown keeps it
    assert ids.of(Meta(0o644)) is None


def test_a_mode_change_alone_sends_no_content_and_keeps_no_snapshot(tmp_path, azurite, container_name):
    """A change of mode, owner (as root) or symlink target is a change of the record alone."""
    src = write_tree(tmp_path / "site", {".env": b"APP_KEY=secret\n", "index.php": b"<?php"})
    (src / "current").symlink_to("index.php")
    proxy = RecordingProxy(azurite.endpoint)
    env = env_for(azurite.connection_string.replace(azurite.endpoint, proxy.endpoint), tmp_path / "state")
    try:
        first = run_cli([str(src), "-c", container_name, "--json"], env)
        assert first.returncode == 0, first.stderr
        os.chmod(src / ".env", 0o600)
        (src / "current").unlink()
        (src / "current").symlink_to(".env")
        if os.geteuid() == 0:
            os.chown(src / "index.php", UID, GID)
        dry = run_cli([str(src), "-c", container_name, "--dry-run"], env)
        proxy.requests.clear()
        second = run_cli([str(src), "-c", container_name, "--json"], env)
    finally:
        proxy.close()
    summary = summary_of(second)
    changed = 3 if os.geteuid() == 0 else 2
    assert (summary["files_uploaded"], summary["files_unchanged"], summary["metadata_changed"]) == (0, 2, changed)
    prefix = f"{urlsplit(proxy.endpoint).path}/{container_name}/"
    blobs = [(method, unquote(urlsplit(path).path)) for method, path, _headers in proxy.requests]
    written = Counter((method, name.removeprefix(prefix)) for method, name in blobs
                      if method != "GET" and name.startswith(prefix) and not name.startswith(prefix + ".sitebackup/"))
    assert written == Counter()  # no Put Blob, Put Block or Snapshot Blob of a file
    assert any(name.startswith(prefix + ".sitebackup/runs/") for method, name in blobs if method == "PUT")
    # the dry run before it listed and counted the change
    assert "would record .env (mode 0644 -> 0600)" in dry.stdout and f"{changed} with metadata changes only" in dry.stdout
    records = {r["path"]: r for p in sorted((tmp_path / "state" / "work" / summary["instance_id"] / "results")
                                            .glob("*.json")) for r in json.loads(p.read_text())}
    assert records[".env"]["mode"] == 0o600 and records[".env"]["unchanged"]
    assert records["current"]["target"] == ".env"
    if os.geteuid() == 0:
        assert (records["index.php"]["uid"], records["index.php"]["gid"], records["index.php"]["unchanged"]) == \
            (UID, GID, True)


def test_each_run_restores_its_own_mode_of_the_same_bytes(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a": b"same bytes"})
    os.chmod(src / "a", 0o755)
    run1 = backup(cli, src, container_name)
    os.chmod(src / "a", 0o700)
    run2 = backup(cli, src, container_name, "--force")  # the same bytes uploaded again, with the new mode
    for run_id, mode in ((run1, 0o755), (run2, 0o700)):
        dest = tmp_path / run_id
        assert cli("restore", run_id, dest).returncode == 0
        assert stat.S_IMODE((dest / "a").stat().st_mode) == mode, run_id


def test_a_symlink_out_of_the_source_is_recorded_not_followed(tmp_path, cli, blob_service, container_name):
    outside = write_tree(tmp_path / "etc", {"shadow": b"root:secret"})
    src = write_tree(tmp_path / "site", {"index.html": b"home"})
    (src / "etc").symlink_to(outside)
    (src / "shadow").symlink_to(outside / "shadow")
    run_id = backup(cli, src, container_name)
    container = blob_service.get_container_client(container_name)
    stored = [b.name for b in container.list_blobs() if not b.name.startswith(".sitebackup/")]
    assert stored == ["index.html"]
    pages = [container.download_blob(b.name).readall() for b in container.list_blobs(name_starts_with=".sitebackup/records/")]
    assert all(b"root:secret" not in page for page in pages)
    dest = tmp_path / "restored"
    assert cli("restore", run_id, dest).returncode == 0
    assert os.readlink(dest / "etc") == str(outside) and os.readlink(dest / "shadow") == str(outside / "shadow")
    assert (outside / "shadow").read_bytes() == b"root:secret"


def test_a_non_root_restore_leaves_owners_and_says_so_once(tmp_path, cli, azurite, container_name):
    src = write_tree(tmp_path / "site", {"storage/app.log": b"log", "index.php": b"<?php"})
    os.chmod(src / "storage", 0o2770)
    if os.geteuid() == 0:
        os.chown(src / "storage", UID, GID)
        os.chown(src / "storage" / "app.log", UID, GID)
    run_id = backup(cli, src, container_name)
    # a place of the user's own, as a new machine would have: a state directory and DEST
    home = Path(tempfile.mkdtemp(prefix="sitebackup-user-"))
    try:
        user = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
            if os.geteuid() == 0 else []
        if user:
            os.chown(home, NOBODY, NOBODY)
        env = env_for(azurite.connection_string, home / "state", HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run([*user, sys.executable, "-m", "sitebackup", "restore", run_id, str(home / "dest"),
                                 "--container", container_name], env=env, capture_output=True, text=True,
                                timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr
        assert [line for line in result.stderr.splitlines() if "owners were not restored" in line] == \
            ["sitebackup: note: owners were not restored: only root can give files their recorded owners "
             "(what was restored belongs to the user who ran the restore)"]
        me = NOBODY if user else os.geteuid()
        for path in (home / "dest", home / "dest" / "storage", home / "dest" / "storage" / "app.log"):
            assert path.lstat().st_uid == me, path
        assert stat.S_IMODE((home / "dest" / "storage").stat().st_mode) == 0o770  # no setgid without the owner
        assert (home / "dest" / "storage" / "app.log").read_bytes() == b"log"
    finally:
        shutil.rmtree(home)


def stand_record(state_dir: Path, conn: str, container: str, run_id: str, entries: list[FileEntry]) -> None:
    """Make *entries* the record of *run_id*, as whoever can write the container or the state directory could."""
    unseal(conn, container, run_id)
    results = state_dir / "work" / run_id / "results"
    for page in results.iterdir():
        page.unlink()
    LocalWorkStore(state_dir / "work").write_result(run_id, 0, entries)


def test_a_hostile_record_writes_nothing_outside_dest_nor_through_a_link(tmp_path, cli, azurite, blob_service,
                                                                          state_dir, container_name):
    outside = write_tree(tmp_path / "outside", {"keep.txt": b"outside"})
    os.chmod(outside, 0o700)
    src = write_tree(tmp_path / "site", {"a.txt": b"A", "lnk/pwned": b"evil", "zz": b"other bytes"})
    run_id = backup(cli, src, container_name)
    good = {r.path: r for r in LocalWorkStore(state_dir / "work").iter_results(run_id)}
    dest = write_tree(tmp_path / "dest", {"victim": b"not in the record", "victim2": b"a file"})
    os.chmod(dest / "victim", 0o644)
    (dest / "planted").symlink_to(outside)
    entries = [
        FileEntry(".", kind="dir", mode=0o777),
        good["a.txt"],
        FileEntry("d", kind="dir", mode=0o777),  # a directory entry that is a file too, below
        FileEntry("d", good["a.txt"].size, md5=good["a.txt"].md5, mode=0o644),
        FileEntry("h", good["a.txt"].size, md5=good["a.txt"].md5, link="../outside/keep.txt"),
        FileEntry("lnk", kind="symlink", target=str(outside)),  # a link over a directory its files are in
        FileEntry("planted", kind="dir", mode=0o777, uid=0),  # DEST's own symlink out, as a directory to chmod
        FileEntry("s1", kind="symlink", target=str(outside)),
        FileEntry("victim2", kind="symlink", target=str(outside / "keep.txt")),  # over a file, without --overwrite
        # a hard link, setuid root, to a file of DEST the record does not hold: restored from its own copy
        FileEntry("zz", good["zz"].size, md5=good["zz"].md5, mode=0o4755, uid=0, gid=0, link="victim"),
        FileEntry("lnk", kind="dir", mode=0o777),
        good["lnk/pwned"],
        FileEntry("s1/s2", kind="symlink", target="x"),  # a symlink beneath a symlink entry
    ]
    stand_record(state_dir, azurite.connection_string, container_name, run_id, entries)
    blob_service.get_container_client(container_name).upload_blob("d", b"A")  # the file "d" has a copy
    result = cli("restore", run_id, dest, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = summary_of(result)
    refused = {f["path"]: f["error"] for f in summary["failures"]}
    assert set(refused) == {"d", "h", "lnk", "planted", "victim2", "s1/s2"}, refused
    assert all(error.startswith("refused: ") for error in refused.values()), refused
    assert "outside" in refused["h"] or "'..'" in refused["h"]
    # nothing outside DEST moved, nothing was written through a link, DEST's own file kept its bits
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == {"keep.txt": b"outside"}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o700
    assert (dest / "victim").read_bytes() == b"not in the record" and (dest / "victim").stat().st_nlink == 1
    assert stat.S_IMODE((dest / "victim").stat().st_mode) == 0o644
    assert (dest / "victim2").read_bytes() == b"a file" and os.readlink(dest / "planted") == str(outside)
    assert (dest / "zz").read_bytes() == b"other bytes" and (dest / "zz").stat().st_ino != (dest / "victim").stat().st_ino
    assert (dest / "a.txt").read_bytes() == b"A" and (dest / "lnk" / "pwned").read_bytes() == b"evil"
    assert not (dest / "lnk").is_symlink() and (dest / "s1").is_symlink() and not (outside / "s2").exists()


def test_verify_local_compares_the_tree_with_the_record(tmp_path, cli, container_name):
    src = php_site(tmp_path)
    run_id = backup(cli, src, container_name)
    clean = cli("verify", run_id, "--local", "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    report = json.loads(clean.stdout)
    assert (report["tree_checked"], report["tree_mismatched"], report["files_mismatched"]) == (16, 0, 0)

    os.chmod(src / ".env", 0o666)
    os.chmod(src / "private", 0o755)
    (src / "current").unlink()
    (src / "current").symlink_to("releases/r41")
    (src / "assets" / "logo-copy.png").unlink()
    (src / "assets" / "logo-copy.png").write_bytes((src / "assets" / "logo.png").read_bytes())
    os.chmod(src / "assets" / "logo-copy.png", 0o640)
    changed = cli("verify", run_id, "--local")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert sorted(changed.stderr.splitlines()) == [
        "MISMATCH .env: local mode 0666 != recorded 0644",
        "MISMATCH assets/logo.png: local file is not a hard link to assets/logo-copy.png",  # walk order: - before .
        "MISMATCH current: local symlink target differs from the recorded one",
        "MISMATCH private: local mode 0755 != recorded 0700",
    ]
    assert changed.stdout.strip().endswith("; 14/16 directories and symlinks match")


def test_a_record_of_the_previous_format_restores_its_files_as_before(tmp_path, cli, azurite, state_dir,
                                                                       container_name):
    src = write_tree(tmp_path / "site", {"a/x.sh": b"#!/bin/sh", "b.txt": b"b"})
    os.chmod(src / "a" / "x.sh", 0o755)
    run_id = backup(cli, src, container_name)
    old = [FileEntry(r.path, r.size, r.mtime_ns, r.md5, r.tier, r.etag)  # format 1: files only, no metadata
           for r in LocalWorkStore(state_dir / "work").iter_results(run_id) if r.is_file]
    stand_record(state_dir, azurite.connection_string, container_name, run_id, old)
    dest = tmp_path / "restored"
    result = cli("restore", run_id, dest, "--json", umask=0o027)
    summary = summary_of(result)
    assert result.returncode == 0 and summary["files_restored"] == 2, result.stdout + result.stderr
    assert (summary["dirs_restored"], summary["symlinks_restored"]) == (0, 0)
    # the mode the blob's metadata carries, masked by the umask; mtimes from the record
    assert stat.S_IMODE((dest / "a" / "x.sh").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "b.txt").stat().st_mode) == 0o640
    assert (dest / "b.txt").stat().st_mtime_ns == (src / "b.txt").stat().st_mtime_ns


def test_a_record_of_a_newer_format_is_refused_not_guessed_at(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    run_id = backup(cli, src, container_name)
    header = blob_service.get_container_client(container_name).get_blob_client(f".sitebackup/runs/{run_id}")
    record = json.loads(header.download_blob().readall())
    header.upload_blob(json.dumps({**record, "format": 99}).encode(), overwrite=True)
    result = cli("restore", run_id, tmp_path / "restored", "--container", container_name)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"run {run_id} was recorded in format 99, newer than this sitebackup reads" in result.stderr
    assert not (tmp_path / "restored" / "a.txt").exists()


def test_a_restore_of_the_blobs_alone_restores_files_and_says_the_tree_needs_a_run(tmp_path, cli, container_name):
    src = write_tree(tmp_path / "site", {"bin/run.sh": b"#!/bin/sh", "index.php": b"<?php"})
    os.chmod(src / "bin" / "run.sh", 0o750)
    (src / "current").symlink_to("index.php")
    (src / "cache").mkdir()
    backup(cli, src, container_name)
    dest = tmp_path / "restored"
    result = cli("restore", "--container", container_name, dest, umask=0o022)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["bin", "bin/run.sh", "index.php"]
    assert stat.S_IMODE((dest / "bin" / "run.sh").stat().st_mode) == 0o750  # the blob's mode metadata
    notes = [line for line in (result.stdout + result.stderr).splitlines() if "restored from the blobs alone" in line]
    assert len(notes) == 1 and "symlinks, hard links, owners and empty directories" in notes[0], notes
    as_of = tmp_path / "as-of"  # the run that backed it up, by time: its tree
    when = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
    result = cli("restore", "--container", container_name, "--as-of", when, as_of)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(as_of / "current") == "index.php" and (as_of / "cache").is_dir()
    assert "restored from the blobs alone" not in result.stdout + result.stderr


def test_a_run_of_directories_and_symlinks_alone_is_something_to_restore(tmp_path, cli, container_name):
    src = tmp_path / "site"
    (src / "empty" / "deeper").mkdir(parents=True)
    (src / "link").symlink_to("empty")
    run_id = backup(cli, src, container_name, "--prefix", "tree")
    existing = tmp_path / "existing"
    existing.mkdir()
    for dest in (tmp_path / "made", existing):
        result = cli("restore", run_id, dest, "--json")
        summary = summary_of(result)
        assert result.returncode == 0 and summary["files_total"] == 0, result.stdout + result.stderr
        assert (dest / "empty" / "deeper").is_dir() and os.readlink(dest / "link") == "empty"

    bare = tmp_path / "bare"  # the record of an empty source holds its root alone: nothing to restore
    bare.mkdir()
    empty_run = backup(cli, bare, container_name, "--prefix", "bare")
    for dest in (tmp_path / "made-bare", existing):
        result = cli("restore", empty_run, dest)
        assert result.returncode == 2 and "nothing to restore: run" in result.stderr, result.stdout + result.stderr

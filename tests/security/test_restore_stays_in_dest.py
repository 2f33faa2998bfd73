"""Restore never writes outside DEST, whoever owns DEST: a process racing the restore with symlink swaps,
planted temporaries and hard links, and hostile ``mode`` metadata, each against the real CLI and Azurite.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from privileges import without_root_powers

from sitebackup.local.dest import TEMP_SUFFIX, DestDir, UnsafeName, restored_mode

# RENAME_EXCHANGE swaps two names atomically: DEST/a is the real directory, then the symlink, then
# the real directory again, as fast as the machine allows. Each batch is an even number of swaps, so
# the tree is as it began whenever the swapper looks for its stop file.
SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b, stop = map(os.fsencode, sys.argv[1:4])
swaps = 0
print("ready", flush=True)
while not os.path.exists(stop):
    for _ in range(200):
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            raise OSError(ctypes.get_errno(), "renameat2")
        swaps += 1
print(swaps, flush=True)
"""


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.splitlines()[-1])


def upload(blob_service, container: str, blobs: dict[str, bytes], modes: dict[str, str] | None = None) -> None:
    client = blob_service.get_container_client(container)
    client.create_container()
    for name, data in blobs.items():
        meta = {"mode": modes[name]} if modes and name in modes else None
        client.upload_blob(name, data, metadata=meta)


def start_swapper(dest: Path, stop: Path) -> subprocess.Popen:
    """Swap DEST/a and DEST/evil without pause, as a process without root's override, until *stop* exists."""
    swapper = subprocess.Popen([*without_root_powers(), sys.executable, "-c", SWAPPER, str(dest / "a"),
                                str(dest / "evil"), str(stop)], stdout=subprocess.PIPE, text=True)
    assert swapper.stdout.readline() == "ready\n"
    return swapper


def stop_swapper(swapper: subprocess.Popen, stop: Path) -> int:
    stop.touch()
    out, _ = swapper.communicate(timeout=60)
    assert swapper.returncode == 0
    return int(out.split()[-1])


def racing_dest(tmp_path: Path) -> tuple[Path, Path]:
    """(DEST with a real directory a/ and a symlink evil -> a 0700 directory outside, that directory)."""
    protected = tmp_path / "protected"
    protected.mkdir(mode=0o700)
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "evil").symlink_to(protected)
    return dest, protected


@pytest.mark.processes
def test_directory_swapped_for_a_symlink_while_files_are_written_never_gets_one(tmp_path):
    dest, protected = racing_dest(tmp_path)
    target = DestDir(dest)
    written, refused = [], 0
    swapper = start_swapper(dest, tmp_path / "stop")
    try:
        for i in range(10000):
            try:
                target.write(f"a/f{i:05d}.txt", write_bytes(b"x"))
                written.append(f"f{i:05d}.txt")
            except (ValueError, OSError):  # refused: a/ was the symlink when it was opened
                refused += 1
    finally:
        swaps = stop_swapper(swapper, tmp_path / "stop")
    assert list(protected.iterdir()) == []
    assert swaps > 0 and written and refused, (swaps, len(written), refused)
    assert sorted(p.name for p in (dest / "a").iterdir()) == written


def test_symlink_swapped_in_under_dest_during_restore_never_gets_a_file(tmp_path, cli, blob_service,
                                                                         container_name):
    blobs = {f"a/f{i:03d}.txt": f"file {i}\n".encode() for i in range(300)}
    upload(blob_service, container_name, blobs)
    dest, protected = racing_dest(tmp_path)
    swapper = start_swapper(dest, tmp_path / "stop")
    try:
        result = cli("restore", "--container", container_name, dest, "--json")
    finally:
        swaps = stop_swapper(swapper, tmp_path / "stop")
    assert swaps > 0
    assert list(protected.iterdir()) == []
    assert (dest / "evil").is_symlink() and not (dest / "a").is_symlink()
    assert result.returncode in (0, 1), result.stderr
    summary = summary_of(result)
    restored = {f"a/{p.name}": p.read_bytes() for p in (dest / "a").iterdir()}
    assert summary["files_restored"] == len(restored)
    assert summary["files_restored"] + summary["files_failed"] == len(blobs)
    assert all(blobs[name] == data for name, data in restored.items())
    assert all("symlinks in the destination are not followed" in f["error"] for f in summary["failures"])


def write_bytes(data: bytes):
    """A DestDir fill that writes *data*, mode 0644, no mtime."""

    def fill(fd: int) -> tuple[int, None]:
        os.write(fd, data)
        return 0o644, None

    return fill


def test_a_users_file_at_the_old_temporary_name_survives(tmp_path, cli, blob_service, container_name):
    upload(blob_service, container_name, {"site/index.html": b"restored"})
    dest = tmp_path / "dest"
    (dest / "site").mkdir(parents=True)
    mine = dest / "site" / f".index.html{TEMP_SUFFIX}"
    mine.write_bytes(b"my own notes")
    result = cli("restore", "--container", container_name, dest, "--json")
    assert result.returncode == 0, result.stderr
    assert (dest / "site" / "index.html").read_bytes() == b"restored"
    assert mine.read_bytes() == b"my own notes"
    assert sorted(p.name for p in (dest / "site").iterdir()) == [mine.name, "index.html"]


def test_a_hard_link_planted_at_the_old_temporary_name_leaves_its_target_alone(tmp_path, cli, blob_service,
                                                                               container_name):
    upload(blob_service, container_name, {"index.html": b"restored"}, {"index.html": "0644"})
    outside = tmp_path / "outside.conf"
    outside.write_bytes(b"secret settings")
    outside.chmod(0o600)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.link(outside, dest / f".index.html{TEMP_SUFFIX}")
    result = cli("restore", "--container", container_name, dest, "--json")
    assert result.returncode == 0, result.stderr
    assert (dest / "index.html").read_bytes() == b"restored"
    assert outside.read_bytes() == b"secret settings"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_planted_hard_link_or_symlink_at_the_temporary_name_is_unlinked_never_written(tmp_path):
    outside = tmp_path / "outside.conf"
    outside.write_bytes(b"secret settings")
    outside.chmod(0o600)
    dest = tmp_path / "dest"
    dest.mkdir()
    tmp = _only_temp_name(tmp_path, "index.html")
    for plant in (os.link, os.symlink):
        plant(outside, dest / tmp)
        DestDir(dest, temp_tag="run1").write("index.html", write_bytes(b"restored"))
        assert (dest / "index.html").read_bytes() == b"restored"
        assert outside.read_bytes() == b"secret settings" and stat.S_IMODE(outside.stat().st_mode) == 0o600
        assert sorted(p.name for p in dest.iterdir()) == ["index.html"]
        (dest / "index.html").unlink()


def _only_temp_name(tmp_path: Path, name: str) -> str:
    """The temporary name DestDir(temp_tag="run1") uses for *name*, seen by failing a write midway."""
    probe = tmp_path / "probe"
    probe.mkdir()
    seen = []

    def fill(fd: int):
        seen.extend(p.name for p in probe.iterdir())
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        DestDir(probe, temp_tag="run1").write(name, fill)
    assert list(probe.iterdir()) == []  # removed on failure
    [tmp] = seen
    assert tmp.startswith(f".{name}.") and tmp.endswith(TEMP_SUFFIX)
    return tmp


def test_symlinked_dest_and_symlinked_parent_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(UnsafeName):
        DestDir(tmp_path / "link").write("f.txt", write_bytes(b"x"))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafeName):
        DestDir(dest).write("sub/f.txt", write_bytes(b"x"))
    with pytest.raises(UnsafeName):
        DestDir(dest).lstat("sub/f.txt")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(("umask", "expected"), [
    (0o022, {"w.txt": 0o755, "s.txt": 0o755, "bad.txt": 0o644, "g.txt": 0o640, "u.txt": 0o755, "none.txt": 0o644}),
    (0o077, {"w.txt": 0o700, "s.txt": 0o700, "bad.txt": 0o600, "g.txt": 0o600, "u.txt": 0o700, "none.txt": 0o600}),
])
def test_modes_from_blob_metadata_are_masked_and_invalid_ones_fall_back(tmp_path, cli, blob_service, container_name,
                                                                        umask, expected):
    modes = {"w.txt": "0777", "s.txt": "7777", "bad.txt": "0999", "g.txt": "0640", "u.txt": "4755"}
    upload(blob_service, container_name, {name: name.encode() for name in expected}, modes)
    dest = tmp_path / "dest"
    result = cli("restore", "--container", container_name, dest, "--json", umask=umask)
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["files_restored"] == len(expected)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == expected


def test_restored_mode_is_pure_masking():
    assert restored_mode("0640", 0o022) == 0o640
    assert restored_mode("7777", 0o022) == 0o755
    assert restored_mode("6755", 0) == 0o755
    assert restored_mode("0777", 0) == 0o777
    for bad in ("0999", "", None, "-1", "0o777", "12345", " 644", "0x1ff"):
        assert restored_mode(bad, 0o022) == 0o644

"""Reading local files for a backup: streamed MD5s and the one "unchanged since the scan" check.

A file is backed up as the version the scan saw (size and modification time): every reader checks
before and after, so a blob is never recorded with content other than what was hashed.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024


class FileChangedError(Exception):
    """The file's size or modification time moved while we were reading it."""

    def __init__(self, message: str = "changed during backup"):
        super().__init__(message)


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def b64(digest: bytes | bytearray | None) -> str | None:
    """An MD5 digest as Azure reports Content-MD5 (base64), or None."""
    return base64.b64encode(bytes(digest)).decode("ascii") if digest else None


def file_md5(path: Path | str) -> bytes:
    """MD5 of a file, streamed: never the whole file in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.digest()


def file_md5_b64(path: Path | str) -> str:
    return base64.b64encode(file_md5(path)).decode("ascii")


def fd_md5_b64(fd: int) -> str:
    """MD5 (base64) of everything in an open file, read from offset 0 without moving its position."""
    digest = hashlib.md5()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def check_unchanged(path: Path | str, size: int, mtime_ns: int) -> os.stat_result:
    """The file's stat if it still has *size* and *mtime_ns*; else FileChangedError."""
    st = os.stat(path)
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        raise FileChangedError()
    return st


def read_whole(path: Path | str) -> tuple[bytes, os.stat_result]:
    """A small file's bytes and the stat they belong to (checked unchanged after the read)."""
    st = os.stat(path)
    with open(path, "rb") as fh:
        data = fh.read()
    check_unchanged(path, st.st_size, st.st_mtime_ns)
    return data, st


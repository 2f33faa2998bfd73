"""Reading local files for a backup: opening them beneath the source root, streamed MD5s and the one
"unchanged since the scan" check.

A backup reads source files only through ``SourceTree.open``: by descriptor, beneath the run's source root,
never through a symlink that leads out of it, whatever path a page names. A file is backed up as the version
the scan saw (size and modification time): every reader checks its descriptor before and after, so a blob is
never recorded with content other than what was hashed.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

CHUNK = 1024 * 1024
# O_NONBLOCK: a FIFO swapped in for a file is refused (not a regular file) instead of blocking the open
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY


class FileChangedError(Exception):
    """The file's size or modification time moved while we were reading it."""

    def __init__(self, message: str = "changed during backup"):
        super().__init__(message)


class UnsafePath(OSError):
    """A source file a backup does not open: reached through a symlink it may not follow, or not a regular file.
    Its ``strerror`` is the file's one-line reason."""

    def __init__(self, reason: str):
        super().__init__(errno.ELOOP, reason)


class _Symlink(Exception):
    pass


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def inside(path: str, root: str) -> bool:
    """Whether *path* is *root* or beneath it (both absolute and normalized)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _open_at(name: str, dir_fd: int, flags: int) -> int:
    """``openat(dir_fd, name, flags)`` (flags hold O_NOFOLLOW); ``_Symlink`` when *name* is a symlink."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP for a file, ENOTDIR for a directory opened with O_NOFOLLOW through a symlink
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and \
                stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise _Symlink() from None
        raise


def _open_dirs(root_fd: int, dirs: list[str]) -> int:
    """The directory *dirs* (components) beneath *root_fd*, opened one component at a time following no symlink:
    a new descriptor, or *root_fd* itself for none; ``_Symlink`` when a component is one."""
    fd = root_fd
    try:
        for part in dirs:
            parent, fd = fd, _open_at(part, fd, _DIR_FLAGS)
            if parent != root_fd:
                os.close(parent)
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


class SourceTree:
    """A run's source root, opened once (at its first file) for the files a backup activity reads beneath it.

    ``open`` walks the relative path from the root's descriptor one component at a time with O_NOFOLLOW
    (O_DIRECTORY for directories), so no symlink planted in the tree after the scan is followed, and refuses
    anything but a regular file. With *follow_symlinks* (``--follow-symlinks``), a path that meets a symlink is
    opened as what it resolves to, only when that lies beneath the root's real path, by the same walk from the
    root's descriptor (a link swapped again meanwhile is refused); the readers' size and mtime checks on the
    descriptor then tell whether it is the file the scan saw. The root itself is the user's SOURCE and is
    opened as given (a symlink to it is followed).

    The last directory walked stays open: a page lists files in walk order, so most files of a page are
    opened with one ``openat`` from it.
    """

    def __init__(self, root: Path | str, follow_symlinks: bool = False):
        self.root = os.fspath(root)
        self.follow_symlinks = follow_symlinks
        self._root: int | None = None
        self._real = ""
        self._dir: tuple[str, int] | None = None  # the last directory walked: its relative path, its descriptor
        self._lock = threading.Lock()

    def _open_beneath(self, relpath: str) -> int:
        """*relpath* opened from the root following no symlink; ``_Symlink`` when a component is one."""
        *dirs, name = parts = relpath.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise UnsafePath("not a relative path beneath the source")
        reldir = relpath.rpartition("/")[0]
        with self._lock:
            if self._root is None:
                # opened at the first file, as a file is: a root that cannot be opened fails each file
                self._real = os.path.realpath(self.root)
                self._root = os.open(self.root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
            if self._dir is None or self._dir[0] != reldir:
                self._drop_dir()
                self._dir = (reldir, _open_dirs(self._root, dirs))
            return _open_at(name, self._dir[1], _FILE_FLAGS)

    def _drop_dir(self) -> None:
        if self._dir is not None and self._dir[1] != self._root:
            os.close(self._dir[1])
        self._dir = None

    def open(self, relpath: str) -> int:
        """A descriptor for reading the regular file *relpath* beneath the root; OSError (``UnsafePath`` for a
        symlink it may not follow or a file that is not regular) otherwise. The caller closes it."""
        try:
            fd = self._open_beneath(relpath)
        except _Symlink:
            if not self.follow_symlinks:
                raise UnsafePath("a symlink in its path (not followed)") from None
            real = os.path.realpath(os.path.join(self.root, relpath))
            if not inside(real, self._real):
                raise UnsafePath("symlink points outside the source") from None
            try:
                fd = self._open_beneath(os.path.relpath(real, self._real))
            except _Symlink:
                raise UnsafePath("a symlink in its path changed while it was opened") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath("not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def opened(self, relpath: str) -> Iterator[int]:
        fd = self.open(relpath)
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._drop_dir()
            if self._root is not None:
                os.close(self._root)
                self._root = None

    def __enter__(self) -> SourceTree:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def b64(digest: bytes | bytearray | None) -> str | None:
    """An MD5 digest as Azure reports Content-MD5 (base64), or None."""
    return base64.b64encode(bytes(digest)).decode("ascii") if digest else None


def file_md5(path: Path | str) -> bytes:
    """MD5 of a file named by a path the caller trusts, streamed: never the whole file in memory."""
    with open(path, "rb") as fh:
        return fd_md5(fh.fileno())


def file_md5_b64(path: Path | str) -> str:
    return base64.b64encode(file_md5(path)).decode("ascii")


def fd_md5(fd: int) -> bytes:
    """MD5 of everything in an open file, read from offset 0 without moving its position."""
    digest = hashlib.md5()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.digest()


def fd_md5_b64(fd: int) -> str:
    """MD5 (base64) of everything in an open file, as ``fd_md5``."""
    return base64.b64encode(fd_md5(fd)).decode("ascii")


def read_at(fd: int, length: int, offset: int) -> bytes:
    """*length* bytes of an open file from *offset* (fewer only at its end), without moving its position."""
    data = os.pread(fd, length, offset)
    while 0 < len(data) < length:  # a read returns at most about 2 GiB
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def check_unchanged(fd: int, size: int, mtime_ns: int) -> os.stat_result:
    """The open file's stat if it still has *size* and *mtime_ns*; else FileChangedError."""
    st = os.fstat(fd)
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        raise FileChangedError()
    return st


def read_whole(fd: int) -> tuple[bytes, os.stat_result]:
    """A small open file's bytes and the stat they belong to (checked unchanged after the read)."""
    st = os.fstat(fd)
    data = read_at(fd, st.st_size, 0)
    if len(data) != st.st_size:
        raise FileChangedError()
    check_unchanged(fd, st.st_size, st.st_mtime_ns)
    return data, st


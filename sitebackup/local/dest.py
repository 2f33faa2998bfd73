"""Writing restored files under a destination directory: names checked, temporaries, modes and mtimes.

Blob names are untrusted: ``safe_relpath`` refuses any name that could land outside the destination,
and ``DestDir`` creates directories without following symlinks. Each file is written to a temporary
name next to its target, checked, given its mode and modification time, then renamed into place, so
a killed restore never leaves a half file under the real name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from sitebackup.local.files import file_md5_b64

TEMP_SUFFIX = ".sitebackup-part"
DEFAULT_MODE = 0o644


class UnsafeName(ValueError):
    """A blob name that would be written outside the destination, or through a symlink."""


def safe_relpath(name: str) -> str:
    """Return *name* as a relative path if writing it under a destination cannot escape it."""
    if not name:
        raise UnsafeName("empty name")
    if "\x00" in name:
        raise UnsafeName("name contains NUL")
    if "\\" in name:
        raise UnsafeName("name contains a backslash")
    if name.startswith("/"):
        raise UnsafeName("absolute name (starts with '/')")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeName("name has an empty, '.' or '..' segment")
    return name


def restored_mode(value: str | None) -> int:
    """The permission bits for a restored file from its ``mode`` metadata (setuid/setgid never restored)."""
    return (int(value, 8) & 0o1777) if value and value.isdigit() else DEFAULT_MODE


class DestDir:
    """One restore destination; every path handed in is a checked relative path below it."""

    def __init__(self, root: str | Path):
        self.root = os.fspath(root)

    def _parent(self, relpath: str) -> str:
        """Create the parent directories of *relpath* without following symlinks."""
        current = self.root
        for part in relpath.split("/")[:-1]:
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                try:
                    os.mkdir(current, 0o755)
                except FileExistsError:  # a parallel batch made it first
                    pass
                st = os.lstat(current)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeName(f"{current!r} is not a directory (symlinks in the destination are not followed)")
        real_dest = os.path.realpath(self.root)
        real = os.path.realpath(current)
        if real != real_dest and not real.startswith(real_dest + os.sep):
            raise UnsafeName("resolves outside the destination")
        return current

    def lstat(self, relpath: str) -> os.stat_result | None:
        safe_relpath(relpath)
        try:
            return os.lstat(os.path.join(self._parent(relpath), relpath.rsplit("/", 1)[-1]))
        except FileNotFoundError:
            return None

    def md5_b64(self, relpath: str) -> str:
        return file_md5_b64(os.path.join(self.root, relpath))

    def write(self, relpath: str, fill: Callable[[int], tuple[int, int | None]]) -> None:
        """Write *relpath* atomically: *fill* writes the content into a temporary file's descriptor
        (open for reading too), raises if it is wrong, and returns the (mode, mtime_ns) to give it;
        then the temporary is renamed into place. On any failure the temporary is removed."""
        safe_relpath(relpath)
        parent = self._parent(relpath)
        base = relpath.rsplit("/", 1)[-1]
        tmp = _temp_name(parent, base)
        # O_NOFOLLOW: a symlink planted at the temporary name is refused, never written through
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                mode, mtime_ns = fill(fd)
                os.fchmod(fd, mode)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(parent, base))
        except BaseException:
            _unlink(tmp)
            raise


def _temp_name(parent: str, base: str) -> str:
    name = f".{base}{TEMP_SUFFIX}"
    if len(os.fsencode(name)) > 255:
        name = f".{hashlib.sha1(os.fsencode(base)).hexdigest()[:16]}{TEMP_SUFFIX}"
    return os.path.join(parent, name)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

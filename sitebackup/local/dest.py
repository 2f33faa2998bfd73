"""Writing restored files under a destination directory: names checked, directories walked by descriptor,
temporaries, modes and mtimes.

Blob names are untrusted, and so is DEST itself when another user owns it: they can swap any directory
under it for a symlink at any moment. So ``safe_relpath`` refuses any name that could land outside
DEST, and every directory is opened relative to its parent's descriptor with ``O_NOFOLLOW``, from DEST
down: a symlink met on the way fails the file, it is never followed, and there is no path to swap
between a check and a write. Each file is written to a temporary of its own, created with ``O_EXCL``
next to its target, checked, given its mode and modification time, then renamed into place relative to
the same descriptor, so a killed restore never leaves a half file under the real name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable

from sitebackup.local.files import fd_md5_b64

TEMP_SUFFIX = ".sitebackup-part"
DEFAULT_MODE = 0o644
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# never an existing file (O_EXCL), never through a symlink planted at the name
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OCTAL_MODE = re.compile(r"[0-7]{1,4}")
# a file's time is a signed 64-bit count of nanoseconds (st_mtime_ns): one outside cannot be given to a file
_MTIME_NS = range(-2**63, 2**63)


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


def mtime_in_range(mtime_ns: int | None) -> bool:
    """Whether an untrusted modification time (None: none recorded) can be given to a file as it is."""
    return mtime_ns is None or mtime_ns in _MTIME_NS


def restored_mode(value: str | None, umask: int) -> int:
    """The permission bits for a restored file from its untrusted ``mode`` metadata: the recorded bits
    less setuid, setgid and sticky, and never more than *umask* allows; DEFAULT_MODE (under the same
    umask) when the value is missing or not 1-4 octal digits."""
    mode = int(value, 8) if value and _OCTAL_MODE.fullmatch(value) else DEFAULT_MODE
    return mode & 0o777 & ~umask


def process_umask() -> int:
    """This process's umask, read without changing it: setting it, even for a moment, would apply to
    files other threads create meanwhile. Linux reports it in /proc; elsewhere it is set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DestDir:
    """One restore destination; every path handed in is a checked relative path below it.

    ``umask`` is the process's, read once: ``restored_mode`` masks modes with it.
    *temp_tag* names this restore's temporaries (``.NAME.TAG.sitebackup-part``): a restore killed and
    run again finds its own leftover under the same name and replaces it.
    """

    def __init__(self, root: str | os.PathLike[str], temp_tag: str = "restore"):
        self.root = os.fspath(root)
        self.temp_tag = temp_tag
        self.umask = process_umask()

    def _parent_fd(self, relpath: str, create: bool) -> int:
        """A descriptor of *relpath*'s parent directory, walked from DEST without following symlinks;
        missing directories are created when *create*, else FileNotFoundError."""
        fd = _open_dir(self.root, None)
        try:
            for part in safe_relpath(relpath).split("/")[:-1]:
                try:
                    child = _open_dir(part, fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:  # a parallel batch made it first
                        pass
                    child = _open_dir(part, fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, relpath: str) -> os.stat_result | None:
        try:
            parent = self._parent_fd(relpath, create=False)
        except FileNotFoundError:
            return None
        try:
            return os.stat(_base(relpath), dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(parent)

    def md5_b64(self, relpath: str) -> str:
        """The MD5 of the regular file at *relpath* (ValueError if it is anything else by now)."""
        parent = self._parent_fd(relpath, create=False)
        try:
            # O_NONBLOCK: a FIFO swapped in after the caller's lstat does not hang the open
            fd = os.open(_base(relpath), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("destination exists and is not a regular file")
            return fd_md5_b64(fd)
        finally:
            os.close(fd)

    def write(self, relpath: str, fill: Callable[[int], tuple[int, int | None]]) -> None:
        """Write *relpath* atomically: *fill* writes the content into a temporary file's descriptor
        (open for reading too), raises if it is wrong, and returns the (mode, mtime_ns) to give it;
        then the temporary is renamed into place. On any failure the temporary is removed."""
        parent = self._parent_fd(relpath, create=True)
        try:
            base = _base(relpath)
            tmp = _temp_name(base, self.temp_tag)
            fd = _create_temp(tmp, parent)
            try:
                try:
                    mode, mtime_ns = fill(fd)
                    os.fchmod(fd, mode)
                    if mtime_ns is not None:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
                os.rename(tmp, base, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                _unlink(tmp, parent)
                raise
        finally:
            os.close(parent)


def _open_dir(name: str, dir_fd: int | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise UnsafeName(f"{name!r} is not a directory (symlinks in the destination are not followed)") from None
        raise


def _base(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1]


def _temp_name(base: str, tag: str) -> str:
    tag = hashlib.sha1(tag.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = f".{base}.{tag}{TEMP_SUFFIX}"
    if len(os.fsencode(name)) > 255:
        name = f".{hashlib.sha1(os.fsencode(base)).hexdigest()[:16]}.{tag}{TEMP_SUFFIX}"
    return name


def _create_temp(name: str, parent: int) -> int:
    """Create the temporary *name* in *parent*, 0600. Whatever already holds the name is a leftover of
    this restore killed earlier, or was planted: it is unlinked, which never touches the file a hard
    link points to nor follows a symlink, and the name is created afresh, once more at most."""
    try:
        return os.open(name, _TEMP_FLAGS, 0o600, dir_fd=parent)
    except FileExistsError:
        os.unlink(name, dir_fd=parent)
    return os.open(name, _TEMP_FLAGS, 0o600, dir_fd=parent)


def _unlink(name: str, parent: int) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except OSError:
        pass

"""Writing a restored tree under a destination directory: names checked, directories walked by descriptor,
temporaries, modes, owners and mtimes; symlinks, hard links and directories' own metadata.

Blob names are untrusted, and so is DEST itself when another user owns it: they can swap any directory
under it for a symlink at any moment. So ``safe_relpath`` refuses any name that could land outside
DEST, and every directory is opened relative to its parent's descriptor with ``O_NOFOLLOW``, from DEST
down: a symlink met on the way fails the file, it is never followed, and there is no path to swap
between a check and a write. Each file is written to a temporary of its own, created with ``O_EXCL``
next to its target, checked, given its owner, mode and modification time, then renamed into place
relative to the same descriptor, so a killed restore never leaves a half file under the real name.

Symlinks and hard links are made the same way (a temporary of their own, renamed into place), and never
followed: a symlink is given its owner and mtime itself (``lchown``), a hard link gets nothing (it shares its
first member's inode, which the restore wrote and checked), and a directory's metadata goes to the
directory opened with ``O_NOFOLLOW``. Owners are the recorded names where this host has them, else the
recorded ids (as tar does), and only when the restore runs as root and was not told ``--no-owner``.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sitebackup.local.files import fd_md5_b64
from sitebackup.model.records import ROOT, Meta

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


class Conflict(ValueError):
    """Something else is at a name the restore would make a symlink or hard link of."""


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


def recorded_mode(mode: int, owned: bool) -> int:
    """The permission bits a restore gives what the record says has *mode*: exactly those, whatever the umask,
    but setuid, setgid and sticky only when the owner is restored too (*owned*)."""
    return mode if owned else mode & 0o777


class OwnerIds:
    """Recorded owners as this host's ids: by name where this host has the name, else the recorded id (as tar
    does), each name looked up once."""

    def __init__(self) -> None:
        self._users: dict[str, int | None] = {}
        self._groups: dict[str, int | None] = {}

    def of(self, meta: Meta) -> tuple[int, int] | None:
        """(uid, gid) for ``os.chown`` (-1: keep), or None when the record names no owner."""
        if meta.uid is None and meta.gid is None:
            return None
        uid = self._lookup(self._users, meta.user, _uid_of)
        gid = self._lookup(self._groups, meta.group, _gid_of)
        return (uid if uid is not None else _or_keep(meta.uid), gid if gid is not None else _or_keep(meta.gid))

    @staticmethod
    def _lookup(cache: dict[str, int | None], name: str | None, find: Callable[[str], int]) -> int | None:
        if name is None:
            return None
        if name not in cache:
            try:
                cache[name] = find(name)
            except (KeyError, ValueError):
                cache[name] = None
        return cache[name]


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _or_keep(value: int | None) -> int:
    return -1 if value is None else value


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
    *owners*: give what is written the owner the record names (``owner``); only root can.
    *dir_mode*: the mode of a directory created on the way to a file. 0700 while the record's own
    directory entries come last (``set_dir``): nothing is readable by others before its directory's mode is.
    """

    def __init__(self, root: str | os.PathLike[str], temp_tag: str = "restore", *, owners: bool = False,
                 dir_mode: int = 0o755):
        self.root = os.fspath(root)
        self.temp_tag = temp_tag
        self.umask = process_umask()
        self.owners = owners
        self.dir_mode = dir_mode
        self._ids = OwnerIds()

    def owner(self, meta: Meta | None) -> tuple[int, int] | None:
        """The (uid, gid) to give an entry with *meta*, or None: owners are not restored, or none is recorded."""
        return self._ids.of(meta) if self.owners and meta is not None else None

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
                        os.mkdir(part, self.dir_mode, dir_fd=fd)
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

    def write(self, relpath: str, fill: Callable[[int], tuple[int, int | None]],
              owner: tuple[int, int] | None = None) -> None:
        """Write *relpath* atomically: *fill* writes the content into a temporary file's descriptor
        (open for reading too), raises if it is wrong, and returns the (mode, mtime_ns) to give it;
        then the temporary is given *owner* (uid, gid), that mode and mtime, and renamed into place. On any
        failure the temporary is removed."""
        parent = self._parent_fd(relpath, create=True)
        try:
            base = _base(relpath)
            tmp = _temp_name(base, self.temp_tag)
            fd = _create_temp(tmp, parent)
            with _removed_on_failure(tmp, parent):
                try:
                    mode, mtime_ns = fill(fd)
                    if owner is not None:  # first: a change of owner clears setuid and setgid
                        os.fchown(fd, *owner)
                    os.fchmod(fd, mode)
                    if mtime_ns is not None:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
                os.rename(tmp, base, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)


    def set_dir(self, relpath: str, meta: Meta, mtime_ns: int) -> None:
        """Give the directory *relpath* (``ROOT``: DEST itself) its recorded owner, mode and mtime, creating it
        when missing; a directory's mtime last, after everything in it (the caller goes deepest first)."""
        if relpath == ROOT:
            fd = _open_dir(self.root, None)
        else:
            parent = self._parent_fd(relpath, create=True)
            try:
                base = _base(relpath)
                try:
                    fd = _open_dir(base, parent)
                except FileNotFoundError:
                    try:
                        os.mkdir(base, 0o700, dir_fd=parent)
                    except FileExistsError:
                        pass
                    fd = _open_dir(base, parent)
            finally:
                os.close(parent)
        try:
            owner = self.owner(meta)
            if owner is not None:
                os.fchown(fd, *owner)
            if meta.mode is not None:
                os.fchmod(fd, recorded_mode(meta.mode, owner is not None))
            if mtime_ns:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def symlink(self, relpath: str, target: bytes, meta: Meta, mtime_ns: int, overwrite: bool) -> None:
        """Make *relpath* a symlink to *target* (never followed: its owner and mtime are the link's own). The
        same link already there is left alone when it has them (its directory is not touched), else made again
        with them; anything else there is a ``Conflict`` unless *overwrite* (never a directory)."""
        parent = self._parent_fd(relpath, create=True)
        try:
            base = _base(relpath)
            owner = self.owner(meta)
            existing = _lstat_at(base, parent)
            if existing is not None and stat.S_ISLNK(existing.st_mode) and \
                    os.readlink(base, dir_fd=parent) == os.fsdecode(target):
                if (not mtime_ns or existing.st_mtime_ns == mtime_ns) and \
                        (owner is None or (existing.st_uid, existing.st_gid) == owner):
                    return
            elif existing is not None:
                if stat.S_ISDIR(existing.st_mode):
                    raise Conflict("destination exists and is a directory")
                if not overwrite:
                    raise Conflict("destination exists and differs (use --overwrite)")
            tmp = _temp_name(base, self.temp_tag)
            _unlink(tmp, parent)
            os.symlink(target, tmp, dir_fd=parent)
            with _removed_on_failure(tmp, parent):
                if owner is not None:
                    os.chown(tmp, *owner, dir_fd=parent, follow_symlinks=False)
                if mtime_ns:
                    os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
                os.rename(tmp, base, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)

    def hard_link(self, relpath: str, first: str, size: int, md5: str | None, overwrite: bool) -> str | None:
        """Make *relpath* a hard link to the regular file *first* (the first member of its group), only when that
        holds the recorded content (*size*, *md5*): "restored", or "skipped" when *relpath* is that file already
        or, unless *overwrite*, a file of the same content. None when *first* is not such a file (the caller
        restores *relpath* from its own copy). Something else at *relpath* is a ``Conflict`` unless *overwrite*.
        Nothing is given to the link: it is *first*'s inode."""
        try:
            src_parent = self._parent_fd(first, create=False)
        except (FileNotFoundError, UnsafeName):
            return None
        try:
            try:
                fd = os.open(_base(first), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=src_parent)
            except OSError:
                return None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size or md5 is None or fd_md5_b64(fd) != md5:
                    return None
                return self._link_to(relpath, _base(first), src_parent, st, md5, overwrite)
            finally:
                os.close(fd)
        finally:
            os.close(src_parent)

    def _link_to(self, relpath: str, name: str, src_parent: int, st: os.stat_result, md5: str,
                 overwrite: bool) -> str:
        """Link *name* in *src_parent*, the file *st* was taken of, as *relpath*: through a temporary checked to
        be that very inode (a name swapped meanwhile is never linked into place)."""
        parent = self._parent_fd(relpath, create=True)
        try:
            base = _base(relpath)
            existing = _lstat_at(base, parent)
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                    return "skipped"
                if stat.S_ISDIR(existing.st_mode):
                    raise Conflict("destination exists and is a directory")
                if not overwrite:
                    if stat.S_ISREG(existing.st_mode) and existing.st_size == st.st_size and \
                            self.md5_b64(relpath) == md5:
                        return "skipped"  # an identical file, as a batch skips one; --overwrite links it
                    raise Conflict("destination exists and differs (use --overwrite)")
            tmp = _temp_name(base, self.temp_tag)
            _unlink(tmp, parent)
            os.link(name, tmp, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
            with _removed_on_failure(tmp, parent):
                linked = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
                if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):
                    raise Conflict("the first file of its hard link group changed while it was linked")
                os.rename(tmp, base, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)
        return "restored"


@contextmanager
def _removed_on_failure(tmp: str, parent: int) -> Iterator[None]:
    """A temporary in *parent* that is given its content and metadata and renamed into place goes away when any
    of that fails: nothing half-made is left beside the entry."""
    try:
        yield
    except BaseException:
        _unlink(tmp, parent)
        raise


def _lstat_at(name: str, parent: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


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

"""Whether another local user can replace a directory on the way to a file sitebackup writes (``--log-file``,
``--metrics-file``), as OpenSSH's ``safe_path`` asks of the files it reads.

Root often writes these from cron into shared places. The file itself is opened without following a symlink,
but the directories above it are walked by the kernel: whoever can rename one of them (or a symlink met on
the way) can swap it for a symlink to any directory, and root then writes there. So the path is walked one
entry at a time from ``/``, symlinks resolved as the kernel would, and each entry must sit in a directory only
root and this user can change: one owned by root or this user, not writable by group or others, unless it
is sticky (``/tmp``) and the entry is root's or this user's. The directory holding the file is not asked
this: the file's own checks (no symlink, one link) cover what is in it.
"""

from __future__ import annotations

import os
import stat

_MAX_SYMLINKS = 40  # as Linux's


def trusted_directory(directory: str | os.PathLike[str]) -> str:
    """*directory* (absolute) with its symlinks resolved, every entry on the way checked; ValueError naming the first
    one another user could replace, or a missing one. Writing through the returned path meets no symlink."""
    uid = os.geteuid()
    todo = [part for part in os.fspath(directory).split("/") if part]
    current, hops = "/", 0
    while todo:
        name = todo.pop(0)
        if name in (".", ".."):
            current = current if name == "." else os.path.dirname(current)
            continue
        entry = os.path.join(current, name)
        try:
            holder, st = os.stat(current), os.lstat(entry)
        except OSError as exc:
            raise ValueError(f"{entry}: {exc.strerror}") from None
        why = _replaceable(holder, st, uid)
        if why is not None:
            raise ValueError(f"{entry} can be replaced by another user: {current} {why}")
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise ValueError(f"{entry}: too many levels of symbolic links")
            target = os.readlink(entry)
            current = "/" if target.startswith("/") else current
            todo[:0] = [part for part in target.split("/") if part]
        elif stat.S_ISDIR(st.st_mode):
            current = entry
        else:
            raise ValueError(f"{entry} is not a directory")
    return current


def _replaceable(holder: os.stat_result, entry: os.stat_result, uid: int) -> str | None:
    """Why another user could rename or remove an entry (of owner *entry*) of directory *holder*, or None."""
    trusted = (0, uid)
    if holder.st_uid not in trusted:
        return f"belongs to uid {holder.st_uid}"
    if holder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if holder.st_mode & stat.S_ISVTX and entry.st_uid in trusted:
            return None  # sticky: only the entry's owner (or root) may rename it
        return f"is writable by other users (mode {stat.S_IMODE(holder.st_mode):04o})"
    return None

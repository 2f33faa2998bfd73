"""One run at a time per source and destination: an advisory file lock held by the hosting process (and one
per destination that a prune holds while it holds the job locks of the destination in the container).

The process that schedules or resumes a backup holds ``<state_dir>/locks/<key>.lock`` (flock) for
as long as it hosts the run; the kernel drops the lock when that process dies, however it dies, so
a second invocation can tell a live run (lock held: attach or exit 4) from an orphaned one (lock
free: resume it).

Each holding writes a fresh random token into the lock file and keeps the one it found there (the holding
before, which has ended): the job lock in the container (``blob.lock``) records its holder's token, so the
next holder of this run lock knows a job lock held under the previous token for a dead process's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path


def lock_key(source: str, container: str, prefix: str) -> str:
    # what "the same backup" means everywhere (BackupInput.same_backup)
    ident = json.dumps([source, container, prefix or ""])
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:24]


class RunLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.token = ""  # names this holding of the lock ("" when it could not be written)
        self.previous = ""  # the token of the holding before this one, which has ended

    @classmethod
    def for_backup(cls, state_dir: Path, source: str, container: str, prefix: str) -> "RunLock":
        return cls(state_dir / "locks" / f"{lock_key(source, container, prefix)}.lock")

    @classmethod
    def for_prune(cls, state_dir: Path, container: str, prefix: str) -> "RunLock":
        return cls(state_dir / "locks" / f"prune-{lock_key('', container, prefix)}.lock")

    def try_acquire(self) -> bool:
        """Take the lock without waiting; True if this process holds it now."""
        if self.fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self._name_holding(fd)
        return True

    def _name_holding(self, fd: int) -> None:
        try:
            self.previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            token = secrets.token_hex(16)
            os.ftruncate(fd, 0)
            os.pwrite(fd, token.encode("ascii"), 0)
            self.token = token
        except OSError:  # a state directory that takes no write: the job lock of a dead holder lapses instead
            self.token = ""

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

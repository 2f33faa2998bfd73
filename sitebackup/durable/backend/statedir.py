"""The state directory on disk: who may own it, the modes of its files, creating and opening the
database, telling a damaged database apart, the lock that keeps ``sitebackup serve`` apart from
other backends, stale sockets, and the secret ``serve`` requires.

Everything under the state directory is trusted (the database holds the runs a worker executes),
so a directory or database another user owns or may write is refused, never used. Once the
directory is ours and nobody else may write it, nobody else can swap the entries checked here.
Files are created owner-only (0600) whatever the umask; SQLite gives the ``-wal`` and ``-shm``
files the database's mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from sitebackup.errors import InputError, StateFullError, full_disk

DB_NAME = "state.db"
SERVE_LOCK = "serve.lock"
TOKEN_FILE = "serve.token"
HINT = "use --state-dir to choose another location"
MIN_TOKEN = 16  # characters of a serve token: a secret nobody guesses
_NOT_OTHERS = 0o022  # group/other write bits: refused
_OWNER_ONLY = 0o077  # group/other bits: removed from our own files


class StateDirError(InputError):
    """The state directory or its database cannot be used (exit 2, one line naming the path)."""


def is_corrupt(ex: BaseException) -> bool:
    """A damaged database or a file that is not one, as opposed to a busy, full or read-only one."""
    if not isinstance(ex, sqlite3.DatabaseError):
        return False
    code = getattr(ex, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(ex)
    return "malformed" in text or "not a database" in text


def corrupt_error(db_path: Path, reason: str) -> StateDirError:
    return StateDirError(f"state database {db_path} is corrupt or not a SQLite database ({reason}); "
                         f"it was left untouched: move it aside or {HINT}")


class Damage:
    """The first sign of a damaged database, kept so every later request fails the same way at once."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.message: str | None = None

    def note(self, ex: BaseException) -> str:
        if self.message is None:
            self.message = str(corrupt_error(self.db_path, str(ex)))
        return self.message


def _refuse(path: Path, what: str, st: os.stat_result) -> None:
    """Raise unless *path* is ours and nobody else may write it."""
    if st.st_uid != os.geteuid():
        raise StateDirError(f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): "
                            f"refusing to use it; {HINT}")
    if st.st_mode & _NOT_OTHERS:
        raise StateDirError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                            f"refusing to use it; chmod go-w it or {HINT}")


def full_error(state_dir: Path, ex: BaseException) -> StateFullError | None:
    """The error of a state directory whose disk is full (exit 5, as when it fills during a run), else None."""
    cause = full_disk(ex)
    return None if cause is None else StateFullError(state_dir, cause, kept="nothing was changed",
                                                     hint=f" or {HINT}")


def prepare(state_dir: Path) -> None:
    """Create the state directory owner-only if missing; refuse one that is not ours alone."""
    try:
        if not state_dir.exists():
            state_dir.mkdir(parents=True, mode=0o700)
            os.chmod(state_dir, 0o700)
        st = os.stat(state_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"not a directory: {state_dir}")
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
        _refuse(state_dir, "state directory", st)
    except OSError as ex:
        raise full_error(state_dir, ex) or \
            StateDirError(f"cannot use state directory {state_dir}: {ex.strerror or ex}; {HINT}") from None


def database(state_dir: Path, schema: str) -> Path:
    """The path of ``state.db`` in a prepared *state_dir*, checked; created with *schema* if missing.
    An empty, foreign or group/other-writable database file is refused."""
    db_path = state_dir / DB_NAME
    try:
        _create(db_path, schema)
        for suffix in ("", "-wal", "-shm"):
            path = state_dir / (DB_NAME + suffix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StateDirError(f"state database file {path} is not a regular file: refusing to use it; {HINT}")
            _refuse(path, "state database file", st)
            if st.st_mode & _OWNER_ONLY:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~_OWNER_ONLY)
            if suffix == "" and st.st_size == 0:
                raise corrupt_error(db_path, "the file is empty")
    except (OSError, sqlite3.Error) as ex:  # e.g. a full disk while creating it
        raise full_error(state_dir, ex) or StateDirError(
            f"cannot use state database {db_path}: {getattr(ex, 'strerror', None) or ex}; {HINT}") from None
    return db_path


def _create(db_path: Path, schema: str) -> None:
    """Create the database unless it exists, atomically: it is never seen empty, so an empty one
    is damage, not a fresh start."""
    if os.path.lexists(db_path):
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{DB_NAME}.", dir=db_path.parent)  # 0600
    os.close(fd)
    try:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # one transaction: a statement each would cost a journal and its fsyncs apiece
            db.executescript(f"BEGIN;\n{schema}\nCOMMIT;")
        finally:
            db.close()
        with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
            os.link(tmp, db_path)
    finally:
        os.unlink(tmp)


class ServeLock:
    """``<state_dir>/serve.lock``: ``sitebackup serve`` holds it exclusively, every in-process backend
    shared. Their workers must not meet in one database: they would take each other's work items
    with the wrong work store."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / SERVE_LOCK
        self.fd: int | None = None

    def acquire(self, exclusive: bool) -> None:
        """Shared for an in-process backend, exclusive for serve."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as ex:
            raise full_error(self.path.parent, ex) or \
                StateDirError(f"cannot use state directory {self.path.parent}: {ex.strerror or ex}; {HINT}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            state_dir = self.path.parent
            if exclusive:
                raise StateDirError(f"state directory {state_dir} is in use by another sitebackup process; "
                                    f"serve needs one of its own: {HINT}") from None
            raise StateDirError(f"state directory {state_dir} is served by `sitebackup serve`"
                                f"{f' ({holder})' if holder else ''}: reach it with --taskhub, or {HINT}") from None
        self.fd = fd

    def record(self, holder: str) -> None:
        """Say who serves (for the message the others get); only the exclusive holder writes."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder.encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None


def remove_stale_sockets(sock_dir: Path, alive: Callable[[int], bool]) -> int:
    """Remove ``PID-*.sock`` files of processes that are gone (SIGKILLed backends leave them)."""
    removed = 0
    try:
        entries = list(os.scandir(sock_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        pid, sep, _ = entry.name.partition("-")
        if sep and pid.isdigit() and entry.name.endswith(".sock") and not alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def serve_token(state_dir: Path) -> tuple[Path, str]:
    """``<state_dir>/serve.token`` and the secret in it, which serve's clients must present: created
    0600 once and kept across restarts (so running workers keep working); delete it for a new one."""
    path = state_dir / TOKEN_FILE
    with contextlib.suppress(FileExistsError):
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    try:
        with open(path, encoding="utf-8", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as fh:
            st = os.fstat(fh.fileno())
            token = fh.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        st, token = None, ""
    if (st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & _OWNER_ONLY
            or len(token) < MIN_TOKEN):
        raise StateDirError(f"token file {path} must be a regular file only this user can read, holding a "
                            f"token of at least {MIN_TOKEN} characters: delete it to get a new one")
    return path, token

"""The job lock in the destination container: backups and prunes of one job never interleave, whatever
host or state directory they run from.

A lock is the blob ``.sitebackup/locks/<job id>`` held through a blob lease: a fixed lease of
``LEASE_SECONDS`` taken when the lock is acquired, renewed every third of that by a daemon thread while it
is held, released at the end. A holder that dies (SIGKILL, a lost machine) stops renewing and its lease
lapses within a lease's time; the service refuses a second lease meanwhile (a backup run again from the
dead one's state directory need not wait: see ``Claim``). A holder that could not renew for a lease's time
(suspended, cut off) may find its lease taken by another process: its next renewal says so, and
``check()``, which the holder calls between steps, then raises ``LockLost``, so it stops changing the
container. A destination out of reach is not a lost lock: the run rides it out or parks as it would.

The lock blob's metadata names the holder (host, pid, command, since, run, claim), for the message of a
process that is refused. The job's descriptor (``blob.records``) is written before its lock blob is first created,
so a prune that lists the jobs of a prefix finds every job that has ever held a lock there. Runs under a
prefix that no job names (runs of an earlier version) are locked under a name made from the prefix.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobLeaseClient, ContainerClient

from sitebackup.blob.clients import StorageSettings, endpoint_label, service_client
from sitebackup.blob.errors import classify, one_line
from sitebackup.blob.naming import RESERVED_PREFIX, overlaps
from sitebackup.blob.records import ContainerRecords
from sitebackup.errors import DestinationError, InputError, LockedError, LockLost
from sitebackup.model.records import Job

LOCKS = RESERVED_PREFIX + "locks/"
LEASE_SECONDS = 60  # the longest fixed lease Azure grants
MIN_LEASE_SECONDS = 15  # the shortest
# for tests only: a shorter lease, so that a killed holder's lock lapses sooner
ENV_LEASE_SECONDS = "SITEBACKUP_LOCK_LEASE_SECONDS"
POLL_SECONDS = 5.0  # a process waiting for a lock (--lock-wait, a watcher taking a run over) asks this often
# for tests only: a shorter interval, so that a waiting process notices a released lock sooner
ENV_POLL_SECONDS = "SITEBACKUP_LOCK_POLL_SECONDS"
MAX_FIELD = 200  # characters kept of each holder field read back: metadata another process wrote


def lease_seconds() -> int:
    value = os.environ.get(ENV_LEASE_SECONDS, "").strip()
    if not value:
        return LEASE_SECONDS
    if not value.isdigit() or not MIN_LEASE_SECONDS <= int(value) <= LEASE_SECONDS:
        raise InputError(f"{ENV_LEASE_SECONDS} must be a whole number of seconds from {MIN_LEASE_SECONDS} to "
                         f"{LEASE_SECONDS}, not {value!r}")
    return int(value)


def poll_seconds() -> float:
    value = os.environ.get(ENV_POLL_SECONDS, "").strip()
    if not value:
        return POLL_SECONDS
    if not value.isdigit() or not 1 <= int(value) <= POLL_SECONDS:
        raise InputError(f"{ENV_POLL_SECONDS} must be a whole number of seconds from 1 to {POLL_SECONDS:.0f}, "
                         f"not {value!r}")
    return float(value)


def host_name() -> str:
    """This host's short name."""
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (or held it last), as its metadata names them."""

    host: str
    pid: int
    command: str  # backup or prune
    since: str  # ISO 8601, UTC
    run: str = ""  # the run a backup hosts
    claim: str = ""  # ``Claim.token`` of the holder

    @classmethod
    def here(cls, command: str, run: str = "", claim: str = "") -> Holder:
        return cls(host=host_name(), pid=os.getpid(), command=command,
                   since=datetime.now(timezone.utc).isoformat(timespec="seconds"), run=run, claim=claim)

    def metadata(self) -> dict[str, str]:
        values = {"host": self.host, "pid": str(self.pid), "command": self.command, "since": self.since,
                  "run": self.run, "claim": self.claim}
        # metadata travels in HTTP headers: ASCII only
        return {key: value.encode("ascii", "backslashreplace").decode("ascii") for key, value in values.items()
                if value}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Holder | None:
        """The holder a lock blob's metadata names; None when it names none (the blob was never held)."""
        fields = {key.lower(): str(value)[:MAX_FIELD] for key, value in metadata.items()}
        if not fields.get("pid", "").isdigit():
            return None
        return cls(host=fields.get("host", "?"), pid=int(fields["pid"]), command=fields.get("command", "?"),
                   since=fields.get("since", "?"), run=fields.get("run", ""), claim=fields.get("claim", ""))

    def __str__(self) -> str:
        run = f", run {self.run}" if self.run else ""
        return f"{self.command} (pid {self.pid} on {self.host}, since {self.since}{run})"


@dataclass(frozen=True)
class Claim:
    """What ties a job lock to a run lock of the holder's state directory (``durable.runlock``), which the holder
    holds for as long as it holds the job lock: ``token`` names this process's holding of the run lock,
    ``ended`` the holding before it. That one has ended (this process holds the run lock now), so a job lock
    still held under its token is a dead process's: it is broken at once instead of lapsing, and a killed
    backup or prune run again from its state directory goes on without waiting."""

    token: str = ""
    ended: str = ""


def describe(holder: Holder | None) -> str:
    return str(holder) if holder is not None else "a process that has not named itself yet"


def prefix_lock(prefix: str) -> str:
    """The name of the lock of runs under *prefix* that no job names."""
    return "prefix-" + hashlib.sha256(f"prefix\0{prefix}".encode("utf-8", "surrogateescape")).hexdigest()[:32]


def locks_for_prefix(jobs: Iterable[Job], prefix: str) -> dict[str, str]:
    """The locks a change to the runs under *prefix* holds (name -> what it locks): every job whose prefix can
    share blob names with it, or, when no job does, the prefix's own."""
    found = {job.id: f"job {job.name}" for job in jobs if overlaps(prefix, job.prefix)}
    return found or {prefix_lock(prefix): f"prefix {prefix!r}"}


class JobLock:
    """One lock blob of a container, taken by this process through a lease it renews while it holds it."""

    def __init__(self, container: ContainerClient, name: str, label: str, command: str, job: Job | None = None):
        self.container = container
        self.blob = container.get_blob_client(LOCKS + name)
        self.name = name
        self.label = label  # what it locks, for messages: "job web01:/srv/site"
        self.command = command
        self.job = job  # its descriptor, written before the lock blob is first created
        self.lease_seconds = lease_seconds()
        self.other: Holder | None = None  # who held it when this process was last refused
        self._lease: BlobLeaseClient | None = None
        self._stop = threading.Event()
        self._renewing = threading.Lock()  # a renewal and the release never cross
        self._lost: str | None = None
        self._next_poll = 0.0
        self._naming: Future[None] | None = None  # the holder's name being written (``try_acquire``)

    @property
    def held(self) -> bool:
        return self._lease is not None

    def acquire(self, wait: timedelta | None = None, run: str = "", claim: Claim = Claim(), *,
                name_later: bool = False) -> None:
        """Take the lock; when another process holds it, ask again every ``poll_seconds()`` until *wait* has
        passed (None: not at all), then raise ``LockedError`` naming the holder. With *name_later*, see
        ``try_acquire``."""
        deadline = time.monotonic() + (wait.total_seconds() if wait else 0.0)
        while not self.try_acquire(run, claim, name_later=name_later):
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" (waited {wait})" if wait else ""
                raise LockedError(f"{self.label} is locked by {describe(self.other)}{waited}: a backup or prune "
                                  "of it is running (--lock-wait DURATION waits for it; a holder that died lets the "
                                  "lock lapse within a minute)")
            time.sleep(min(poll_seconds(), left))

    def poll(self, run: str = "", claim: Claim = Claim()) -> bool:
        """``try_acquire``, asking the service at most once every ``poll_seconds()``: for a loop that polls often."""
        if self.held:
            return True
        if time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + poll_seconds()
        return self.try_acquire(run, claim)

    def try_acquire(self, run: str = "", claim: Claim = Claim(), *, name_later: bool = False) -> bool:
        """Take the lock if no other process holds it (or a dead one: see ``Claim``); True if this process holds it
        now, else False with ``other`` naming the holder. The holder is named in the lock blob's metadata once the
        lease is taken; with *name_later*, on a thread, while the caller reads what it reads under the lock:
        ``named()`` waits for it, and the caller calls it before it changes anything."""
        if self.held:
            return True
        lease = BlobLeaseClient(self.blob)
        try:
            if not self._take(lease, claim):
                return False
        except AzureError as exc:
            raise self._error(exc) from None
        self._hold(lease)
        metadata = Holder.here(self.command, run, claim.token).metadata()
        naming: Future[None] = Future()
        if name_later:
            self._naming = naming
            threading.Thread(target=self._name, args=(lease, metadata, naming), name=f"lock {self.name} holder",
                             daemon=True).start()
            return True
        self._name(lease, metadata, naming)
        self._named(naming)
        return True

    def _name(self, lease: BlobLeaseClient, metadata: dict[str, str], naming: Future[None]) -> None:
        try:
            self.blob.set_blob_metadata(metadata, lease=lease)
            naming.set_result(None)
        except BaseException as exc:
            naming.set_exception(exc)

    def named(self) -> None:
        """Wait until the holder is named (``try_acquire`` with *name_later*); a failure to name it is a failure to
        take the lock: the lock is let go and the error raised."""
        naming, self._naming = self._naming, None
        if naming is not None:
            self._named(naming)

    def _named(self, naming: Future[None]) -> None:
        try:
            naming.result()
        except BaseException as exc:
            self.release()
            if isinstance(exc, AzureError):
                raise self._error(exc) from None
            raise

    def _take(self, lease: BlobLeaseClient, claim: Claim) -> bool:
        try:
            lease.acquire(lease_duration=self.lease_seconds)
            return True
        except (ResourceNotFoundError, ResourceExistsError) as exc:
            missing = isinstance(exc, ResourceNotFoundError)
        try:
            if missing:
                self._create()
                lease.acquire(lease_duration=self.lease_seconds)
                return True
            return self._take_from_the_dead(lease, claim)
        except ResourceExistsError:  # leased by another process meanwhile
            return False
        finally:
            # the SDK's errors keep their responses in reference cycles until the garbage collector runs, and a
            # Ctrl-C that lands in one of their finalizers then is lost (Python ignores what a finalizer raises):
            # collected now, not at some later point of the run
            gc.collect()

    def _take_from_the_dead(self, lease: BlobLeaseClient, claim: Claim) -> bool:
        """Refused: name the holder (``other``); take the lock all the same if the holder is dead (``Claim``)."""
        try:
            props = self.blob.get_blob_properties()
        except ResourceNotFoundError:
            self.other = None
            return False
        self.other = Holder.from_metadata(props.metadata or {})
        if not claim.ended or self.other is None or self.other.claim != claim.ended:
            return False
        try:  # unless another process took it since it was read
            BlobLeaseClient(self.blob).break_lease(lease_break_period=0, etag=props.etag,
                                                   match_condition=MatchConditions.IfNotModified)
            lease.acquire(lease_duration=self.lease_seconds)
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                return False
            raise
        return True

    def lost(self) -> str | None:
        """Why this process can no longer count on the lock it took, else None."""
        if not self.held or self._lost is None:
            return None
        return f"its lease lapsed and was taken, or was broken ({self._lost})"

    def check(self) -> None:
        """Raise ``LockLost`` once the lock this process took is no longer its own: called between steps."""
        reason = self.lost()
        if reason is not None:
            raise LockLost(f"lost the lock of {self.label}: {reason}; stopped before changing the container "
                           "further: run the same command again")

    def release(self) -> None:
        """Let the lock go (a lease that cannot be released lapses by itself)."""
        self._stop.set()
        lease, self._lease = self._lease, None
        if lease is None:
            return
        with self._renewing, contextlib.suppress(Exception):
            lease.release()

    def _hold(self, lease: BlobLeaseClient) -> None:
        self._lease, self._lost = lease, None
        self._stop = stop = threading.Event()
        threading.Thread(target=self._renew, args=(lease, stop), name=f"lock {self.name}", daemon=True).start()

    def _renew(self, lease: BlobLeaseClient, stop: threading.Event) -> None:
        """Renew every third of the lease; after a failed attempt (the service out of reach) sooner. A lease
        that lapsed meanwhile renews as long as nobody leased the blob since: the service's answer, once it
        comes, says whether this process still held the lock all along."""
        interval = self.lease_seconds / 3
        while not stop.wait(interval):
            try:
                with self._renewing:
                    if stop.is_set():
                        return
                    lease.renew()
                interval = self.lease_seconds / 3
            except (ResourceExistsError, ResourceNotFoundError) as exc:
                # leased again by another process after ours lapsed, broken, or removed after it lapsed
                self._lost = one_line(exc)
                return
            except Exception:  # not reached: ask again soon
                interval = POLL_SECONDS

    def _create(self) -> None:
        """The lock blob, empty; the job's descriptor first."""
        if self.job is not None:
            ContainerRecords(self.container).put_job(self.job)
        with contextlib.suppress(ResourceExistsError):  # created meanwhile by another process
            self.container.upload_blob(self.blob.blob_name, b"", overwrite=False)

    def _error(self, exc: AzureError) -> DestinationError:
        label = endpoint_label(self.container)
        return classify(exc, label) or DestinationError(f"cannot take the lock of {self.label} at {label}: "
                                                        f"{one_line(exc)}")


@contextmanager
def lock_client(settings: StorageSettings, container: str) -> Iterator[ContainerClient]:
    """A client of *container* for its locks: quick to give up (a lock request waits on nobody, and a renewal
    that fails is tried again at the next), closed after."""
    with service_client(settings, quick=True) as (service, _label):
        yield service.get_container_client(container)


@contextmanager
def job_lock(client: ContainerClient, job: Job, command: str) -> Iterator[JobLock]:
    """The lock of *job* in the container of *client* (a ``lock_client``), not taken yet (the caller takes it when
    it is going to change the container); released on the way out if taken."""
    lock = JobLock(client, job.id, f"job {job.name}", command, job=job)
    try:
        yield lock
    finally:
        lock.release()


def list_jobs(container: ContainerClient) -> list[Job]:
    """The jobs the container names (``blob.records``), or the one-line error of a destination that fails."""
    try:
        return ContainerRecords(container).jobs()
    except AzureError as exc:
        label = endpoint_label(container)
        raise classify(exc, label) or DestinationError(f"cannot list the jobs at {label}: {one_line(exc)}") from None


@dataclass(frozen=True)
class HeldLocks:
    """Locks one process holds together."""

    locks: list[JobLock]

    def check(self) -> None:
        for lock in self.locks:
            lock.check()


@contextmanager
def prefix_locks(settings: StorageSettings, container: str, prefix: str, command: str, wait: timedelta | None,
                 claim: Claim = Claim()) -> Iterator[HeldLocks]:
    """Hold every lock ``locks_for_prefix`` names for *prefix* while the block runs, waiting up to *wait* in all.

    The jobs are listed again once the locks are held, and the lock of a job that appeared meanwhile is taken
    too, so a job's backup that started between the listing and the locks is waited for or refused."""
    deadline = time.monotonic() + (wait.total_seconds() if wait else 0.0)
    with lock_client(settings, container) as client:
        held: dict[str, JobLock] = {}
        try:
            while wanted := {name: label for name, label in locks_for_prefix(list_jobs(client), prefix).items()
                             if name not in held}:
                for name, label in sorted(wanted.items()):  # one order for every process: no two wait on each other
                    lock = held[name] = JobLock(client, name, label, command)
                    left = deadline - time.monotonic()
                    lock.acquire(timedelta(seconds=left) if wait and left > 0 else None, claim=claim)
            yield HeldLocks(list(held.values()))
        finally:
            for lock in held.values():
                lock.release()


@dataclass(frozen=True)
class LockState:
    """A lock blob as ``remove_lapsed`` found it."""

    name: str
    label: str
    holder: Holder | None  # who holds it, or held it last
    live: bool  # its lease is held: it stays


def remove_lapsed(container: ContainerClient, chosen: Callable[[str], str | None]) -> list[LockState]:
    """Remove, from one listing, the lock blobs *chosen* whose lease has lapsed (*chosen* gives, by lock name,
    what the lock locks, or None for a lock to leave alone); the state of each chosen one. The service refuses
    to delete a blob under a live lease without its lease id, so a lock taken after the listing stays."""
    found = []
    for blob in container.list_blobs(name_starts_with=LOCKS, include=["metadata"]):
        label = chosen(blob.name[len(LOCKS):])
        if label is None:
            continue
        live = blob.lease.state in ("leased", "breaking")
        if not live:
            try:
                container.delete_blob(blob.name)
            except ResourceNotFoundError:  # removed meanwhile
                pass
            except HttpResponseError as exc:
                if exc.status_code != 412:  # LeaseIdMissing: leased since the listing
                    raise
                live = True
        found.append(LockState(name=blob.name[len(LOCKS):], label=label,
                               holder=Holder.from_metadata(blob.metadata or {}), live=live))
    return found

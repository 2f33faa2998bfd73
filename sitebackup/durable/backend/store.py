"""SQLite store of the embedded durabletask backend: schema, transactions, leases.

Owns every byte written to ``<state_dir>/state.db``. Each public mutating method is
one ``BEGIN IMMEDIATE`` transaction, so a SIGKILL at any instant leaves a database
the next process continues from. History events are stored as serialized protobuf.

Work items (orchestrator episodes and activities) are claimed with a lease: owner id,
expiry time and a per-row generation (``lease_token``) that is bumped on every claim.
The completion token handed to the worker carries that generation, so a completion
for a lease that was lost and re-claimed by someone else is rejected.

Every table carries a ``taskhub`` column: instances of different task hubs never see
each other.

A write that fails because the disk is full (or the database stopped taking writes) is
rolled back and reported once to ``on_fault``: nothing half-written stays, and the process
hosting the run can stop instead of retrying forever.

An orchestrator episode is applied whole or not at all: one thing in it this backend does not
support (an entity call, an action type newer than its protocol, ...) fails the orchestration
with a message naming it, whether or not the episode also completes; nothing is dropped silently.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterator
from urllib.parse import quote

import durabletask.internal.helpers as helpers
import durabletask.internal.orchestrator_service_pb2 as pb
from google.protobuf import timestamp_pb2, wrappers_pb2

from sitebackup.errors import write_fault

TERMINAL = (
    pb.ORCHESTRATION_STATUS_COMPLETED,
    pb.ORCHESTRATION_STATUS_FAILED,
    pb.ORCHESTRATION_STATUS_TERMINATED,
)
_TERMINAL_SQL = ",".join(str(s) for s in TERMINAL)
# What an orchestrator episode may ask for; anything else fails the orchestration (``unsupported``).
_SUPPORTED_ACTIONS = ("scheduleTask", "createTimer", "createSubOrchestration", "sendEvent", "completeOrchestration")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    taskhub TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    status INTEGER NOT NULL,
    input TEXT,
    output TEXT,
    custom_status TEXT,
    failure BLOB,
    tags TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    completed_at REAL,
    parent_instance_id TEXT,
    parent_task_id INTEGER,
    ready_at REAL NOT NULL DEFAULT 1e18,
    lease_owner TEXT,
    lease_expires REAL NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0,
    history_version INTEGER NOT NULL DEFAULT 0,
    history_len INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (taskhub, instance_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_ready ON instances (taskhub, ready_at);
CREATE INDEX IF NOT EXISTS instances_created ON instances (taskhub, created_at);
CREATE INDEX IF NOT EXISTS instances_completed ON instances (taskhub, completed_at);
CREATE INDEX IF NOT EXISTS instances_parent ON instances (taskhub, parent_instance_id);
CREATE INDEX IF NOT EXISTS instances_lease ON instances (lease_owner);

CREATE TABLE IF NOT EXISTS history (
    taskhub TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (taskhub, instance_id, seq)
) WITHOUT ROWID;

-- Events not yet in history: activity results, fired timers (visible_at = fire time),
-- external events, sub-orchestration results. dispatch_token marks the episode they went out in.
CREATE TABLE IF NOT EXISTS new_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    taskhub TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    visible_at REAL NOT NULL,
    kind TEXT NOT NULL,
    event BLOB NOT NULL,
    dispatch_token INTEGER
);
CREATE INDEX IF NOT EXISTS new_events_instance ON new_events (taskhub, instance_id, id);

CREATE TABLE IF NOT EXISTS activities (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    taskhub TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    input TEXT,
    lease_owner TEXT,
    lease_expires REAL NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS activities_claim ON activities (taskhub, lease_expires, id);
CREATE INDEX IF NOT EXISTS activities_instance ON activities (taskhub, instance_id);
CREATE INDEX IF NOT EXISTS activities_lease ON activities (lease_owner);

-- Live GetWorkItems streams, so `status` can tell whether any worker is attached.
CREATE TABLE IF NOT EXISTS streams (
    taskhub TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    PRIMARY KEY (taskhub, stream_id)
) WITHOUT ROWID;
"""


class AlreadyExists(Exception):
    """An instance with that id exists and the reuse policy does not allow replacing it."""


class NotFound(Exception):
    """No instance with that id."""


@dataclass
class InstanceRow:
    instance_id: str
    execution_id: str
    name: str
    version: str | None
    status: pb.OrchestrationStatus  # as stored: the enum's number
    input: str | None
    output: str | None
    custom_status: str | None
    failure: bytes | None
    tags: str | None
    created_at: float
    updated_at: float
    completed_at: float | None
    parent_instance_id: str | None

    def to_state(self, include_payloads: bool) -> pb.OrchestrationState:
        state = pb.OrchestrationState(
            instanceId=self.instance_id,
            name=self.name,
            orchestrationStatus=self.status,
            createdTimestamp=_ts(self.created_at),
            lastUpdatedTimestamp=_ts(self.updated_at),
            executionId=wrappers_pb2.StringValue(value=self.execution_id),
        )
        if self.version:
            state.version.value = self.version
        if self.completed_at is not None:
            state.completedTimestamp.CopyFrom(_ts(self.completed_at))
        if include_payloads and self.input:
            state.input.value = self.input
        if include_payloads and self.output:
            state.output.value = self.output
        if self.custom_status:
            state.customStatus.value = self.custom_status
        if self.failure:
            state.failureDetails.ParseFromString(self.failure)
        if self.parent_instance_id:
            state.parentInstanceId.value = self.parent_instance_id
        if self.tags:
            state.tags.update(json.loads(self.tags))
        return state


_INSTANCE_COLS = ("instance_id, execution_id, name, version, status, input, output, custom_status, "
                  "failure, tags, created_at, updated_at, completed_at, parent_instance_id")


def unsupported(response: pb.OrchestratorResponse) -> list[str]:
    """What *response* asks for that this backend cannot carry out, each named once: an action type it
    does not implement (entity calls, signals and locks; terminate; rewind), an action of a type newer
    than its protocol, or a response cut into chunks (it applies a response whole)."""
    names: list[str] = []
    for action in response.actions:
        which = action.WhichOneof("orchestratorActionType")
        if which is None:
            names.append(f"an action of a type unknown to this backend (id {action.id})")
        elif which == "sendEntityMessage":
            names.append(f"sendEntityMessage ({action.sendEntityMessage.WhichOneof('EntityMessageType')})")
        elif which not in _SUPPORTED_ACTIONS:
            names.append(which)
    if response.isPartial:
        names.append("a partial (chunked) orchestrator response")
    return list(dict.fromkeys(names))


def _not_supported(names: list[str]) -> pb.OrchestratorAction:
    """The action that fails an orchestration which asked for *names*."""
    return pb.OrchestratorAction(id=-1, completeOrchestration=pb.CompleteOrchestrationAction(
        orchestrationStatus=pb.ORCHESTRATION_STATUS_FAILED,
        failureDetails=pb.TaskFailureDetails(
            errorType="NotSupportedError", isNonRetriable=True,
            errorMessage=f"not supported by the sitebackup embedded backend: {', '.join(names)}; "
                         "none of this step's actions was carried out")))


@dataclass
class _Inflight:
    """What went out in one orchestrator episode, kept until its completion arrives."""
    owner: str  # whose lease the episode went out under: releasing another owner's leases keeps it
    prefix: bytes | None  # an orchestratorStarted we generated for this episode
    blobs: list[bytes]
    kinds: list[str]
    events: list[pb.HistoryEvent]
    history_version: int


@dataclass
class OrchestratorClaim:
    token: str
    request: pb.OrchestratorRequest


@dataclass
class ActivityClaim:
    token: str
    request: pb.ActivityRequest


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _now_event_ts(ev: pb.HistoryEvent, now: float) -> pb.HistoryEvent:
    ev.timestamp.FromNanoseconds(int(now * 1e9))
    return ev


def _only(instances: Collection[str] | None) -> tuple[str, list[str]]:
    """The SQL condition (and its values) that keeps a claim to *instances*; none when None."""
    if instances is None:
        return "", []
    ids = sorted(instances)
    return f" AND instance_id IN ({','.join('?' * len(ids))})", ids


def orchestration_token(instance_id: str, generation: int) -> str:
    return f"o|{generation}|{instance_id}"


def activity_token(row_id: int, generation: int) -> str:
    return f"a|{generation}|{row_id}"


def parse_token(token: str) -> tuple[str, int, str] | None:
    parts = token.split("|", 2)
    if len(parts) != 3 or parts[0] not in ("o", "a"):
        return None
    try:
        return parts[0], int(parts[1]), parts[2]
    except ValueError:
        return None


class Store:
    """One SQLite connection guarded by a lock; notifies ``changed`` after every commit."""

    def __init__(self, path: Path, on_fault: Callable[[str], None] = lambda reason: None):
        self.path = path
        self.on_fault = on_fault
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.RLock()
        self.changed = threading.Condition()
        self.generation = 0  # bumped after each commit; lets waiters detect missed notifications
        # Bumped (in memory) whenever an instance's status may have changed, so local waiters
        # re-read only the instances that changed instead of on every commit.
        self.touched: dict[tuple[str, str], int] = {}
        self._inflight: dict[tuple[str, str, int], _Inflight] = {}
        self._history_cache: OrderedDict[tuple[str, str], tuple[int, list[pb.HistoryEvent]]] = OrderedDict()
        try:
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._db.execute("SELECT count(*) FROM instances").fetchone()
        except Exception:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- plumbing -------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                # a COMMIT that failed (disk full) may leave the transaction open: end it, or every later
                # BEGIN fails and the write lock stays held against the other processes
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._history_cache.clear()  # it may hold events of the episode just rolled back
                reason = write_fault(exc)
                if reason is not None:
                    self.on_fault(reason)
                raise
        self.notify()

    def notify(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def _add_events(self, db: sqlite3.Connection, hub: str,
                    rows: list[tuple[str, float, pb.HistoryEvent]], now: float) -> None:
        """Queue new events (instance_id, visible_at, event) and make their instances ready."""
        if not rows:
            return
        db.executemany(
            "INSERT INTO new_events (taskhub, instance_id, visible_at, kind, event) VALUES (?,?,?,?,?)",
            [(hub, iid, vis, ev.WhichOneof("eventType"), ev.SerializeToString()) for iid, vis, ev in rows])
        earliest: dict[str, float] = {}
        for iid, vis, _ in rows:
            earliest[iid] = min(vis, earliest.get(iid, vis))
        db.executemany(
            "UPDATE instances SET ready_at = MIN(ready_at, ?), updated_at = ? WHERE taskhub=? AND instance_id=?",
            [(vis, now, hub, iid) for iid, vis in earliest.items()])

    def _touch(self, hub: str, instance_id: str) -> None:
        key = (hub, instance_id)
        self.touched[key] = self.touched.get(key, 0) + 1

    def _is_live(self, db: sqlite3.Connection, hub: str, instance_id: str) -> bool:
        row = db.execute("SELECT status FROM instances WHERE taskhub=? AND instance_id=?",
                         (hub, instance_id)).fetchone()
        return row is not None and row[0] not in TERMINAL

    def _delete_instance(self, db: sqlite3.Connection, hub: str, instance_id: str) -> None:
        self._touch(hub, instance_id)
        for table in ("instances", "history", "new_events", "activities"):
            db.execute(f"DELETE FROM {table} WHERE taskhub=? AND instance_id=?", (hub, instance_id))
        self._history_cache.pop((hub, instance_id), None)

    # --- instances ------------------------------------------------------------------

    def create_instance(self, hub: str, instance_id: str, name: str, *, version: str | None = None,
                        input: str | None = None, tags: dict[str, str] | None = None,
                        start_at: float | None = None, replaceable: list[int] | None = None) -> None:
        """Create an instance; raises AlreadyExists unless the existing one's status is replaceable."""
        with self._tx() as db:
            self._create_tx(db, hub, instance_id, name, version=version, input=input, tags=tags,
                            start_at=start_at, replaceable=replaceable or [])

    def _create_tx(self, db: sqlite3.Connection, hub: str, instance_id: str, name: str, *,
                   version: str | None, input: str | None, tags: dict[str, str] | None = None,
                   start_at: float | None = None, replaceable: list[int] | tuple[int, ...] = (),
                   parent: tuple[str, int] | None = None) -> None:
        row = db.execute("SELECT status FROM instances WHERE taskhub=? AND instance_id=?",
                         (hub, instance_id)).fetchone()
        if row is not None:
            if row[0] not in replaceable:
                raise AlreadyExists(f"Orchestration instance '{instance_id}' already exists")
            self._delete_instance(db, hub, instance_id)
        now = time.time()
        execution_id = uuid.uuid4().hex
        self._touch(hub, instance_id)
        db.execute(
            "INSERT INTO instances (taskhub, instance_id, execution_id, name, version, status, input, tags,"
            " created_at, updated_at, parent_instance_id, parent_task_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (hub, instance_id, execution_id, name, version, pb.ORCHESTRATION_STATUS_PENDING, input,
             json.dumps(tags) if tags else None, now, now,
             parent[0] if parent else None, parent[1] if parent else None))
        visible = start_at if start_at is not None else now
        started = helpers.new_orchestrator_started_event(datetime.fromtimestamp(visible, timezone.utc))
        execution = helpers.new_execution_started_event(name, instance_id, input, tags, version=version)
        execution.executionStarted.orchestrationInstance.executionId.value = execution_id
        if start_at is not None:
            execution.executionStarted.scheduledStartTimestamp.CopyFrom(_ts(start_at))
        if parent:
            execution.executionStarted.parentInstance.taskScheduledId = parent[1]
            execution.executionStarted.parentInstance.orchestrationInstance.instanceId = parent[0]
        self._add_events(db, hub, [(instance_id, visible, _now_event_ts(started, visible)),
                                   (instance_id, visible, _now_event_ts(execution, now))], now)

    def get_instance(self, hub: str, instance_id: str) -> InstanceRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_INSTANCE_COLS} FROM instances WHERE taskhub=? AND instance_id=?",
                                   (hub, instance_id)).fetchone()
        return InstanceRow(*row) if row else None

    def raise_event(self, hub: str, instance_id: str, event: pb.HistoryEvent) -> None:
        """Queue an event for an instance (external event, suspend, resume). Dropped if terminal."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT status FROM instances WHERE taskhub=? AND instance_id=?",
                             (hub, instance_id)).fetchone()
            if row is None:
                raise NotFound(f"Orchestration instance '{instance_id}' not found")
            if row[0] not in TERMINAL:
                self._add_events(db, hub, [(instance_id, now, _now_event_ts(event, now))], now)

    def terminate(self, hub: str, instance_id: str, output: str | None, recursive: bool) -> None:
        """Terminate the instance (and with *recursive* its unfinished sub-orchestrations). One without an episode
        in flight is terminated here and now, as its next episode would (``_terminate_now``): it may have no worker
        at all (its process was killed). One whose episode a worker runs gets the event, applied right after."""
        now = time.time()
        with self._tx() as db:
            todo, targets = [instance_id], []
            while todo:
                iid = todo.pop()
                if self._is_live(db, hub, iid):
                    targets.append(iid)
                if recursive:
                    todo.extend(r[0] for r in db.execute(
                        "SELECT instance_id FROM instances WHERE taskhub=? AND parent_instance_id=?"
                        f" AND status NOT IN ({_TERMINAL_SQL})", (hub, iid)))
            queued = []
            for iid in targets:
                if not self._terminate_now(db, hub, iid, output, now):
                    queued.append((iid, now, _now_event_ts(helpers.new_terminated_event(encoded_output=output), now)))
            self._add_events(db, hub, queued, now)

    def _terminate_now(self, db: sqlite3.Connection, hub: str, iid: str, output: str | None, now: float) -> bool:
        """End an instance no episode of which is in flight as TERMINATED with *output*, its history closed as a
        worker closes it; what was queued for it (activities, events, timers) is dropped, and a late result of an
        activity still running somewhere is ignored (its row is gone). False, changing nothing, while an episode
        holds the instance's lease."""
        row = db.execute("SELECT history_len, parent_instance_id, parent_task_id FROM instances"
                         " WHERE taskhub=? AND instance_id=? AND lease_expires<?", (hub, iid, now)).fetchone()
        if row is None:
            return False
        history_len, parent_iid, parent_task = row
        self._touch(hub, iid)
        events = [helpers.new_orchestrator_started_event(datetime.fromtimestamp(now, timezone.utc)),
                  helpers.new_terminated_event(encoded_output=output),
                  helpers.new_orchestrator_completed_event(),
                  helpers.new_execution_completed_event(pb.ORCHESTRATION_STATUS_TERMINATED, output)]
        db.executemany("INSERT INTO history (taskhub, instance_id, seq, event) VALUES (?,?,?,?)",
                       [(hub, iid, history_len + i, _now_event_ts(ev, now).SerializeToString())
                        for i, ev in enumerate(events)])
        for table in ("new_events", "activities"):
            db.execute(f"DELETE FROM {table} WHERE taskhub=? AND instance_id=?", (hub, iid))
        db.execute("UPDATE instances SET status=?, output=?, completed_at=?, updated_at=?, ready_at=1e18,"
                   " lease_owner=NULL, lease_expires=0, history_version=history_version+1, history_len=?"
                   " WHERE taskhub=? AND instance_id=?",
                   (pb.ORCHESTRATION_STATUS_TERMINATED, output, now, now, history_len + len(events), hub, iid))
        self._history_cache.pop((hub, iid), None)
        if parent_iid and parent_task is not None and self._is_live(db, hub, parent_iid):
            self._add_events(db, hub, [(parent_iid, now, self._result_for_parent(
                parent_task, pb.ORCHESTRATION_STATUS_TERMINATED, output, None))], now)
        return True

    def history(self, hub: str, instance_id: str) -> list[pb.HistoryEvent] | None:
        with self._lock:
            if not self._db.execute("SELECT 1 FROM instances WHERE taskhub=? AND instance_id=?",
                                    (hub, instance_id)).fetchone():
                return None
            return [pb.HistoryEvent.FromString(r[0]) for r in self._db.execute(
                "SELECT event FROM history WHERE taskhub=? AND instance_id=? ORDER BY seq", (hub, instance_id))]

    def _cached_history(self, db: sqlite3.Connection, hub: str, instance_id: str,
                        version: int) -> list[pb.HistoryEvent]:
        """History as of ``version``; the version counter tells us if another process changed it."""
        key = (hub, instance_id)
        hit = self._history_cache.get(key)
        if hit is not None and hit[0] == version:
            self._history_cache.move_to_end(key)
            return hit[1]
        events = [pb.HistoryEvent.FromString(r[0]) for r in db.execute(
            "SELECT event FROM history WHERE taskhub=? AND instance_id=? ORDER BY seq", (hub, instance_id))]
        self._history_cache[key] = (version, events)
        while len(self._history_cache) > 32:
            self._history_cache.popitem(last=False)
        return events

    # --- orchestrator work items ----------------------------------------------------

    def claim_orchestrations(self, hub: str, owner: str, limit: int, lease_seconds: float,
                             accept: Callable[[str, str | None], bool] | None = None,
                             instances: Collection[str] | None = None) -> list[OrchestratorClaim]:
        """Claim up to *limit* ready episodes (of *instances* only, when given)."""
        now = time.time()
        only, ids = _only(instances)
        with self._lock:
            candidates = self._db.execute(
                "SELECT instance_id, name, version FROM instances WHERE taskhub=? AND ready_at<=? AND lease_expires<?"
                f"{only} ORDER BY ready_at LIMIT ?", (hub, now, now, *ids, limit if accept is None else 1000)).fetchall()
            if accept is not None:
                candidates = [c for c in candidates if accept(c[1], c[2])][:limit]
            if not candidates:
                return []
            claims = []
            with self._tx() as db:
                for iid, _, _ in candidates:
                    claim = self._claim_one(db, hub, iid, owner, now, lease_seconds)
                    if claim is not None:
                        claims.append(claim)
            return claims

    def _claim_one(self, db: sqlite3.Connection, hub: str, iid: str, owner: str, now: float,
                   lease_seconds: float) -> OrchestratorClaim | None:
        row = db.execute(
            "UPDATE instances SET lease_owner=?, lease_expires=?, lease_token=lease_token+1"
            " WHERE taskhub=? AND instance_id=? AND ready_at<=? AND lease_expires<?"
            " RETURNING lease_token, history_version, execution_id",
            (owner, now + lease_seconds, hub, iid, now, now)).fetchone()
        if row is None:
            return None
        gen, history_version, execution_id = row
        db.execute("UPDATE new_events SET dispatch_token=? WHERE taskhub=? AND instance_id=? AND visible_at<=?",
                   (gen, hub, iid, now))
        rows = db.execute("SELECT kind, event FROM new_events WHERE taskhub=? AND instance_id=? AND dispatch_token=?"
                          " ORDER BY id", (hub, iid, gen)).fetchall()
        if not rows:
            # ready_at was stale (events purged); fix it and let the lease go.
            self._release_instance(db, hub, iid)
            return None
        kinds = [r[0] for r in rows]
        blobs = [r[1] for r in rows]
        events = [pb.HistoryEvent.FromString(b) for b in blobs]
        prefix = None
        if kinds[0] != "orchestratorStarted":
            # The episode's clock; stored in history on completion so replays see the same time.
            started = helpers.new_orchestrator_started_event(datetime.fromtimestamp(now, timezone.utc))
            prefix = started.SerializeToString()
            events.insert(0, started)
        past = self._cached_history(db, hub, iid, history_version)
        self._inflight[(hub, iid, gen)] = _Inflight(owner, prefix, blobs, kinds, events, history_version)
        request = pb.OrchestratorRequest(instanceId=iid, executionId=wrappers_pb2.StringValue(value=execution_id),
                                         pastEvents=past, newEvents=events)
        return OrchestratorClaim(orchestration_token(iid, gen), request)

    def _release_instance(self, db: sqlite3.Connection, hub: str, iid: str) -> None:
        db.execute(
            "UPDATE instances SET lease_owner=NULL, lease_expires=0,"
            " ready_at=COALESCE((SELECT MIN(visible_at) FROM new_events WHERE taskhub=? AND instance_id=?), 1e18)"
            " WHERE taskhub=? AND instance_id=?", (hub, iid, hub, iid))

    def abandon(self, hub: str, token: str) -> bool:
        parsed = parse_token(token)
        if parsed is None:
            return False
        kind, gen, key = parsed
        with self._tx() as db:
            if kind == "o":
                self._inflight.pop((hub, key, gen), None)
                return db.execute("UPDATE instances SET lease_owner=NULL, lease_expires=0"
                                  " WHERE taskhub=? AND instance_id=? AND lease_token=?",
                                  (hub, key, gen)).rowcount > 0
            return db.execute("UPDATE activities SET lease_owner=NULL, lease_expires=0"
                              " WHERE taskhub=? AND id=? AND lease_token=?", (hub, int(key), gen)).rowcount > 0

    def disown(self, hub: str, token: str, lease_seconds: float) -> None:
        """Stop renewing a work item whose stream to another process's worker closed: its lease runs out
        once, then another stream may claim it. A completion that still arrives in time is accepted (same token)."""
        parsed = parse_token(token)
        if parsed is None:
            return
        kind, gen, key = parsed
        expires = time.time() + lease_seconds
        with self._tx() as db:
            if kind == "o":
                db.execute("UPDATE instances SET lease_owner=NULL, lease_expires=MIN(lease_expires, ?)"
                           " WHERE taskhub=? AND instance_id=? AND lease_token=?", (expires, hub, key, gen))
            else:
                db.execute("UPDATE activities SET lease_owner=NULL, lease_expires=MIN(lease_expires, ?)"
                           " WHERE taskhub=? AND id=? AND lease_token=?", (expires, hub, int(key), gen))

    def complete_orchestration(self, hub: str, response: pb.OrchestratorResponse) -> bool:
        """Apply one episode's result atomically. False if the token is stale (lease lost)."""
        parsed = parse_token(response.completionToken)
        if parsed is None or parsed[0] != "o":
            return False
        _, gen, iid = parsed
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT lease_token, status, custom_status, history_version, history_len, name, version, input,"
                " execution_id, parent_instance_id, parent_task_id FROM instances WHERE taskhub=? AND instance_id=?",
                (hub, iid)).fetchone()
            inflight = self._inflight.pop((hub, iid, gen), None)
            if row is None or row[0] != gen or inflight is None:
                return False
            (_, status, custom_status, history_version, history_len, name, version, input,
             execution_id, parent_iid, parent_task) = row
            self._apply_episode(db, hub, iid, gen, response, inflight, now, status, custom_status,
                                history_version, history_len, name, version, input, execution_id,
                                parent_iid, parent_task)
        return True

    def _apply_episode(self, db: sqlite3.Connection, hub: str, iid: str, gen: int, response: pb.OrchestratorResponse,
                       inflight: _Inflight, now: float, status: pb.OrchestrationStatus, custom_status: str | None,
                       history_version: int, history_len: int, name: str, version: str | None, input: str | None,
                       execution_id: str, parent_iid: str | None, parent_task: int | None) -> None:
        self._touch(hub, iid)
        appended = list(inflight.events)  # includes the generated prefix, matching ``blobs``
        blobs: list[bytes] = ([inflight.prefix] if inflight.prefix else []) + inflight.blobs

        if status == pb.ORCHESTRATION_STATUS_PENDING:
            status = pb.ORCHESTRATION_STATUS_RUNNING
        for kind in inflight.kinds:
            if kind == "executionSuspended":
                status = pb.ORCHESTRATION_STATUS_SUSPENDED
            elif kind == "executionResumed":
                status = pb.ORCHESTRATION_STATUS_RUNNING
        if response.HasField("customStatus"):
            custom_status = response.customStatus.value

        def record(ev: pb.HistoryEvent) -> None:
            _now_event_ts(ev, now)
            appended.append(ev)
            blobs.append(ev.SerializeToString())

        # An episode is applied whole or not at all: one action this backend cannot carry out fails the
        # orchestration, and nothing else the step asked for (activities, sub-orchestrations, events) happens.
        missing = unsupported(response)
        actions = [_not_supported(missing)] if missing else list(response.actions)
        activities: list[tuple[str, str, str, int, str, str | None, str | None]] = []
        new_events: list[tuple[str, float, pb.HistoryEvent]] = []
        complete: pb.CompleteOrchestrationAction | None = None
        for action in actions:
            which = action.WhichOneof("orchestratorActionType")
            if which == "scheduleTask":
                st = action.scheduleTask
                task_input = st.input.value if st.HasField("input") else None
                record(helpers.new_task_scheduled_event(action.id, st.name, task_input))
                activities.append((hub, iid, execution_id, action.id, st.name,
                                   st.version.value if st.HasField("version") else None, task_input))
            elif which == "createTimer":
                fire_at = action.createTimer.fireAt.ToDatetime(tzinfo=timezone.utc)
                record(helpers.new_timer_created_event(action.id, fire_at))
                new_events.append((iid, fire_at.timestamp(), helpers.new_timer_fired_event(action.id, fire_at)))
            elif which == "createSubOrchestration":
                cs = action.createSubOrchestration
                sub_input = cs.input.value if cs.HasField("input") else None
                sub_version = cs.version.value if cs.HasField("version") else None
                record(helpers.new_sub_orchestration_created_event(action.id, cs.name, cs.instanceId,
                                                                   sub_input, version=sub_version))
                try:
                    self._create_tx(db, hub, cs.instanceId, cs.name, version=sub_version, input=sub_input,
                                    replaceable=TERMINAL, parent=(iid, action.id))
                except AlreadyExists as ex:
                    new_events.append((iid, now, helpers.new_sub_orchestration_failed_event(action.id, ex)))
            elif which == "sendEvent":
                se = action.sendEvent
                data = se.data.value if se.HasField("data") else None
                record(helpers.new_event_sent_event(action.id, se.instance.instanceId, data, name=se.name))
                if se.instance.instanceId and self._is_live(db, hub, se.instance.instanceId):
                    new_events.append((se.instance.instanceId, now, helpers.new_event_raised_event(se.name, data)))
            elif which == "completeOrchestration":
                complete = action.completeOrchestration

        output = None
        failure: bytes | None = None
        completed_at = None
        if complete is not None and complete.orchestrationStatus == pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW:
            self._continue_as_new(db, hub, iid, gen, complete, name, version, custom_status, now)
            # the events this step sent still arrive (one sent to itself reaches the new execution); its
            # timers and activities belong to the execution that ended and end with it
            self._add_events(db, hub, [e for e in new_events if e[2].HasField("eventRaised")], now)
            return

        db.execute("DELETE FROM new_events WHERE taskhub=? AND instance_id=? AND dispatch_token=?", (hub, iid, gen))
        if complete is not None:
            status = complete.orchestrationStatus
            output = complete.result.value if complete.HasField("result") else None
            failure = complete.failureDetails.SerializeToString() if complete.HasField("failureDetails") else None
            completed_at = now
        record(helpers.new_orchestrator_completed_event())
        if status in TERMINAL:
            record(helpers.new_execution_completed_event(
                status, output, complete.failureDetails if complete and complete.HasField("failureDetails") else None))
            # Nothing can be delivered to a finished instance: drop what is still queued for it.
            db.execute("DELETE FROM new_events WHERE taskhub=? AND instance_id=?", (hub, iid))
            db.execute("DELETE FROM activities WHERE taskhub=? AND instance_id=?", (hub, iid))
            activities, new_events = [], [e for e in new_events if e[0] != iid]
            if parent_iid and parent_task is not None and self._is_live(db, hub, parent_iid):  # set together
                new_events.append((parent_iid, now, self._result_for_parent(parent_task, status, output, complete)))

        db.executemany("INSERT INTO history (taskhub, instance_id, seq, event) VALUES (?,?,?,?)",
                       [(hub, iid, history_len + i, b) for i, b in enumerate(blobs)])
        if activities:
            db.executemany("INSERT INTO activities (taskhub, instance_id, execution_id, task_id, name, version, input)"
                           " VALUES (?,?,?,?,?,?,?)", activities)
        self._add_events(db, hub, new_events, now)
        db.execute(
            "UPDATE instances SET status=?, custom_status=?, output=COALESCE(?, output), failure=COALESCE(?, failure),"
            " completed_at=COALESCE(?, completed_at), updated_at=?, history_version=history_version+1,"
            " history_len=? WHERE taskhub=? AND instance_id=?",
            (status, custom_status, output, failure, completed_at, now, history_len + len(blobs), hub, iid))
        self._release_instance(db, hub, iid)

        cached = self._history_cache.get((hub, iid))
        if cached is not None and cached[0] == history_version:
            cached[1].extend(appended)
            self._history_cache[(hub, iid)] = (history_version + 1, cached[1])

    @staticmethod
    def _result_for_parent(task_id: int, status: int, output: str | None,
                           complete: pb.CompleteOrchestrationAction | None) -> pb.HistoryEvent:
        if status == pb.ORCHESTRATION_STATUS_COMPLETED:
            return helpers.new_sub_orchestration_completed_event(task_id, output)
        if complete is not None and complete.HasField("failureDetails"):
            details = complete.failureDetails
        else:
            details = pb.TaskFailureDetails(errorType="TerminatedError",
                                            errorMessage="sub-orchestration was terminated")
        return pb.HistoryEvent(eventId=-1, subOrchestrationInstanceFailed=pb.SubOrchestrationInstanceFailedEvent(
            taskScheduledId=task_id, failureDetails=details))

    def _continue_as_new(self, db: sqlite3.Connection, hub: str, iid: str, gen: int,
                         complete: pb.CompleteOrchestrationAction, name: str, version: str | None,
                         custom_status: str | None, now: float) -> None:
        new_input = complete.result.value if complete.HasField("result") else None
        new_version = complete.newVersion.value if complete.HasField("newVersion") else version
        # Events that arrived during this episode follow the new execution's start events;
        # timers and activities of the old execution die with it.
        arrivals = [pb.HistoryEvent.FromString(r[0]) for r in db.execute(
            "SELECT event FROM new_events WHERE taskhub=? AND instance_id=? AND kind != 'timerFired'"
            " AND (dispatch_token IS NULL OR dispatch_token != ?) ORDER BY id", (hub, iid, gen))]
        for table in ("history", "new_events", "activities"):
            db.execute(f"DELETE FROM {table} WHERE taskhub=? AND instance_id=?", (hub, iid))
        execution_id = uuid.uuid4().hex
        started = helpers.new_orchestrator_started_event(datetime.fromtimestamp(now, timezone.utc))
        execution = helpers.new_execution_started_event(name, iid, new_input, version=new_version)
        execution.executionStarted.orchestrationInstance.executionId.value = execution_id
        events = [started, _now_event_ts(execution, now), *complete.carryoverEvents, *arrivals]
        db.execute(
            "UPDATE instances SET status=?, execution_id=?, input=?, version=?, output=NULL, failure=NULL,"
            " completed_at=NULL, custom_status=?, updated_at=?, history_version=history_version+1, history_len=0"
            " WHERE taskhub=? AND instance_id=?",
            (pb.ORCHESTRATION_STATUS_PENDING, execution_id, new_input, new_version, custom_status, now, hub, iid))
        self._add_events(db, hub, [(iid, now, ev) for ev in events], now)
        self._release_instance(db, hub, iid)
        self._history_cache.pop((hub, iid), None)

    # --- activity work items --------------------------------------------------------

    def claim_activities(self, hub: str, owner: str, limit: int, lease_seconds: float,
                         accept: Callable[[str, str | None], bool] | None = None,
                         instances: Collection[str] | None = None) -> list[ActivityClaim]:
        """Claim up to *limit* activities (of *instances* only, when given)."""
        now = time.time()
        only, ids = _only(instances)
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, name, version FROM activities WHERE taskhub=? AND lease_expires<?{only} ORDER BY id LIMIT ?",
                (hub, now, *ids, limit if accept is None else max(limit, 1000))).fetchall()
            ids = [r[0] for r in rows if accept is None or accept(r[1], r[2])][:limit]
            if not ids:
                return []
            with self._tx() as db:
                claimed = db.execute(
                    "UPDATE activities SET lease_owner=?, lease_expires=?, lease_token=lease_token+1"
                    f" WHERE id IN ({','.join('?' * len(ids))}) AND lease_expires<?"
                    " RETURNING id, lease_token, instance_id, execution_id, task_id, name, version, input",
                    (owner, now + lease_seconds, *ids, now)).fetchall()
        claims = []
        for row_id, gen, iid, execution_id, task_id, name, version, task_input in sorted(claimed):
            req = pb.ActivityRequest(
                name=name, taskId=task_id,
                orchestrationInstance=pb.OrchestrationInstance(
                    instanceId=iid, executionId=wrappers_pb2.StringValue(value=execution_id)))
            if version is not None:
                req.version.value = version
            if task_input is not None:
                req.input.value = task_input
            claims.append(ActivityClaim(activity_token(row_id, gen), req))
        return claims

    def complete_activities(self, batch: list[tuple[str, pb.ActivityResponse]]) -> list[bool]:
        """Record many activity results in one transaction; per item, whether it was applied (False: the
        token is stale, the lease was lost, or the work item is gone)."""
        now = time.time()
        keys: list[tuple[str, int, int] | None] = []
        for hub, response in batch:
            parsed = parse_token(response.completionToken)
            if parsed is not None and parsed[0] == "a" and parsed[2].isdigit():
                keys.append((hub, int(parsed[2]), parsed[1]))
            else:
                keys.append(None)
        wanted = list({k for k in keys if k is not None})
        applied: dict[int, str] = {}  # activity row id -> instance id
        with self._tx() as db:
            for start in range(0, len(wanted), 5000):
                chunk = wanted[start:start + 5000]
                # The plain id list lets SQLite search by rowid; the row values check hub and lease generation.
                for row_id, iid in db.execute(
                        f"DELETE FROM activities WHERE id IN ({','.join('?' * len(chunk))}) AND (taskhub, id, lease_token)"
                        f" IN (VALUES {','.join(['(?,?,?)'] * len(chunk))}) RETURNING id, instance_id",
                        [key[1] for key in chunk] + [v for key in chunk for v in key]):
                    applied[row_id] = iid
            events: dict[str, list[tuple[str, float, pb.HistoryEvent]]] = {}
            for key, (hub, response) in zip(keys, batch):
                if key is None or key[1] not in applied:
                    continue
                if response.HasField("failureDetails") and response.failureDetails.errorMessage:
                    event = pb.HistoryEvent(eventId=-1, taskFailed=pb.TaskFailedEvent(
                        taskScheduledId=response.taskId, failureDetails=response.failureDetails))
                else:
                    event = pb.HistoryEvent(eventId=-1, taskCompleted=pb.TaskCompletedEvent(
                        taskScheduledId=response.taskId,
                        result=response.result if response.HasField("result") else None))
                events.setdefault(hub, []).append((applied[key[1]], now, _now_event_ts(event, now)))
            for hub, rows in events.items():
                self._add_events(db, hub, rows, now)
        return [k is not None and k[1] in applied for k in keys]

    # --- leases and liveness --------------------------------------------------------

    def renew_leases(self, owner: str, lease_seconds: float) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE instances SET lease_expires=? WHERE lease_owner=?", (now + lease_seconds, owner))
            db.execute("UPDATE activities SET lease_expires=? WHERE lease_owner=?", (now + lease_seconds, owner))
            db.execute("UPDATE streams SET heartbeat=? WHERE owner=?", (now, owner))
            # Streams of processes that died without cleaning up.
            db.execute("DELETE FROM streams WHERE heartbeat < ?", (now - 10 * lease_seconds,))

    def release_dead_owners(self, host: str, alive: Callable[[int], bool]) -> int:
        """Release leases and streams of this host's processes that no longer exist.

        A SIGKILLed process cannot release its leases; waiting for them to expire would stall
        a resume for a whole lease period. Owners are "host:pid:token"; other hosts' owners
        are left to lease expiry, since we cannot see their processes.
        """
        now = time.time()
        with self._lock:
            owners = {row[0] for table in ("instances", "activities") for row in self._db.execute(
                f"SELECT DISTINCT lease_owner FROM {table} WHERE lease_expires>? AND lease_owner LIKE ?",
                (now, host + ":%"))}
            owners |= {row[0] for row in self._db.execute(
                "SELECT DISTINCT owner FROM streams WHERE owner LIKE ?", (host + ":%",))}
        dead = [o for o in owners if o.count(":") >= 2 and o.split(":")[-2].isdigit()
                and not alive(int(o.split(":")[-2]))]
        for owner in dead:
            self.release_leases(owner)
        return len(dead)

    def release_leases(self, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE instances SET lease_owner=NULL, lease_expires=0 WHERE lease_owner=?", (owner,))
            db.execute("UPDATE activities SET lease_owner=NULL, lease_expires=0 WHERE lease_owner=?", (owner,))
            db.execute("DELETE FROM streams WHERE owner=?", (owner,))
            # only *owner*'s episodes (under the store's lock, like every claim and completion): a dead
            # peer's release must not orphan this process's own
            self._inflight = {key: episode for key, episode in self._inflight.items() if episode.owner != owner}

    def register_stream(self, hub: str, stream_id: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO streams (taskhub, stream_id, owner, heartbeat) VALUES (?,?,?,?)",
                       (hub, stream_id, owner, time.time()))

    def unregister_stream(self, hub: str, stream_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM streams WHERE taskhub=? AND stream_id=?", (hub, stream_id))

    def worker_attached(self, hub: str, instance_id: str, lease_seconds: float) -> bool:
        now = time.time()
        with self._lock:
            db = self._db
            return bool(
                db.execute("SELECT 1 FROM instances WHERE taskhub=? AND instance_id=? AND lease_expires>?",
                           (hub, instance_id, now)).fetchone()
                or db.execute("SELECT 1 FROM activities WHERE taskhub=? AND instance_id=? AND lease_expires>?"
                              " LIMIT 1", (hub, instance_id, now)).fetchone()
                or db.execute("SELECT 1 FROM streams WHERE taskhub=? AND heartbeat>? LIMIT 1",
                              (hub, now - lease_seconds)).fetchone())

    # --- queries and purge ----------------------------------------------------------

    def query_instances(self, hub: str, *, statuses: list[int], created_from: float | None,
                        created_to: float | None, prefix: str | None, offset: int,
                        limit: int | None) -> tuple[list[InstanceRow], bool]:
        where, args = self._filters(hub, statuses, created_from, created_to)
        if prefix:
            where.append("substr(instance_id, 1, ?) = ?")
            args += [len(prefix), prefix]
        sql = (f"SELECT {_INSTANCE_COLS} FROM instances WHERE {' AND '.join(where)}"
               " ORDER BY created_at, instance_id LIMIT ? OFFSET ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, -1 if limit is None else limit + 1, offset)).fetchall()
        more = limit is not None and len(rows) > limit
        return [InstanceRow(*r) for r in rows[:limit]], more

    @staticmethod
    def _filters(hub: str, statuses: list[int], time_from: float | None, time_to: float | None,
                 column: str = "created_at") -> tuple[list[str], list[str | float]]:
        where: list[str] = ["taskhub=?"]
        args: list[str | float] = [hub]
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args += list(statuses)
        if time_from is not None:
            where.append(f"{column} >= ?")
            args.append(time_from)
        if time_to is not None:
            where.append(f"{column} < ?")
            args.append(time_to)
        return where, args

    def list_terminal_ids(self, hub: str, *, statuses: list[int], completed_from: float | None,
                          completed_to: float | None, after: tuple[float, str] | None,
                          limit: int) -> tuple[list[tuple[float, str]], bool]:
        where, args = self._filters(hub, statuses, completed_from, completed_to, column="completed_at")
        where += [f"status IN ({_TERMINAL_SQL})", "completed_at IS NOT NULL"]
        if after is not None:
            where.append("(completed_at > ? OR (completed_at = ? AND instance_id > ?))")
            args += [after[0], after[0], after[1]]
        with self._lock:
            rows = self._db.execute(
                f"SELECT completed_at, instance_id FROM instances WHERE {' AND '.join(where)}"
                " ORDER BY completed_at, instance_id LIMIT ?", (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    def purge(self, hub: str, *, instance_id: str | None = None, statuses: list[int] | None = None,
              created_from: float | None = None, created_to: float | None = None,
              recursive: bool = False) -> int:
        """Delete terminal instances (and, if recursive, their terminal sub-orchestrations)."""
        with self._tx() as db:
            if instance_id is not None:
                roots = [r[0] for r in db.execute(
                    f"SELECT instance_id FROM instances WHERE taskhub=? AND instance_id=? AND status IN ({_TERMINAL_SQL})",
                    (hub, instance_id))]
            else:
                where, args = self._filters(hub, statuses or [], created_from, created_to)
                where.append(f"status IN ({_TERMINAL_SQL})")
                roots = [r[0] for r in db.execute(
                    f"SELECT instance_id FROM instances WHERE {' AND '.join(where)}", args)]
            doomed, todo = set(), list(roots)
            while todo:
                iid = todo.pop()
                if iid in doomed:
                    continue
                doomed.add(iid)
                if recursive:
                    todo.extend(r[0] for r in db.execute(
                        "SELECT instance_id FROM instances WHERE taskhub=? AND parent_instance_id=?"
                        f" AND status IN ({_TERMINAL_SQL})", (hub, iid)))
            for iid in doomed:
                self._delete_instance(db, hub, iid)
        return len(doomed)

    def restart(self, hub: str, instance_id: str, new_instance_id: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT name, version, input, tags, status FROM instances"
                             " WHERE taskhub=? AND instance_id=?", (hub, instance_id)).fetchone()
            if row is None:
                raise NotFound(f"Orchestration instance '{instance_id}' not found")
            name, version, task_input, tags, status = row
            if status not in TERMINAL:
                raise AlreadyExists(f"Orchestration instance '{instance_id}' is not in a terminal state")
            self._create_tx(db, hub, new_instance_id, name, version=version, input=task_input,
                            tags=json.loads(tags) if tags else None, replaceable=TERMINAL)


def peek_instance_ids(path: Path, hub: str, *, prefix: str = "", names: tuple[str, ...] = (),
                      statuses: tuple[int, ...] = (), limit: int = 100) -> list[str]:
    """Instance ids starting with *prefix*, newest first, through a read-only connection that never waits
    for a lock: for shell completion, which must answer at once or not at all (errors propagate)."""
    db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=0)
    try:
        where, args = Store._filters(hub, list(statuses), None, None)
        where.append("substr(instance_id, 1, ?) = ?")
        args += [len(prefix), prefix]
        if names:
            where.append(f"name IN ({','.join('?' * len(names))})")
            args += list(names)
        sql = f"SELECT instance_id FROM instances WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT ?"
        return [row[0] for row in db.execute(sql, (*args, limit))]
    finally:
        db.close()

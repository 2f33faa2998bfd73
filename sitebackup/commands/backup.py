"""The backup command: build the request from options, pre-flight the destination, schedule or re-attach,
host the worker and watch.

``expand_prefix`` runs once in the CLI process, so every page of one run (and its resume) uses the
same expanded prefix; filters are read once too, so a resumed run keeps those it started with.
"""

from __future__ import annotations

import socket
import string
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from durabletask import client as dt_client

from sitebackup.blob.clients import StorageSettings, connect
from sitebackup.blob.naming import backup_prefix, validate_container_name
from sitebackup.blob.workstore import WorkStore
from sitebackup.commands.hosting import (
    POLL_SECONDS,
    activity_deps,
    attach_and_watch,
    find_unfinished,
    get_run,
    host_and_watch,
    last_progress,
    new_instance_id,
    run_label,
    stalled_for,
)
from sitebackup.durable.runlock import RunLock
from sitebackup.durable.runtime import Runtime, open_backend
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import AlreadyRunningError, InputError, StalledError
from sitebackup.local import filters, incremental
from sitebackup.model.codec import to_wire
from sitebackup.model.reports import RunStart
from sitebackup.model.work import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONCURRENCY,
    BackupCounts,
    BackupInput,
    BackupOptions,
    Concurrency,
    Summary,
    UploadSpec,
)
from sitebackup.ui.printers import Printer, human_duration
from sitebackup.workflows.names import BACKUP_ORCHESTRATION

TEMPLATE_HELP = "use {date}, {time} or {hostname}"


@dataclass
class BackupRequest:
    source: Path
    container: str
    prefix: str = ""
    concurrency: int = DEFAULT_CONCURRENCY
    state_dir: Path = field(default_factory=Path)
    compare: str = incremental.MODE_MTIME  # or checksum / force
    patterns: list[str] = field(default_factory=list)  # gitignore-style, see local.filters
    follow_symlinks: bool = False
    no_wait: bool = False
    upload: UploadSpec = field(default_factory=UploadSpec)
    stall_after: timedelta | None = None  # a live run idle for longer is stalled; None: never judged

    def orchestration_input(self, endpoint: str | None) -> BackupInput:
        return BackupInput(source=str(self.source), container=self.container, prefix=self.prefix, endpoint=endpoint,
                           options=BackupOptions(concurrency=self.concurrency, compare=self.compare,
                                                 patterns=self.patterns, follow_symlinks=self.follow_symlinks,
                                                 upload=self.upload))


def expand_prefix(template: str | None, now: datetime | None = None, hostname: str | None = None) -> str:
    """``{date}`` → YYYY-MM-DD, ``{time}`` → HHMMSS (local time), ``{hostname}`` → short host name; ``{{``
    and ``}}`` are braces. Only these plain fields: no attribute, index, conversion or format spec."""
    if not template or "{" not in template:
        return template or ""
    now = now or datetime.now()
    values = {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S"),
              "hostname": hostname or socket.gethostname().split(".")[0]}
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid --prefix template {template!r}: {TEMPLATE_HELP} ({exc})") from None
    expanded = []
    for literal, name, spec, conversion in parts:
        expanded.append(literal)
        if name is None:
            continue
        if name not in values or spec or conversion:
            raise InputError(f"invalid --prefix template {template!r}: {TEMPLATE_HELP}, without attributes, "
                             "indexes, conversions or format specs")
        expanded.append(values[name])
    return "".join(expanded)


def build_request(source: str | Path, container: str, prefix: str | None, *, state_dir: Path,
                  concurrency: int = DEFAULT_CONCURRENCY, block_size: int = DEFAULT_BLOCK_SIZE, checksum: bool = False,
                  force: bool = False, excludes: tuple[str, ...] = (), includes: tuple[str, ...] = (),
                  exclude_from: tuple[Path, ...] = (), no_ignore_file: bool = False, follow_symlinks: bool = False,
                  no_wait: bool = False, stall_after: timedelta | None = None, tier: str | None = None) -> BackupRequest:
    """Validate the backup's options into a request: source, destination, comparison, filters."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"source {str(source)!r} does not exist")
    if not path.is_dir():
        raise InputError(f"source {str(source)!r} is not a directory")
    if concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if checksum and force:
        raise InputError("--checksum and --force exclude each other")
    mode = incremental.MODE_FORCE if force else incremental.MODE_CHECKSUM if checksum else incremental.MODE_MTIME
    try:
        patterns = filters.patterns_for(path, excludes=excludes, includes=includes, exclude_from=exclude_from,
                                        use_ignore_file=not no_ignore_file)
    except OSError as exc:
        raise InputError(f"cannot read filter file {exc.filename}: {exc.strerror}") from None
    return BackupRequest(source=path.resolve(), container=validate_container_name(container),
                         prefix=backup_prefix(expand_prefix(prefix)), concurrency=concurrency,
                         state_dir=state_dir, compare=mode, patterns=patterns, follow_symlinks=follow_symlinks,
                         no_wait=no_wait, upload=UploadSpec(block_size=block_size, tier=tier), stall_after=stall_after)


def find_baseline(client: dt_client.TaskHubGrpcClient, inp: BackupInput, work: WorkStore) -> str | None:
    """The newest completed backup of the same source and destination (and endpoint) whose record remains
    (and that no prune is dropping)."""
    query = dt_client.OrchestrationQuery(runtime_status=[dt_client.OrchestrationStatus.COMPLETED],
                                         fetch_inputs_and_outputs=True)
    candidates = []
    for state in client.get_all_orchestration_states(query):
        other = run_label(state) if state.name == BACKUP_ORCHESTRATION else None
        if other is None or not inp.label.same_backup(other):
            continue
        if other.endpoint and inp.endpoint and other.endpoint != inp.endpoint:
            continue
        candidates.append((state.created_at, state.instance_id))
    for _created, instance_id in sorted(candidates, reverse=True):
        if work.has_results(instance_id) and work.pruned(instance_id) is None:
            return instance_id
    return None


def find_unfinished_backup(client: dt_client.TaskHubGrpcClient, inp: BackupInput) -> str | None:
    return find_unfinished(client, BACKUP_ORCHESTRATION, inp.label.same_backup)


def run_backup(request: BackupRequest, settings: StorageSettings, printer: Printer, *,
               taskhub: TaskHubSettings | None = None, local_worker: bool = True,
               detach: bool = False) -> Summary[Any]:
    """Schedule or resume, then host a worker and watch (or only watch, or with *detach* only schedule)."""
    endpoint = connect(settings.require(), request.container)
    inp = request.orchestration_input(endpoint)
    inp.options.shared = taskhub is not None
    lock = RunLock.for_backup(request.state_dir, inp.source, inp.container, inp.prefix)
    with open_backend(request.state_dir, taskhub) as runtime:
        try:
            deps = activity_deps(settings, Concurrency(request.concurrency), runtime)
            with runtime.connected() as client:
                instance_id, live = claim_or_find(client, runtime, inp, lock)
                warning = check_live_run(client, instance_id, request) if live else None
                resumed = instance_id is not None
                if instance_id is None:
                    # with --force too: the baseline says what each name holds, to keep as a snapshot
                    inp.baseline = find_baseline(client, inp, deps.work)
                    instance_id = client.schedule_new_orchestration(BACKUP_ORCHESTRATION, input=to_wire(inp),
                                                                    instance_id=new_instance_id())
            printer.start(RunStart(instance_id=instance_id, source=inp.source, destination=inp.destination,
                                   endpoint=endpoint, resumed=resumed, attached=live))
            if warning is not None:
                printer.message(warning)
            if detach:
                return Summary(kind=BACKUP_ORCHESTRATION, counts=BackupCounts(), instance_id=instance_id,
                               runtime_status="SCHEDULED", detached=True)
            if live and local_worker:
                return attach_and_watch(runtime, deps, instance_id, printer, lock)
            return host_and_watch(runtime, deps, instance_id, printer, local_worker=local_worker)
        finally:
            lock.release()


def check_live_run(client: dt_client.TaskHubGrpcClient, instance_id: str, request: BackupRequest) -> str | None:
    """Before attaching to a run another process hosts: with --no-wait refuse (AlreadyRunningError, or
    StalledError when it has made no progress for ``stall_after``); else a warning if it looks stalled."""
    state = get_run(client, instance_id)
    idle = stalled_for(state, request.stall_after) if request.stall_after is not None else None
    if idle is None:
        if request.no_wait:
            raise AlreadyRunningError(f"the same backup is already running as {instance_id}", instance_id)
        return None
    since = last_progress(state).isoformat(timespec="seconds")
    what = (f"the same backup is running as {instance_id} but has made no progress for {human_duration(idle)} "
            f"(since {since}, over --stall-after {human_duration(request.stall_after)})")
    if request.no_wait:
        raise StalledError(f"{what}: is its process hung? stop it, or cancel the run: sitebackup cancel {instance_id}",
                           instance_id)
    return f"warning: {what}; attaching anyway"


def claim_or_find(client: dt_client.TaskHubGrpcClient, runtime: Runtime, inp: BackupInput,
                  lock: RunLock) -> tuple[str | None, bool]:
    """(unfinished instance id or None, whether a live process works on it).

    Holding *lock* makes this process the one that schedules or resumes; when another live
    process holds it, wait until that process has scheduled its instance (or let go).
    """
    while True:
        owner = lock.try_acquire()
        instance_id = find_unfinished_backup(client, inp)
        if owner:
            # another kind of process (a worker, a dying one whose leases still run) may hold the work
            return instance_id, bool(instance_id and runtime.worker_attached(instance_id))
        if instance_id is not None:
            return instance_id, True
        time.sleep(POLL_SECONDS)

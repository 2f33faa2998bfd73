"""The unlock command: remove the job locks of a container whose lease has lapsed, and name the holder of any
lock that is live (it stays: its holder is running).

A lock whose holder died lapses by itself within a minute and blocks nobody after that (``blob.lock``); this
command says who held it and removes it, and says who holds a live one instead of breaking it.
"""

from __future__ import annotations

from collections.abc import Callable

import click
from azure.core.exceptions import AzureError

from sitebackup.blob.clients import StorageSettings, check_container, endpoint_label
from sitebackup.blob.errors import classify, one_line
from sitebackup.blob.lock import LockState, describe, list_jobs, lock_client, locks_for_prefix, prefix_lock, remove_lapsed
from sitebackup.blob.naming import normalize_prefix, validate_container_name
from sitebackup.commands.backup import expand_prefix
from sitebackup.commands.options import Command, debug_option, storage_options
from sitebackup.errors import DestinationError, InputError, LockedError, exit_codes_help
from sitebackup.model.records import Job
from sitebackup.ui.escape import printable


def selection(jobs: list[Job], prefix: str | None, job: str | None) -> Callable[[str], str | None]:
    """What each lock name locks (a label for messages), or None for a lock left alone: the lock of *job* (its
    id or name), the locks a prune of *prefix* takes, or else every lock of the container."""
    if job is not None:
        chosen = {j.id: f"job {j.name}" for j in jobs if job in (j.id, j.name)}
        if not chosen:
            raise InputError(f"no job {job!r} in the container: give a job's id, or its name (--job NAME of its "
                             "backups, or HOST:SOURCE)")
        return chosen.get
    if prefix is not None:
        chosen = {**locks_for_prefix(jobs, prefix), prefix_lock(prefix): f"prefix {prefix!r}"}
        return chosen.get
    known = {j.id: f"job {j.name}" for j in jobs}
    return lambda name: known.get(name, f"lock {name}")


def unlock(settings: StorageSettings, container: str, prefix: str | None = None, job: str | None = None
           ) -> list[LockState]:
    """Remove the chosen locks whose lease has lapsed; every chosen lock as it was found."""
    check_container(settings.require(), container)
    with lock_client(settings, container) as client:
        chosen = selection(list_jobs(client), prefix, job)
        try:
            return remove_lapsed(client, chosen)
        except AzureError as exc:
            label = endpoint_label(client)
            raise classify(exc, label) or DestinationError(f"cannot remove the locks at {label}: {one_line(exc)}") \
                from None


@click.command("unlock", cls=Command, epilog=exit_codes_help(0, 2, 3, 4, 70, 130))
@click.option("--container", "-c", required=True, help="The container whose job locks to remove.")
@click.option("--prefix", default=None, help="Only the locks a prune of this prefix takes: the jobs whose prefix "
                                             "overlaps it ({hostname}, {date} and {time} expanded as by backup).")
@click.option("--job", "job", metavar="JOB", help="Only the lock of this job: its id, or its name (--job NAME of its "
                                                  "backups, or HOST:SOURCE).")
@storage_options
@debug_option
def command(container: str, prefix: str | None, job: str | None, storage: StorageSettings) -> None:
    """Remove stale job locks: those whose holder died and whose lease has lapsed.

    A backup or prune holds its job's lock in the container while it runs; a holder that dies
    lets it lapse within a minute, and nobody waits on it after that. A lock whose lease is live
    stays: its holder is named and the command exits 4.

    \b
    Examples:
      sitebackup unlock -c backups
      sitebackup unlock -c backups --prefix web
      sitebackup unlock -c backups --job nightly-web
    """
    if prefix is not None and job is not None:
        raise click.UsageError("--prefix and --job exclude each other")
    found = unlock(storage, validate_container_name(container),
                   normalize_prefix(expand_prefix(prefix)) if prefix is not None else None, job)
    live = [lock for lock in found if lock.live]
    for lock in found:
        if not lock.live:
            last = f" (last held by {lock.holder})" if lock.holder is not None else ""
            click.echo(printable(f"removed the lock of {lock.label}: nobody holds it{last}"))
    if not found:
        click.echo(f"no lock to remove in container {container}")
    if live:
        raise LockedError("; ".join(f"{lock.label} is locked by {describe(lock.holder)}" for lock in live) +
                          ": its lease is live, so its holder is running; left as it is (a holder that died lets "
                          "its lock lapse within a minute)")

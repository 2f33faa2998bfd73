"""The cat command: one file of a backup run, its exact bytes to stdout, in the version the run recorded.

The record is read until the file's entry (``commands.browsing``); the copy holding that version is the
current blob or the snapshot a later run kept (``blob.history``), its size checked against the record before
its body is read. The bytes are streamed as the service sends them, hashed as they go: a copy whose MD5 is
not the recorded one ends the command with exit 1 and a message on stderr, after the bytes. Bytes read from
the container are not sent to a terminal when they are not plain text (control characters included: they
could drive the terminal) unless --force says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from sitebackup.blob.clients import StorageSettings
from sitebackup.blob.history import choose, copies_of, copy_client
from sitebackup.blob.naming import blob_name, validate_container_name
from sitebackup.commands.browsing import Browse, OpenedRun, browsing, normalize_paths
from sitebackup.commands.options import LATEST_JOB_HELP, Command, catalog_options, complete_runs, job_option, json_option
from sitebackup.durable.taskhub import TaskHubSettings
from sitebackup.errors import EXIT_FILES_FAILED, InputError, SiteBackupError, exit_codes_help
from sitebackup.local.files import b64
from sitebackup.model.records import FileEntry

SNIFF_BYTES = 8192  # what decides whether the bytes are text
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b")


class Mismatch(SiteBackupError):
    """The bytes sent were not the version the run recorded."""

    exit_code = EXIT_FILES_FAILED


def looks_binary(head: bytes) -> bool:
    """Whether bytes (the start of a file) are anything but plain text a terminal shows as it is: UTF-8 without
    control characters other than tab, newlines, form feed and backspace."""
    if any(byte < 0x20 and byte not in _TEXT_CONTROLS or byte == 0x7F for byte in head):
        return True
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 3  # a character cut at the end of the sample is still text
    return any(0x80 <= ord(c) < 0xA0 or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069" for c in text)


def find_entry(browse: Browse, run: OpenedRun, path: str) -> FileEntry:
    """The run's entry of *path*, read up to it."""
    for entry in browse.entries(run):
        if entry.path == path:
            return entry
    raise InputError(f"not in run {run.run_id}: {path!r}")


def chunks_of(browse: Browse, run: OpenedRun, entry: FileEntry) -> Iterator[bytes]:
    """The bytes of the copy holding the version *entry* recorded, as the service sends them."""
    if entry.kind != "file":
        raise InputError(f"{entry.path!r} is a {entry.kind} in run {run.run_id}, not a file")
    if not entry.stored:
        raise InputError(f"run {run.run_id} holds no copy of {entry.path!r}: {entry.error or 'not backed up'}")
    copy = choose(copies_of(run.container, blob_name(run.label.prefix, entry.path)), entry.md5)
    if copy is None:
        raise InputError(f"no copy of {entry.path!r} as run {run.run_id} recorded it remains in the container "
                         "(the blob was overwritten, or the version pruned)")
    if copy.size != entry.size:
        raise Mismatch(f"the copy of {entry.path!r} is {copy.size} bytes, run {run.run_id} recorded {entry.size}")
    # decompress=False: the blob's own bytes, whatever Content-Encoding it is marked with
    return copy_client(run.container, copy).download_blob(decompress=False).chunks()


def write_file(settings: StorageSettings, run_ref: str, path: str, *, force: bool, json_output: bool,
               container: str | None, job: str | None, state_dir: Path, taskhub: TaskHubSettings | None,
               out: BinaryIO) -> None:
    """Stream the file to *out* (with --json, as one object whose content is base64), checked as it goes."""
    with browsing(settings, state_dir, taskhub, container, job) as browse:
        run = browse.open(run_ref)
        entry = find_entry(browse, run, path)
        chunks = chunks_of(browse, run, entry)
        digest, size = hashlib.md5(), 0
        first = next(chunks, b"")
        if not json_output and not force and out.isatty() and looks_binary(first[:SNIFF_BYTES]):
            raise InputError(f"{path!r} is not plain text: not written to a terminal (pipe it, redirect it, or give "
                             "--force)")
        if json_output:
            out.write(b'{"run_id":' + _json(run.run_id) + b',"path":' + _json(entry.path) + b',"size":'
                      + str(entry.size).encode() + b',"md5":' + _json(entry.md5 or "") + b',"content_base64":"')
        held = b""  # base64 goes out in groups of three bytes
        for chunk in _chain(first, chunks):
            digest.update(chunk)
            size += len(chunk)
            if json_output:
                held += chunk
                cut = len(held) - len(held) % 3
                out.write(base64.b64encode(held[:cut]))
                held = held[cut:]
            else:
                out.write(chunk)
        ok = size == entry.size and b64(digest.digest()) == entry.md5
        if json_output:
            out.write(base64.b64encode(held) + b'","verified":' + (b"true" if ok else b"false") + b"}\n")
        out.flush()
        if not ok:
            raise Mismatch(f"the bytes of {path!r} do not match run {run.run_id}'s record (MD5 or size differs): "
                           "the copy in the container is damaged or was replaced")


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _json(text: str) -> bytes:
    return json.dumps(text).encode()


@click.command("cat", cls=Command, epilog=exit_codes_help(0, 1, 2, 3, 5, 70, 130))
@click.argument("run_ref", metavar="RUN", shell_complete=complete_runs("backups"))
@click.argument("path", metavar="PATH")
@click.option("--force", "-f", is_flag=True, help="Write bytes that are not plain text to a terminal too.")
@click.option("--container", "-c", help="Read the run's sealed record from this container (all a new machine needs).")
@job_option(LATEST_JOB_HELP)
@json_option("Print one JSON object: run, path, size, recorded MD5, the bytes in base64, and whether they matched.")
@catalog_options
def command(run_ref: str, path: str, force: bool, container: str | None, job: str | None, json_output: bool,
            storage: StorageSettings, taskhub: TaskHubSettings | None, state_dir: Path) -> None:
    """Write one file of a backup run to stdout, exactly as the run recorded it.

    The bytes stream as they are downloaded and are checked against the MD5 the run recorded: when
    they do not match, the command ends with exit 1 and says so on stderr, after the bytes. Bytes
    that are not plain text are not written to a terminal unless --force. RUN is a run id, a unique
    prefix of one (4 characters at least), or `latest`.

    \b
    Examples:
      sitebackup cat latest wp-config.php -c backups
      sitebackup cat 20261206T0300 db/dump.sql.gz -c backups > dump.sql.gz
    """
    [record_path] = normalize_paths([path])
    if not record_path:
        raise click.UsageError("give the path of a file in the run")
    sys.stdout.flush()
    write_file(storage, run_ref, record_path, force=force, json_output=json_output,
               container=validate_container_name(container) if container else None, job=job, state_dir=state_dir,
               taskhub=taskhub, out=sys.stdout.buffer)

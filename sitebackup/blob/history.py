"""The stored copies of a blob name, current and snapshots, and which one holds a recorded version.

A run records each file's Content-MD5; later runs keep replaced content as blob snapshots
(``upload.replace``), and ``prune`` removes copies no kept run needs. So the version of a file a run
recorded is the current blob if its Content-MD5 is the recorded one, else the newest snapshot whose
Content-MD5 is; when neither remains, the version was pruned. One listing with snapshots answers this
for a whole prefix (the SDK pages it, 5,000 entries a request), never a request per file.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from azure.storage.blob import BlobClient, ContainerClient

from sitebackup.blob.naming import is_reserved
from sitebackup.local.files import b64

PRUNED = "pruned: no copy of the recorded version remains in the container"


@dataclass(frozen=True)
class Copy:
    """One stored copy of a blob name: the current blob (``snapshot`` None) or one of its snapshots."""

    name: str
    snapshot: str | None
    md5: str | None
    size: int
    etag: str | None = None
    tier: str | None = None  # the access tier the service reports for this copy


def _copies(container: ContainerClient, start: str | None) -> Iterator[Copy]:
    for blob in container.list_blobs(name_starts_with=start, include=["snapshots"]):
        yield Copy(blob.name, blob.snapshot, b64(blob.content_settings.content_md5), blob.size, blob.etag,
                   getattr(blob.blob_tier, "value", blob.blob_tier))


def list_copies(container: ContainerClient, prefix: str = "") -> Iterator[Copy]:
    """Every copy under *prefix* (the whole container when empty), sitebackup's reserved work files left out."""
    return (copy for copy in _copies(container, f"{prefix}/" if prefix else None) if not is_reserved(copy.name))


def copies_by_name(container: ContainerClient, prefix: str, names: Collection[str]) -> dict[str, list[Copy]]:
    """The copies of *names* (a set), from one listing of *prefix*: memory follows the names asked for."""
    found: dict[str, list[Copy]] = {}
    for copy in list_copies(container, prefix):
        if copy.name in names:
            found.setdefault(copy.name, []).append(copy)
    return found


def copies_of(container: ContainerClient, name: str) -> list[Copy]:
    """The copies of one blob name: a listing from that name on, one request (names are listed in order,
    so the name's own entries come before any longer name it starts)."""
    return list(itertools.takewhile(lambda copy: copy.name == name, _copies(container, name)))


def choose(copies: list[Copy], md5: str | None) -> Copy | None:
    """The copy holding the version hashed *md5*: the current blob if it is that version, else the newest
    such snapshot (snapshot ids are ISO timestamps: they sort by time)."""
    matching = [c for c in copies if c.md5 == md5 and md5 is not None]
    current = [c for c in matching if c.snapshot is None]
    if current:
        return current[0]
    return max(matching, key=lambda c: c.snapshot or "", default=None)


def copy_client(container: ContainerClient, copy: Copy) -> BlobClient:
    return container.get_blob_client(copy.name, snapshot=copy.snapshot)

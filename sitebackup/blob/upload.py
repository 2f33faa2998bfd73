"""Uploading one local file as a block blob with its Content-MD5, content type and mtime/mode metadata, shaped
by the run's ``UploadSpec``, and replacing a blob without losing the content an earlier run recorded there
(``replace``)."""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobBlock, BlobClient, ContainerClient, ContentSettings, StandardBlobTier

from sitebackup.local.files import SourceTree, b64, check_unchanged, fd_md5, read_whole
from sitebackup.model.records import FileEntry, PriorCopy
from sitebackup.model.work import UploadSpec

# Files up to this size are read, hashed and sent in one Put Blob: on Azurite and on
# real links alike, requests rather than bytes are the cost for small files.
SINGLE_PUT_BYTES = 8 * 1024 * 1024
STREAM_BLOCK_BYTES = 8 * 1024 * 1024
META_MTIME = "mtime_ns"
META_MODE = "mode"
# --tier: the access tier a blob gets with its upload (StandardBlobTier values)
ACCESS_TIERS = tuple(tier.value for tier in StandardBlobTier)


@dataclass(frozen=True)
class Uploaded:
    size: int
    mtime_ns: int
    md5: str  # base64, as Azure reports Content-MD5
    tier: str | None = None  # the access tier set with the upload; None: the account's default
    etag: str | None = None  # of the blob as this upload left it: the next run replaces it only if still so

    def record(self, relpath: str) -> FileEntry:
        """The file's line in the run record: what restore, verify and prune look for (by name and MD5)."""
        return FileEntry(relpath, self.size, self.mtime_ns, self.md5, self.tier, self.etag)


def replace_conditions(md5: str, prior: PriorCopy | None) -> dict[str, Any] | None:
    """The conditions under which content hashed *md5* may go over the blob without keeping what is there,
    as keyword arguments of the put or commit; None when the old content must be kept as a snapshot first.

    A name the baseline did not hold is written only if it does not exist (If-None-Match: \\*), and the
    baseline's own bytes only if the blob still is what the baseline wrote (If-Match: its ETag). Anything
    else (other bytes, or a condition that fails) may be content a run recorded: it is kept as a snapshot.
    """
    if prior is None:
        return {"match_condition": MatchConditions.IfMissing}
    if prior.md5 == md5 and prior.etag:
        return {"etag": prior.etag, "match_condition": MatchConditions.IfNotModified}
    return None


def keep_snapshot(blob: BlobClient) -> None:
    """Keep the blob's current content as a snapshot (Snapshot Blob: one request); nothing to keep if it is gone."""
    try:
        blob.create_snapshot()
    except ResourceNotFoundError:
        pass


def already_there(props: Any, md5: str, mtime_ns: int) -> bool:
    """Whether a blob found where the baseline did not expect it is this very version of the file (same
    Content-MD5 and mtime metadata): an attempt of the same run that was killed, or a lost state directory."""
    return b64(props.content_settings.content_md5) == md5 and (props.metadata or {}).get(META_MTIME) == str(mtime_ns)


def replace(blob: BlobClient, put: Callable[..., dict[str, Any]], md5: str, mtime_ns: int,
            prior: PriorCopy | None) -> str:
    """``put(**conditions)`` the version (*md5*, *mtime_ns*) of a file at *blob*, first keeping old content as a
    snapshot when it may differ (``replace_conditions``); returns the blob's ETag as the put left it.

    A new file and the baseline's own bytes cost no extra request, a changed file one (the snapshot).
    When the blob is not what the baseline recorded, it is asked for its properties: if it already is
    this version nothing is sent again, else it is kept as a snapshot and replaced.
    """
    conditions = replace_conditions(md5, prior)
    if conditions is not None:
        try:
            return str(put(**conditions)["etag"])
        except (ResourceExistsError, ResourceModifiedError):
            try:
                props = blob.get_blob_properties()
            except ResourceNotFoundError:
                return str(put()["etag"])
            if already_there(props, md5, mtime_ns):
                return str(props.etag)
    keep_snapshot(blob)
    return str(put()["etag"])


# a compressed file is typed as what it is, never as what is inside it: "site.tar.gz" typed as a tar would be
# saved or opened as one, and the blob carries no Content-Encoding, so no client inflates it on the way down
COMPRESSED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
                    "compress": "application/x-compress", "br": "application/x-brotli"}


def content_type(name: str) -> str:
    guessed, encoding = mimetypes.guess_type(name)
    if encoding is not None:
        return COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def blob_properties(name: str, st: os.stat_result, md5: bytes, spec: UploadSpec) -> dict[str, Any]:
    """What every backed-up blob carries, as keyword arguments of an upload or a block-list commit:
    mtime/mode metadata (restore puts them back), content type, the file's MD5 as Content-MD5, and
    what *spec* asks (the access tier, set by the same request: no second call per blob)."""
    props: dict[str, Any] = {
        "metadata": {META_MTIME: str(st.st_mtime_ns), META_MODE: format(st.st_mode & 0o7777, "04o")},
        "content_settings": ContentSettings(content_type=content_type(name), content_md5=bytearray(md5)),
    }
    if spec.tier:
        props["standard_blob_tier"] = StandardBlobTier(spec.tier)
    return props


def single_put_options(name: str, st: os.stat_result, md5: bytes, spec: UploadSpec) -> dict[str, Any]:
    """Keyword arguments of a one-request upload (sync or aio ``upload_blob``) of bytes hashed as *md5*.

    The MD5 goes twice: as the blob's Content-MD5 property, which the service stores unchecked, and
    as the request's transactional Content-MD5, which it checks against the bytes received, so a
    body damaged on the way is refused (400 Md5Mismatch) instead of stored under a correct-looking hash.
    """
    return {**blob_properties(name, st, md5, spec), "overwrite": True,
            "headers": {"Content-MD5": base64.b64encode(md5).decode("ascii")}}


def put_headers(name: str, st: os.stat_result, md5: bytes, spec: UploadSpec, prior_etag: str | None,
                if_missing: bool) -> dict[str, str]:
    """The headers of a Put Blob that ``single_put_options`` describes to the SDK, for a request built
    without it: the same properties, both Content-MD5s, the tier, and the condition ``replace`` chose
    (*if_missing*: If-None-Match, *prior_etag*: If-Match)."""
    digest = base64.b64encode(md5).decode("ascii")
    headers = {"Content-MD5": digest, "x-ms-blob-content-md5": digest, "x-ms-blob-content-type": content_type(name),
               f"x-ms-meta-{META_MTIME}": str(st.st_mtime_ns), f"x-ms-meta-{META_MODE}": format(st.st_mode & 0o7777, "04o")}
    if spec.tier:
        headers["x-ms-access-tier"] = StandardBlobTier(spec.tier).value
    if if_missing:
        headers["If-None-Match"] = "*"
    elif prior_etag:
        headers["If-Match"] = prior_etag
    return headers


def small_file_put(fd: int) -> tuple[bytes, os.stat_result, bytes]:
    """A small open file's bytes, stat and MD5, read once: what a one-request upload sends."""
    data, st = read_whole(fd)
    return data, st, hashlib.md5(data).digest()


def uploaded(st: os.stat_result, md5: bytes, tier: str | None = None, etag: str | None = None) -> Uploaded:
    return Uploaded(st.st_size, st.st_mtime_ns, base64.b64encode(md5).decode("ascii"), tier, etag)


def upload_file(container: ContainerClient, source: SourceTree, relpath: str, name: str, spec: UploadSpec, *,
                prior: PriorCopy | None = None, max_concurrency: int = 4) -> Uploaded:
    """Upload the file *relpath* of *source* as block blob *name* as *spec* says, over what the baseline recorded
    there (*prior*, ``replace``); FileChangedError when the file moved under us, so a blob is never recorded as
    backed up with content other than what we hashed."""
    with source.opened(relpath) as fd:
        return _upload_fd(container, fd, name, spec, prior, max_concurrency)


def _upload_fd(container: ContainerClient, fd: int, name: str, spec: UploadSpec, prior: PriorCopy | None,
               max_concurrency: int) -> Uploaded:
    blob = container.get_blob_client(name)
    if os.fstat(fd).st_size <= SINGLE_PUT_BYTES:
        data, st, md5 = small_file_put(fd)
        etag = replace(blob, lambda **c: blob.upload_blob(data, length=len(data), **single_put_options(name, st, md5, spec),
                                                          **c), uploaded(st, md5).md5, st.st_mtime_ns, prior)
        return uploaded(st, md5, spec.tier, etag)
    st = os.fstat(fd)
    md5 = fd_md5(fd)

    def put(**conditions: Any) -> dict[str, Any]:
        with open(fd, "rb", closefd=False) as fh:
            fh.seek(0)  # a second put (after a snapshot) sends the file from its start again
            return blob.upload_blob(fh, overwrite=True, length=st.st_size, max_concurrency=max_concurrency,
                                    validate_content=True, **blob_properties(name, st, md5, spec), **conditions)

    etag = replace(blob, put, uploaded(st, md5).md5, st.st_mtime_ns, prior)
    check_unchanged(fd, st.st_size, st.st_mtime_ns)
    return uploaded(st, md5, spec.tier, etag)


def commit_blocks(blob: BlobClient, ids: list[str], st: os.stat_result, md5: str, spec: UploadSpec,
                  prior: PriorCopy | None) -> Uploaded:
    """Commit the staged blocks *ids* as the file's blob, with the whole file's MD5 (base64) as its Content-MD5
    and what every backed-up blob carries, over what the baseline recorded at its name (``replace``)."""
    properties = blob_properties(blob.blob_name, st, base64.b64decode(md5), spec)
    etag = replace(blob, lambda **c: blob.commit_block_list([BlobBlock(block_id=i) for i in ids], **properties, **c),
                   md5, st.st_mtime_ns, prior)
    return Uploaded(st.st_size, st.st_mtime_ns, md5, spec.tier, etag)

"""Uploading one local file as a block blob with its Content-MD5, content type and mtime/mode metadata."""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob import ContainerClient, ContentSettings, StandardBlobTier

from sitebackup.local.files import check_unchanged, file_md5, read_whole

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

    def record(self, relpath: str) -> dict[str, Any]:
        """The run record of the file: what restore, verify and the next run read."""
        rec: dict[str, Any] = {"path": relpath, "size": self.size, "mtime_ns": self.mtime_ns, "md5": self.md5}
        if self.tier:
            rec["tier"] = self.tier
        return rec


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def blob_properties(name: str, st: os.stat_result, md5: bytes, tier: str | None = None) -> dict[str, Any]:
    """What every backed-up blob carries, as keyword arguments of an upload or a block-list commit:
    mtime/mode metadata (restore puts them back), content type, the file's MD5 as Content-MD5, and
    the access *tier* when one was chosen (set by the same request: no second call per blob)."""
    props: dict[str, Any] = {
        "metadata": {META_MTIME: str(st.st_mtime_ns), META_MODE: format(st.st_mode & 0o7777, "04o")},
        "content_settings": ContentSettings(content_type=content_type(name), content_md5=bytearray(md5)),
    }
    if tier:
        props["standard_blob_tier"] = StandardBlobTier(tier)
    return props


def single_put_options(name: str, st: os.stat_result, md5: bytes, tier: str | None = None) -> dict[str, Any]:
    """Keyword arguments of a one-request upload (sync or aio ``upload_blob``) of bytes hashed as *md5*.

    The MD5 goes twice: as the blob's Content-MD5 property, which the service stores unchecked, and
    as the request's transactional Content-MD5, which it checks against the bytes received, so a
    body damaged on the way is refused (400 Md5Mismatch) instead of stored under a correct-looking hash.
    """
    return {**blob_properties(name, st, md5, tier), "overwrite": True,
            "headers": {"Content-MD5": base64.b64encode(md5).decode("ascii")}}


def small_file_put(path: Path) -> tuple[bytes, os.stat_result, bytes]:
    """A small file's bytes, stat and MD5, read once: what a one-request upload sends."""
    data, st = read_whole(path)
    return data, st, hashlib.md5(data).digest()


def uploaded(st: os.stat_result, md5: bytes, tier: str | None = None) -> Uploaded:
    return Uploaded(st.st_size, st.st_mtime_ns, base64.b64encode(md5).decode("ascii"), tier)


def upload_file(container: ContainerClient, path: Path, name: str, *, max_concurrency: int = 4,
                tier: str | None = None) -> Uploaded:
    """Upload *path* as block blob *name*; FileChangedError when the file moved under us, so a blob
    is never recorded as backed up with content other than what we hashed."""
    if os.stat(path).st_size <= SINGLE_PUT_BYTES:
        data, st, md5 = small_file_put(path)
        container.get_blob_client(name).upload_blob(data, length=len(data),
                                                    **single_put_options(name, st, md5, tier))
        return uploaded(st, md5, tier)
    st = os.stat(path)
    md5 = file_md5(path)
    with open(path, "rb") as fh:
        container.get_blob_client(name).upload_blob(fh, overwrite=True, length=st.st_size,
                                                    max_concurrency=max_concurrency, validate_content=True,
                                                    **blob_properties(name, st, md5, tier))
    check_unchanged(path, st.st_size, st.st_mtime_ns)
    return uploaded(st, md5, tier)

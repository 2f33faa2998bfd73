"""The blob side: credentials and their order, naming rules, error classification and upload helpers.

Nothing here knows about durable orchestration; activities call these functions, the CLI
calls ``connect`` once before scheduling so that a bad destination fails fast.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings, ExponentialRetry

from sitebackup.errors import DestinationError, InputError

log = logging.getLogger("sitebackup.storage")

ENV_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ENV_ACCOUNT_URL = "AZURE_STORAGE_ACCOUNT_URL"
ENV_RETRIES = "SITEBACKUP_STORAGE_RETRIES"
DEFAULT_RETRIES = 5
MAX_BLOB_NAME = 1024
# Files up to this size are read, hashed and sent in one Put Blob: on Azurite and on
# real links alike, requests rather than bytes are the cost for small files.
SINGLE_PUT_BYTES = 8 * 1024 * 1024
STREAM_BLOCK_BYTES = 8 * 1024 * 1024
META_MTIME = "mtime_ns"
META_MODE = "mode"

_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
_SECRET_PATTERNS = [
    re.compile(r"(AccountKey=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessSignature=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"([?&]sig=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE),
]


class FileChangedError(Exception):
    """The file's size or modification time moved while we were reading it."""


def redact(text: str) -> str:
    """Blank out account keys, SAS signatures and bearer tokens in *text*."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def validate_container_name(name: str) -> str:
    if not _CONTAINER_RE.match(name or ""):
        raise InputError(
            f"invalid container name {name!r}: use 3-63 lowercase letters, digits and single hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def normalize_prefix(prefix: str | None) -> str:
    """Return *prefix* without surrounding slashes; refuse segments that could escape it."""
    if not prefix:
        return ""
    if "\\" in prefix or "\x00" in prefix:
        raise InputError(f"invalid prefix {prefix!r}: use '/' separators and no NUL characters")
    stripped = prefix.strip("/")
    segments = stripped.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise InputError(f"invalid prefix {prefix!r}: empty, '.' and '..' segments are not allowed")
    return stripped


def blob_name(prefix: str, relpath: str) -> str:
    if "\\" in relpath:
        # the service reads '\\' in a blob name as '/': the blob would land under another path
        raise ValueError("file name contains '\\', which Azure Blob Storage turns into '/'")
    name = f"{prefix}/{relpath}" if prefix else relpath
    if len(name) > MAX_BLOB_NAME:
        raise ValueError(f"blob name is {len(name)} characters; Azure allows {MAX_BLOB_NAME}")
    return name


@dataclass(frozen=True)
class StorageSettings:
    """Where credentials come from, in the documented order. Never serialized anywhere."""

    connection_string: str | None = None
    account_url: str | None = None

    @classmethod
    def from_options(cls, connection_string: str | None, account_url: str | None) -> "StorageSettings":
        return cls(
            connection_string=connection_string or os.environ.get(ENV_CONNECTION_STRING) or None,
            account_url=account_url or os.environ.get(ENV_ACCOUNT_URL) or None,
        )

    @property
    def configured(self) -> bool:
        return bool(self.connection_string or self.account_url)


NOT_CONFIGURED = (
    "no storage configured: pass --connection-string or set AZURE_STORAGE_CONNECTION_STRING, "
    "or pass --account-url (with a SAS, or signed in for DefaultAzureCredential); "
    "for a local Azurite use --connection-string UseDevelopmentStorage=true"
)


def _transport(pool_size: int) -> RequestsTransport:
    # one pooled connection per concurrent upload; urllib3's default of 10 drops and re-opens
    # connections (and warns) as soon as the upload window is wider than that
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True)


def storage_retries() -> int:
    value = os.environ.get(ENV_RETRIES, "").strip()
    if not value:
        return DEFAULT_RETRIES
    if not value.isdigit():
        raise InputError(f"{ENV_RETRIES} must be a whole number of retries, not {value!r}")
    return int(value)


def make_service_client(settings: StorageSettings, *, quick: bool = False,
                        pool_size: int = 32) -> tuple[BlobServiceClient, str]:
    """Build a client from *settings*; return it with a label that is safe to show and store.

    ``quick`` makes a client that gives up within seconds: used for the pre-flight check so an
    unreachable endpoint answers with exit 3 instead of minutes of retries.
    """
    if quick:
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1, random_jitter_range=1)
        kwargs = {"retry_policy": retry, "connection_timeout": 5, "read_timeout": 30}
    else:
        # about a minute of backoff (3, 5, 9, 17, 33 s) before a request is given up; fewer retries
        # (SITEBACKUP_STORAGE_RETRIES) make a long outage end the run sooner, as a resumable failure
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=storage_retries(),
                                 random_jitter_range=1)
        kwargs = {"retry_policy": retry, "connection_timeout": 20, "read_timeout": 300,
                  "transport": _transport(pool_size)}
    try:
        if settings.connection_string:
            check_connection_string(settings.connection_string)
            client = BlobServiceClient.from_connection_string(settings.connection_string, **kwargs)
            how = "connection string"
        elif settings.account_url:
            url = settings.account_url
            if urlsplit(url).query:
                client = BlobServiceClient(url, **kwargs)
                how = "SAS in --account-url"
            else:
                from azure.identity import DefaultAzureCredential

                client = BlobServiceClient(url, credential=DefaultAzureCredential(), **kwargs)
                how = "DefaultAzureCredential"
        else:
            raise InputError(NOT_CONFIGURED)
    except (ValueError, TypeError) as exc:
        raise InputError(f"malformed storage connection string or URL: {redact(str(exc))}") from None
    label = endpoint_label(client)
    log.info("storage: %s via %s", label, how)
    return client, label


def endpoint_label(client: BlobServiceClient | ContainerClient) -> str:
    """scheme://host[:port]/path of the account endpoint, never the query (which may hold a SAS)."""
    parts = urlsplit(client.url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


# a wrong key or an expired SAS (Azurite answers AuthorizationFailure where Azure says AuthenticationFailed)
_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo", "NoAuthenticationInformation"}


def check_connection_string(text: str) -> None:
    """Refuse what the SDK would accept and fail on later (empty or non-base64 keys); never echo values."""
    if text.strip().lower().rstrip(";") == "usedevelopmentstorage=true":
        return
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InputError("malformed storage connection string: expected Name=value pairs separated by ';'")
        fields[key.strip().lower()] = value.strip()
    if "accountkey" in fields:
        try:
            if not fields["accountkey"] or not base64.b64decode(fields["accountkey"], validate=True):
                raise ValueError
        except ValueError:
            raise InputError("malformed storage connection string: AccountKey is empty or not base64") from None
        if not fields.get("accountname"):
            raise InputError("malformed storage connection string: AccountKey without AccountName")


def classify(exc: BaseException, label: str) -> DestinationError | None:
    """Turn an Azure SDK exception into a one-line DestinationError, or None if it is per-file."""
    if isinstance(exc, ClientAuthenticationError):
        return DestinationError(f"authentication failed at {label}: check the key, SAS or identity")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return DestinationError(f"cannot reach the blob service at {label}")
    if isinstance(exc, HttpResponseError) and exc.status_code in (401, 403) and \
            getattr(exc.error_code, "value", exc.error_code) in _AUTH_CODES:
        return DestinationError(f"authentication failed at {label}: check the key, SAS or identity")
    if isinstance(exc, HttpResponseError) and exc.status_code in (401, 403):
        # error_code may be a StorageErrorCode enum: show its wire value (AuthorizationFailure)
        code = getattr(exc.error_code, "value", exc.error_code) or exc.status_code
        return DestinationError(f"access denied at {label} ({code})")
    return None


def connect(settings: StorageSettings, container: str) -> str:
    """Pre-flight: reach the service, create the container if missing; return the endpoint label."""
    client, label = make_service_client(settings, quick=True)
    try:
        client.get_container_client(container).create_container()
    except ResourceExistsError:
        pass
    except Exception as exc:  # the SDK raises many types; classify the ones that mean "destination"
        err = classify(exc, label)
        if err is not None:
            raise err from None
        raise DestinationError(f"cannot use container {container!r} at {label}: {redact(str(exc)).splitlines()[0]}") from None
    finally:
        client.close()
    return label


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_md5(path: Path | str) -> bytes:
    """MD5 of a file, streamed: never the whole file in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.digest()


def file_md5_b64(path: Path | str) -> str:
    """The file's MD5 as Azure reports Content-MD5 (base64)."""
    return base64.b64encode(file_md5(path)).decode("ascii")


@dataclass(frozen=True)
class Uploaded:
    size: int
    mtime_ns: int
    md5: str  # base64, as Azure reports Content-MD5


def blob_properties(name: str, st: os.stat_result, md5: bytes) -> dict[str, Any]:
    """What every backed-up blob carries, as keyword arguments of an upload or a block-list commit:
    mtime/mode metadata (restore puts them back), content type, and the file's MD5 as Content-MD5."""
    return {
        "metadata": {META_MTIME: str(st.st_mtime_ns), META_MODE: format(st.st_mode & 0o7777, "04o")},
        "content_settings": ContentSettings(content_type=content_type(name), content_md5=bytearray(md5)),
    }


def single_put_options(name: str, st: os.stat_result, md5: bytes) -> dict[str, Any]:
    """Keyword arguments of a one-request upload (sync or aio ``upload_blob``) of bytes hashed as *md5*.

    The MD5 goes twice: as the blob's Content-MD5 property, which the service stores unchecked, and
    as the request's transactional Content-MD5, which it checks against the bytes received, so a
    body damaged on the way is refused (400 Md5Mismatch) instead of stored under a correct-looking hash.
    """
    return {**blob_properties(name, st, md5), "overwrite": True,
            "headers": {"Content-MD5": base64.b64encode(md5).decode("ascii")}}


def upload_file(container: ContainerClient, path: Path, name: str, *, max_concurrency: int = 4) -> Uploaded:
    """Upload *path* as block blob *name* with Content-MD5, content type and mtime/mode metadata.

    Raises FileChangedError when the file moved under us, so a blob is never recorded as
    backed up with content other than what we hashed.
    """
    st = os.stat(path)
    blob = container.get_blob_client(name)
    if st.st_size <= SINGLE_PUT_BYTES:
        with open(path, "rb") as fh:
            data = fh.read()
        md5 = hashlib.md5(data).digest()
        _check_unchanged(path, st)
        blob.upload_blob(data, length=len(data), **single_put_options(name, st, md5))
    else:
        md5 = file_md5(path)
        with open(path, "rb") as fh:
            blob.upload_blob(fh, overwrite=True, length=st.st_size, max_concurrency=max_concurrency,
                             validate_content=True, **blob_properties(name, st, md5))
        _check_unchanged(path, st)
    return Uploaded(st.st_size, st.st_mtime_ns, base64.b64encode(md5).decode("ascii"))


def _check_unchanged(path: Path, before: os.stat_result) -> None:
    after = os.stat(path)
    if after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns:
        raise FileChangedError("changed during backup")

"""Blob service clients, sync and async, from one credential order; the pre-flight checks of a destination.

The order, documented in the README: ``--connection-string`` / ``AZURE_STORAGE_CONNECTION_STRING``, then
``--account-url`` / ``AZURE_STORAGE_ACCOUNT_URL`` with a SAS in its query, or without one through
``DefaultAzureCredential``. Settings live in memory only: never serialized, never logged.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import (
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    ExponentialRetry,
    generate_container_sas,
)

from sitebackup.blob.bwlimit import Limiter, PacedAdapter, process_limiter
from sitebackup.blob.errors import classify, one_line, redact
from sitebackup.blob.inflight import throttled_response
from sitebackup.errors import DestinationError, InputError

log = logging.getLogger("sitebackup.blob")
_sessions: dict[Limiter | None, requests.Session] = {}
_sessions_lock = threading.Lock()

ENV_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ENV_ACCOUNT_URL = "AZURE_STORAGE_ACCOUNT_URL"
ENV_RETRIES = "SITEBACKUP_STORAGE_RETRIES"
DEFAULT_RETRIES = 5
# response bodies are read in chunks of this size: azure-core's default (4 KiB) costs a Python-level
# iteration per 4 KiB, most of a large download's CPU; the SDK's own default is lost with our transports
DOWNLOAD_CHUNK_BYTES = 4 * 1024 * 1024
CONNECTION_TIMEOUT, READ_TIMEOUT = 20, 300  # seconds
QUICK_TIMEOUTS = (5, 30)  # (connection, read) seconds of a client that gives up soon
# idle connections kept for reuse per host: at least as many as any synchronous client has in flight at once
KEPT_CONNECTIONS = 1024
STORAGE_SCOPE = "https://storage.azure.com/.default"

NOT_CONFIGURED = (
    "no storage configured: pass --connection-string or set AZURE_STORAGE_CONNECTION_STRING, "
    "or pass --account-url (with a SAS, or signed in for DefaultAzureCredential); "
    "for a local Azurite use --connection-string UseDevelopmentStorage=true"
)


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

    def require(self) -> "StorageSettings":
        if not self.configured:
            raise InputError(NOT_CONFIGURED)
        return self


def storage_retries() -> int:
    value = os.environ.get(ENV_RETRIES, "").strip()
    if not value:
        return DEFAULT_RETRIES
    if not value.isdigit():
        raise InputError(f"{ENV_RETRIES} must be a whole number of retries, not {value!r}")
    return int(value)


def _session() -> requests.Session:
    """The connections of every synchronous client of this process (paced by the --bwlimit it has, if any): a
    client made for one step (the pre-flight, the job's lock, the catalog, the activities) takes a connection an
    earlier one left open instead of paying a TCP and TLS handshake, a round trip or more each, on the way to the
    first upload. Connections are opened on demand; as many are kept for reuse as any client has in flight."""
    limiter = process_limiter()
    with _sessions_lock:
        session = _sessions.get(limiter)
        if session is None:
            # urllib3's default of 10 kept drops and re-opens connections (and warns) as soon as more are in flight
            adapter = (requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=KEPT_CONNECTIONS)
                       if limiter is None else
                       PacedAdapter(limiter, pool_connections=4, pool_maxsize=KEPT_CONNECTIONS))
            session = _sessions[limiter] = requests.Session()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.hooks["response"].append(throttled_response)  # a 503 here narrows the asyncio window too
        return session


def _transport(timeouts: tuple[int, int]) -> RequestsTransport:
    # a transport of our own: the client's connection_timeout/read_timeout options would not reach it
    return RequestsTransport(session=_session(), session_owner=False, connection_data_block_size=DOWNLOAD_CHUNK_BYTES,
                             connection_timeout=timeouts[0], read_timeout=timeouts[1])


def _aio_transport(in_flight: int, timeouts: tuple[int, int] = (CONNECTION_TIMEOUT, READ_TIMEOUT)) -> Any:
    import aiohttp
    from azure.core.pipeline.transport import AioHttpTransport

    # the connector's limit is the real bound on parallel requests: match the window
    return AioHttpTransport(session=aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)),
                            session_owner=True, connection_timeout=timeouts[0], read_timeout=timeouts[1],
                            connection_data_block_size=DOWNLOAD_CHUNK_BYTES)


def _retry(aio: bool, quick: bool) -> Any:
    Retry: Any = ExponentialRetry
    if aio:
        from azure.storage.blob.aio import ExponentialRetry as AioRetry

        Retry = AioRetry
    if quick:
        return Retry(initial_backoff=1, increment_base=2, retry_total=1, random_jitter_range=1)
    # about a minute of backoff (3, 5, 9, 17, 33 s) before a request is given up; fewer retries
    # (SITEBACKUP_STORAGE_RETRIES) make a long outage end the run sooner, as a resumable failure
    return Retry(initial_backoff=1, increment_base=2, retry_total=storage_retries(), random_jitter_range=1)


def put_pipeline(credential: Any, in_flight: int, *after_retry: Any) -> Any:
    """An azure-core async pipeline client for lean requests beside an aio client whose ``credential``
    is given: the same retries, timeouts and connection window, and only the policies a request
    authorized by a SAS in its URL needs (a bearer token policy for a token credential), then *after_retry*
    (policies that see every attempt).

    The SDK's clients run a dozen policies and build a client object per blob; for small files
    that per-request work, not the bytes, is what the client spends its CPU on."""
    from azure.core import AsyncPipelineClient
    from azure.core.pipeline import AsyncPipeline
    from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy

    policies: list[Any] = [_retry(aio=True, quick=False)]
    if hasattr(credential, "get_token"):
        policies.append(AsyncBearerTokenCredentialPolicy(credential, STORAGE_SCOPE))
    policies.extend(after_retry)
    transport = _aio_transport(in_flight)
    return AsyncPipelineClient("", pipeline=AsyncPipeline(transport, policies))


def container_sas(credential: Any, container: str, lifetime: timedelta, read: bool = False) -> str | None:
    """A SAS for reading blobs of *container* (*read*), or else for creating and writing them, for
    *lifetime*, signed in memory with the account key the client *credential* holds (one HMAC per run,
    not one per request); None without a key. It lives only in this process: never stored, logged or
    passed to another."""
    key = getattr(credential, "account_key", None)
    if not key:
        return None
    permission = ContainerSasPermissions(read=True) if read else ContainerSasPermissions(create=True, write=True)
    return generate_container_sas(credential.account_name, container, account_key=key, permission=permission,
                                  expiry=datetime.now(timezone.utc) + lifetime)


def make_service_client(settings: StorageSettings, *, quick: bool = False, pool_size: int = 32,
                        aio: bool = False) -> tuple[Any, str]:
    """A ``BlobServiceClient`` (``aio``: the asyncio one, to be made inside its event loop) from *settings*,
    with a label that is safe to show and store.

    ``quick`` makes a client that gives up within seconds: used for the pre-flight check so an
    unreachable endpoint answers with exit 3 instead of minutes of retries. *pool_size* is the most connections
    the asyncio client opens; the synchronous clients share the process's (``_session``).
    """
    Client: Any = BlobServiceClient
    if aio:
        from azure.storage.blob.aio import BlobServiceClient as AioClient

        Client = AioClient
    timeouts = QUICK_TIMEOUTS if quick else (CONNECTION_TIMEOUT, READ_TIMEOUT)
    kwargs = {"retry_policy": _retry(aio, quick), "connection_timeout": timeouts[0], "read_timeout": timeouts[1],
              "transport": _aio_transport(pool_size, timeouts) if aio else _transport(timeouts)}
    try:
        if settings.connection_string:
            check_connection_string(settings.connection_string)
            client = Client.from_connection_string(settings.connection_string, **kwargs)
            how = "connection string"
        elif settings.account_url and urlsplit(settings.account_url).query:
            client = Client(settings.account_url, **kwargs)
            how = "SAS in --account-url"
        elif settings.account_url:
            client = Client(settings.account_url, credential=_default_credential(aio), **kwargs)
            how = "DefaultAzureCredential"
        else:
            raise InputError(NOT_CONFIGURED)
    except (ValueError, TypeError) as exc:
        raise InputError(f"malformed storage connection string or URL: {redact(str(exc))}") from None
    label = endpoint_label(client)
    log.info("storage: %s via %s", label, how)
    return client, label


def _default_credential(aio: bool) -> Any:
    # imported on use: azure.identity costs start-up time that key and SAS users should not pay
    if aio:
        from azure.identity.aio import DefaultAzureCredential as AioCredential

        return AioCredential()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@contextmanager
def service_client(settings: StorageSettings, **kwargs: Any) -> Iterator[tuple[BlobServiceClient, str]]:
    """``make_service_client`` for the duration of a block, closed after."""
    client, label = make_service_client(settings, **kwargs)
    try:
        yield client, label
    finally:
        client.close()


def endpoint_label(client: BlobServiceClient | ContainerClient) -> str:
    """scheme://host[:port]/path of the account endpoint, never the query (which may hold a SAS)."""
    parts = urlsplit(client.url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


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


def _preflight(settings: StorageSettings, container: str, create: bool) -> str:
    with service_client(settings.require(), quick=True) as (client, label):
        try:
            if create:
                client.get_container_client(container).create_container()
            else:
                client.get_container_client(container).get_container_properties()
        except ResourceExistsError:
            pass
        except ResourceNotFoundError:
            raise InputError(f"container {container!r} does not exist at {label}") from None
        except Exception as exc:  # the SDK raises many types; classify the ones that mean "destination"
            err = classify(exc, label)
            if err is not None:
                raise err from None
            raise DestinationError(f"cannot use container {container!r} at {label}: {one_line(exc)}") from None
    return label


def connect(settings: StorageSettings, container: str) -> str:
    """Pre-flight of a backup: reach the service, create the container if missing; the endpoint label."""
    return _preflight(settings, container, create=True)


def check_container(settings: StorageSettings, container: str) -> str:
    """Pre-flight of a restore or verify: the container must exist (never created); the endpoint label."""
    return _preflight(settings, container, create=False)

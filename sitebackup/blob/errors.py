"""What a failure at the blob service means: the whole destination (a DestinationError that stops the
run, resumable) or one file (a one-line reason), with secrets redacted from every message."""

from __future__ import annotations

import re
from typing import Any
from xml.etree import ElementTree

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from sitebackup.errors import DestinationError
from sitebackup.local.files import FileChangedError, describe_os_error

_SECRET_PATTERNS = [
    re.compile(r"(AccountKey=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessSignature=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"([?&]sig=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE),
]
# a wrong key or an expired SAS (Azurite answers AuthorizationFailure where Azure says AuthenticationFailed)
_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo", "NoAuthenticationInformation"}
# as the SDK maps them; anything else is an HttpResponseError
_ERROR_TYPES: dict[int, type[HttpResponseError]] = {
    401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError, 412: ResourceModifiedError}
# the service refuses to read or overwrite a blob in the Archive tier until it is rehydrated
ARCHIVED = ("blob is in the Archive tier: rehydrate it first (az storage blob set-tier --container-name CONTAINER "
            "--name BLOB --tier Hot --rehydrate-priority Standard; this takes hours), then run again")


def response_error(response: Any) -> HttpResponseError:
    """The exception the SDK raises for a refused storage request, for a request sent without it: the
    type ``replace`` and ``classify`` tell apart, the service's ``x-ms-error-code`` as ``error_code``,
    its message first (what one-line reports show)."""
    code = response.headers.get("x-ms-error-code")
    try:
        message = ElementTree.fromstring(response.text()).findtext("Message") or ""
    except ElementTree.ParseError:
        message = ""
    kind = _ERROR_TYPES.get(response.status_code, HttpResponseError)
    if code in _AUTH_CODES:
        kind = ClientAuthenticationError
    error = kind(message=f"{message.splitlines()[0] if message else response.reason}\nErrorCode:{code}",
                 response=response)
    error.error_code = code  # type: ignore[attr-defined]  # as the SDK's own deserialized errors carry it
    return error


def redact(text: str) -> str:
    """Blank out account keys, SAS signatures and bearer tokens in *text*."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, redacted (its type name when it has none)."""
    text = str(exc)
    return redact(text).splitlines()[0] if text.strip() else type(exc).__name__


def error_code(exc: HttpResponseError) -> str | None:
    """The service's error code as its wire string (the SDK may give a StorageErrorCode enum), or None: an
    HttpResponseError the SDK raises of its own (a body it could not decode, say) has no error_code at all."""
    code = getattr(exc, "error_code", None)
    return getattr(code, "value", code)


def is_archived(exc: BaseException) -> bool:
    return isinstance(exc, HttpResponseError) and error_code(exc) == "BlobArchived"


def classify(exc: BaseException, label: str) -> DestinationError | None:
    """Turn an Azure SDK exception into a one-line DestinationError, or None if it is per-file."""
    if isinstance(exc, ClientAuthenticationError):
        return DestinationError(f"authentication failed at {label}: check the key, SAS or identity")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return DestinationError(f"cannot reach the blob service at {label}")
    if isinstance(exc, HttpResponseError) and exc.status_code in (401, 403):
        code = error_code(exc)
        if code in _AUTH_CODES:
            return DestinationError(f"authentication failed at {label}: check the key, SAS or identity")
        return DestinationError(f"access denied at {label} ({code or exc.status_code})")
    return None


def file_error(exc: BaseException, label: str) -> str:
    """Why one file failed, in one line; raises the DestinationError instead when the whole
    destination is failing, so the orchestration's retry policy and `resume` take over."""
    if isinstance(exc, (FileChangedError, ValueError)):
        return str(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if is_archived(exc):
        return ARCHIVED
    fatal = classify(exc, label)
    if fatal is not None:
        raise fatal from None
    return one_line(exc)

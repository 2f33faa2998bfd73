"""The Durable Task Scheduler connection string: parsing, validation and the credential it names.

``Endpoint=https://...;TaskHub=...;Authentication=DefaultAzure`` is the format the other Durable
Task SDKs use; durabletask-azuremanaged has no parser for it. Errors name the offending key, never
a value, so a pasted secret is not echoed back.

A ``sitebackup serve`` endpoint also wants its token: ``TokenFile=PATH`` names the file that holds
it (a path is safe on a command line, the secret is not), or ``SITEBACKUP_SERVE_TOKEN`` carries the
token itself in the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sitebackup.errors import InputError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

ENV_TASKHUB = "DURABLE_TASK_SCHEDULER_CONNECTION_STRING"
ENV_SERVE_TOKEN = "SITEBACKUP_SERVE_TOKEN"

# canonical spelling by lower-cased key
AUTH_MODES = {m.lower(): m for m in
              ("DefaultAzure", "ManagedIdentity", "WorkloadIdentity", "Environment", "AzureCli", "None")}
_KEYS = {k.lower(): k for k in ("Endpoint", "TaskHub", "Authentication", "ClientID", "TenantID", "TokenFile")}
_CLIENT_ID_MODES = {"DefaultAzure", "ManagedIdentity", "WorkloadIdentity"}


@dataclass(frozen=True)
class TaskHubSettings:
    host_address: str  # host:port, scheme removed: the SDK takes TLS from secure_channel
    secure: bool
    taskhub: str
    authentication: str
    client_id: str | None = None
    tenant_id: str | None = None
    token_file: str | None = None

    @property
    def label(self) -> str:
        """For messages: where and which hub, nothing secret."""
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.host_address} task hub {self.taskhub!r}"

    def serve_token(self) -> str | None:
        """The token for a `sitebackup serve` endpoint: from ``TokenFile``, else the environment."""
        if self.authentication != "None":
            return None
        if self.token_file is None:
            return os.environ.get(ENV_SERVE_TOKEN, "").strip() or None
        path = os.path.expanduser(self.token_file)
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail(f"cannot read TokenFile {path}: {getattr(exc, 'strerror', None) or 'not a token file'}") from None
        if not token:
            raise _fail(f"TokenFile {path} is empty")
        return token

    def credential(self) -> "TokenCredential | None":
        try:
            return self._credential()
        except ValueError as exc:  # e.g. WorkloadIdentity outside a configured pod
            raise _fail(f"Authentication={self.authentication} cannot be used here: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'not configured'}") from None

    def _credential(self) -> "TokenCredential | None":
        if self.authentication == "None":
            return None
        from azure import identity

        if self.authentication == "DefaultAzure":
            return identity.DefaultAzureCredential(managed_identity_client_id=self.client_id)
        if self.authentication == "ManagedIdentity":
            return identity.ManagedIdentityCredential(client_id=self.client_id)
        if self.authentication == "WorkloadIdentity":
            # the pod's injected AZURE_* variables fill in whatever the string leaves out
            return identity.WorkloadIdentityCredential(client_id=self.client_id, tenant_id=self.tenant_id)
        if self.authentication == "Environment":
            return identity.EnvironmentCredential()
        return identity.AzureCliCredential(tenant_id=self.tenant_id or "")


def _fail(problem: str) -> InputError:
    return InputError(f"task hub connection string: {problem}")


def parse(text: str) -> TaskHubSettings:
    """Parse a connection string; raises ``InputError`` with a one-line reason when it is malformed."""
    values: dict[str, str] = {}
    for segment in text.split(";"):
        if not segment.strip():
            continue
        key, sep, value = segment.partition("=")
        key = key.strip()
        if not sep:
            raise _fail("expected Key=Value pairs separated by ';', got a segment without '='")
        canonical = _KEYS.get(key.lower())
        if canonical is None:
            shown = f" {key!r}" if key.isidentifier() and len(key) <= 32 else ""
            raise _fail(f"unknown key{shown} (expected {', '.join(_KEYS.values())})")
        if canonical in values:
            raise _fail(f"{canonical} is given more than once")
        value = value.strip()
        if not value:
            raise _fail(f"{canonical} is empty")
        values[canonical] = value

    for required in ("Endpoint", "TaskHub", "Authentication"):
        if required not in values:
            raise _fail(f"{required}= is missing (format: Endpoint=https://...;TaskHub=NAME;"
                        f"Authentication={'|'.join(AUTH_MODES.values())})")

    auth = AUTH_MODES.get(values["Authentication"].lower())
    if auth is None:
        raise _fail(f"Authentication must be one of {', '.join(AUTH_MODES.values())}")
    host_address, secure = _endpoint(values["Endpoint"])
    if not secure and auth != "None":
        raise _fail(f"Authentication={auth} needs an https:// endpoint: tokens are never sent in plaintext")
    client_id = values.get("ClientID")
    if client_id and auth not in _CLIENT_ID_MODES:
        raise _fail(f"ClientID applies only to {', '.join(sorted(_CLIENT_ID_MODES))}, not to Authentication={auth}")
    if "TokenFile" in values and auth != "None":
        raise _fail(f"TokenFile applies only to Authentication=None (a `sitebackup serve` endpoint), not to {auth}")
    return TaskHubSettings(host_address=host_address, secure=secure, taskhub=values["TaskHub"],
                           authentication=auth, client_id=client_id, tenant_id=values.get("TenantID"),
                           token_file=values.get("TokenFile"))


def _endpoint(value: str) -> tuple[str, bool]:
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _fail("Endpoint must start with https:// (or http:// for a local plaintext endpoint)")
    try:
        port = parts.port
    except ValueError:
        raise _fail("Endpoint has an invalid port") from None
    if not parts.hostname:
        raise _fail("Endpoint has no host name")
    if parts.username or parts.password:
        raise _fail("Endpoint must not carry user information")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _fail("Endpoint must be a bare scheme://host[:port] without a path or query")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    secure = scheme == "https"
    return f"{host}:{port or (443 if secure else 80)}", secure


def from_option(value: str | None) -> TaskHubSettings | None:
    """The scheduler settings from ``--taskhub`` or its environment variable; None means the embedded backend."""
    if value is None:
        value = os.environ.get(ENV_TASKHUB)
    if value is None or not value.strip():
        return None
    return parse(value)

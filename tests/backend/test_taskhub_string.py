"""The Durable Task Scheduler connection string parser: accepted and rejected forms (pure logic)."""

from __future__ import annotations

import pytest

from sitebackup.durable.taskhub import ENV_TASKHUB, from_option, parse
from sitebackup.errors import EXIT_USAGE, InputError


def test_azure_endpoint_with_default_credential():
    s = parse("Endpoint=https://myscheduler.westus2.durabletask.io;TaskHub=backups;Authentication=DefaultAzure")
    assert (s.host_address, s.secure, s.taskhub, s.authentication, s.client_id) == (
        "myscheduler.westus2.durabletask.io:443", True, "backups", "DefaultAzure", None)


def test_keys_and_modes_are_case_insensitive_and_spaces_and_trailing_semicolon_ignored():
    s = parse(" endpoint = HTTPS://Sched.example.com:8443/ ; TASKHUB=hub1;authentication=managedidentity;"
              "clientid=00000000-0000-0000-0000-000000000001;")
    assert s.host_address == "sched.example.com:8443"
    assert s.authentication == "ManagedIdentity"
    assert s.client_id == "00000000-0000-0000-0000-000000000001"


def test_local_plaintext_endpoint():
    s = parse("Endpoint=http://127.0.0.1:4001;TaskHub=default;Authentication=None")
    assert (s.host_address, s.secure, s.authentication) == ("127.0.0.1:4001", False, "None")
    assert s.credential() is None
    assert "127.0.0.1:4001" in s.label and "default" in s.label


@pytest.mark.parametrize("mode", ["DefaultAzure", "ManagedIdentity", "WorkloadIdentity", "Environment", "AzureCli"])
def test_every_mode_builds_a_credential(mode, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("x")
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000000002")
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000003")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token))
    s = parse(f"Endpoint=https://x.durabletask.io;TaskHub=h;Authentication={mode}")
    assert s.credential() is not None


@pytest.mark.parametrize("text, reason", [
    ("", "Endpoint= is missing"),
    ("Endpoint=https://x.io;TaskHub=h", "Authentication= is missing"),
    ("Endpoint=https://x.io;Authentication=None", "TaskHub= is missing"),
    ("TaskHub=h;Authentication=None", "Endpoint= is missing"),
    ("Endpoint=https://x.io;TaskHub=;Authentication=None", "TaskHub is empty"),
    ("Endpoint=https://x.io;TaskHub=h;Authentication=Password", "Authentication must be one of"),
    ("Endpoint=ftp://x.io;TaskHub=h;Authentication=None", "must start with https://"),
    ("Endpoint=x.io:443;TaskHub=h;Authentication=None", "must start with https://"),
    ("Endpoint=https://;TaskHub=h;Authentication=None", "no host name"),
    ("Endpoint=https://x.io:99999;TaskHub=h;Authentication=None", "invalid port"),
    ("Endpoint=https://x.io/v1?a=b;TaskHub=h;Authentication=None", "without a path or query"),
    ("Endpoint=http://x.io;TaskHub=h;Authentication=DefaultAzure", "needs an https:// endpoint"),
    ("Endpoint=https://x.io;TaskHub=h;TaskHub=g;Authentication=None", "more than once"),
    ("Endpoint=https://x.io;TaskHub=h;Authentication=AzureCli;ClientID=abc", "ClientID applies only"),
    ("Endpoint=https://x.io;TaskHub=h;Authentication=None;Colour=blue", "unknown key 'Colour'"),
    ("Endpoint=https://x.io;TaskHub=h;Authentication=None;justtext", "without '='"),
])
def test_rejected_forms_say_why_in_one_line(text, reason):
    with pytest.raises(InputError) as info:
        parse(text)
    message = str(info.value)
    assert reason in message
    assert message.startswith("task hub connection string: ")
    assert "\n" not in message
    assert info.value.exit_code == EXIT_USAGE


def test_workload_identity_outside_a_pod_is_an_input_error(monkeypatch):
    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    s = parse("Endpoint=https://x.io;TaskHub=h;Authentication=WorkloadIdentity")
    with pytest.raises(InputError, match="Authentication=WorkloadIdentity cannot be used here"):
        s.credential()


def test_secrets_in_a_malformed_string_are_not_echoed():
    secret = "sig=Zm9vYmFyc2VjcmV0c2VjcmV0"
    for text in (f"Endpoint=https://x.io;TaskHub=h;Authentication=None;{secret}",
                 f"Endpoint=https://x.io;TaskHub=h;Authentication=None;{secret.replace('=', '')}",
                 f"Endpoint=https://x.io;TaskHub=h;Authentication={secret}"):
        with pytest.raises(InputError) as info:
            parse(text)
        assert "Zm9vYmFy" not in str(info.value)


def test_from_option_prefers_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_TASKHUB, raising=False)
    assert from_option(None) is None
    monkeypatch.setenv(ENV_TASKHUB, "Endpoint=http://127.0.0.1:1;TaskHub=env;Authentication=None")
    assert from_option(None).taskhub == "env"
    assert from_option("Endpoint=http://127.0.0.1:1;TaskHub=opt;Authentication=None").taskhub == "opt"

"""Pure-logic unit tests: naming rules, batching, redaction, the default-command parser."""

from __future__ import annotations

import threading

import pytest
from azure.core.exceptions import HttpResponseError

from sitebackup.blob import naming
from sitebackup.blob.errors import file_error, redact
from sitebackup.errors import InputError
from sitebackup.model.work import FileRef
from sitebackup.workflows.window import stream_pages


def plan_batches(files, **kwargs):
    return list(stream_pages(files, lambda entry: entry.size, **kwargs))


@pytest.mark.parametrize("name", ["abc", "backups", "a-b-c", "a1b2", "x" * 63])
def test_valid_container_names(name):
    assert naming.validate_container_name(name) == name


@pytest.mark.parametrize("name", ["", "ab", "x" * 64, "Abc", "a_b", "-ab", "ab-", "a--b", "a.b"])
def test_invalid_container_names(name):
    with pytest.raises(InputError):
        naming.validate_container_name(name)


def test_prefix_normalization():
    assert naming.normalize_prefix("/nightly/web/") == "nightly/web"
    assert naming.normalize_prefix("") == ""
    for bad in ("a/../b", "..", "a//b", "./a", "a\\b"):
        with pytest.raises(InputError):
            naming.normalize_prefix(bad)


def test_blob_name_joins_and_bounds_length():
    assert naming.blob_name("", "a/b.txt") == "a/b.txt"
    assert naming.blob_name("p/q", "a/b.txt") == "p/q/a/b.txt"
    with pytest.raises(ValueError):
        naming.blob_name("", "x" * 1025)


def test_redact_hides_keys_and_sas():
    text = ("AccountName=a;AccountKey=c2VjcmV0a2V5Cg==;EndpointSuffix=x "
            "https://a.blob.core.windows.net/?sv=2022&sig=abc%2Fdef&se=1 Authorization: Bearer eyJ0eXAi.x.y")
    out = redact(text)
    assert "c2VjcmV0a2V5Cg" not in out and "abc%2Fdef" not in out and "eyJ0eXAi" not in out
    assert "AccountName=a" in out


def test_batches_bounded_by_count_and_bytes():
    files = [FileRef(f"f{i}", 1000, 0) for i in range(1000)]
    batches = plan_batches(files, min_batches=1, batch_files=256, batch_bytes=100_000)
    assert all(len(b) <= 100 for b in batches)
    assert sum(len(b) for b in batches) == 1000


def test_small_trees_are_cut_to_fill_the_window():
    files = [FileRef(f"f{i}", 10, 0) for i in range(100)]
    assert len(plan_batches(files, min_batches=20)) == 20


def test_large_files_go_alone():
    files = [FileRef("a", 10, 0), FileRef("big", 50, 0), FileRef("b", 10, 0)]
    batches = plan_batches(files, min_batches=1, batch_bytes=40)
    assert [[e.path for e in b] for b in batches if any(e.path == "big" for e in b)] == [["big"]]


def test_every_command_has_help_with_a_description_and_examples():
    from click.testing import CliRunner

    from sitebackup.cli import cli

    runner = CliRunner()
    for name, command in cli.commands.items():
        short = command.get_short_help_str(limit=80)
        assert short and not short.endswith("..."), (name, short)
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output, name
        assert "Exit codes" in result.output, name


def test_cancel_check_asks_again_when_the_backend_changed_the_run_or_the_interval_passed():
    from types import SimpleNamespace

    from durabletask.client import OrchestrationStatus

    from sitebackup.commands.hosting import CancelCheck

    status = {"value": OrchestrationStatus.RUNNING}
    asked: list[str] = []
    made: list[bool] = []

    class Client:
        def __init__(self, patient: bool = True):
            made.append(patient)

        def get_orchestration_state(self, run_id, fetch_payloads=True):
            asked.append(run_id)
            return SimpleNamespace(runtime_status=status["value"])

    runtime = SimpleNamespace(version=0, client=Client, stopping=threading.Event())
    runtime.status_version = lambda run_id: runtime.version
    now = {"t": 100.0}
    check = CancelCheck(runtime, interval=1.0, clock=lambda: now["t"])
    assert [check("r"), check("r"), check("r")] == [False, False, False]
    assert len(asked) == 1  # cached between files
    status["value"] = OrchestrationStatus.TERMINATED
    assert check("r") is False  # nothing says the run changed yet
    runtime.version += 1  # this process's backend applied the cancel
    assert check("r") is True and len(asked) == 2
    assert check("r") is True and len(asked) == 2  # a cancel is final: never asked again
    check2 = CancelCheck(runtime, interval=1.0, clock=lambda: now["t"])
    status["value"] = OrchestrationStatus.RUNNING
    assert check2("s") is False
    now["t"] += 1.5  # under the scheduler nothing moves the version: the interval decides
    status["value"] = OrchestrationStatus.TERMINATED
    assert check2("s") is True
    check3 = CancelCheck(runtime, interval=1.0, clock=lambda: now["t"])
    status["value"] = OrchestrationStatus.RUNNING
    assert check3("t") is False
    runtime.stopping.set()  # Ctrl-C or SIGTERM: this process's uploads end as for a cancel, whatever the run says
    assert check3("t") is True
    # asked on the upload loop's thread too: a client that fails at once when the backend is going away
    assert made == [False, False, False]


def test_a_fresh_cancel_check_asks_the_backend_every_time():
    """Before a block range: a cancel that another process applied (its backend, not this one's, moved the run)
    is seen at once, not after the interval."""
    from types import SimpleNamespace

    from durabletask.client import OrchestrationStatus

    from sitebackup.commands.hosting import CancelCheck

    status = {"value": OrchestrationStatus.RUNNING}
    asked: list[str] = []

    class Client:
        def __init__(self, patient: bool = True):
            pass

        def get_orchestration_state(self, run_id, fetch_payloads=True):
            asked.append(run_id)
            return SimpleNamespace(runtime_status=status["value"])

    runtime = SimpleNamespace(client=Client, stopping=threading.Event(), status_version=lambda run_id: 0)
    check = CancelCheck(runtime, interval=1.0, clock=lambda: 100.0)
    assert [check("r"), check("r", fresh=True), check("r", fresh=True)] == [False, False, False]
    assert len(asked) == 3
    status["value"] = OrchestrationStatus.TERMINATED
    assert check("r") is False  # between files: the cached answer, within the interval
    assert check("r", fresh=True) is True and check("r") is True and len(asked) == 4


def test_both_transports_of_our_own_carry_the_clients_timeouts():
    import asyncio

    from sitebackup.blob.clients import CONNECTION_TIMEOUT, READ_TIMEOUT, StorageSettings, make_service_client

    settings = StorageSettings(connection_string="DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;"
                                                 "BlobEndpoint=http://127.0.0.1:9/a;")
    client, _label = make_service_client(settings)
    config = client._config.transport.connection_config  # the SDK reads its timeouts from here
    assert (config.timeout, config.read_timeout) == (CONNECTION_TIMEOUT, READ_TIMEOUT)
    client.close()

    async def aio() -> tuple[float, float]:
        client, _label = make_service_client(settings, aio=True)
        async with client:
            config = client._config.transport.connection_config
            return config.timeout, config.read_timeout

    assert asyncio.run(aio()) == (CONNECTION_TIMEOUT, READ_TIMEOUT)


def test_the_synchronous_clients_of_a_process_share_its_connections_with_their_own_timeouts():
    from sitebackup.blob.clients import (
        CONNECTION_TIMEOUT,
        QUICK_TIMEOUTS,
        READ_TIMEOUT,
        StorageSettings,
        make_service_client,
    )

    settings = StorageSettings(connection_string="DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;"
                                                 "BlobEndpoint=http://127.0.0.1:9/a;")
    quick, _label = make_service_client(settings, quick=True)  # the pre-flight's, the lock's
    quick.close()  # closing a client leaves the process's connections open for the next
    steady, _label = make_service_client(settings)  # the activities'
    try:
        assert steady._config.transport.session is quick._config.transport.session
        config = quick._config.transport.connection_config
        assert (config.timeout, config.read_timeout) == QUICK_TIMEOUTS
        config = steady._config.transport.connection_config
        assert (config.timeout, config.read_timeout) == (CONNECTION_TIMEOUT, READ_TIMEOUT)
    finally:
        steady.close()


def test_an_sdk_error_without_a_service_code_fails_the_file_in_one_line():
    # the SDK raises HttpResponseError of its own (a body it could not decode) with no error_code attribute
    exc = HttpResponseError("Received response with content-encoding: gzip, but failed to decode it.")
    assert not hasattr(exc, "error_code")
    assert file_error(exc, "http://127.0.0.1:1/acct") == "Received response with content-encoding: gzip, but failed to decode it."

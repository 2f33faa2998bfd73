"""The command line's shape, in process and without Azurite: one module per command owning its click
definition, a small ``cli.py`` that learns --json and --debug from click (never from argv), the option
groups that reach a command as typed values, and exit-code texts made from the one table."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest

from sitebackup.blob.clients import StorageSettings
from sitebackup.cli import cli, run
from sitebackup.commands import backup, list_runs, prune
from sitebackup.commands.options import Session, set_log_levels
from sitebackup.commands.retention import Policy
from sitebackup.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_USAGE, exit_codes_help
from sitebackup.local import incremental
from sitebackup.model.work import BackupCounts, Summary
from sitebackup.ui.metrics import GAUGES

ROOT = Path(__file__).resolve().parents[2]
CLI_SOURCE = (ROOT / "sitebackup" / "cli.py").read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def no_scheduler_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DURABLE_TASK_SCHEDULER_CONNECTION_STRING", "AZURE_STORAGE_CONNECTION_STRING",
                 "AZURE_STORAGE_ACCOUNT_URL", "SITEBACKUP_BWLIMIT"):
        monkeypatch.delenv(name, raising=False)


def test_each_command_is_defined_in_its_own_module():
    defined_in = {}
    for name, command in cli.commands.items():
        module = inspect.getmodule(command.callback)
        assert module is not None and module.__name__.startswith("sitebackup.commands."), name
        assert importlib.import_module(module.__name__).command is command, name
        defined_in[name] = module.__name__
    assert len(set(defined_in.values())) == len(defined_in), f"modules defining several commands: {defined_in}"
    assert set(cli.commands) == {"backup", "restore", "verify", "prune", "worker", "serve", "status", "list",
                                 "resume", "cancel", "purge", "check", "unlock", "ls", "diff", "find", "cat", "stats"}


def test_every_command_has_help_examples_and_its_exit_codes_from_the_table():
    for name, command in cli.commands.items():
        assert command.help and "Example" in command.help, name
        codes = [int(code) for code in re.findall(r"(?:^Exit codes: |; )(\d+) ", command.epilog or "")]
        assert codes and 0 in codes and EXIT_USAGE in codes, (name, command.epilog)
        assert command.epilog == exit_codes_help(*codes), name
    assert cli.epilog == exit_codes_help()


def test_the_metrics_help_names_every_exit_code():
    text = GAUGES["sitebackup_last_run_exit_code"]
    assert all(f"{e.code} {e.name}" in text for e in EXIT_CODES), text


def test_cli_py_only_assembles_and_never_reads_argv():
    assert len(CLI_SOURCE.splitlines()) < 250
    assert "sys.argv" not in CLI_SOURCE and '"--json" in' not in CLI_SOURCE and '"--debug" in' not in CLI_SOURCE
    assert "@click.command" not in CLI_SOURCE and "click.option" not in CLI_SOURCE


@pytest.mark.parametrize("args", [
    ["backup", "--container", "abc", "--json"],  # a missing argument, found after --json is recorded
    ["{tmp}", "-c", "abc", "--bogus", "--json"],  # an unknown option stops the parser before --json
    ["{tmp}", "-c", "abc", "--json", "--prefix"],  # so does an option without its value
    ["status", "--json"],
    ["{tmp}", "-c", "abc", "--taskhub", "garbage", "--json"],  # an option's callback refuses before --json's turn
])
def test_with_json_a_usage_error_is_also_one_json_object(tmp_path, capsys, args):
    session = Session()
    assert run([a.replace("{tmp}", str(tmp_path)) for a in args], session) == EXIT_USAGE
    assert session.json_output
    out, err = capsys.readouterr()
    event = json.loads(out)
    assert event["event"] == "error" and event["exit_code"] == EXIT_USAGE and event["message"] in err


def test_a_json_that_is_the_value_of_another_option_is_not_the_flag(tmp_path, capsys):
    session = Session()
    assert run([str(tmp_path / "missing"), "-c", "abc", "--prefix", "--json"], session) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert not session.json_output and out == "" and "does not exist" in err


@pytest.mark.parametrize("debug", [False, True])
def test_debug_typed_after_the_command_shows_the_traceback_of_an_internal_error(tmp_path, capsys, monkeypatch, debug):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(list_runs, "list_runs", broken)
    session = Session()
    try:
        code = run(["list", "--state-dir", str(tmp_path), *(["--debug"] if debug else []), "--json"], session)
    finally:
        set_log_levels(debug=False)
    out, err = capsys.readouterr()
    assert code == EXIT_INTERNAL and session.debug is debug
    assert ("Traceback" in err) is debug and "internal error: boom" in err
    assert json.loads(out)["exit_code"] == EXIT_INTERNAL


def test_backup_takes_its_options_as_typed_groups(tmp_path, monkeypatch):
    seen = {}

    def run_backup(request, settings, printer, **kwargs):
        seen.update(request=request, settings=settings, printer=printer, **kwargs)
        return Summary(kind="BackupSiteContent", counts=BackupCounts(), runtime_status="COMPLETED")

    monkeypatch.setattr(backup, "run_backup", run_backup)
    state = tmp_path / "state"
    code = run([str(tmp_path), "-c", "abc", "--connection-string", "UseDevelopmentStorage=true", "--checksum",
                "--exclude", "*.tmp", "--include", "keep.tmp", "--follow-symlinks", "-q", "--tier", "cool",
                "--state-dir", str(state)], Session())
    assert code == 0
    request = seen["request"]
    assert seen["settings"] == StorageSettings(connection_string="UseDevelopmentStorage=true", account_url=None)
    assert seen["taskhub"] is None and seen["local_worker"] is True and seen["detach"] is False
    assert request.compare == incremental.MODE_CHECKSUM and request.follow_symlinks
    assert request.patterns == ["*.tmp", "!keep.tmp"] and request.upload.tier == "Cool" and request.state_dir == state


def test_prune_takes_its_keep_rules_as_one_policy(tmp_path, monkeypatch, capsys):
    seen = {}

    def run_prune(request, settings, taskhub):
        seen.update(request=request, settings=settings, taskhub=taskhub)
        return {"kept": [], "removed": []}

    monkeypatch.setattr(prune, "run_prune", run_prune)
    assert run(["prune", "-c", "abc", "--keep-last", "1", "--keep-daily", "7", "--keep-within", "30d", "--json",
                "--state-dir", str(tmp_path)], Session()) == 0
    assert seen["request"].policy == Policy(last=1, daily=7, within=timedelta(days=30))
    assert seen["request"].state_dir == tmp_path and seen["taskhub"] is None
    assert json.loads(capsys.readouterr().out) == {"kept": [], "removed": []}


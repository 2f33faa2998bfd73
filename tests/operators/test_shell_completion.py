"""Shell completion through click, in real child processes: the bash, zsh and fish scripts, commands,
options, directories, and run references (`latest`, run ids read from the state directory); never an error,
on any failure no run id."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, write_tree


def complete(env: dict[str, str], line: str) -> tuple[list[tuple[str, str]], str]:
    """(type, value) items bash would get for the last word of *line*, and what went to stderr."""
    words = line.split(" ")
    result = run_cli([], {**env, "_SITEBACKUP_COMPLETE": "bash_complete", "COMP_WORDS": line,
                          "COMP_CWORD": str(len(words) - 1)})
    assert result.returncode == 0, result.stderr
    items = [tuple(item.split(",", 1)) for item in result.stdout.splitlines() if item]
    return items, result.stderr


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _sitebackup_completion sitebackup"),
                                           ("zsh", "#compdef sitebackup"),
                                           ("fish", "complete --no-files --command sitebackup")])
def test_each_shell_gets_its_script(cli_env, shell, marker):
    result = run_cli([], {**cli_env, "_SITEBACKUP_COMPLETE": f"{shell}_source"})
    assert result.returncode == 0 and marker in result.stdout


def test_commands_options_and_the_default_commands_source(cli_env):
    assert complete(cli_env, "sitebackup re")[0] == [("plain", "restore"), ("plain", "resume")]
    assert ("plain", "--bwlimit") in complete(cli_env, "sitebackup backup --")[0]
    assert complete(cli_env, "sitebackup verify --met")[0] == [("plain", "--metrics-file")]
    # no command starts so: the word is the SOURCE of `sitebackup SOURCE ...`
    assert complete(cli_env, "sitebackup ./si")[0] == [("dir", "./si")]
    assert complete(cli_env, "sitebackup ./site --tier a")[0] == [("plain", "archive")]


def test_run_ids_come_from_the_state_directory_for_the_commands_that_take_them(tmp_path, cli, cli_env,
                                                                                container_name):
    src = write_tree(tmp_path / "site", {"a.txt": b"a"})
    done = json.loads(cli(src, "-c", container_name, "--json").stdout.splitlines()[-1])["instance_id"]
    # a run nobody works on stays unfinished
    # (another container: a container's root belongs to the first job)
    waiting = json.loads(cli(src, "-c", container_name + "-p", "--prefix", "p", "--no-local-worker", "--detach",
                             "--json").stdout.splitlines()[0])["instance_id"]

    def ids(line: str) -> list[str]:
        items, err = complete(cli_env, line)
        assert err == ""
        return [value for kind, value in items if kind == "plain"]

    assert ids("sitebackup status ") == ["latest", waiting, done]  # `latest`, then newest first
    assert ids(f"sitebackup status {done[:-2]}") == [done]
    assert ids("sitebackup status la") == ["latest"]
    assert ids("sitebackup resume ") == ids("sitebackup cancel ") == ["latest", waiting]
    assert ids("sitebackup verify ") == ids("sitebackup restore ") == ["latest", done]  # completed backups only
    for line in ("sitebackup ls ", "sitebackup cat ", "sitebackup stats ", "sitebackup diff ",
                 f"sitebackup diff {done} "):
        assert ids(line) == ["latest", done], line
    assert complete(cli_env, f"sitebackup restore {done} ./o")[0] == [("dir", "./o")]
    assert complete(cli_env, "sitebackup restore --container c ./o")[0] == [("dir", "./o")]
    other = {**cli_env, "SITEBACKUP_STATE_DIR": str(tmp_path / "elsewhere")}
    assert ids(f"sitebackup status --state-dir {cli_env['SITEBACKUP_STATE_DIR']} ") == ["latest", waiting, done]
    assert complete(other, "sitebackup status ") == ([("plain", "latest")], "")
    cli("cancel", waiting)


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "taskhub"])
def test_completion_offers_only_latest_and_says_nothing_when_it_cannot_read_runs(tmp_path, cli_env, case):
    state = tmp_path / "state"
    env = {**cli_env, "SITEBACKUP_STATE_DIR": str(state)}
    if case != "missing":
        state.mkdir()
        (state / "state.db").write_bytes(b"" if case == "empty" else b"not a database at all" * 100)
    if case == "taskhub":
        env["DURABLE_TASK_SCHEDULER_CONNECTION_STRING"] = "Endpoint=http://127.0.0.1:1;TaskHub=x;Authentication=None"
    assert complete(env, "sitebackup status ") == ([("plain", "latest")], "")
    assert complete(env, "sitebackup status 2026") == ([], "")

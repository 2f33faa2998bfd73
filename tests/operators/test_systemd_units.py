"""contrib/systemd: the service and timer pair pass `systemd-analyze verify` (when the machine has it; their
structure is checked either way), their Documentation= is this project's docs as installed, and the command line
they run is one sitebackup accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_cli, write_tree

UNITS = ROOT / "contrib" / "systemd"
SITEBACKUP = Path(sys.executable).with_name("sitebackup")  # the console script of this environment


def unit(name: str) -> configparser.ConfigParser:
    """A unit file's sections and keys (a repeated key keeps its last value; enough to check presence)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def env_file() -> dict[str, str]:
    lines = (UNITS / "example.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def exec_start_argv(env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: ${NAME} is one word, $NAME is split at whitespace."""
    words = []
    for word in shlex.split(unit("sitebackup@.service")["Service"]["ExecStart"]):
        if match := re.fullmatch(r"\$\{(\w+)\}", word):
            words.append(env[match.group(1)])
        elif match := re.fullmatch(r"\$(\w+)", word):
            words += env.get(match.group(1), "").split()
        else:
            words.append(word)
    return words


@pytest.mark.processes
def test_units_pass_systemd_analyze_verify_and_have_the_required_structure(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze:
        # verify needs an executable ExecStart and an instance name for the templates
        (tmp_path / "sitebackup@.service").write_text(
            (UNITS / "sitebackup@.service").read_text().replace("/usr/local/bin/sitebackup", str(SITEBACKUP)))
        shutil.copy(UNITS / "sitebackup@.timer", tmp_path)
        result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "sitebackup@web.service"),
                                 str(tmp_path / "sitebackup@web.timer")], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr

    service = unit("sitebackup@.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["EnvironmentFile"] == "/etc/sitebackup/%i.env"
    assert service["Environment"] == "SITEBACKUP_STATE_DIR=%S/sitebackup"
    assert service["StateDirectory"] == "sitebackup" and service["StateDirectoryMode"] == "0700"
    assert "4" in service["SuccessExitStatus"].split()
    for key, value in {"ProtectSystem": "strict", "ReadOnlyPaths": "/", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "ProtectHome": "read-only", "PrivateDevices": "yes"}.items():
        assert service[key] == value, key
    assert service["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    assert service["ExecStart"].startswith("/")

    # the docs that ship with it: a page of docs/, where that page's install steps copy docs/ to
    docs = re.fullmatch(r"file:(/\S+)/([\w-]+\.md)", unit("sitebackup@.service")["Unit"]["Documentation"])
    assert docs and (ROOT / "docs" / docs.group(2)).is_file()
    assert f"install -m 644 docs/*.md {docs.group(1)}/" in (ROOT / "docs" / docs.group(2)).read_text()

    timer = unit("sitebackup@.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_the_command_the_service_runs_is_one_sitebackup_accepts(tmp_path, cli_env):
    env = env_file()
    assert {"SOURCE", "CONTAINER", "SITEBACKUP_ARGS"} <= set(env)
    assert "install -m 600" in (UNITS / "example.env").read_text()  # it holds the storage credentials
    source = write_tree(tmp_path / "www", {"index.html": b"<html>"})
    argv = exec_start_argv({**env, "SOURCE": str(source)})
    assert argv[0] == "/usr/local/bin/sitebackup"
    # every option of the example parses (an unknown one would be exit 2); --help stops before any work
    result = run_cli([*argv[1:], "--help"], cli_env)
    assert result.returncode == 0, result.stderr
    for option in (w for w in argv if w.startswith("--")):
        assert option in result.stdout, option
    # and the environment file's other settings are variables sitebackup reads
    for name in set(env) - {"SOURCE", "CONTAINER", "SITEBACKUP_ARGS"}:
        assert f"env {name}]" in " ".join(result.stdout.split()), name

"""docs/cli.md is what scripts/gen_cli_docs.py makes of the click commands today: a changed option, help text or
exit code without the page regenerated fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click
import pytest
from helpers import ROOT

from sitebackup.cli import cli
from sitebackup.errors import EXIT_CODES


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def test_docs_cli_md_is_what_the_commands_say_now():
    assert gen.CLI_DOC.read_text(encoding="utf-8") == gen.render(), \
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_the_page_has_every_command_its_options_and_every_exit_code():
    page = gen.render()
    for name, command in cli.commands.items():
        assert f"## sitebackup {name}\n" in page
        assert f"Usage: sitebackup {name} " in page
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert any(opt in page for opt in param.opts), (name, param.name)
    for e in EXIT_CODES:
        assert f"| {e.code} | `{e.name}` | {e.meaning} |" in page


def test_the_page_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = gen.render()
    monkeypatch.setenv("COLUMNS", "300")
    assert gen.render() == narrow


def test_check_fails_on_a_stale_page_and_leaves_it_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]):
    stale = tmp_path / "cli.md"
    stale.write_text("# an old page\n")
    monkeypatch.setattr(gen, "CLI_DOC", stale)
    assert gen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert stale.read_text() == "# an old page\n"
    assert gen.main([]) == 0
    assert stale.read_text(encoding="utf-8") == gen.render()
    assert gen.main(["--check"]) == 0


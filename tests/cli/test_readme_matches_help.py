"""The README stays true to `--help`: every option of every command is documented, and every option the
README shows (in option tables and in `sitebackup ...` command lines) exists on that command."""

from __future__ import annotations

import re
import shlex

import click
from helpers import ROOT

from sitebackup.cli import cli

README = (ROOT / "README.md").read_text(encoding="utf-8")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def options_of(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names.update(n for n in param.opts + param.secondary_opts if n.startswith("--"))
    return names


COMMANDS = {name: options_of(command) for name, command in cli.commands.items()}
EVERY_OPTION = set().union(*COMMANDS.values()) | {"--version"}


def command_lines() -> list[tuple[str, list[str]]]:
    """(command, its --flags) for every `sitebackup ...` line in the README's code blocks."""
    found = []
    in_code = False
    for line in README.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        text = line.split("#", 1)[0].strip()
        for part in re.split(r";|&&|\|\||\|", text) if in_code else ():  # one shell line may run several commands
            match = re.search(r"(?:^|[\s($])(?:\S*/)?sitebackup(?:@\S+)? (.*)", part)
            if not match:
                continue
            try:
                words = shlex.split(match.group(1), posix=True)
            except ValueError:  # an unbalanced quote in a shell fragment: take the words as they are
                words = match.group(1).split()
            command = words[0] if words and words[0] in COMMANDS else "backup"
            flags = [w.strip("[]().,").split("=", 1)[0] for w in words]
            found.append((command, [f for f in flags if FLAG.fullmatch(f)]))
    return found


def test_every_option_of_every_command_is_in_the_readme():
    documented = set(FLAG.findall(README)) | {"--help"}  # every command has it: one mention is enough
    missing = {name: sorted(opts - documented) for name, opts in COMMANDS.items() if opts - documented}
    assert not missing, f"options missing from README.md: {missing}"


def test_every_option_in_a_readme_table_exists():
    rows = [line for line in README.splitlines() if line.startswith("| `--")]
    assert rows
    shown = {flag for row in rows for flag in FLAG.findall(row.split("|")[1])}
    assert shown - EVERY_OPTION == set()


def test_every_readme_command_line_uses_options_its_command_has():
    lines = command_lines()
    assert len(lines) >= 10
    wrong = [(command, flag) for command, flags in lines for flag in flags if flag not in COMMANDS[command]]
    assert not wrong, f"README command lines with options their command lacks: {wrong}"


def test_the_module_map_names_every_module():
    start = README.index("\nsitebackup/\n")
    block = README[start:README.index("```", start)]
    modules = {p.stem for p in (ROOT / "sitebackup").rglob("*.py") if p.stem not in ("__init__", "__main__")}
    modules -= {p.stem for p in (ROOT / "sitebackup" / "durable" / "backend").glob("*.py")}  # "backend/" stands for them
    missing = {m for m in modules if not re.search(rf"\b{m}\b", block)}
    assert not missing, f"modules missing from the README module map: {sorted(missing)}"

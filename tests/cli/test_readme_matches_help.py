"""The README and the pages of docs/ stay true to `--help` and to each other: every option of every command is
explained in the README or a hand-written guide, every option the pages show (in option tables and in
`sitebackup ...` command lines) exists on that command, crontab lines work pasted as they are, links between
the pages resolve, the module map names every module and every exit code has its troubleshooting section."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
from helpers import ROOT

from sitebackup.cli import cli
from sitebackup.errors import EXIT_CODES

DOCS = ROOT / "docs"
PAGES = {path: path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]}
# what people wrote: docs/cli.md is generated from --help, so it documents every option by construction
GUIDES = {path: text for path, text in PAGES.items() if path != DOCS / "cli.md"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
CRON_LINE = re.compile(r"(?:[\d*/,-]+[ \t]+){5}(?=\S)")  # five schedule fields, then the command
CRON_ENV = "set -a; . /etc/sitebackup/cron.env; set +a; "


def options_of(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names.update(n for n in param.opts + param.secondary_opts if n.startswith("--"))
    return names


COMMANDS = {name: options_of(command) for name, command in cli.commands.items()}
EVERY_OPTION = set().union(*COMMANDS.values()) | {"--version"}


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def lines_of(text: str, code: bool) -> list[str]:
    """The lines inside the page's ``` blocks (code), or outside them."""
    found, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code == code:
            found.append(line)
    return found


def code_lines(text: str) -> list[str]:
    return lines_of(text, code=True)


def command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(command, its --flags) for every `sitebackup ...` command in the page's code blocks."""
    found = []
    for line in code_lines(text):
        for part in re.split(r";|&&|\|\||\|", line.split("#", 1)[0].strip()):  # one shell line may run several
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


def crontab_lines() -> list[tuple[str, str]]:
    return [(name(path), line) for path, text in PAGES.items() for line in code_lines(text)
            if CRON_LINE.match(line) and "sitebackup" in line]


def anchors(text: str) -> set[str]:
    """The ids GitHub gives the page's headings."""
    headings = [line for line in lines_of(text, code=False) if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lstrip("#").strip().lower()).replace(" ", "-") for h in headings}


def test_every_option_of_every_command_is_in_a_guide_or_the_readme():
    documented = {flag for text in GUIDES.values() for flag in FLAG.findall(text)} | {"--help"}
    missing = {cmd: sorted(opts - documented) for cmd, opts in COMMANDS.items() if opts - documented}
    assert not missing, f"options no guide (README.md, docs/*.md but cli.md) explains: {missing}"


def test_every_value_an_option_accepts_is_in_a_guide():
    """A choice such as `--tier smart` or `list --status CANCELLED` is explained where people read, in a code span
    (`--tier hot|cool|...|smart`, a statuses table): one that no guide names is undocumented, so remove it or
    document it."""
    spans = " ".join(re.findall(r"`([^`\n]+)`", "\n".join(GUIDES.values())))
    choices = [(name_, param.opts[-1], value) for name_, command in cli.commands.items() for param in command.params
               if isinstance(param, click.Option) and not param.hidden and isinstance(param.type, click.Choice)
               for value in param.type.choices]
    assert ("backup", "--tier", "smart") in choices
    missing = [c for c in choices if not re.search(rf"(?<![\w-]){re.escape(str(c[2]))}(?![\w-])", spans)]
    assert not missing, f"values options accept that no guide names in a code span: {missing}"


def test_every_option_in_an_option_table_exists():
    rows = [(name(path), line) for path, text in PAGES.items() for line in text.splitlines() if line.startswith("| `--")]
    assert {page for page, _row in rows} >= {"docs/backup.md", "docs/restore.md"}
    wrong = [(page, flag) for page, row in rows for flag in FLAG.findall(row.split("|")[1]) if flag not in EVERY_OPTION]
    assert not wrong, f"option tables with options no command has: {wrong}"


def test_every_command_line_uses_options_its_command_has():
    lines = [(name(path), command, flags) for path, text in PAGES.items() for command, flags in command_lines(text)]
    assert len(lines) >= 30
    assert {page for page, _c, _f in lines} >= {"README.md", "docs/cli.md", "docs/cron-systemd.md", "docs/restore.md"}
    wrong = [(page, command, flag) for page, command, flags in lines for flag in flags if flag not in COMMANDS[command]]
    assert not wrong, f"command lines with options their command lacks: {wrong}"


@pytest.mark.processes  # sh checks the lines
def test_crontab_lines_work_pasted_as_they_are():
    """cron runs a line with sh, a PATH of /usr/bin:/bin and no credentials: each line names sitebackup by its
    full path and reads the root-only environment file first; and sh must be able to parse it."""
    lines = crontab_lines()
    assert len(lines) >= 3
    for page, line in lines:
        command = line[CRON_LINE.match(line).end():]
        assert command.startswith(CRON_ENV), (page, line)
        words = shlex.split(command.replace(";", " ; "))
        assert all(w.startswith("/") for w in words if w.endswith("sitebackup")), (page, line)
        assert "%" not in line, (page, line)  # cron makes a newline of it
        assert not {"--connection-string", "--account-url"} & set(words), (page, line)  # secrets never on a line
        syntax = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
        assert syntax.returncode == 0, (page, line, syntax.stderr)


@pytest.mark.processes  # sh reads the file
def test_the_cron_environment_file_is_read_by_sh_as_written():
    env_file = ROOT / "contrib" / "cron" / "example.env"
    assert f"install -m 600 -o root -g root {env_file.relative_to(ROOT)} /etc/sitebackup/cron.env" \
        in PAGES[DOCS / "cron-systemd.md"]
    shown = subprocess.run(["sh", "-c", f"set -a; . {shlex.quote(str(env_file))}; set +a; env -0"],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
    variables = dict(item.split("=", 1) for item in shown.split("\0") if item)
    assert variables["AZURE_STORAGE_CONNECTION_STRING"].endswith(";AccountKey=KEY;EndpointSuffix=core.windows.net")
    # every other setting in it is a variable sitebackup reads (its --help names them: "[env NAME]")
    read = {m for command in cli.commands.values() for param in command.params if isinstance(param, click.Option)
            for m in re.findall(r"env (\w+)", param.help or "")}
    assert set(variables) - {"PATH", "PWD", "SHLVL", "_"} <= read


def test_links_between_the_pages_resolve():
    broken = []
    for path, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append((name(path), target))
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
                broken.append((name(path), target))
    assert not broken, f"links to missing pages or headings: {broken}"


def test_the_module_map_names_every_module():
    page = PAGES[DOCS / "development.md"]
    start = page.index("\nsitebackup/\n")
    block = page[start:page.index("```", start)]
    modules = {p.stem for p in (ROOT / "sitebackup").rglob("*.py") if p.stem not in ("__init__", "__main__")}
    modules -= {p.stem for p in (ROOT / "sitebackup" / "durable" / "backend").glob("*.py")}  # "backend/" stands for them
    missing = {m for m in modules if not re.search(rf"\b{m}\b", block)}
    assert not missing, f"modules missing from the module map in docs/development.md: {sorted(missing)}"


def test_troubleshooting_has_one_section_per_exit_code():
    sections = re.findall(r"^## (\d+) (\S+)$", PAGES[DOCS / "troubleshooting.md"], re.MULTILINE)
    assert sections == [(str(e.code), e.name) for e in EXIT_CODES]

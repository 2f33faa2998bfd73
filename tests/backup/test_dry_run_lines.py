"""The lines of a --dry-run: written in batches whatever stdout's buffering, in order, all of them, and
flushed however the walk ends (pure rendering logic: stdout is a recorder)."""

from __future__ import annotations

import io
import json

import pytest

from sitebackup.model.reports import DryRunItem
from sitebackup.ui import render


class Recorder(io.StringIO):
    """An unbuffered stdout: every write counted."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def items(n: int) -> list[DryRunItem]:
    return [DryRunItem(action="upload", path=f"d/f{i:05}.txt", size=i) for i in range(n)]


@pytest.mark.parametrize("json_output", [False, True])
def test_a_few_writes_for_many_files_all_lines_in_order(monkeypatch, json_output):
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    with render.DryRunLines(json_output, quiet=False) as lines:
        for item in items(2500):
            lines.add(item)
    text = out.getvalue().splitlines()
    assert len(text) == 2500
    if json_output:
        assert [json.loads(line)["path"] for line in text] == [f"d/f{i:05}.txt" for i in range(2500)]
    else:
        assert text[0].startswith("would upload d/f00000.txt") and text[-1].startswith("would upload d/f02499.txt")
    # a write per batch of BATCH lines (or per FLUSH_SECONDS on a slow walk), not a write per file
    assert out.writes <= 2500 // render.DryRunLines.BATCH + 2


def test_held_lines_are_written_when_the_walk_fails(monkeypatch):
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    with pytest.raises(RuntimeError):
        with render.DryRunLines(True, quiet=False) as lines:
            for item in items(10):
                lines.add(item)
            raise RuntimeError("walk failed")
    assert len(out.getvalue().splitlines()) == 10


def test_a_slow_walk_shows_its_lines_without_waiting_for_a_batch(monkeypatch):
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr(render.DryRunLines, "FLUSH_SECONDS", 0.0)
    with render.DryRunLines(False, quiet=False) as lines:
        lines.add(items(1)[0])
        assert out.getvalue().startswith("would upload d/f00000.txt")


def test_a_failure_goes_to_stderr_after_the_lines_before_it(monkeypatch, capsys):
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    with render.DryRunLines(False, quiet=False) as lines:
        lines.add(items(1)[0])
        lines.add(DryRunItem(action="fail", path="bad\x1b[31m", error="Permission denied"))
        assert out.getvalue().startswith("would upload")  # written before the failure line
    err = capsys.readouterr().err
    assert "FAILED bad" in err and "\x1b" not in err

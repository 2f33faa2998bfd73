"""The package's layers hold: imports go one way (import-linter contracts in pyproject.toml) and no
module imports itself back through another (no cycles, lazy imports included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.processes
def test_import_linter_contracts_are_kept():
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("sitebackup", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append((module, *back))
    assert not cycles, cycles


@pytest.mark.processes
def test_an_upward_import_breaks_a_contract(tmp_path):
    """The check can fail: a copy of the package with one upward import (local -> cli) is refused."""
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(ROOT / "sitebackup", copy / "sitebackup")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / "sitebackup" / "local" / "upward.py").write_text("from sitebackup import cli  # noqa\n")
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter), "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "sitebackup.local.upward -> sitebackup.cli" in result.stdout

"""Fixtures for the embedded backend tests (the harness itself lives in harness.py, importable by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Harness  # noqa: E402


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path / "state").start()
    yield h
    h.stop()

"""Work pages kept outside the orchestration history.

The scan writes the file list as numbered pages; each copy activity reads one page and writes
one result file (what it uploaded, with sizes and hashes). Only page numbers and counts travel
through the durable history, so its size does not grow with the number of files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class WorkStore:
    def __init__(self, root: Path):
        self.root = root

    def _dir(self, instance_id: str) -> Path:
        if "/" in instance_id or instance_id in ("", ".", ".."):
            raise ValueError(f"bad instance id {instance_id!r}")
        return self.root / instance_id

    def _write(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # write-then-rename: a kill mid-write never leaves a half page behind
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
        os.replace(tmp, path)

    def _read(self, path: Path) -> Any:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    def write_page(self, instance_id: str, page: int, items: list[Any]) -> None:
        self._write(self._dir(instance_id) / "pages" / f"{page:06d}.json", items)

    def read_page(self, instance_id: str, page: int) -> list[Any]:
        return self._read(self._dir(instance_id) / "pages" / f"{page:06d}.json")

    def write_result(self, instance_id: str, page: int, records: list[Any]) -> None:
        self._write(self._dir(instance_id) / "results" / f"{page:06d}.json", records)

    def iter_results(self, instance_id: str) -> Iterator[Any]:
        folder = self._dir(instance_id) / "results"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            yield from self._read(path)

    def remove(self, instance_id: str) -> None:
        shutil.rmtree(self._dir(instance_id), ignore_errors=True)

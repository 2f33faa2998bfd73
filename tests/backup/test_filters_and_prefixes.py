"""Pure logic of gitignore-style filters and --prefix templates (no I/O beyond tmp files)."""

from __future__ import annotations

from datetime import datetime

import pytest

from sitebackup.commands.backup import expand_prefix
from sitebackup.errors import InputError
from sitebackup.local.filters import Filter, patterns_for


@pytest.mark.parametrize("patterns, path, is_dir, excluded", [
    (["*.tmp"], "a.tmp", False, True),
    (["*.tmp"], "deep/er/a.tmp", False, True),
    (["*.tmp"], "a.tmpx", False, False),
    (["cache/"], "cache", True, True),
    (["cache/"], "sub/cache", True, True),
    (["cache/"], "cache", False, False),  # dir-only pattern, file named cache
    (["/cache"], "sub/cache", True, False),  # anchored
    (["/cache"], "cache", True, True),
    (["**/node_modules/"], "node_modules", True, True),
    (["**/node_modules/"], "a/b/node_modules", True, True),
    (["docs/*.md"], "docs/a.md", False, True),
    (["docs/*.md"], "docs/sub/a.md", False, False),  # * stops at /
    (["docs/**/*.md"], "docs/sub/x/a.md", False, True),
    (["logs/**"], "logs/a/b.txt", False, True),
    (["file?.txt"], "file1.txt", False, True),
    (["file?.txt"], "file10.txt", False, False),
    (["[ab].txt"], "b.txt", False, True),
    (["[!ab].txt"], "b.txt", False, False),
    (["*.log", "!keep.log"], "keep.log", False, False),
    (["*.log", "!keep.log"], "other.log", False, True),
    (["# comment", "", "   "], "# comment", False, False),
    (["\\#hash"], "#hash", False, True),
    ([], ".hidden", False, False),  # hidden files are included unless excluded
    ([".*"], ".hidden", False, True),
])
def test_gitignore_rules(patterns, path, is_dir, excluded):
    assert Filter(patterns).excluded(path, is_dir) is excluded


def test_patterns_order_ignore_file_then_files_then_options_then_includes(tmp_path):
    (tmp_path / ".sitebackupignore").write_text("*.tmp\n# note\n\ncache/\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("*.bak\n")
    patterns = patterns_for(tmp_path, excludes=("*.log",), includes=("keep.tmp",), exclude_from=(extra,))
    assert patterns == ["*.tmp", "cache/", "*.bak", "*.log", "!keep.tmp"]
    rules = Filter(patterns)
    assert rules.excluded("x.tmp", False) and not rules.excluded("keep.tmp", False)
    assert patterns_for(tmp_path, use_ignore_file=False) == []


def test_prefix_templates_expand_once_with_local_time():
    now = datetime(2026, 3, 4, 5, 6, 7)
    assert expand_prefix("nightly/{date}/{hostname}-{time}", now, "web1") == "nightly/2026-03-04/web1-050607"
    assert expand_prefix("plain/prefix", now, "h") == "plain/prefix"
    assert expand_prefix("", now, "h") == ""
    with pytest.raises(InputError, match="invalid --prefix template"):
        expand_prefix("{nope}", now, "h")

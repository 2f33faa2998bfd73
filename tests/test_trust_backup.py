"""Backup input that must be refused up front: prefix templates limited to their documented fields,
and prefixes no blob can live under.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from helpers import write_tree

from sitebackup.commands.backup import expand_prefix
from sitebackup.errors import InputError

NOW = datetime(2026, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("template", [
    "{hostname.__class__}", "{hostname.__class__.__mro__}", "{date[0]}", "{date!r}", "{time:>20}", "{}", "{0}",
    "{nope}", "snap/{date", "snap/{date}}/x",
])
def test_prefix_templates_accept_only_the_documented_fields(template):
    with pytest.raises(InputError, match="use {date}, {time} or {hostname}"):
        expand_prefix(template, NOW, "web1")


def test_prefix_templates_expand_fields_and_keep_braces_doubled():
    assert expand_prefix("{hostname}/{date}/{time}", NOW, "web1") == "web1/2026-03-04/050607"
    assert expand_prefix("{{literal}}/{date}", NOW, "web1") == "{literal}/2026-03-04"
    assert expand_prefix("a}b", NOW, "web1") == "a}b"  # no template: taken as it is


@pytest.mark.parametrize(("prefix", "message"), [
    ("{hostname.__class__}", "invalid --prefix template"),
    (".sitebackup", "is reserved for sitebackup's work files"),
    ("/.sitebackup/work/", "is reserved for sitebackup's work files"),
    ("p" * 1023, "1023 characters leave no room for a file name"),
])
def test_a_prefix_no_blob_can_have_is_a_usage_error_before_anything_is_sent(tmp_path, cli, blob_service,
                                                                            container_name, prefix, message):
    src = write_tree(tmp_path / "site", {f"f{i}.txt": b"x" for i in range(5)})
    for extra in ([], ["--dry-run"]):
        result = cli(src, "-c", container_name, "--prefix", prefix, *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("sitebackup: error: ") and message in line and "<class" not in line
    assert not blob_service.get_container_client(container_name).exists()


def test_the_longest_prefix_that_leaves_room_for_a_name_is_accepted(tmp_path, cli, blob_service, container_name):
    src = write_tree(tmp_path / "site", {"f": b"x"})
    prefix = "p" * 1022
    result = cli(src, "-c", container_name, "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    assert list(blob_service.get_container_client(container_name).list_blob_names()) == [f"{prefix}/f"]

"""Compressed files are backed up and restored as the bytes they are: a ``.gz`` is typed as gzip data (not as
the archive inside it) and carries no Content-Encoding, and a blob someone later marked ``Content-Encoding:
gzip`` (a CDN set-up, a portal edit) is still restored and verified byte for byte, not inflated on the way.
Real CLI processes, the embedded backend and a real Azurite."""

from __future__ import annotations

import gzip
import json
import os

from azure.storage.blob import ContentSettings
from helpers import write_tree


def summary(result) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gzip_files_keep_their_bytes_through_backup_restore_and_verify(tmp_path, cli, blob_service, container_name):
    small = gzip.compress(b"<html>" + b"hello " * 2000 + b"</html>", mtime=0)
    # past one range of a download (8 MiB), so the ranged path is covered too; random bytes do not compress
    big = gzip.compress(os.urandom(9 * 1024 * 1024), compresslevel=1, mtime=0)
    files = {"site.tar.gz": small, "dump/db.sql.gz": big, "index.html": b"<html>plain</html>",
             "page.html": small}
    src = write_tree(tmp_path / "site", files)
    result = cli(str(src), "--container", container_name, "--json")
    assert result.returncode == 0, result.stderr
    run_id = summary(result)["instance_id"]

    container = blob_service.get_container_client(container_name)
    props = {name: container.get_blob_client(name).get_blob_properties() for name in files}
    assert props["site.tar.gz"].content_settings.content_type == "application/gzip"
    assert props["dump/db.sql.gz"].content_settings.content_type == "application/gzip"
    assert props["index.html"].content_settings.content_type == "text/html"
    assert all(p.content_settings.content_encoding is None for p in props.values())

    # someone marks blobs as gzip-encoded so browsers inflate them: the blob's bytes are unchanged
    for name in ("site.tar.gz", "dump/db.sql.gz", "page.html"):
        settings = props[name].content_settings
        container.get_blob_client(name).set_http_headers(ContentSettings(
            content_type=settings.content_type, content_encoding="gzip", content_md5=settings.content_md5))

    dest = tmp_path / "restored"
    result = cli("restore", run_id, str(dest), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files

    result = cli("verify", run_id, "--download", "--json")
    assert result.returncode == 0, result.stdout + result.stderr

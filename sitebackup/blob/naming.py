"""Naming rules of the destination: container names, prefixes, blob names and the reserved work prefix."""

from __future__ import annotations

import re

from sitebackup.errors import InputError

MAX_BLOB_NAME = 1024
# Reserved at the destination container's root for work files shared by workers on several hosts;
# a source file that would land there is refused rather than uploaded over them.
RESERVED_PREFIX = ".sitebackup/"

_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")


def validate_container_name(name: str) -> str:
    if not _CONTAINER_RE.match(name or ""):
        raise InputError(
            f"invalid container name {name!r}: use 3-63 lowercase letters, digits and single hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def normalize_prefix(prefix: str | None) -> str:
    """Return *prefix* without surrounding slashes; refuse segments that could escape it."""
    if not prefix:
        return ""
    if "\\" in prefix or "\x00" in prefix:
        raise InputError(f"invalid prefix {prefix!r}: use '/' separators and no NUL characters")
    stripped = prefix.strip("/")
    segments = stripped.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise InputError(f"invalid prefix {prefix!r}: empty, '.' and '..' segments are not allowed")
    return stripped


def backup_prefix(prefix: str | None) -> str:
    """*prefix* normalized for a backup, refused up front when no blob could be stored under it: inside
    the reserved work prefix, or too long to leave room for a name."""
    prefix = normalize_prefix(prefix)
    if is_reserved(prefix):
        raise InputError(f"invalid prefix {prefix!r}: {RESERVED_PREFIX} is reserved for sitebackup's work files")
    if len(prefix) + len("/x") > MAX_BLOB_NAME:
        raise InputError(f"invalid prefix: {len(prefix)} characters leave no room for a file name "
                         f"(Azure allows {MAX_BLOB_NAME} per blob name)")
    return prefix


def blob_name(prefix: str, relpath: str) -> str:
    if "\\" in relpath:
        # the service reads '\\' in a blob name as '/': the blob would land under another path
        raise ValueError("file name contains '\\', which Azure Blob Storage turns into '/'")
    name = f"{prefix}/{relpath}" if prefix else relpath
    if len(name) > MAX_BLOB_NAME:
        raise ValueError(f"blob name is {len(name)} characters; Azure allows {MAX_BLOB_NAME}")
    return name


def overlaps(prefix: str, other: str) -> bool:
    """Whether blob names under *prefix* and under *other* can be the same names."""
    return not prefix or not other or prefix == other or prefix.startswith(other + "/") or \
        other.startswith(prefix + "/")


def is_reserved(name: str) -> bool:
    return name == RESERVED_PREFIX.rstrip("/") or name.startswith(RESERVED_PREFIX)


def backup_blob_name(prefix: str, relpath: str) -> str:
    """The blob a source file goes to; ValueError (reported per file) when no valid blob can hold it."""
    name = blob_name(prefix, relpath)
    if is_reserved(name):
        raise ValueError(f"{name!r} is under {RESERVED_PREFIX}, reserved for sitebackup's work files; "
                         "back up with --prefix to keep it")
    return name

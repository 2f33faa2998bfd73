"""Naming rules of the destination: container names, prefixes, blob names and the reserved work prefix.

A file's blob name is its path with the characters a blob name cannot hold escaped (``escape_name``): control
characters make Azure refuse the name (its naming rules exclude them) and make Azurite answer 500 to every
listing of the container afterwards. Names without them are their paths, unchanged. The record keeps the real
path; ``unescape_name`` turns a listed blob name back into it.
"""

from __future__ import annotations

import re

from sitebackup.errors import InputError

MAX_BLOB_NAME = 1024
# Reserved at the destination container's root for work files shared by workers on several hosts;
# a source file that would land there is refused rather than uploaded over them.
RESERVED_PREFIX = ".sitebackup/"

_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")

# An escaped character is ESCAPE_MARK and its code point as four uppercase hex digits; the mark itself is
# escaped too, so the mapping is reversible. U+201B (single high-reversed-9 quotation mark), the character rclone
# quotes with in its own name encoding, is rare in real names: a name holding it is the only ordinary one that changes.
ESCAPE_MARK = "\u201b"
# C0 and C1 control characters and DEL (Azure's naming rules refuse them), U+FFFE and U+FFFF (not XML: Azurite's
# listings break on them as on the C0 ones)
_CONTROL = r"\x00-\x1f\x7f-\x9f\ufffe\uffff"
_HAS_CONTROL = re.compile(f"[{_CONTROL}]")
_ESCAPED = re.compile(f"[{_CONTROL}{ESCAPE_MARK}]")
_TOKEN = re.compile(f"{ESCAPE_MARK}(00[01][0-9A-F]|007F|00[89][0-9A-F]|FFF[EF]|201B)")


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
    if "\\" in prefix or _HAS_CONTROL.search(prefix):
        raise InputError(f"invalid prefix {prefix!r}: use '/' separators and no control characters")
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


def escape_name(relpath: str) -> str:
    """*relpath* as a blob name can hold it: each control character, U+FFFE, U+FFFF and ESCAPE_MARK as
    ESCAPE_MARK and four uppercase hex digits (ESC: the mark and ``001B``); any other character, '/' included,
    as it is."""
    return _ESCAPED.sub(lambda found: f"{ESCAPE_MARK}{ord(found.group()):04X}", relpath)


def unescape_name(name: str) -> str:
    """The path ``escape_name`` turned into *name*. A mark not followed by the code of a character it
    escapes is kept as it is: a name stored before escaping existed reads as itself."""
    return _TOKEN.sub(lambda found: chr(int(found.group(1), 16)), name)


def blob_name(prefix: str, relpath: str) -> str:
    """The blob of *relpath* (a file's path under the source) under *prefix*."""
    if "\\" in relpath:
        # the service reads '\\' in a blob name as '/': the blob would land under another path
        raise ValueError("file name contains '\\', which Azure Blob Storage turns into '/'")
    name = f"{prefix}/{escape_name(relpath)}" if prefix else escape_name(relpath)
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

"""The one codec of the run model: values to JSON bytes and plain JSON values, and back, validated.

Everything the model defines is written and read here and nowhere else. Decoding is strict: a page or
record read back from the state directory or the container is data, not code, so a value of the wrong
type, a missing required field or a name that could escape its root is a ``DamagedData`` error naming
what was read and where in it, never a half-used value. Unknown fields are ignored and missing optional
ones take their defaults, so what an earlier version wrote still loads (``FORMAT_VERSION`` says when
that stops being true).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from sitebackup.errors import InputError

# The version of the on-disk formats (run records, work pages, orchestration inputs). Bump it when what
# is written changes meaning (2: entries carry kind, mode, owner, symlink target and hard link), and say
# in CHANGELOG.md what happens to data written before.
FORMAT_VERSION = 2

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


class DamagedData(InputError):
    """A page, record or payload that does not decode as the model says (exit 2, one line naming it)."""


def encode(value: object) -> bytes:
    """Compact JSON of a model value (or a list of them)."""
    return _encoder.encode(value)


def decode(data: bytes | str, kind: type[T], what: str) -> T:
    """*data* (JSON) as a *kind*; ``DamagedData`` naming *what* when it is not one."""
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DamagedData(f"{what} is damaged: {exc}") from None


def to_wire(value: object) -> Any:
    """A model value as plain JSON values (dicts, lists, str, int...), as the durable SDK stores payloads."""
    return msgspec.to_builtins(value)


def from_wire(raw: object, kind: type[T], what: str) -> T:
    """Plain JSON values (a payload the durable SDK decoded) as a *kind*; ``DamagedData`` naming *what*."""
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise DamagedData(f"{what} is damaged: {exc}") from None

"""Times typed on the command line (``--as-of``, ``--since``): the one parser, pure (its clock and time zone are
arguments).

Accepted forms:

- an ISO 8601 date and time, with or without an offset (``2026-12-06T03:00``, ``2026-12-06 03:00:00+01:00``,
  ``2026-12-06T02:00Z``): local time when it names no offset;
- a date alone (``2026-12-06``): the whole local day, so its end (23:59:59.999999) as an upper bound
  (``--as-of``: the runs of that day are "as of" it) and its start as a lower bound (``--since``);
- ``now``, ``today`` and ``yesterday`` (whole local days, as a date), and ``N UNIT ago`` with UNIT one of
  s, m, h, d, w or their words (``36h ago``, ``3 days ago``, ``90 minutes ago``): exactly that long before now.

A local time that a daylight-saving change skips or repeats is read as the clock shows it: a repeated hour
counts from its first pass, except that a day's end is the end of its last.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone, tzinfo

from sitebackup.errors import InputError

FORMS = "an ISO date or date and time (2026-12-06, 2026-12-06T03:00, 2026-12-06 03:00+01:00), " \
        "now, today, yesterday, or N UNIT ago (36h ago, 3 days ago)"
_UNITS = {"s": "seconds", "sec": "seconds", "secs": "seconds", "second": "seconds", "seconds": "seconds",
          "m": "minutes", "min": "minutes", "mins": "minutes", "minute": "minutes", "minutes": "minutes",
          "h": "hours", "hr": "hours", "hrs": "hours", "hour": "hours", "hours": "hours",
          "d": "days", "day": "days", "days": "days", "w": "weeks", "week": "weeks", "weeks": "weeks"}
_AGO = re.compile(r"(\d{1,9})\s*([a-z]+)\s+ago")


def parse_time(text: str, *, end_of_day: bool, now: datetime | None = None, tz: tzinfo | None = None) -> datetime:
    """The instant *text* names, in UTC. A whole day (a date alone, ``today``, ``yesterday``) gives its
    last instant when *end_of_day*, else its first. *now* (aware) is the clock of the relative forms (default: the
    system's); *tz* the local time zone (default: the system's, its daylight-saving rules included)."""
    return _parse(text, end_of_day, now, tz).astimezone(timezone.utc)


def _parse(text: str, end_of_day: bool, now: datetime | None, tz: tzinfo | None) -> datetime:
    words = " ".join(text.strip().lower().split())
    clock = now if now is not None else datetime.now(timezone.utc)
    if words == "now":
        return clock
    if words in ("today", "yesterday"):
        today = clock.astimezone(tz).date() if tz is not None else clock.astimezone().date()
        return day_bound(today - timedelta(days=words == "yesterday"), end=end_of_day, tz=tz)
    ago = _AGO.fullmatch(words)
    if ago is not None and ago.group(2) in _UNITS:
        return clock - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    stripped = text.strip()
    try:
        return day_bound(date.fromisoformat(stripped), end=end_of_day, tz=tz)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(stripped)
    except ValueError:
        raise InputError(f"invalid time {text!r}: use {FORMS}") from None
    return when if when.tzinfo is not None else local(when, tz)


def day_bound(day: date, *, end: bool, tz: tzinfo | None = None) -> datetime:
    """The first or (*end*) the last instant of *day* in the local time zone."""
    if end:  # the last pass of a repeated hour: the day ends when its clock last shows 23:59:59.999999
        return local(datetime.combine(day, time.max).replace(fold=1), tz)
    return local(datetime.combine(day, time.min), tz)


def local(naive: datetime, tz: tzinfo | None) -> datetime:
    """*naive* read as a wall-clock time in *tz* (None: the system's local time)."""
    return naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()

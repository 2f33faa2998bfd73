"""The one time parser of --as-of and --since, property-tested: ISO forms read back as the instants they
name, a date alone spans its whole local day (its bounds touch the days around it, daylight-saving days
included), relative forms count back from the clock, and anything else is refused in one line."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sitebackup.commands.times import day_bound, parse_time
from sitebackup.errors import InputError

UTC = timezone.utc
# zones whose daylight-saving changes are unusual: at midnight (Santiago, Havana), by half an hour (Lord Howe)
ZONES = st.one_of(st.timezones(), st.sampled_from([ZoneInfo(name) for name in (
    "Europe/Berlin", "America/New_York", "America/Santiago", "America/Havana", "Australia/Lord_Howe",
    "Asia/Kolkata", "Pacific/Chatham", "UTC")]))
INSTANTS = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC))
WALL_TIMES = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2099, 12, 31))
DAYS = st.dates(min_value=date(1971, 1, 2), max_value=date(2099, 12, 30))
US = timedelta(microseconds=1)


@given(INSTANTS, ZONES, st.sampled_from(["T", " "]), st.booleans())
def test_an_iso_time_with_an_offset_reads_back_as_the_same_instant(instant, zone, sep, end_of_day):
    shown = instant.astimezone(zone)
    assert parse_time(shown.isoformat(sep), end_of_day=end_of_day) == instant
    assert parse_time(instant.isoformat().replace("+00:00", "Z"), end_of_day=end_of_day) == instant


@given(WALL_TIMES, ZONES)
def test_an_iso_time_without_an_offset_is_the_local_clock(wall, zone):
    when = parse_time(wall.isoformat(), end_of_day=True, tz=zone)
    assert when.tzinfo == UTC
    shown = when.astimezone(zone).replace(tzinfo=None)
    if wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall:  # the clock shows it
        assert shown == wall
    else:  # skipped by a daylight-saving change: read with the offset before it, as the clock would have gone on
        assert abs(shown - wall) <= timedelta(hours=2)


@given(INSTANTS, ZONES)
@example(datetime(2026, 10, 25, 0, 30, tzinfo=UTC), ZoneInfo("Europe/Berlin"))  # in the hour Berlin repeats
@example(datetime(2026, 3, 29, 1, 0, tzinfo=UTC), ZoneInfo("Europe/Berlin"))  # the first instant after the skip
@settings(max_examples=300)
def test_a_date_alone_spans_its_whole_local_day(instant, zone):
    day = instant.astimezone(zone).date()
    start = parse_time(day.isoformat(), end_of_day=False, tz=zone)
    end = parse_time(day.isoformat(), end_of_day=True, tz=zone)
    assert start <= instant <= end
    # nothing of the day is left out, nothing of the next or the last day taken in
    assert (end + US).astimezone(zone).date() == day + timedelta(days=1)
    assert (start - US).astimezone(zone).date() == day - timedelta(days=1)
    assert start.astimezone(zone).date() == end.astimezone(zone).date() == day


@given(DAYS, ZONES)
def test_consecutive_days_touch(day, zone):
    assert day_bound(day, end=True, tz=zone).astimezone(UTC) + US == \
        day_bound(day + timedelta(days=1), end=False, tz=zone).astimezone(UTC)


@pytest.mark.parametrize("zone, day, hours", [
    ("Europe/Berlin", date(2026, 3, 29), 23), ("Europe/Berlin", date(2026, 10, 25), 25),
    ("America/New_York", date(2026, 3, 8), 23), ("America/New_York", date(2026, 11, 1), 25),
    ("Australia/Lord_Howe", date(2026, 4, 5), 24.5), ("Europe/Berlin", date(2026, 6, 1), 24),
])
def test_daylight_saving_days_are_as_long_as_the_clock_says(zone, day, hours):
    tz = ZoneInfo(zone)
    start = parse_time(day.isoformat(), end_of_day=False, tz=tz)
    end = parse_time(day.isoformat(), end_of_day=True, tz=tz)
    assert end + US - start == timedelta(hours=hours)


@given(INSTANTS, st.integers(min_value=0, max_value=10_000),
       st.sampled_from([("s", "seconds"), ("sec", "seconds"), ("m", "minutes"), ("minutes", "minutes"),
                        ("h", "hours"), ("hour", "hours"), ("d", "days"), ("days", "days"), ("w", "weeks"),
                        ("week", "weeks")]),
       st.sampled_from(["", " ", "  "]), st.booleans())
def test_relative_times_count_back_from_the_clock(now, count, unit, space, end_of_day):
    word, name = unit
    assert parse_time(f"{count}{space}{word} ago", end_of_day=end_of_day, now=now) == now - timedelta(**{name: count})
    assert parse_time(f" {count}{space}{word.upper()}  AGO ", end_of_day=end_of_day, now=now) == \
        now - timedelta(**{name: count})


@given(INSTANTS, ZONES)
@example(datetime(2044, 9, 5, tzinfo=UTC), ZoneInfo("America/Santiago"))  # a day whose midnight is skipped
def test_today_and_yesterday_are_whole_local_days(now, zone):
    today = now.astimezone(zone).date()
    for word, day in (("today", today), ("yesterday", today - timedelta(days=1))):
        # compared in UTC: Python never finds a clock time a change skips or repeats equal to one of another zone
        assert parse_time(word, end_of_day=False, now=now, tz=zone) == \
            day_bound(day, end=False, tz=zone).astimezone(UTC)
        assert parse_time(word, end_of_day=True, now=now, tz=zone) == day_bound(day, end=True, tz=zone).astimezone(UTC)
    assert parse_time("now", end_of_day=True, now=now, tz=zone) == now
    assert parse_time("yesterday", end_of_day=True, now=now, tz=zone) < now <= \
        parse_time("today", end_of_day=True, now=now, tz=zone)


@given(st.one_of(INSTANTS.map(datetime.isoformat), DAYS.map(date.isoformat), st.just("yesterday"),
                 st.integers(0, 999).map(lambda n: f"{n}h ago")), ZONES, st.booleans())
def test_what_it_gives_reads_back_as_itself(text, zone, end_of_day):
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    when = parse_time(text, end_of_day=end_of_day, now=now, tz=zone)
    assert parse_time(when.isoformat(), end_of_day=not end_of_day, now=now, tz=zone) == when


def test_the_system_time_zone_is_the_default():
    assert parse_time("2026-06-01T12:00", end_of_day=True) == datetime(2026, 6, 1, 12).astimezone().astimezone(UTC)
    assert parse_time("2026-06-01", end_of_day=True) == \
        datetime(2026, 6, 1, 23, 59, 59, 999999).astimezone().astimezone(UTC)


@pytest.mark.parametrize("text", ["", "soon", "3 fortnights ago", "ago", "-3 days ago", "3 days", "2026-13-01",
                                  "2026-12-06T25:00", "tomorrow", "12/06/2026", "1e3h ago"])
def test_anything_else_is_refused_in_one_line_naming_the_forms(text):
    with pytest.raises(InputError) as refused:
        parse_time(text, end_of_day=True)
    assert "\n" not in str(refused.value) and "36h ago" in str(refused.value) and "2026-12-06" in str(refused.value)

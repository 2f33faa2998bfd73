"""prune's keep rules (restic `forget` semantics) on synthetic run times: pure logic, no service."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sitebackup.commands.retention import Policy, apply_policy

UTC = timezone.utc
PLUS2 = timezone(timedelta(hours=2))  # a local time zone where local midnight is 22:00 UTC
NOW = datetime(2027, 6, 1, tzinfo=UTC)


def at(text: str, tz=UTC) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def kept(runs: dict[str, datetime], policy: Policy, tz=UTC) -> list[str]:
    return list(apply_policy(list(runs.items()), policy, now=NOW, tz=tz).keep)


def test_keep_last_keeps_the_newest_n_and_drops_the_rest_newest_first():
    runs = {f"r{i}": at(f"2026-03-0{i} 12:00") for i in range(1, 6)}
    decision = apply_policy(list(runs.items()), Policy(last=2), now=NOW)
    assert list(decision.keep) == ["r5", "r4"]
    assert decision.drop == ["r3", "r2", "r1"]
    assert decision.keep["r5"] == ["last run"]


def test_daily_keeps_the_newest_run_of_each_day_and_the_oldest_while_counts_are_left():
    runs = {"mon-late": at("2026-03-09 23:00"), "mon-early": at("2026-03-09 01:00"),
            "sun": at("2026-03-08 12:00"), "sat-late": at("2026-03-07 18:00"), "sat-early": at("2026-03-07 06:00")}
    assert kept(runs, Policy(daily=2)) == ["mon-late", "sun"]
    # a count left when the oldest run is reached keeps it too, so history reaches back as far as it can
    decision = apply_policy(list(runs.items()), Policy(daily=5), now=NOW)
    assert list(decision.keep) == ["mon-late", "sun", "sat-late", "sat-early"]
    assert decision.keep["sat-early"] == ["oldest daily run"]


def test_day_boundaries_are_local_time():
    # 21:30 and 22:30 UTC are one UTC day, but two days at UTC+2 (23:30 and 00:30)
    runs = {"after-midnight": at("2026-03-10 22:30"), "before-midnight": at("2026-03-10 21:30"),
            "day-before": at("2026-03-09 12:00")}
    assert kept(runs, Policy(daily=2), tz=UTC) == ["after-midnight", "day-before"]
    assert kept(runs, Policy(daily=2), tz=PLUS2) == ["after-midnight", "before-midnight"]


def test_hourly_boundaries():
    runs = {"10:59": at("2026-03-10 10:59:59"), "10:00": at("2026-03-10 10:00:00"),
            "09:59": at("2026-03-10 09:59:59"), "08:30": at("2026-03-10 08:30")}
    assert kept(runs, Policy(hourly=2)) == ["10:59", "09:59"]
    assert kept(runs, Policy(hourly=3)) == ["10:59", "09:59", "08:30"]


def test_weekly_uses_iso_weeks_monday_to_sunday_across_the_year():
    runs = {"mon-w1": at("2027-01-04 08:00"), "sun-w53": at("2027-01-03 20:00"),
            "thu-w53": at("2026-12-31 12:00"), "mon-w53": at("2026-12-28 08:00"), "sun-w52": at("2026-12-27 08:00")}
    # Sunday 2027-01-03 is in ISO week 53 of 2026 with the Monday and Thursday before it
    assert kept(runs, Policy(weekly=3)) == ["mon-w1", "sun-w53", "sun-w52"]
    assert kept(runs, Policy(weekly=2)) == ["mon-w1", "sun-w53"]


def test_monthly_boundaries():
    runs = {"mar-1": at("2026-03-01 00:00"), "feb-28": at("2026-02-28 23:59"), "feb-1": at("2026-02-01 00:00"),
            "jan-31": at("2026-01-31 12:00"), "dec": at("2025-12-15 12:00")}
    assert kept(runs, Policy(monthly=3)) == ["mar-1", "feb-28", "jan-31"]


def test_rules_combine_a_run_any_rule_keeps_is_kept():
    # one run a day from Thursday 2026-01-01 (d00) to Sunday 2026-03-01 (d59)
    runs = {f"d{i:02d}": at("2026-01-01 03:00") + timedelta(days=i) for i in range(60)}
    decision = apply_policy(list(runs.items()), Policy(daily=7, weekly=4, monthly=12), now=NOW)
    assert set(decision.keep) == {"d59", "d58", "d57", "d56", "d55", "d54", "d53",  # seven days
                                  "d52", "d45", "d38",  # the Sundays of three earlier weeks
                                  "d30",  # January's last day
                                  "d00"}  # the oldest: the monthly count is not used up
    assert decision.keep["d59"] == ["daily run", "weekly run", "monthly run"]
    assert decision.keep["d58"] == ["daily run", "monthly run"]
    assert decision.keep["d52"] == ["weekly run"]
    assert decision.keep["d00"] == ["oldest monthly run"]
    assert set(decision.keep) | set(decision.drop) == set(runs) and not set(decision.keep) & set(decision.drop)


def test_keep_within_counts_back_from_the_newest_run_not_from_now():
    runs = {"newest": at("2026-03-10 12:00"), "a-day-before": at("2026-03-09 12:00"),
            "two-days-before": at("2026-03-08 12:00"), "long-ago": at("2025-01-01 00:00")}
    decision = apply_policy(list(runs.items()), Policy(within=timedelta(days=2)), now=NOW)
    assert list(decision.keep) == ["newest", "a-day-before"]
    assert decision.keep["a-day-before"] == ["within 2d of the newest"]
    # a run dated in the future does not move the window
    runs["future"] = at("2030-01-01 00:00")
    assert kept(runs, Policy(within=timedelta(days=2))) == ["future", "newest", "a-day-before"]


def test_the_newest_run_is_always_kept_and_nothing_else_without_rules():
    runs = {"b": at("2026-03-02 00:00"), "a": at("2026-03-01 00:00")}
    assert Policy().empty() and not Policy(monthly=1).empty()
    decision = apply_policy(list(runs.items()), Policy(), now=NOW)
    assert decision.keep == {"b": ["newest run"]} and decision.drop == ["a"]
    assert apply_policy([], Policy(last=3), now=NOW).keep == {}


def test_naive_times_are_utc_as_the_durable_backends_report_them():
    naive = {"late": datetime(2026, 3, 10, 22, 30), "early": datetime(2026, 3, 10, 21, 30)}
    assert kept(naive, Policy(daily=2), tz=PLUS2) == ["late", "early"]

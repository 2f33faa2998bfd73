"""Which runs a retention policy keeps: restic's ``forget`` rules applied to run start times. Pure logic.

Runs are taken newest first. ``last`` keeps the N newest runs; ``hourly``, ``daily``, ``weekly`` and
``monthly`` keep the newest run of each of the N newest hours, days, ISO weeks and months that hold
a run, in local time (as restic does); a rule whose count is not used up when it reaches the oldest
run keeps that one too, so the history kept reaches back as far as the counts allow (restic since
0.17); ``within`` keeps every run started less than that long before the newest run (not before
now: a paused cron does not make prune drop everything). A run any rule keeps is kept, and the
newest run is always kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    within: timedelta | None = None

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly or self.within)


@dataclass
class Decision:
    keep: dict[str, list[str]] = field(default_factory=dict)  # run id -> why, newest run first
    drop: list[str] = field(default_factory=list)  # newest first


def _aware(when: datetime) -> datetime:
    # the durable backends report naive UTC times
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


_BUCKETS: tuple[tuple[str, str, Callable[[datetime, int], Any]], ...] = (
    ("last", "last run", lambda when, nr: nr),
    ("hourly", "hourly run", lambda when, nr: (when.year, when.month, when.day, when.hour)),
    ("daily", "daily run", lambda when, nr: (when.year, when.month, when.day)),
    ("weekly", "weekly run", lambda when, nr: when.isocalendar()[:2]),
    ("monthly", "monthly run", lambda when, nr: (when.year, when.month)),
)


def _span(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def apply_policy(runs: Sequence[tuple[str, datetime]], policy: Policy, *, now: datetime | None = None,
                 tz: tzinfo | None = None) -> Decision:
    """Split *runs* (id, start time) into kept (with the rules that keep each) and dropped, by *policy*.

    *tz* is the local time zone the hour/day/week/month rules count in (default: this machine's).
    """
    ordered = sorted(((run_id, _aware(when)) for run_id, when in runs), key=lambda run: run[1], reverse=True)
    decision = Decision()
    if not ordered:
        return decision
    now = _aware(now or datetime.now(timezone.utc))
    past = [when for _, when in ordered if when <= now]
    # restic: relative to the newest run that is not in the future
    since = max(past) - policy.within if policy.within and past else None
    counts = {rule: getattr(policy, rule) for rule, _, _ in _BUCKETS}
    last_seen: dict[str, Any] = {}
    for nr, (run_id, when) in enumerate(ordered):
        local = when.astimezone(tz)
        reasons = []
        if policy.within and (since is None or when > since):
            reasons.append(f"within {_span(policy.within)} of the newest")
        oldest = nr == len(ordered) - 1
        for rule, reason, bucket in _BUCKETS:
            if counts[rule] <= 0:
                continue
            value = bucket(local, nr)
            if rule not in last_seen or value != last_seen[rule] or oldest:
                reasons.append(f"oldest {reason}" if rule in last_seen and value == last_seen[rule] else reason)
                last_seen[rule] = value
                counts[rule] -= 1
        if nr == 0 and not reasons:
            reasons.append("newest run")
        if reasons:
            decision.keep[run_id] = reasons
        else:
            decision.drop.append(run_id)
    return decision

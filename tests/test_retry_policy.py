"""Retry schedule parsing, jittered delays, server hints and the queue lifetime."""

from __future__ import annotations

import math
import random

import pytest
from relay.policies.retry import (
    DEFAULT_SCHEDULE,
    RetryPolicy,
    RetrySchedule,
    format_seconds,
    retry_hint,
)

# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def test_parse_units_and_repeat_marker() -> None:
    schedule = RetrySchedule.parse("30s, 5m, 10m,1h, 1d*")
    assert schedule.steps == (30.0, 300.0, 600.0, 3600.0, 86400.0)
    assert schedule.repeat_last is True
    assert schedule.cap == 86400.0
    assert str(schedule) == "30s, 5m, 10m, 1h, 1d*"


def test_parse_bare_numbers_are_seconds_and_units_are_case_insensitive() -> None:
    assert RetrySchedule.parse("90, 2M, 1.5h").steps == (90.0, 120.0, 5400.0)


def test_default_schedule_is_postfix_like() -> None:
    schedule = RetrySchedule.default()
    assert str(schedule) == DEFAULT_SCHEDULE == "5m, 10m, 20m, 40m, 1h*"
    assert schedule.base_delay(1) == 300.0
    assert schedule.base_delay(50) == 3600.0


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected delays separated by commas"),
    ("5m,,10m", "expected delays separated by commas"),
    ("5m, 10m,", "expected delays separated by commas"),
    ("5x", "'5x' is not a delay"),
    ("five minutes", "is not a delay"),
    ("-5m", "is not a delay"),
    ("5m*, 10m", "only the last delay may carry '*'"),
    ("5m, 10m**", "is not a delay"),
    ("0s, 5m", "must be more than 0"),
    ("30d", "at most 7d"),
])
def test_parse_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="retry schedule") as info:
        RetrySchedule.parse(text)
    assert message in str(info.value)


def test_bad_jitter_and_cap_are_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetrySchedule.parse("5m*", jitter=1.5)
    with pytest.raises(ValueError, match="cap"):
        RetrySchedule.parse("5m, 1h*", cap=600)


def test_exponential() -> None:
    schedule = RetrySchedule.exponential(first=300, factor=2, cap=3600)
    assert schedule.steps == (300.0, 600.0, 1200.0, 2400.0, 3600.0)
    assert schedule.repeat_last is True
    assert schedule.base_delay(9) == 3600.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"first": 0}, "first must be more than 0"),
    ({"first": 600, "cap": 60}, "must be at least first"),
    ({"factor": 1.0}, "factor must be more than 1"),
    ({"factor": 1.000001}, "too small"),
])
def test_exponential_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrySchedule.exponential(**kwargs)


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (45, 60, 90, 3600, 5400, 86400)] == \
        ["45s", "1m", "90s", "1h", "90m", "1d"]


# ------------------------------------------------------------------------------------------------
# Delays
# ------------------------------------------------------------------------------------------------


def test_delay_jitter_stays_within_ten_percent_and_varies() -> None:
    schedule = RetrySchedule.parse("5m, 10m, 20m, 40m, 1h*")
    rng = random.Random(1234)
    for attempts, base in [(1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0)]:
        delays = [schedule.delay(attempts, rng=rng) for _ in range(500)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
        # Jitter actually spreads the delays (both sides of the base are reached).
        assert min(delays) < base * 0.95 and max(delays) > base * 1.05


def test_delay_never_exceeds_the_cap() -> None:
    schedule = RetrySchedule.parse("5m, 1h*")
    rng = random.Random(7)
    delays = [schedule.delay(10, rng=rng) for _ in range(500)]
    assert all(3600 * 0.9 <= d <= 3600 for d in delays)


def test_delay_without_jitter_is_exact() -> None:
    schedule = RetrySchedule.parse("5m, 10m*", jitter=0)
    assert [schedule.delay(n) for n in (0, 1, 2, 3)] == [300.0, 300.0, 600.0, 600.0]


def test_same_seed_same_delays() -> None:
    schedule = RetrySchedule.default()
    first = [schedule.delay(n, rng=random.Random(42)) for n in range(1, 8)]
    again = [schedule.delay(n, rng=random.Random(42)) for n in range(1, 8)]
    assert first == again


def test_finite_schedule_ends() -> None:
    schedule = RetrySchedule.parse("1m, 5m")
    assert schedule.max_attempts == 3
    assert schedule.delay(2, rng=random.Random(1)) <= 330
    assert math.isinf(schedule.delay(3))
    assert math.isinf(schedule.delay(3, hint=60))  # a hint does not resurrect a finished schedule
    assert RetrySchedule.default().max_attempts is None


def test_hint_is_honoured_within_bounds() -> None:
    schedule = RetrySchedule.parse("5m, 10m, 20m, 40m, 1h*")
    rng = random.Random(99)
    # Within bounds: at least the hint, at most 10 % more.
    for _ in range(200):
        delay = schedule.delay(1, hint=900, rng=rng)
        assert 900 <= delay <= 990
    # A shorter hint than the schedule step is honoured too (the server knows best)…
    assert 120 <= schedule.delay(4, hint=120, rng=rng) <= 132
    # …but never below the floor, nor above the cap.
    assert schedule.delay(1, hint=1, rng=rng) == schedule.min_delay == 60
    assert schedule.delay(1, hint=86400, rng=rng) == 3600
    # Nonsense hints fall back to the schedule.
    assert 270 <= schedule.delay(1, hint=float("nan"), rng=rng) <= 330
    assert 270 <= schedule.delay(1, hint=-5, rng=rng) <= 330


def test_min_delay_never_delays_the_schedule_itself() -> None:
    schedule = RetrySchedule.parse("20s, 1m*")
    assert schedule.min_delay == 20
    assert schedule.delay(1, hint=0, rng=random.Random(3)) == 20


@pytest.mark.parametrize(("text", "seconds"), [
    ("451 4.7.1 Please try again in 5 minutes", 300.0),
    ("try again in 30 seconds", 30.0),
    ("Greylisted, retry after 120 seconds", 120.0),
    ("Try again later in 1 hour", None),
    ("please retry in 2 hours", 7200.0),
    ("Too many connections, wait 90 secs", 90.0),
    ("come back in 10 min", 600.0),
    ("try again after 1.5 minutes", 90.0),
    ("RETRY IN 45S", 45.0),
    ("try again later", None),
    ("rate limited, 5 minutes", None),
    ("try again in 99999999 minutes", None),
    ("", None),
])
def test_retry_hint(text: str, seconds: float | None) -> None:
    assert retry_hint(text) == seconds


# ------------------------------------------------------------------------------------------------
# Policy: lifetime and delay warnings
# ------------------------------------------------------------------------------------------------

DAY = 86400.0


def test_next_attempt_within_lifetime() -> None:
    policy = RetryPolicy(RetrySchedule.parse("5m*", jitter=0))
    assert policy.next_attempt(now=1000.0, received_at=900.0, attempts=1) == 1300.0


def test_next_attempt_past_lifetime_is_none() -> None:
    policy = RetryPolicy(RetrySchedule.parse("1h*", jitter=0), max_lifetime=5 * DAY)
    received = 10_000.0
    # The next try would land 30 minutes after the lifetime ends.
    assert policy.next_attempt(now=received + 5 * DAY - 1800, received_at=received, attempts=30) is None
    # An attempt exactly at the end is still allowed.
    assert policy.next_attempt(now=received + 5 * DAY - 3600, received_at=received, attempts=30) == \
        received + 5 * DAY
    # Already expired.
    assert policy.next_attempt(now=received + 6 * DAY, received_at=received, attempts=30) is None


def test_next_attempt_with_finite_schedule_exhausted_is_none() -> None:
    policy = RetryPolicy(RetrySchedule.parse("1m, 2m"))
    assert policy.next_attempt(now=0.0, received_at=0.0, attempts=3) is None


def test_next_attempt_honours_hint() -> None:
    policy = RetryPolicy(RetrySchedule.default())
    due = policy.next_attempt(now=0.0, received_at=0.0, attempts=1, hint=600, rng=random.Random(5))
    assert due is not None and 600 <= due <= 660


def test_is_expired_and_expires_at() -> None:
    policy = RetryPolicy(RetrySchedule.default(), max_lifetime=2 * DAY)
    assert policy.expires_at(100.0) == 100.0 + 2 * DAY
    assert not policy.is_expired(received_at=100.0, now=100.0 + 2 * DAY - 1)
    assert policy.is_expired(received_at=100.0, now=100.0 + 2 * DAY)


def test_default_policy_values() -> None:
    policy = RetryPolicy.default()
    assert policy.max_lifetime == 5 * DAY
    assert policy.delay_warning_after == 4 * 3600


def test_delay_warning_due() -> None:
    policy = RetryPolicy(RetrySchedule.default(), max_lifetime=DAY, delay_warning_after=4 * 3600)
    assert not policy.delay_warning_due(received_at=0.0, now=4 * 3600 - 1)
    assert policy.delay_warning_due(received_at=0.0, now=4 * 3600)
    assert not policy.delay_warning_due(received_at=0.0, now=DAY)  # expired: a bounce, not a warning
    quiet = RetryPolicy(RetrySchedule.default(), delay_warning_after=None)
    assert not quiet.delay_warning_due(received_at=0.0, now=DAY)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_lifetime": 0}, "max_lifetime"),
    ({"max_lifetime": float("inf")}, "max_lifetime"),
    ({"delay_warning_after": -1}, "delay_warning_after"),
])
def test_policy_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(RetrySchedule.default(), **kwargs)

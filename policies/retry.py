"""Retry timing: how long to wait after a temporary failure, and when a recipient has waited too long.

A :class:`RetrySchedule` is a list of delays — ``"5m, 10m, 20m, 40m, 1h*"`` — where step *n* is the wait
after the *n*-th failed attempt and a trailing ``*`` makes the last step repeat for ever (until the
queue lifetime ends). Without the ``*`` the schedule is finite: after its last step there is no further
attempt and the recipient expires. :meth:`RetrySchedule.exponential` builds the same thing from a first
delay, a factor and a cap.

:class:`RetryPolicy` adds the queue lifetime (Postfix's maximal_queue_lifetime, default five days) and
the age after which the sender gets a "delayed" DSN (default four hours).

Invariants:
- Every delay returned is within ``[min_delay, cap]`` of its schedule (or ``math.inf`` when a finite
  schedule is exhausted), so no reply — however odd its "try again in …" hint — can make us hammer a
  server or park a recipient for days.
- Delays carry ±``jitter`` (default 10 %) so that recipients that failed together do not come back in
  lock step; a server's hint is only ever stretched (never shortened) by the jitter.
- Pure: standard library only; randomness comes from the ``rng`` passed in (seed it in tests).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

DEFAULT_SCHEDULE = "5m, 10m, 20m, 40m, 1h*"
DEFAULT_MAX_LIFETIME = 5 * 86400.0
DEFAULT_DELAY_WARNING_AFTER = 4 * 3600.0
DEFAULT_JITTER = 0.1
# Hints below this are raised to it: a reply saying "try again in 1 second" must not cause a busy loop.
DEFAULT_MIN_DELAY = 60.0
# A schedule step longer than this is almost certainly a typo ("5d" for "5m").
MAX_STEP = 7 * 86400.0
# Hints above this are ignored as nonsense rather than parking a recipient for a month.
MAX_HINT = 7 * 86400.0
MAX_STEPS = 100

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STEP = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)\s*(\*?)$", re.IGNORECASE | re.ASCII)

_HINT_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_HINT = re.compile(
    r"\b(?:try(?:\s+again)?|retry|come\s+back|wait|resend)\s+"
    r"(?:again\s+)?(?:in|after|for)?\s*(?:about\s+|at\s+least\s+|another\s+)?"
    r"(\d{1,7}(?:\.\d+)?)\s*"
    r"(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)\b",
    re.IGNORECASE | re.ASCII,
)


@dataclass(frozen=True)
class RetrySchedule:
    """Delays (seconds) after the 1st, 2nd, … failed attempt; the last repeats when ``repeat_last``."""

    steps: tuple[float, ...]
    repeat_last: bool = True
    jitter: float = DEFAULT_JITTER
    min_delay: float = DEFAULT_MIN_DELAY
    cap: float = 0.0  # 0: the longest step

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("retry schedule: needs at least one delay")
        if len(self.steps) > MAX_STEPS:
            raise ValueError(f"retry schedule: at most {MAX_STEPS} delays, got {len(self.steps)}")
        for step in self.steps:
            if not math.isfinite(step) or step <= 0 or step > MAX_STEP:
                raise ValueError(f"retry schedule: each delay must be more than 0 and at most "
                                 f"{format_seconds(MAX_STEP)}, got {step!r} seconds")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"retry schedule: jitter must be in [0, 1), got {self.jitter!r}")
        if self.cap == 0.0:
            object.__setattr__(self, "cap", max(self.steps))
        if not math.isfinite(self.min_delay) or self.min_delay < 0:
            raise ValueError(f"retry schedule: min_delay must be 0 or more, got {self.min_delay!r}")
        # Never let the floor push the schedule's own first steps later than written.
        object.__setattr__(self, "min_delay", min(self.min_delay, min(self.steps)))
        if not math.isfinite(self.cap) or self.cap < max(self.steps):
            raise ValueError(f"retry schedule: cap ({self.cap!r}) must be at least the longest delay "
                             f"({max(self.steps)!r})")

    @classmethod
    def parse(cls, text: str, *, jitter: float = DEFAULT_JITTER, min_delay: float = DEFAULT_MIN_DELAY,
              cap: float = 0.0) -> RetrySchedule:
        """Parse ``"5m, 10m, 30m, 1h*"``: units s/m/h/d (none: seconds); ``*`` only on the last delay."""
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or any(not item for item in items):
            raise ValueError(f"retry schedule {text!r}: expected delays separated by commas, "
                             "for example '5m, 10m, 30m, 1h*'")
        steps: list[float] = []
        repeat_last = False
        for index, item in enumerate(items):
            match = _STEP.match(item)
            if match is None:
                raise ValueError(f"retry schedule {text!r}: {item!r} is not a delay "
                                 "(a number with an optional unit s, m, h or d, for example '10m')")
            number, unit, star = match.groups()
            if star and index != len(items) - 1:
                raise ValueError(f"retry schedule {text!r}: only the last delay may carry '*' "
                                 "(it marks the delay that repeats)")
            repeat_last = bool(star)
            steps.append(float(number) * _UNIT_SECONDS[(unit or "s").lower()])
        try:
            return cls(tuple(steps), repeat_last, jitter=jitter, min_delay=min_delay, cap=cap)
        except ValueError as exc:
            raise ValueError(f"retry schedule {text!r}: {str(exc).removeprefix('retry schedule: ')}") from None

    @classmethod
    def exponential(cls, first: float = 300.0, factor: float = 2.0, cap: float = 3600.0, *,
                    jitter: float = DEFAULT_JITTER, min_delay: float = DEFAULT_MIN_DELAY) -> RetrySchedule:
        """``first``, ``first*factor``, … up to ``cap``, which then repeats."""
        if not (math.isfinite(first) and first > 0):
            raise ValueError(f"exponential retry: first must be more than 0, got {first!r}")
        if not (math.isfinite(cap) and cap >= first):
            raise ValueError(f"exponential retry: cap ({cap!r}) must be at least first ({first!r})")
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"exponential retry: factor must be more than 1, got {factor!r}")
        steps: list[float] = []
        step = first
        while step < cap:
            steps.append(step)
            step *= factor
            if len(steps) >= MAX_STEPS:
                raise ValueError(f"exponential retry: factor {factor!r} is too small to reach the cap "
                                 f"within {MAX_STEPS} steps")
        steps.append(cap)
        return cls(tuple(steps), True, jitter=jitter, min_delay=min_delay, cap=cap)

    @classmethod
    def default(cls) -> RetrySchedule:
        return cls.parse(DEFAULT_SCHEDULE)

    @property
    def max_attempts(self) -> int | None:
        """How many attempts a finite schedule allows (the first one plus one per delay); None: no limit."""
        return None if self.repeat_last else len(self.steps) + 1

    def base_delay(self, attempts: int) -> float:
        """The un-jittered delay after ``attempts`` failed attempts; ``math.inf`` past a finite schedule."""
        index = max(attempts, 1) - 1
        if index >= len(self.steps):
            return self.steps[-1] if self.repeat_last else math.inf
        return self.steps[index]

    def delay(self, attempts: int, hint: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next try after ``attempts`` failed attempts.

        ``hint`` (a server's "try again in N seconds", see :func:`retry_hint`) replaces the schedule's
        step, stretched by up to ``jitter`` and bounded by ``[min_delay, cap]``. Returns ``math.inf``
        when a finite schedule has no further attempt.
        """
        base = self.base_delay(attempts)
        if math.isinf(base):
            return base
        draw = (rng or _RNG).random()
        if hint is not None and math.isfinite(hint) and hint >= 0:
            wanted = hint * (1 + self.jitter * draw)
        else:
            wanted = base * (1 + self.jitter * (2 * draw - 1))
        return min(max(wanted, self.min_delay), self.cap)

    def __str__(self) -> str:
        text = ", ".join(format_seconds(step) for step in self.steps)
        return text + "*" if self.repeat_last else text


_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """A schedule plus the queue lifetime and the delay-warning age (seconds; None disables warnings)."""

    schedule: RetrySchedule
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    delay_warning_after: float | None = DEFAULT_DELAY_WARNING_AFTER

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_lifetime) and self.max_lifetime > 0):
            raise ValueError(f"retry policy: max_lifetime must be more than 0 seconds, "
                             f"got {self.max_lifetime!r}")
        warn = self.delay_warning_after
        if warn is not None and not (math.isfinite(warn) and warn > 0):
            raise ValueError(f"retry policy: delay_warning_after must be more than 0 seconds or unset, "
                             f"got {warn!r}")

    @classmethod
    def default(cls) -> RetryPolicy:
        return cls(RetrySchedule.default())

    def expires_at(self, received_at: float) -> float:
        """When the recipient's lifetime ends (the Will-Retry-Until of a delay DSN)."""
        return received_at + self.max_lifetime

    def is_expired(self, received_at: float, now: float) -> bool:
        return now >= self.expires_at(received_at)

    def next_attempt(self, now: float, received_at: float, attempts: int, hint: float | None = None,
                     rng: random.Random | None = None) -> float | None:
        """When to try again after ``attempts`` failed attempts; None: give up (the caller expires it).

        None when the lifetime is over, when the next attempt would fall after it, or when a finite
        schedule is exhausted.
        """
        if self.is_expired(received_at, now):
            return None
        due = now + self.schedule.delay(attempts, hint, rng)
        return None if due > self.expires_at(received_at) else due

    def delay_warning_due(self, received_at: float, now: float) -> bool:
        """True once the message is old enough for a "delayed" DSN (send it once; the caller remembers)."""
        if self.delay_warning_after is None or self.is_expired(received_at, now):
            return False
        return now - received_at >= self.delay_warning_after


def retry_hint(text: str) -> float | None:
    """Seconds from a "try again in 5 minutes" / "retry after 30 seconds" wording, else None."""
    match = _HINT.search(text)
    if match is None:
        return None
    seconds = float(match.group(1)) * _HINT_UNIT_SECONDS[match.group(2)[0].lower()]
    return seconds if seconds <= MAX_HINT else None


def format_seconds(seconds: float) -> str:
    """``3600`` → ``"1h"``; the largest unit that divides the value exactly."""
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


__all__ = [
    "DEFAULT_SCHEDULE",
    "RetryPolicy",
    "RetrySchedule",
    "format_seconds",
    "retry_hint",
]

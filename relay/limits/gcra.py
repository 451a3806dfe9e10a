"""The generic cell rate algorithm (GCRA) as pure integer arithmetic, shared by every backend.

A rule "``count`` per ``period``" becomes an emission interval ``T = ⌊period / count⌋`` microseconds
(at least 1 µs) and a window ``W = count · T`` (the burst tolerance plus one interval). Each key keeps a
single number, its *theoretical arrival time* (TAT): the instant at which the key would be back to idle if
nothing else happened. An event of ``cost`` n arriving at ``now`` is admitted when

    max(TAT, now) + n·T − now ≤ W

and, when admitted, ``TAT := max(TAT, now) + n·T``. A denied event changes nothing.

What "count per period" admits, exactly:
- An idle key admits a burst of ``count`` units at once (never ``count + 1``).
- After that, one unit every ``T``. Rounding ``T`` down to a whole microsecond means the effective
  period ``W`` is the configured one less under ``count`` µs (60/min: exact; 7 per second: W = 999 999 µs).
- Over any span of length ``L`` (first to last admitted event, both included) at most
  ``count + ⌊L / T⌋`` units are admitted. In particular a span of one period can see up to ``2·count``
  (a full burst at its start, the refill trickling in during it); it is a rate with a burst, not a fixed
  window counter.
- A key whose TAT is not in the future carries no information (it equals a fresh key), so storage may
  forget it then: the Redis key expires at TAT, the memory backend sweeps it.
- ``cost > count`` can never be admitted; backends report that with ``retry_after = math.inf``.

Invariants: all arithmetic is on integers (microseconds), so decisions are exact and identical across
backends; the Lua script in :mod:`relay.limits.redis` mirrors :func:`decide` line for line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from relay.limits.base import Decision

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    """A validated "count per period" rule in the integer units the algorithm works in."""

    count: int
    interval_us: int  # T

    @property
    def window_us(self) -> int:
        """W = count · T: how far ahead of now the TAT may run and still admit."""
        return self.count * self.interval_us


def to_micros(seconds: float) -> int:
    return round(seconds * MICROS)


def make_rate(count: int, period: float) -> Rate:
    """Validate a rule (``count ≥ 1``, ``period > 0``, at most one event per microsecond)."""
    if count < 1:
        raise ValueError(f"count must be at least 1 (got {count})")
    if not period > 0 or math.isinf(period):
        raise ValueError(f"period must be a positive number of seconds (got {period})")
    period_us = to_micros(period)
    if period_us < count:
        raise ValueError(f"{count} per {period} s is finer than one event per microsecond")
    return Rate(count=count, interval_us=period_us // count)


def check_cost(cost: int) -> None:
    if cost < 1:
        raise ValueError(f"cost must be at least 1 (got {cost})")


def check_lease(limit: int, ttl: float) -> int:
    """Validate a concurrency-slot request (not GCRA, but shared by both backends); ttl in µs."""
    if limit < 0:
        raise ValueError(f"limit must not be negative (got {limit})")
    if not ttl > 0 or math.isinf(ttl) or to_micros(ttl) < 1:
        raise ValueError(f"ttl must be a positive number of seconds (got {ttl})")
    return to_micros(ttl)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One GCRA step: the answer and the TAT to store (unchanged when denied or only peeking)."""

    allowed: bool
    tat_us: int
    retry_after_us: int  # -1: never (cost > count)
    current: int


def outstanding(tat_us: int, now_us: int, rate: Rate) -> int:
    """Units still "in flight" at ``now``: ⌈(TAT − now) / T⌉, the count-like figure for logs."""
    ahead = max(tat_us - now_us, 0)
    return -(-ahead // rate.interval_us)


def decide(tat_us: int | None, now_us: int, rate: Rate, cost: int, record: bool) -> Outcome:
    """Admit or deny ``cost`` units at ``now_us`` given the stored TAT (``None``: never seen)."""
    base = now_us if tat_us is None else max(tat_us, now_us)
    if cost > rate.count:
        return Outcome(False, base, -1, outstanding(base, now_us, rate))
    new_tat = base + cost * rate.interval_us
    if new_tat - now_us <= rate.window_us:
        kept = new_tat if record else base
        return Outcome(True, kept, 0, outstanding(kept, now_us, rate))
    return Outcome(False, base, new_tat - rate.window_us - now_us, outstanding(base, now_us, rate))


def to_decision(outcome_allowed: bool, retry_after_us: int, current: int) -> Decision:
    """The interface's :class:`Decision` (seconds) from a backend's integer answer."""
    retry = math.inf if retry_after_us < 0 else retry_after_us / MICROS
    return Decision(allowed=outcome_allowed, retry_after=retry, current=current)

"""Traffic shaping for outbound destinations: the rate syntax, per-destination limits and the adaptive
slow-down schedule the throttle plugin (``relay.plugins.throttle``) enforces.

- :func:`parse_rate` reads ``"100/min"``, ``"10000/day"``, ``"5/s"``, ``"3000/h"`` or ``"50/10min"``
  (COUNT "/" [N] UNIT; units s/sec/second, m/min/minute, h/hr/hour, d/day, plurals allowed) into a
  :class:`Rate`; ``"unlimited"`` is None. Anything else is a :class:`ValueError` that quotes the input
  and shows the expected form.
- :class:`LimitsTable` maps a recipient domain to its :class:`DestinationLimits`: the exact domain, then
  ``.parent`` wildcards from the closest parent outwards, then the default (the same matching as
  routes). Domains compare in their normalised form (lower case, no trailing dot, IDNA).
- :class:`AdaptivePolicy` and :class:`SlowDown`: a slow-down signal (a 421, or a reply the bounce
  classifier marks ``rate_signal``) multiplies the destination's rate by ``cut_factor`` (never below
  ``min_factor`` of the configured rate) and starts a cool-down of ``cooldown`` seconds; each further
  signal during the cool-down restarts it, and cuts again once ``cut_hold`` seconds have passed since the
  last cut (so one burst of replies to one slow connection counts once). When the cool-down is over the
  rate comes back by ``recovery_step`` of the configured rate every ``recovery_interval`` seconds — the
  first step at the end of the cool-down — until it is whole again.

Invariants: pure functions over values (no I/O, no clock: ``now`` is always an argument, epoch
seconds); a factor is always within ``[min_factor, 1]``; a scaled rate admits at least one message per
period, so a cut never stops a destination altogether.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from relay.policies.routing import normalise_domain

# --------------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------------

_UNITS: dict[str, int] = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
# Canonical spelling per unit length, largest first (for printing).
_CANONICAL: tuple[tuple[int, str], ...] = ((86400, "day"), (3600, "h"), (60, "min"), (1, "s"))
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)?\s*([a-z]+)\s*$", re.ASCII | re.IGNORECASE)
UNLIMITED = "unlimited"
#: The limiter works in whole microseconds: faster than this cannot be expressed.
MAX_PER_SECOND = 1_000_000
_EXPECTED = "expected COUNT/PERIOD such as '100/min', '10000/day', '5/s' or '50/10min', or 'unlimited'"


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` messages per ``period`` seconds."""

    count: int
    period: int

    def __post_init__(self) -> None:
        if self.count < 1 or self.period < 1:
            raise ValueError(f"a rate needs a count and a period of at least 1 (got {self.count}/{self.period}s)")
        if self.count > MAX_PER_SECOND * self.period:
            raise ValueError(f"{self.count} per {self.period} s is faster than {MAX_PER_SECOND} per second")

    def __str__(self) -> str:
        for seconds, unit in _CANONICAL:
            if self.period % seconds == 0:
                multiple = self.period // seconds
                return f"{self.count}/{unit}" if multiple == 1 else f"{self.count}/{multiple}{unit}"
        raise AssertionError("unreachable: every period is a whole number of seconds")

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @property
    def interval(self) -> float:
        """Seconds between two messages at the steady rate."""
        return self.period / self.count

    def scaled(self, factor: float) -> Rate:
        """This rate times ``factor`` (same period, count rounded down, at least 1)."""
        if factor >= 1.0:
            return self
        # The epsilon keeps 0.3 × 10 at 3, not 2.9999… → 2.
        return Rate(max(1, math.floor(self.count * factor + 1e-9)), self.period)


def parse_rate(text: str) -> Rate | None:
    """``"100/min"`` → ``Rate(100, 60)``; ``"unlimited"`` → None; anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"rate {text!r}: {_EXPECTED}")
    if text.strip().lower() == UNLIMITED:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"rate {text!r}: {_EXPECTED}")
    count_text, multiple_text, unit = match.groups()
    seconds = _UNITS.get(unit.lower())
    if seconds is None:
        raise ValueError(f"rate {text!r}: unknown unit {unit!r} (use s, min, h or day)")
    count = int(count_text)
    multiple = int(multiple_text) if multiple_text else 1
    if count < 1:
        raise ValueError(f"rate {text!r}: the count must be at least 1 (write 'unlimited' for no limit)")
    if multiple < 1:
        raise ValueError(f"rate {text!r}: the period must be at least 1 {unit}")
    try:
        return Rate(count, multiple * seconds)
    except ValueError as exc:
        raise ValueError(f"rate {text!r}: {exc}") from None


def format_rate(rate: Rate | None) -> str:
    return UNLIMITED if rate is None else str(rate)


# --------------------------------------------------------------------------------------------------
# Per-destination limits
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DestinationLimits:
    """What one destination may take: concurrent connections (0: no limit) and a message rate."""

    connections: int
    rate: Rate | None

    def __post_init__(self) -> None:
        if self.connections < 0:
            raise ValueError(f"connections must not be negative (got {self.connections})")


class LimitsTable:
    """Recipient domain → limits: exact domain, then ``.parent`` wildcards, then the default."""

    def __init__(self, default: DestinationLimits, overrides: Mapping[str, DestinationLimits]) -> None:
        table: dict[str, DestinationLimits] = {}
        for key, limits in overrides.items():
            normal = _normalise_key(key)
            if normal in table:
                raise ValueError(f"destinations: {key!r} duplicates another key once normalised ({normal!r})")
            table[normal] = limits
        self.default = default
        self._table = table

    @property
    def overrides(self) -> dict[str, DestinationLimits]:
        return dict(self._table)

    def match(self, domain: str) -> tuple[str | None, DestinationLimits]:
        """The override key that applies to ``domain`` (None: the default) and its limits."""
        try:
            name = normalise_domain(domain)
        except ValueError:
            return None, self.default  # an address literal or a malformed name: the default applies
        if name in self._table:
            return name, self._table[name]
        labels = name.split(".")
        for start in range(1, len(labels)):
            wildcard = "." + ".".join(labels[start:])
            if wildcard in self._table:
                return wildcard, self._table[wildcard]
        return None, self.default


def _normalise_key(key: str) -> str:
    try:
        if key.startswith("."):
            return "." + normalise_domain(key[1:])
        return normalise_domain(key)
    except ValueError as exc:
        raise ValueError(f"destinations: key {key!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The adaptive slow-down
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AdaptivePolicy:
    cut_factor: float = 0.5
    cooldown: float = 3600.0
    recovery_step: float = 0.25
    recovery_interval: float = 900.0
    min_factor: float = 0.05
    cut_hold: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.cut_factor < 1:
            raise ValueError(f"cut_factor must be between 0 and 1 (got {self.cut_factor})")
        if not 0 < self.min_factor <= 1:
            raise ValueError(f"min_factor must be above 0 and at most 1 (got {self.min_factor})")
        if not 0 < self.recovery_step <= 1:
            raise ValueError(f"recovery_step must be above 0 and at most 1 (got {self.recovery_step})")
        for name in ("cooldown", "recovery_interval"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds (got {getattr(self, name)})")
        if not 0 <= self.cut_hold < math.inf:
            raise ValueError(f"cut_hold must not be negative (got {self.cut_hold})")


@dataclass(frozen=True, slots=True)
class SlowDown:
    """A destination's slow-down: the factor set by the last cut, when that cut was made, the last
    signal (the cool-down runs from it) and why (for logs and the status command)."""

    factor: float
    cut_at: float
    signal_at: float
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps({"factor": self.factor, "cut_at": self.cut_at, "signal_at": self.signal_at,
                           "reason": self.reason}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> SlowDown | None:
        """The stored form back; None for nothing stored or anything unreadable (treated as no slow-down)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            state = cls(float(data["factor"]), float(data["cut_at"]), float(data["signal_at"]),
                        str(data.get("reason", "")))
        except (ValueError, TypeError, KeyError):
            return None
        if not (0 < state.factor <= 1 and math.isfinite(state.cut_at) and math.isfinite(state.signal_at)):
            return None
        return state


def factor_at(policy: AdaptivePolicy, state: SlowDown | None, now: float) -> float:
    """The share of the configured rate in force at ``now`` (1.0: no slow-down)."""
    if state is None:
        return 1.0
    recovering_for = now - (state.signal_at + policy.cooldown)
    if recovering_for < 0:
        return state.factor
    # The microsecond of slack absorbs float rounding at epoch magnitudes (a step is never that short).
    steps = math.floor((recovering_for + 1e-6) / policy.recovery_interval) + 1
    factor = state.factor + steps * policy.recovery_step
    return 1.0 if factor >= 1.0 - 1e-9 else factor


def cooldown_left(policy: AdaptivePolicy, state: SlowDown | None, now: float) -> float:
    """Seconds until the cool-down ends and recovery starts (0 when none is running; never more than
    ``cooldown``, even when the signal's clock ran ahead of ``now``'s — another node, a later write)."""
    if state is None:
        return 0.0
    return min(policy.cooldown, max(0.0, state.signal_at + policy.cooldown - now))


def recovered_at(policy: AdaptivePolicy, state: SlowDown) -> float:
    """When the factor is back to 1.0 (from then on the state may be forgotten)."""
    steps = max(1, math.ceil((1.0 - state.factor) / policy.recovery_step - 1e-9))
    return state.signal_at + policy.cooldown + (steps - 1) * policy.recovery_interval


def on_signal(policy: AdaptivePolicy, state: SlowDown | None, now: float, reason: str) -> SlowDown:
    """The state after a slow-down signal at ``now``: a cut, or (within ``cut_hold`` of the last cut)
    only a fresh cool-down at the same factor."""
    current = factor_at(policy, state, now)
    if state is not None and now - state.cut_at < policy.cut_hold:
        return SlowDown(current, state.cut_at, now, state.reason)
    cut = max(policy.min_factor, current * policy.cut_factor)
    return SlowDown(cut, now, now, reason)


__all__ = [
    "UNLIMITED",
    "AdaptivePolicy",
    "DestinationLimits",
    "LimitsTable",
    "Rate",
    "SlowDown",
    "cooldown_left",
    "factor_at",
    "format_rate",
    "on_signal",
    "parse_rate",
    "recovered_at",
]

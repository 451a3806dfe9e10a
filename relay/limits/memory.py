"""Rate limits kept in this process's memory: right for a single relay node (no Redis configured).

- :meth:`MemoryLimiter.hit` / :meth:`MemoryLimiter.peek` run the GCRA of :mod:`relay.limits.gcra`
  ("``count`` per ``period``" = a burst of ``count``, then one unit every ``period / count``; see that
  module for exactly what is admitted). ``count == 0`` means the rule is disabled: always allowed,
  nothing stored.
- :meth:`MemoryLimiter.acquire` / :meth:`MemoryLimiter.release` hold concurrency slots as leases: a
  holder that neither releases nor renews within ``ttl`` seconds loses its slot. Acquiring again as a
  current holder renews the lease without taking a second slot. ``limit == 0`` disables the check.
- :class:`~relay.limits.base.ValueStore`: small values with a TTL (plugins' state; visible to this
  process only, like everything here).

Invariants:
- The clock is monotonic (microseconds), so wall-clock steps never unblock or block anyone.
- Every decision runs to completion without awaiting, so it is atomic with respect to other tasks on
  the event loop: concurrent callers never over-admit. Not thread-safe: use it from one event loop.
- Memory is bounded by live state. Each stored key has exactly one entry in a heap ordered by the time
  it stops mattering (GCRA: its TAT; slots: its last lease's expiry; values: their expiry). Every call
  first pops a few due entries (``sweep_budget``), dropping keys that are idle and re-filing the rest,
  so a flood of distinct client IPs is forgotten once its period has passed; each call adds at most one
  key and removes up to ``sweep_budget``, so idle keys cannot pile up. Keys are only ever removed by the sweep,
  which is what keeps "one heap entry per key" true.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Final

from relay.limits.base import Decision, RateLimiter, ValueStore, check_value
from relay.limits.gcra import MICROS, check_cost, check_lease, decide, make_rate, to_decision, to_micros

_RATE: Final = 0
_SLOTS: Final = 1
_VALUE: Final = 2
_ALWAYS: Final = Decision(allowed=True)


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryLimiter(RateLimiter, ValueStore):
    def __init__(self, clock_us: Callable[[], int] = monotonic_us, sweep_budget: int = 64) -> None:
        if sweep_budget < 2:
            # At least two removals per call, or idle keys could be created faster than swept.
            raise ValueError("sweep_budget must be at least 2")
        self._clock_us = clock_us
        self._sweep_budget = sweep_budget
        self._tats: dict[str, int] = {}
        self._slots: dict[str, dict[str, int]] = {}
        self._values: dict[str, tuple[str, int]] = {}  # key -> (value, expiry µs)
        # (deadline µs, kind, key): exactly one entry per key in _tats, _slots or _values.
        self._deadlines: list[tuple[int, int, str]] = []

    # -- rates ---------------------------------------------------------------------------------------

    async def hit(self, key: str, count: int, period: float, cost: int = 1) -> Decision:
        if count == 0:
            return _ALWAYS
        rate = make_rate(count, period)
        check_cost(cost)
        now = self._now()
        outcome = decide(self._tats.get(key), now, rate, cost, record=True)
        if outcome.allowed:
            self._store_tat(key, outcome.tat_us)
        return to_decision(outcome.allowed, outcome.retry_after_us, outcome.current)

    async def peek(self, key: str, count: int, period: float) -> Decision:
        if count == 0:
            return _ALWAYS
        rate = make_rate(count, period)
        outcome = decide(self._tats.get(key), self._now(), rate, 1, record=False)
        return to_decision(outcome.allowed, outcome.retry_after_us, outcome.current)

    def _store_tat(self, key: str, tat_us: int) -> None:
        if key not in self._tats:
            heapq.heappush(self._deadlines, (tat_us, _RATE, key))
        self._tats[key] = tat_us

    # -- concurrency slots ---------------------------------------------------------------------------

    async def acquire(self, key: str, limit: int, holder: str, ttl: float) -> Decision:
        if limit == 0:
            return _ALWAYS
        ttl_us = check_lease(limit, ttl)
        now = self._now()
        holders = self._slots.get(key)
        if holders is None:
            holders = self._slots[key] = {}
            heapq.heappush(self._deadlines, (now + ttl_us, _SLOTS, key))
        _drop_lapsed(holders, now)
        if holder in holders or len(holders) < limit:
            holders[holder] = now + ttl_us
            return Decision(allowed=True, current=len(holders))
        first_free = min(holders.values())
        return Decision(allowed=False, retry_after=(first_free - now) / MICROS, current=len(holders))

    async def release(self, key: str, holder: str) -> None:
        holders = self._slots.get(key)
        if holders is not None:
            # The key itself stays until the sweep reaches it (see the module invariants).
            holders.pop(holder, None)

    # -- shared values (ValueStore) -------------------------------------------------------------------

    async def get_value(self, key: str) -> str | None:
        return self._live_value(key, self._now())

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        check_value(value, ttl)
        self._store_value(key, value, self._now() + max(to_micros(ttl), 1))

    async def replace_value(self, key: str, expected: str | None, value: str, ttl: float) -> bool:
        check_value(value, ttl)
        now = self._now()
        if self._live_value(key, now) != expected:
            return False
        self._store_value(key, value, now + max(to_micros(ttl), 1))
        return True

    async def scan_values(self, prefix: str, limit: int = 1000) -> dict[str, str]:
        now = self._now()
        found: dict[str, str] = {}
        for key in sorted(k for k in self._values if k.startswith(prefix)):
            if len(found) >= limit:
                break
            value = self._live_value(key, now)
            if value is not None:
                found[key] = value
        return found

    async def slots_held(self, key: str) -> int:
        now = self._now()
        holders = self._slots.get(key)
        return sum(1 for expiry in holders.values() if expiry > now) if holders else 0

    def _live_value(self, key: str, now: int) -> str | None:
        entry = self._values.get(key)
        return entry[0] if entry is not None and entry[1] > now else None

    def _store_value(self, key: str, value: str, expiry_us: int) -> None:
        # A shorter new expiry leaves the older heap deadline in place: the sweep re-files the key then
        # (reads check the expiry themselves), keeping exactly one heap entry per key.
        if key not in self._values:
            heapq.heappush(self._deadlines, (expiry_us, _VALUE, key))
        self._values[key] = (value, expiry_us)

    async def close(self) -> None:
        self._tats.clear()
        self._slots.clear()
        self._values.clear()
        self._deadlines.clear()

    # -- bounded memory ------------------------------------------------------------------------------

    @property
    def tracked_keys(self) -> int:
        """How many keys are stored (rates and slot sets); idle ones leave at the next sweeps."""
        return len(self._tats) + len(self._slots) + len(self._values)

    def sweep(self) -> None:
        """Drop every key that is idle now (calls do this a little at a time by themselves)."""
        self._sweep(self._clock_us(), len(self._deadlines))

    def _now(self) -> int:
        now = self._clock_us()
        self._sweep(now, self._sweep_budget)
        return now

    def _sweep(self, now: int, budget: int) -> None:
        heap = self._deadlines
        while budget > 0 and heap and heap[0][0] <= now:
            budget -= 1
            _, kind, key = heapq.heappop(heap)
            deadline = self._deadline(kind, key, now)
            if deadline is not None:
                heapq.heappush(heap, (deadline, kind, key))
            elif kind == _RATE:
                del self._tats[key]
            elif kind == _SLOTS:
                del self._slots[key]
            else:
                del self._values[key]

    def _deadline(self, kind: int, key: str, now: int) -> int | None:
        if kind == _RATE:
            return self._rate_deadline(key, now)
        if kind == _SLOTS:
            return self._slots_deadline(key, now)
        expiry = self._values[key][1]
        return expiry if expiry > now else None

    def _rate_deadline(self, key: str, now: int) -> int | None:
        tat = self._tats[key]
        return tat if tat > now else None

    def _slots_deadline(self, key: str, now: int) -> int | None:
        holders = self._slots[key]
        _drop_lapsed(holders, now)
        return max(holders.values()) if holders else None


def _drop_lapsed(holders: dict[str, int], now: int) -> None:
    for name in [name for name, expiry in holders.items() if expiry <= now]:
        del holders[name]


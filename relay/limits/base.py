"""Rate limiting: one interface, two backends (process memory, Redis shared by every relay node).

Two primitives cover every limit the relay enforces:

- :meth:`RateLimiter.hit` — "may this event happen now?" against ``count`` events per ``period``
  seconds (connections per IP per period, AUTH failures, messages and recipients per user or IP, daily
  quotas). It consumes ``cost`` only when the answer is yes.
- :meth:`RateLimiter.acquire` / :meth:`RateLimiter.release` — concurrency (connections open per IP),
  held as leases that expire by themselves so a crashed node does not leak slots forever.

Invariants:
- Each decision is one atomic step: in Redis one round trip running one Lua script; keys carry a TTL so
  nothing is left behind. Concurrent callers on any number of nodes never over-admit.
- A backend that cannot reach its storage raises :class:`LimiterUnavailable`; the caller applies the
  configured fail-open / fail-closed policy (:class:`FailPolicyLimiter` does it in one place).

Next to the limits, every backend also keeps small shared values (:class:`ValueStore`): strings with a
TTL in the same storage (process memory, or the Redis every node shares), for state that plugins share
between nodes — the throttle's slow-downs. It is a separate ABC so that :class:`RateLimiter` stays
exactly what it was; callers test ``isinstance(limiter, ValueStore)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


class LimiterUnavailable(Exception):
    """The limiter's storage (Redis) could not be reached in time."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # Seconds until the request would be allowed (0 when allowed).
    retry_after: float = 0.0
    # Events counted in the current window after this decision (for logs and metrics).
    current: int = 0
    # True when the answer was not decided by the backend (storage unavailable, fail-open applied).
    degraded: bool = False


class RateLimiter(abc.ABC):
    @abc.abstractmethod
    async def hit(self, key: str, count: int, period: float, cost: int = 1) -> Decision:
        """Allow and record ``cost`` events under ``key`` unless that exceeds ``count`` per ``period`` s."""

    @abc.abstractmethod
    async def peek(self, key: str, count: int, period: float) -> Decision:
        """Whether one more event would be allowed, without recording anything."""

    @abc.abstractmethod
    async def acquire(self, key: str, limit: int, holder: str, ttl: float) -> Decision:
        """Take one of ``limit`` concurrent slots for ``holder``; the slot lapses after ``ttl`` s."""

    @abc.abstractmethod
    async def release(self, key: str, holder: str) -> None:
        """Give a slot back (a no-op if it already lapsed)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


#: Largest value a :class:`ValueStore` keeps (UTF-8 bytes): it is for small state, not for data.
MAX_VALUE_BYTES = 65_536


class ValueStore(abc.ABC):
    """Small string values with a TTL, kept where the limits are.

    Invariants: every value carries a TTL (nothing outlives its usefulness); each call is one atomic
    step (Redis: one round trip, except :meth:`scan_values`, an admin listing); keys live in their own
    namespace, apart from the limiter's keys. Storage failures raise :class:`LimiterUnavailable` —
    there is no fail-open answer for a read, so callers decide what an outage means for them.
    """

    @abc.abstractmethod
    async def get_value(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""

    @abc.abstractmethod
    async def set_value(self, key: str, value: str, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (replacing whatever was there)."""

    @abc.abstractmethod
    async def replace_value(self, key: str, expected: str | None, value: str, ttl: float) -> bool:
        """Compare and set: store ``value`` only if the current value is ``expected`` (None: absent).

        Returns whether it was stored. Read-modify-write cycles on shared state loop on this.
        """

    @abc.abstractmethod
    async def scan_values(self, prefix: str, limit: int = 1000) -> dict[str, str]:
        """Up to ``limit`` live values whose key starts with ``prefix`` (for status listings)."""

    @abc.abstractmethod
    async def slots_held(self, key: str) -> int:
        """How many unexpired concurrency slots :meth:`RateLimiter.acquire` holds under ``key``."""


def check_value(value: str, ttl: float) -> None:
    """Validate a value and its TTL (shared by every backend)."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a value must be encodable as UTF-8") from None
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"value longer than {MAX_VALUE_BYTES} bytes")
    if not ttl > 0 or ttl == float("inf"):
        raise ValueError(f"ttl must be a positive number of seconds (got {ttl})")

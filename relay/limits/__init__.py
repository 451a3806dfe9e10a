"""Rate limiting: pick the backend, apply the fail policy, build keys.

- :func:`make_limiter` — :class:`~relay.limits.memory.MemoryLimiter` when ``[redis] url`` is empty
  (one relay node), else :class:`~relay.limits.redis.RedisLimiter` wrapped in
  :class:`FailPolicyLimiter` so an unreachable Redis follows ``fail_open``.
- :class:`FailPolicyLimiter` — turns :class:`LimiterUnavailable` into the configured answer. Fail-open:
  ``Decision(allowed=True, degraded=True)``. Fail-closed: :class:`LimiterUnavailable` propagates (the
  SMTP side answers ``451 4.3.0``). Either way the outage is logged as ``rate_limiter_unavailable``
  (warning, at most one line per :attr:`FailPolicyLimiter.warn_interval` seconds, carrying how many
  decisions failed since the last line) and its end as ``rate_limiter_recovered`` (info).
  :meth:`FailPolicyLimiter.release` never raises for an outage in either mode: the lease lapses by its
  ttl, and a release runs on teardown paths that have nobody to answer.
  Shared values (:class:`ValueStore`) pass through it to the wrapped backend; an outage there raises
  :class:`LimiterUnavailable` in both modes (there is no "open" answer to a read), noted in the same
  outage log lines.
- :func:`limit_key` — the one way to build a key from parts (see its docstring for the rules).

What "``count`` per ``period``" admits is stated exactly in :mod:`relay.limits.gcra`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import time
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from relay.limits.base import Decision, LimiterUnavailable, RateLimiter, ValueStore
from relay.limits.memory import MemoryLimiter
from relay.limits.redis import RedisLimiter
from relay.log import get_logger
from relay.settings import RedisSettings

__all__ = [
    "Decision",
    "FailPolicyLimiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RateLimiter",
    "RedisLimiter",
    "ValueStore",
    "limit_key",
    "make_limiter",
]


log = get_logger(__name__)

_T = TypeVar("_T")


def make_limiter(settings: RedisSettings) -> RateLimiter:
    """The limiter for this configuration (no I/O yet: Redis is dialled on the first decision)."""
    if not settings.url:
        return MemoryLimiter()
    return FailPolicyLimiter(RedisLimiter(settings), fail_open=settings.fail_open)


class FailPolicyLimiter(RateLimiter, ValueStore):
    """Delegates to ``inner``; applies fail-open / fail-closed when it raises LimiterUnavailable.

    Its :class:`ValueStore` methods need an ``inner`` that keeps values (both backends do); with one
    that does not they raise :class:`LimiterUnavailable`.
    """

    warn_interval: float = 10.0

    def __init__(self, inner: RateLimiter, *, fail_open: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self._fail_open = fail_open
        self._clock = clock
        self._down_since: float | None = None
        self._last_warning: float | None = None
        self._failed_since_warning = 0
        self._failed_total = 0

    @property
    def inner(self) -> RateLimiter:
        return self._inner

    async def hit(self, key: str, count: int, period: float, cost: int = 1) -> Decision:
        return await self._decide(self._inner.hit(key, count, period, cost))

    async def peek(self, key: str, count: int, period: float) -> Decision:
        return await self._decide(self._inner.peek(key, count, period))

    async def acquire(self, key: str, limit: int, holder: str, ttl: float) -> Decision:
        return await self._decide(self._inner.acquire(key, limit, holder, ttl))

    async def release(self, key: str, holder: str) -> None:
        try:
            await self._inner.release(key, holder)
        except LimiterUnavailable as exc:
            self._note_failure(exc)
        else:
            self._note_success()

    async def close(self) -> None:
        await self._inner.close()

    # -- shared values: passed through, outages noted and raised in both modes ----------------------

    async def get_value(self, key: str) -> str | None:
        return await self._pass(lambda values: values.get_value(key))

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        await self._pass(lambda values: values.set_value(key, value, ttl))

    async def replace_value(self, key: str, expected: str | None, value: str, ttl: float) -> bool:
        return await self._pass(lambda values: values.replace_value(key, expected, value, ttl))

    async def scan_values(self, prefix: str, limit: int = 1000) -> dict[str, str]:
        return await self._pass(lambda values: values.scan_values(prefix, limit))

    async def slots_held(self, key: str) -> int:
        return await self._pass(lambda values: values.slots_held(key))

    async def _pass(self, call: Callable[[ValueStore], Awaitable[_T]]) -> _T:
        if not isinstance(self._inner, ValueStore):
            raise LimiterUnavailable(f"{type(self._inner).__name__} keeps no shared values")
        try:
            result = await call(self._inner)
        except LimiterUnavailable as exc:
            self._note_failure(exc)
            raise
        self._note_success()
        return result

    async def _decide(self, pending: Awaitable[Decision]) -> Decision:
        try:
            decision = await pending
        except LimiterUnavailable as exc:
            self._note_failure(exc)
            if not self._fail_open:
                raise
            return Decision(allowed=True, degraded=True)
        self._note_success()
        return decision

    def _note_failure(self, exc: LimiterUnavailable) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        self._failed_total += 1
        self._failed_since_warning += 1
        if self._last_warning is None or now - self._last_warning >= self.warn_interval:
            log.warning("rate_limiter_unavailable", error=str(exc), fail_open=self._fail_open,
                        failed_decisions=self._failed_since_warning)
            self._last_warning = now
            self._failed_since_warning = 0

    def _note_success(self) -> None:
        if self._down_since is None:
            return
        log.info("rate_limiter_recovered", down_seconds=round(self._clock() - self._down_since, 3),
                 failed_decisions=self._failed_total)
        self._down_since = None
        self._last_warning = None
        self._failed_since_warning = 0
        self._failed_total = 0


# Characters that would make a key ambiguous or unreadable in logs; '%' itself so escaping is reversible
# and '#' because it marks a hashed part. Lone surrogates (undecodable bytes smuggled through
# surrogateescape) are escaped too, as they cannot be sent to Redis as UTF-8.
_ESCAPED: Final = frozenset("%:#") | frozenset(chr(c) for c in (*range(0x21), 0x7F))
MAX_PART_BYTES: Final = 200


def limit_key(*parts: str) -> str:
    """Build a limiter key from parts: ``limit_key("auth_fail_user", "Bob@Example.COM")``.

    Rules, so that one client cannot dodge a limit by spelling and no part can forge another:
    - Parts are joined with ``:``; inside a part ``%``, ``:``, ``#``, spaces and control characters are
      %-escaped, so ``limit_key("a:b")`` and ``limit_key("a", "b")`` differ.
    - Case is normalised: every part is NFC-normalised and lower-cased (user names, addresses and
      domains compare case-insensitively for limiting), and a part that is an IP address is written in
      its canonical form (``2001:DB8:0::1`` → ``2001:db8::1``, ``::ffff:192.0.2.1`` → ``192.0.2.1``).
    - No unbounded keys: a part longer than 200 bytes (UTF-8, after escaping) is replaced by ``#`` and
      the SHA-256 of its normalised text.
    """
    if not parts:
        raise ValueError("limit_key needs at least one part")
    return ":".join(_key_part(part) for part in parts)


@functools.lru_cache(maxsize=8192)
def _key_part(part: str) -> str:
    # Pure, and the same few parts (the client's IP, the user) recur on every command: memoised.
    text = _canonical_ip(part) or unicodedata.normalize("NFC", part).lower()
    escaped = "".join(f"%{ord(ch):02X}" if _needs_escape(ch) else ch for ch in text)
    if len(escaped.encode("utf-8")) > MAX_PART_BYTES:
        return "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return escaped


def _needs_escape(ch: str) -> bool:
    return ch in _ESCAPED or "\ud800" <= ch <= "\udfff"


def _canonical_ip(part: str) -> str | None:
    # Only strings that could be an address are tried, to keep the common path cheap.
    if not part or len(part) > 45 or not (":" in part or part[0].isdigit()):
        return None
    try:
        address = ipaddress.ip_address(part)
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; they are the same client.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)

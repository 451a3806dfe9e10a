"""Rate limits shared by every relay node through one Redis (``[redis] url`` set).

Each decision is one round trip running one Lua script (``EVALSHA``; redis-py's script object loads the
script and retries once when the server answers ``NOSCRIPT``, e.g. after a restart), so it is atomic
across any number of nodes and tasks. Scripts read the clock with ``redis.call('TIME')``: every node
decides against the same server clock, whatever its own clock says. Requires Redis ≥ 5 (scripts that
read ``TIME`` and then write are replicated by effects).

Keys (all under ``settings.key_prefix``):
- ``<prefix>rate:<key>`` — a string: the GCRA theoretical arrival time in µs since the epoch (see
  :mod:`relay.limits.gcra` for exactly what "count per period" admits). Written with ``PX`` set to when
  the TAT passes, because from then on the key is indistinguishable from a fresh one.
- ``<prefix>slots:<key>`` — a sorted set of holders scored by lease expiry (µs since the epoch). Each
  acquire drops lapsed holders, admits if the holder already holds a slot (renewal) or fewer than
  ``limit`` remain, then ``PEXPIRE``\\s the set to its last lease's expiry.
- ``<prefix>kv:<key>`` — a string value of the :class:`~relay.limits.base.ValueStore`, written with
  ``PX`` (its TTL). ``GET`` / ``SET`` are single commands; the compare-and-set and the count of live
  slots are one script each. :meth:`RedisLimiter.scan_values` (an admin listing) walks ``SCAN`` and
  ``MGET``s in batches: several round trips, not atomic as a whole, never on a mail path.

Invariants:
- Every key written carries a TTL; nothing is left behind when traffic stops.
- ``count == 0`` / ``limit == 0`` mean "rule disabled": allowed without a round trip.
- Any failure to get an answer — connection refused or lost, connect or read timeout
  (``settings.timeout``), a server that is loading, read-only or out of memory — raises
  :class:`LimiterUnavailable`; the fail policy lives in :class:`relay.limits.FailPolicyLimiter`.
- The client reconnects by itself: a failed connection is dropped from the pool and the next decision
  dials again. A connection error (not a timeout) is retried once at once, so a pooled connection that
  died with a restarted server costs no decision. That retry can, rarely, count one event twice if the
  first reply was lost after the script ran — erring on the strict side, never over-admitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from relay.limits.base import Decision, LimiterUnavailable, RateLimiter, ValueStore, check_value
from relay.limits.gcra import check_cost, check_lease, make_rate, to_decision
from relay.settings import RedisSettings

_ALWAYS: Final = Decision(allowed=True)

# Mirrors relay.limits.gcra.decide; integers in µs throughout (exact below 2**53 in Lua's doubles).
_GCRA_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local count = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local record = ARGV[4] == '1'

local base = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local tat = tonumber(stored)
  if tat and tat > now then base = tat end
end

-- ceil((tat - now) / interval) in exact integer steps
local function outstanding(tat)
  local ahead = tat - now
  if ahead <= 0 then return 0 end
  local units = math.floor(ahead / interval)
  if units * interval < ahead then units = units + 1 end
  return units
end

if cost > count then
  return {0, -1, outstanding(base)}
end
local new_tat = base + cost * interval
local window = count * interval
if new_tat - now <= window then
  if not record then
    return {1, 0, outstanding(base)}
  end
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
  return {1, 0, outstanding(new_tat)}
end
return {0, new_tat - window - now, outstanding(base)}
"""

_SLOTS_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local holder = ARGV[2]
local ttl = tonumber(ARGV[3])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local held = redis.call('ZSCORE', KEYS[1], holder)
local n = redis.call('ZCARD', KEYS[1])
if not held and n >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now, n}
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), holder)
if not held then n = n + 1 end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local ttl_ms = math.ceil((tonumber(last[2]) - now) / 1000)
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl_ms))
return {1, 0, n}
"""

# ARGV: expected-present flag, expected value, new value, TTL in ms. Returns 1 when stored.
_REPLACE_SCRIPT: Final = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

# Live leases are those scored after now (acquire drops the ones at or before it).
_HELD_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
"""

# SCAN's MATCH is a glob: these characters of a prefix must be taken literally.
_GLOB_SPECIALS: Final = frozenset("*?[]\\")
_SCAN_BATCH: Final = 500


class RedisLimiter(RateLimiter, ValueStore):
    """The shared backend; construct once per process and :meth:`close` it at shutdown."""

    def __init__(self, settings: RedisSettings) -> None:
        if not settings.url:
            raise ValueError("RedisLimiter needs [redis] url")
        self._prefix = settings.key_prefix
        self._client = redis.asyncio.Redis.from_url(
            settings.url,
            socket_connect_timeout=settings.timeout,
            socket_timeout=settings.timeout,
            # Once, at once, and only for connection errors: see the module docstring. Timeouts are
            # not retried so a stalled Redis costs one timeout per decision, not several.
            retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        )
        self._gcra: AsyncScript = self._client.register_script(_GCRA_SCRIPT)
        self._slots: AsyncScript = self._client.register_script(_SLOTS_SCRIPT)
        self._replace: AsyncScript = self._client.register_script(_REPLACE_SCRIPT)
        self._held: AsyncScript = self._client.register_script(_HELD_SCRIPT)

    def rate_key(self, key: str) -> str:
        return f"{self._prefix}rate:{key}"

    def slots_key(self, key: str) -> str:
        return f"{self._prefix}slots:{key}"

    def value_key(self, key: str) -> str:
        return f"{self._prefix}kv:{key}"

    async def hit(self, key: str, count: int, period: float, cost: int = 1) -> Decision:
        if count == 0:
            return _ALWAYS
        rate = make_rate(count, period)
        check_cost(cost)
        args = (rate.count, rate.interval_us, cost, 1)
        return to_decision(*await self._run(self._gcra, self.rate_key(key), args))

    async def peek(self, key: str, count: int, period: float) -> Decision:
        if count == 0:
            return _ALWAYS
        rate = make_rate(count, period)
        args = (rate.count, rate.interval_us, 1, 0)
        return to_decision(*await self._run(self._gcra, self.rate_key(key), args))

    async def acquire(self, key: str, limit: int, holder: str, ttl: float) -> Decision:
        if limit == 0:
            return _ALWAYS
        ttl_us = check_lease(limit, ttl)
        args = (limit, holder, ttl_us)
        return to_decision(*await self._run(self._slots, self.slots_key(key), args))

    async def release(self, key: str, holder: str) -> None:
        # One command, atomic by itself; an emptied set is deleted by Redis (and had a TTL anyway).
        try:
            await self._client.zrem(self.slots_key(key), holder)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    # -- shared values (ValueStore) -------------------------------------------------------------------

    async def get_value(self, key: str) -> str | None:
        try:
            raw: object = await self._client.get(self.value_key(key))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return _text(raw)

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        check_value(value, ttl)
        try:
            await self._client.set(self.value_key(key), value, px=_ttl_ms(ttl))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def replace_value(self, key: str, expected: str | None, value: str, ttl: float) -> bool:
        check_value(value, ttl)
        args = ("0" if expected is None else "1", expected or "", value, _ttl_ms(ttl))
        try:
            reply: object = await self._replace(keys=[self.value_key(key)], args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return reply == 1

    async def scan_values(self, prefix: str, limit: int = 1000) -> dict[str, str]:
        base = self.value_key("")
        pattern = "".join(f"\\{ch}" if ch in _GLOB_SPECIALS else ch for ch in base + prefix) + "*"
        found: dict[str, str] = {}
        try:
            keys: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=_SCAN_BATCH):
                keys.append(key)
                if len(keys) >= limit:
                    break
            for start in range(0, len(keys), _SCAN_BATCH):
                batch = keys[start:start + _SCAN_BATCH]
                values: Sequence[object] = await self._client.mget(batch)
                for key, raw in zip(batch, values, strict=True):
                    text = _text(raw)
                    if text is not None:  # expired between SCAN and MGET
                        found[key.decode("utf-8", "surrogateescape")[len(base):]] = text
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return dict(sorted(found.items()))

    async def slots_held(self, key: str) -> int:
        try:
            reply: object = await self._held(keys=[self.slots_key(key)])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if not isinstance(reply, int):
            raise LimiterUnavailable(f"redis: unexpected script reply {reply!r:.80}")
        return reply

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: AsyncScript, key: str, args: tuple[int | str, ...]) -> tuple[bool, int, int]:
        try:
            reply: object = await script(keys=[key], args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return _decision_reply(reply)


def _unavailable(exc: BaseException) -> LimiterUnavailable:
    # redis-py's messages name host:port and the failure, never the password in the URL.
    return LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}")


def _text(raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "surrogateescape")
    if isinstance(raw, str):
        return raw
    raise LimiterUnavailable(f"redis: unexpected value type {type(raw).__name__}")


def _ttl_ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _decision_reply(reply: object) -> tuple[bool, int, int]:
    """``{allowed, retry_after_us, current}`` from either script, checked."""
    if (isinstance(reply, list) and len(reply) == 3
            and all(isinstance(v, int) for v in reply)):
        allowed, retry_after_us, current = reply
        return bool(allowed), int(retry_after_us), int(current)
    raise LimiterUnavailable(f"redis: unexpected script reply {reply!r:.80}")

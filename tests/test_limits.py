"""Rate limiting: both backends against the same expectations, plus what only Redis has (several nodes,
TTLs, outages) and the pure GCRA arithmetic.

Shared tests run once on :class:`MemoryLimiter` and once on :class:`RedisLimiter` over the suite's real
Redis (unique key prefix per test). Outage tests start and SIGKILL a redis-server of their own on a free
loopback port. Nothing here asserts on speed: tests that need time to pass wait for the ``retry_after``
the limiter gave (plus a margin) and assert on the answer afterwards.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay.limits import (
    Decision,
    FailPolicyLimiter,
    LimiterUnavailable,
    MemoryLimiter,
    RateLimiter,
    RedisLimiter,
    limit_key,
    make_limiter,
)
from relay.limits.gcra import Outcome, Rate, decide, make_rate
from relay.settings import RedisSettings

# Slack added to a retry_after before trying again: covers timer granularity and, for Redis, the
# distance between the server's clock and ours. Only ever makes a test wait longer.
MARGIN = 0.05
# A hang guard for calls to an unreachable Redis, not a speed assertion: settings.timeout is 0.5 s.
HANG_GUARD = 10.0


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[RateLimiter]:
    backend: RateLimiter
    if request.param == "memory":
        backend = MemoryLimiter()
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisLimiter(RedisSettings(url=url, key_prefix=key_prefix))
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisProcess:
    """A redis-server of this test's own, which it may kill and start again on the same port."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            for _ in range(200):
                assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
                try:
                    if await client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    await asyncio.sleep(0.05)
            raise AssertionError(f"redis-server on port {self.port} never answered")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class FakeClock:
    """Microseconds, advanced by hand: for the pure-logic tests of the memory backend."""

    now_us: int = 1_000_000_000

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1_000_000)


def dead_settings() -> RedisSettings:
    """Settings pointing at a loopback port where nothing listens."""
    return RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")


# -- hit / peek, both backends ----------------------------------------------------------------------


async def test_allows_up_to_count_then_denies(limiter: RateLimiter) -> None:
    for n in range(1, 6):
        decision = await limiter.hit("ip:192.0.2.1", 5, 60)
        assert decision == Decision(allowed=True, retry_after=0.0, current=n)
    denied = await limiter.hit("ip:192.0.2.1", 5, 60)
    assert not denied.allowed
    assert 0 < denied.retry_after <= 12  # one emission interval: 60 s / 5
    assert denied.current == 5
    assert (await limiter.hit("ip:192.0.2.2", 5, 60)).allowed  # keys are independent


async def test_cost_counts_several_units(limiter: RateLimiter) -> None:
    assert (await limiter.hit("rcpt", 10, 60, cost=4)).current == 4
    assert (await limiter.hit("rcpt", 10, 60, cost=4)).current == 8
    too_many = await limiter.hit("rcpt", 10, 60, cost=4)
    assert not too_many.allowed
    assert 0 < too_many.retry_after <= 12  # two units short: two intervals of 6 s
    assert too_many.current == 8  # a denied hit consumed nothing
    assert (await limiter.hit("rcpt", 10, 60, cost=2)).current == 10
    assert not (await limiter.hit("rcpt", 10, 60)).allowed


async def test_cost_above_count_is_never_allowed(limiter: RateLimiter) -> None:
    impossible = await limiter.hit("big", 3, 60, cost=4)
    assert not impossible.allowed
    assert impossible.retry_after == math.inf
    assert (await limiter.hit("big", 3, 60, cost=3)).allowed  # and it consumed nothing


async def test_peek_does_not_consume(limiter: RateLimiter) -> None:
    for _ in range(5):
        assert await limiter.peek("auth:bob", 2, 60) == Decision(allowed=True, current=0)
    await limiter.hit("auth:bob", 2, 60)
    assert await limiter.peek("auth:bob", 2, 60) == Decision(allowed=True, current=1)
    await limiter.hit("auth:bob", 2, 60)
    full = await limiter.peek("auth:bob", 2, 60)
    assert not full.allowed and full.retry_after > 0 and full.current == 2
    assert not (await limiter.hit("auth:bob", 2, 60)).allowed


async def test_period_recovery(limiter: RateLimiter) -> None:
    assert (await limiter.hit("k", 2, 0.2)).allowed
    assert (await limiter.hit("k", 2, 0.2)).allowed
    denied = await limiter.hit("k", 2, 0.2)
    assert not denied.allowed and 0 < denied.retry_after <= 0.1
    await asyncio.sleep(denied.retry_after + MARGIN)
    assert (await limiter.hit("k", 2, 0.2)).allowed  # one interval refilled one unit
    await asyncio.sleep(0.2 + MARGIN)
    assert (await limiter.hit("k", 2, 0.2)).allowed  # a whole period refills the whole burst
    assert (await limiter.hit("k", 2, 0.2)).allowed


async def test_zero_count_disables_the_rule(limiter: RateLimiter) -> None:
    for _ in range(20):
        assert (await limiter.hit("off", 0, 60)).allowed
    assert (await limiter.acquire("off", 0, "h", 10)).allowed


async def test_bad_arguments_are_refused(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        await limiter.hit("k", -1, 60)
    with pytest.raises(ValueError):
        await limiter.hit("k", 5, 0)
    with pytest.raises(ValueError):
        await limiter.hit("k", 5, 60, cost=0)
    with pytest.raises(ValueError):
        await limiter.hit("k", 10_000_000, 1)  # finer than one event per microsecond
    with pytest.raises(ValueError):
        await limiter.acquire("k", 5, "h", 0)
    with pytest.raises(ValueError):
        await limiter.acquire("k", -1, "h", 10)


async def test_concurrent_hits_never_over_admit(limiter: RateLimiter) -> None:
    decisions = await asyncio.gather(*(limiter.hit("flood", 10, 3600) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10


# -- acquire / release, both backends ---------------------------------------------------------------


async def test_acquire_up_to_limit_release_frees(limiter: RateLimiter) -> None:
    assert await limiter.acquire("conn:ip", 2, "c1", 30) == Decision(allowed=True, current=1)
    assert await limiter.acquire("conn:ip", 2, "c2", 30) == Decision(allowed=True, current=2)
    denied = await limiter.acquire("conn:ip", 2, "c3", 30)
    assert not denied.allowed and 0 < denied.retry_after <= 30 and denied.current == 2
    # A holder acquiring again renews its lease, it does not take a second slot.
    assert await limiter.acquire("conn:ip", 2, "c1", 30) == Decision(allowed=True, current=2)
    await limiter.release("conn:ip", "c1")
    assert await limiter.acquire("conn:ip", 2, "c3", 30) == Decision(allowed=True, current=2)
    await limiter.release("conn:ip", "nobody")  # releasing a slot not held is a no-op
    await limiter.release("never-seen", "nobody")
    assert not (await limiter.acquire("conn:ip", 2, "c4", 30)).allowed


async def test_lapsed_lease_frees_its_slot(limiter: RateLimiter) -> None:
    assert (await limiter.acquire("conn:ip", 1, "crashed", 0.2)).allowed
    denied = await limiter.acquire("conn:ip", 1, "next", 0.2)
    assert not denied.allowed and 0 < denied.retry_after <= 0.2
    await asyncio.sleep(denied.retry_after + MARGIN)
    assert await limiter.acquire("conn:ip", 1, "next", 0.2) == Decision(allowed=True, current=1)


async def test_concurrent_acquires_never_over_admit(limiter: RateLimiter) -> None:
    decisions = await asyncio.gather(*(limiter.acquire("conn", 7, f"h{i}", 60) for i in range(50)))
    assert sum(d.allowed for d in decisions) == 7


# -- Redis only: several nodes, TTLs ----------------------------------------------------------------


async def test_two_nodes_never_over_admit_together(redis_url: str, key_prefix: str) -> None:
    settings_ = RedisSettings(url=redis_url, key_prefix=key_prefix)
    node_a, node_b = RedisLimiter(settings_), RedisLimiter(settings_)
    try:
        nodes = [node_a, node_b]
        hits = await asyncio.gather(*(nodes[i % 2].hit("user:alice", 10, 3600) for i in range(60)))
        assert sum(d.allowed for d in hits) == 10
        slots = await asyncio.gather(
            *(nodes[i % 2].acquire("conn:alice", 4, f"conn{i}", 60) for i in range(60)))
        assert sum(d.allowed for d in slots) == 4
    finally:
        await node_a.close()
        await node_b.close()


async def test_every_key_has_a_ttl(redis_url: str, key_prefix: str,
                                   raw_redis: redis.asyncio.Redis) -> None:
    node = RedisLimiter(RedisSettings(url=redis_url, key_prefix=key_prefix))
    try:
        await node.hit("rate", 5, 60, cost=5)
        await node.hit("rate-short", 5, 0.5, cost=5)
        await node.acquire("slots", 3, "h1", 30)
        await node.acquire("slots", 3, "h2", 10)
        await node.peek("peeked-only", 5, 60)
        keys = sorted([k.decode() async for k in raw_redis.scan_iter(match=key_prefix + "*")])
        assert keys == [node.rate_key("rate"), node.rate_key("rate-short"), node.slots_key("slots")]
        ttl = {key: await raw_redis.pttl(key) for key in keys}
        assert 0 < ttl[node.rate_key("rate")] <= 60_000
        assert 0 < ttl[node.rate_key("rate-short")] <= 500  # a full burst takes a period to drain
        assert 10_000 < ttl[node.slots_key("slots")] <= 30_000  # until the last lease lapses
        await asyncio.sleep(0.5 + MARGIN)
        assert not await raw_redis.exists(node.rate_key("rate-short"))  # gone once it no longer matters
    finally:
        await node.close()


async def test_releasing_the_last_slot_leaves_no_key(redis_url: str, key_prefix: str,
                                                     raw_redis: redis.asyncio.Redis) -> None:
    node = RedisLimiter(RedisSettings(url=redis_url, key_prefix=key_prefix))
    try:
        await node.acquire("c", 2, "h", 30)
        await node.release("c", "h")
        assert not await raw_redis.exists(node.slots_key("c"))
    finally:
        await node.close()


# -- Redis unreachable -----------------------------------------------------------------------------


async def test_nothing_listening_raises_unavailable() -> None:
    node = RedisLimiter(dead_settings())
    try:
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(LimiterUnavailable):
                await node.hit("k", 5, 60)
            with pytest.raises(LimiterUnavailable):
                await node.peek("k", 5, 60)
            with pytest.raises(LimiterUnavailable):
                await node.acquire("k", 5, "h", 60)
            with pytest.raises(LimiterUnavailable):
                await node.release("k", "h")
    finally:
        await node.close()


async def test_silent_server_times_out_as_unavailable() -> None:
    # A socket that completes the TCP handshake (kernel backlog) but never answers: a stalled Redis.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        node = RedisLimiter(RedisSettings(url=f"redis://127.0.0.1:{port}/0", timeout=0.2))
        try:
            async with asyncio.timeout(HANG_GUARD):
                with pytest.raises(LimiterUnavailable, match="Timeout"):
                    await node.hit("k", 5, 60)
        finally:
            await node.close()


async def test_fail_open_allows_degraded_and_warns_once() -> None:
    policy = FailPolicyLimiter(RedisLimiter(dead_settings()), fail_open=True)
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(HANG_GUARD):
                for _ in range(5):
                    assert await policy.hit("k", 5, 60) == Decision(allowed=True, degraded=True)
                assert await policy.acquire("k", 5, "h", 60) == Decision(allowed=True, degraded=True)
                assert (await policy.peek("k", 5, 60)).degraded
                await policy.release("k", "h")
        warnings = [line for line in logs if line["log_level"] == "warning"]
        assert len(warnings) == 1
        assert warnings[0]["event"] == "rate_limiter_unavailable"
        assert warnings[0]["fail_open"] is True
        assert "ConnectionError" in warnings[0]["error"]
    finally:
        await policy.close()


async def test_fail_closed_raises_but_release_does_not() -> None:
    policy = FailPolicyLimiter(RedisLimiter(dead_settings()), fail_open=False)
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(HANG_GUARD):
                with pytest.raises(LimiterUnavailable):
                    await policy.hit("k", 5, 60)
                with pytest.raises(LimiterUnavailable):
                    await policy.acquire("k", 5, "h", 60)
                await policy.release("k", "h")  # the lease lapses by itself; nobody to answer
        assert [line["event"] for line in logs] == ["rate_limiter_unavailable"]
    finally:
        await policy.close()


async def test_warning_repeats_after_the_interval_and_recovery_is_logged() -> None:
    clock = [100.0]
    inner = MemoryLimiter()
    outage = {"on": True}

    class Flaky(RateLimiter):
        """A backend whose outage the test switches on and off (pure-logic test of the policy)."""

        async def hit(self, key: str, count: int, period: float, cost: int = 1) -> Decision:
            if outage["on"]:
                raise LimiterUnavailable("down")
            return await inner.hit(key, count, period, cost)

        async def peek(self, key: str, count: int, period: float) -> Decision:
            return await inner.peek(key, count, period)

        async def acquire(self, key: str, limit: int, holder: str, ttl: float) -> Decision:
            return await inner.acquire(key, limit, holder, ttl)

        async def release(self, key: str, holder: str) -> None:
            await inner.release(key, holder)

        async def close(self) -> None:
            await inner.close()

    policy = FailPolicyLimiter(Flaky(), fail_open=True, clock=lambda: clock[0])
    with capture_logs() as logs:
        for _ in range(3):
            await policy.hit("k", 5, 60)
        clock[0] = 109.5
        await policy.hit("k", 5, 60)
        clock[0] = 110.0
        await policy.hit("k", 5, 60)  # 10 s after the first warning: a second one
        outage["on"] = False
        clock[0] = 111.0
        assert await policy.hit("k", 5, 60) == Decision(allowed=True, current=1)
        await policy.hit("k", 5, 60)
    assert [(line["event"], line.get("failed_decisions")) for line in logs] == [
        ("rate_limiter_unavailable", 1),
        ("rate_limiter_unavailable", 4),
        ("rate_limiter_recovered", 5),
    ]
    assert logs[2]["down_seconds"] == 11.0
    await policy.close()


# -- Redis killed and restarted under a live limiter -----------------------------------------------


async def test_redis_killed_then_restarted(own_redis: RedisProcess) -> None:
    await own_redis.start()
    node = RedisLimiter(RedisSettings(url=own_redis.url))
    try:
        assert (await node.hit("k", 3, 60)).allowed
        assert (await node.acquire("c", 2, "h1", 60)).allowed
        own_redis.kill()
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(LimiterUnavailable):
                await node.hit("k", 3, 60)
            with pytest.raises(LimiterUnavailable):
                await node.acquire("c", 2, "h2", 60)
        await own_redis.start()  # same port; the script cache and all keys are gone
        assert await node.hit("k", 3, 60) == Decision(allowed=True, current=1)
        assert await node.acquire("c", 2, "h2", 60) == Decision(allowed=True, current=1)
    finally:
        await node.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_fail_policy_through_a_restart(own_redis: RedisProcess, fail_open: bool) -> None:
    await own_redis.start()
    policy = make_limiter(RedisSettings(url=own_redis.url, fail_open=fail_open))
    assert isinstance(policy, FailPolicyLimiter)
    try:
        assert await policy.hit("k", 3, 60) == Decision(allowed=True, current=1)
        own_redis.kill()
        with capture_logs() as logs:
            async with asyncio.timeout(HANG_GUARD):
                for _ in range(3):
                    if fail_open:
                        assert await policy.hit("k", 3, 60) == Decision(allowed=True, degraded=True)
                    else:
                        with pytest.raises(LimiterUnavailable):
                            await policy.hit("k", 3, 60)
            await own_redis.start()
            assert await policy.hit("k", 3, 60) == Decision(allowed=True, current=1)
        assert [line["event"] for line in logs] == ["rate_limiter_unavailable", "rate_limiter_recovered"]
    finally:
        await policy.close()


# -- make_limiter ------------------------------------------------------------------------------------


async def test_make_limiter_picks_the_backend() -> None:
    memory = make_limiter(RedisSettings())
    assert isinstance(memory, MemoryLimiter)
    shared = make_limiter(RedisSettings(url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, FailPolicyLimiter) and isinstance(shared.inner, RedisLimiter)
    await memory.close()
    await shared.close()


# -- memory backend: exact GCRA and bounded memory (fake clock) ---------------------------------------


async def test_memory_retry_after_is_exact() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock_us=clock)
    for _ in range(3):
        assert (await limiter.hit("k", 3, 3)).allowed  # T = 1 s
    assert (await limiter.hit("k", 3, 3)).retry_after == 1.0
    clock.advance(0.4)
    assert (await limiter.hit("k", 3, 3)).retry_after == 0.6
    assert (await limiter.hit("k", 3, 3, cost=2)).retry_after == 1.6
    clock.advance(0.6)
    assert await limiter.hit("k", 3, 3) == Decision(allowed=True, current=3)
    assert (await limiter.peek("k", 3, 3)).retry_after == 1.0


async def test_memory_forgets_idle_keys() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock_us=clock)
    for i in range(5000):
        await limiter.hit(f"ip:{i}", 10, 1)
        await limiter.acquire(f"conn:{i}", 2, "h", 1)
    await limiter.hit("long", 1, 3600)
    assert limiter.tracked_keys == 10_001
    clock.advance(2)
    for _ in range(200):  # each call sweeps a few due keys: 10 000 / 64 calls drain them all
        await limiter.peek("long", 1, 3600)
    assert limiter.tracked_keys == 1
    assert not (await limiter.hit("long", 1, 3600)).allowed  # live state survived the sweeps


async def test_memory_sweep_keeps_live_and_drops_released() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock_us=clock)
    await limiter.acquire("held", 1, "h", 10)
    await limiter.acquire("released", 1, "h", 1)
    await limiter.release("released", "h")
    await limiter.hit("busy", 2, 1)
    clock.advance(1)
    limiter.sweep()
    assert limiter.tracked_keys == 1
    assert not (await limiter.acquire("held", 1, "other", 10)).allowed
    clock.advance(9)
    limiter.sweep()
    assert limiter.tracked_keys == 0


# -- GCRA arithmetic (pure) ---------------------------------------------------------------------------


events = st.lists(st.tuples(st.integers(0, 3_000_000), st.integers(1, 4)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(1, 12), period_ms=st.integers(1, 5000), steps=events)
def test_gcra_admits_at_most_count_plus_refill_in_any_span(
        count: int, period_ms: int, steps: list[tuple[int, int]]) -> None:
    rate = make_rate(count, period_ms / 1000)
    tat: int | None = None
    now = 10**15
    admitted: list[tuple[int, int]] = []
    for gap, cost in steps:
        now += gap
        outcome = decide(tat, now, rate, cost, record=True)
        if outcome.allowed:
            tat = outcome.tat_us
            admitted.append((now, cost))
        else:
            assert_retry_after_exact(tat, now, rate, cost, outcome)
    for i, (start, _) in enumerate(admitted):
        units = 0
        for at, cost in admitted[i:]:
            units += cost
            assert units <= count + (at - start) // rate.interval_us


def assert_retry_after_exact(tat: int | None, now: int, rate: Rate, cost: int, outcome: Outcome) -> None:
    if outcome.retry_after_us < 0:
        assert cost > rate.count
        return
    assert outcome.retry_after_us > 0
    assert decide(tat, now + outcome.retry_after_us, rate, cost, record=False).allowed
    assert not decide(tat, now + outcome.retry_after_us - 1, rate, cost, record=False).allowed


@given(count=st.integers(1, 50), period_ms=st.integers(50, 100_000))
def test_gcra_idle_key_takes_exactly_a_burst_of_count(count: int, period_ms: int) -> None:
    rate = make_rate(count, period_ms / 1000)
    tat: int | None = None
    now = 10**15
    for _ in range(count):
        outcome = decide(tat, now, rate, 1, record=True)
        assert outcome.allowed
        tat = outcome.tat_us
    assert not decide(tat, now, rate, 1, record=True).allowed


# -- limit_key ---------------------------------------------------------------------------------------


def test_limit_key_normalises_case_and_addresses() -> None:
    assert limit_key("Auth_Fail", "Bob@Example.COM") == "auth_fail:bob@example.com"
    assert limit_key("conn", "2001:DB8:0::1") == "conn:2001%3Adb8%3A%3A1"
    assert limit_key("conn", "::ffff:192.0.2.1") == limit_key("conn", "192.0.2.1") == "conn:192.0.2.1"
    assert limit_key("u", "Cafe\u0301") == limit_key("u", "caf\u00e9")  # NFC


def test_limit_key_escapes_separators() -> None:
    assert limit_key("a:b") != limit_key("a", "b")
    assert limit_key("a:b") == "a%3Ab"
    assert limit_key("50%", "#x", "sp ace\r\n") == "50%25:%23x:sp%20ace%0D%0A"
    assert limit_key("bad\udcff") == "bad%DCFF"  # a lone surrogate cannot go to Redis as UTF-8
    with pytest.raises(ValueError):
        limit_key()


def test_limit_key_hashes_long_parts() -> None:
    long_part = "x" * 201
    key = limit_key("user", long_part)
    assert key.startswith("user:#") and len(key) == len("user:#") + 64
    assert key == limit_key("user", long_part.upper())  # hashed after normalising
    assert key != limit_key("user", "x" * 202)
    assert limit_key("user", "x" * 200) == "user:" + "x" * 200
    assert len(limit_key("u", "é" * 101)) == len("u:#") + 64  # 202 bytes in UTF-8

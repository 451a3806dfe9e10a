"""The per-destination throttle: the rate syntax and the adaptive schedule (pure, fake clock), the
limiter's shared values on both backends, the plugin on a real Redis shared by two "relay nodes", the
scheduler's after-attempt hook, and end to end through real relays delivering to real SMTP sinks.

Nothing asserts on speed. Bounds on what got through are the limiter's exact guarantee (a burst of
``count``, then one per interval, over the span the test measured), so a slow machine only makes them
easier to meet; tests that need time to pass wait for it and assert on the answer afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay.plugins.throttle import (
    CONN_PREFIX,
    SLOW_PREFIX,
    ThrottleConfig,
    ThrottlePlugin,
    read_status,
)
from relay.policies.bounce import BounceClassifier, Classification
from relay.policies.retry import RetryPolicy, RetrySchedule
from relay.policies.routing import Router
from relay.policies.shaping import (
    AdaptivePolicy,
    DestinationLimits,
    LimitsTable,
    Rate,
    SlowDown,
    cooldown_left,
    factor_at,
    on_signal,
    parse_rate,
    recovered_at,
)
from structlog.testing import capture_logs

from relay.chain import Chain
from relay.delivery.chainhook import ChainHook
from relay.delivery.config import DeliverySettings, TimeoutSettings
from relay.delivery.mx import MxResolver
from relay.delivery.scheduler import DeliveryService
from relay.limits import FailPolicyLimiter, MemoryLimiter, RedisLimiter, make_limiter
from relay.limits.base import LimiterUnavailable, RateLimiter, ValueStore
from relay.plugin import (
    CONTINUE,
    Action,
    AttemptContext,
    AttemptFinished,
    DeliveryEvent,
    Plugin,
    PluginConfig,
    PluginHost,
    Stage,
    Verdict,
)
from relay.settings import ConfigError, RedisSettings, StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import NewMessage, NewRecipient, QueueStore, RecipientRow, RecipientState, StoredMessage
from relay.throttlecli import MEMORY_BACKEND, format_duration, render_table
from tests.support.dnsserver import DnsTestServer
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

ROOT = Path(__file__).resolve().parent.parent
SENDER = "alice@sender.test"
BODY = b"From: alice@sender.test\r\nSubject: throttle\r\n\r\nhello\r\n"
RATE_SIGNAL = Classification("temporary", "rate_limited", "4.7.0", rate_signal=True,
                             rule="smtp_service_not_available")
GREYLISTED = Classification("temporary", "greylisted", "4.7.1", rate_signal=False, rule="greylisting")


# -- helpers ---------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_ids = itertools.count(1)


def stored_message(queue_id: str = "msg1") -> StoredMessage:
    return StoredMessage(id=queue_id, sender=SENDER, size=len(BODY), received_at=time.time(), client_ip="127.0.0.1",
                         client_helo="client.test", auth_user=None, listener="relay", envid=None, ret=None,
                         smtputf8=False)


def recipient(address: str) -> RecipientRow:
    return RecipientRow(id=next(_ids), message_id="msg1", address=address, domain=address.rpartition("@")[2],
                        state=RecipientState.QUEUED, attempts=0, next_attempt_at=0.0, last_reply=None,
                        notify=None, orcpt=None, updated_at=0.0)


def attempt(destination: str, *addresses: str) -> AttemptContext:
    return AttemptContext(message=stored_message(), recipients=[recipient(a) for a in addresses],
                          destination=destination, route_kind="mx", data=BODY)


def deferral(destination: str, address: str, classification: Classification = RATE_SIGNAL) -> DeliveryEvent:
    return DeliveryEvent(stored_message(), recipient(address), destination, classification=classification,
                         next_attempt_at=time.time() + 60)


def make_throttle(limiter: RateLimiter, clock: Callable[[], float] = time.time, **config: Any) -> ThrottlePlugin:
    return ThrottlePlugin(ThrottleConfig.model_validate(config), PluginHost("node.test", None, limiter), clock=clock)


async def finish(plugin: ThrottlePlugin, ctx: AttemptContext, attempted: bool = True) -> None:
    await plugin.after_attempt(AttemptFinished(ctx, attempted))


def changes(logs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["destination"], e["old_rate"], e["new_rate"]) for e in logs if e["event"] == "throttle_rate_changed"]


async def wait_until(predicate: Callable[[], Any], limit: float = 60.0) -> None:
    """Poll a (sync or async) condition until it holds; TimeoutError after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def nodes(redis_url: str, key_prefix: str) -> AsyncIterator[Callable[[], RateLimiter]]:
    """Limiters as relay nodes build them (make_limiter over the suite's Redis), one per call.

    Fail-closed with a generous timeout: the budget properties tested here hold while Redis answers;
    with the default fail-open a slow answer on a loaded machine would admit by design (tested
    separately) and make these tests measure the machine instead of the throttle."""
    made: list[RateLimiter] = []

    def make() -> RateLimiter:
        limiter = make_limiter(RedisSettings(url=redis_url, key_prefix=key_prefix, fail_open=False, timeout=5.0))
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


# -- the rate syntax (pure) ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "count", "period"), [
    ("100/min", 100, 60), ("10000/day", 10000, 86400), ("5/s", 5, 1), ("3000/h", 3000, 3600),
    ("50/10min", 50, 600), (" 7 / 2 hours ", 7, 7200), ("1/SEC", 1, 1), ("20/m", 20, 60), ("2/3d", 2, 259200),
])
def test_rates_parse_into_count_and_period(text: str, count: int, period: int) -> None:
    assert parse_rate(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["unlimited", " Unlimited "])
def test_unlimited_is_no_rate(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize(("text", "message"), [
    ("fast", "rate 'fast': expected COUNT/PERIOD such as '100/min', '10000/day', '5/s' or '50/10min'"),
    ("100", "expected COUNT/PERIOD"),
    ("1.5/min", "expected COUNT/PERIOD"),
    ("-1/min", "expected COUNT/PERIOD"),
    ("0/min", "rate '0/min': the count must be at least 1 (write 'unlimited' for no limit)"),
    ("10/fortnight", "rate '10/fortnight': unknown unit 'fortnight' (use s, min, h or day)"),
    ("10/0min", "rate '10/0min': the period must be at least 1 min"),
    ("2000001/s", "faster than 1000000 per second"),
    ("", "expected COUNT/PERIOD"),
])
def test_bad_rates_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    assert message in str(caught.value)


def test_rates_print_canonically_and_scale_down_to_at_least_one() -> None:
    assert [str(parse_rate(t)) for t in ("3000/hour", "100/60s", "5/2s", "10/90s", "1/86400s", "7/120min")] == [
        "3000/h", "100/min", "5/2s", "10/90s", "1/day", "7/2h"]
    rate = Rate(600, 60)
    assert rate.scaled(0.5) == Rate(300, 60) and rate.scaled(1.0) is rate
    assert Rate(10, 60).scaled(0.3) == Rate(3, 60)  # not 2: 0.3 × 10 is 3 despite binary fractions
    assert Rate(10, 60).scaled(0.01) == Rate(1, 60)  # a cut never stops a destination
    assert Rate(10, 60).interval == 6.0 and Rate(5, 1).per_second == 5.0


def test_limits_match_the_exact_domain_then_parent_wildcards_then_the_default() -> None:
    default = DestinationLimits(10, Rate(600, 60))
    gmail = DestinationLimits(20, Rate(3000, 3600))
    corp = DestinationLimits(2, None)
    idn = DestinationLimits(1, Rate(1, 1))
    table = LimitsTable(default, {"Gmail.COM": gmail, ".corp.example": corp, "bücher.example": idn})
    assert table.match("gmail.com.") == ("gmail.com", gmail)
    assert table.match("mail.gmail.com") == (None, default)
    assert table.match("a.b.corp.example") == (".corp.example", corp)
    assert table.match("corp.example") == (None, default)
    assert table.match("XN--BCHER-KVA.example") == ("xn--bcher-kva.example", idn)
    assert table.match("[192.0.2.1]") == (None, default)
    with pytest.raises(ValueError, match="duplicates another key"):
        LimitsTable(default, {"gmail.com": gmail, "GMAIL.com.": gmail})
    with pytest.raises(ValueError, match=r"key 'bad\.\.name'"):
        LimitsTable(default, {"bad..name": gmail})


# -- the adaptive schedule (pure, fake clock) ------------------------------------------------------------

POLICY = AdaptivePolicy(cut_factor=0.5, cooldown=3600, recovery_step=0.25, recovery_interval=900, min_factor=0.05,
                        cut_hold=120)


def test_a_signal_cuts_the_rate_for_the_cooldown_then_it_recovers_in_steps() -> None:
    t0 = 1000.0
    state = on_signal(POLICY, None, t0, "421")
    assert state == SlowDown(0.5, t0, t0, "421")
    assert factor_at(POLICY, None, t0) == 1.0
    assert [factor_at(POLICY, state, t0 + dt) for dt in (0, 1800, 3599.9, 3600, 4499.9, 4500, 5400, 9999)] == [
        0.5, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]
    assert cooldown_left(POLICY, state, t0 + 600) == 3000 and cooldown_left(POLICY, state, t0 + 4000) == 0
    assert recovered_at(POLICY, state) == t0 + 4500


def test_signals_within_the_hold_restart_the_cooldown_and_later_ones_cut_again() -> None:
    t0 = 1000.0
    first = on_signal(POLICY, None, t0, "first")
    again = on_signal(POLICY, first, t0 + 100, "again")
    assert again == SlowDown(0.5, t0, t0 + 100, "first")  # no second cut, a fresh cool-down
    assert factor_at(POLICY, again, t0 + 3600) == 0.5 and factor_at(POLICY, again, t0 + 3700) == 0.75
    second = on_signal(POLICY, again, t0 + 200, "second")
    assert second == SlowDown(0.25, t0 + 200, t0 + 200, "second")
    # During the recovery a signal cuts from where the rate is then.
    recovering = t0 + 200 + 3600 + 900  # 0.25 + 2 steps
    assert factor_at(POLICY, second, recovering) == 0.75
    assert on_signal(POLICY, second, recovering, "third").factor == 0.375


def test_cuts_stop_at_the_floor_and_recovery_takes_the_steps_it_needs() -> None:
    state: SlowDown | None = None
    now = 0.0
    for _ in range(10):
        state = on_signal(POLICY, state, now, "x")
        now += POLICY.cut_hold
    assert state is not None and state.factor == 0.05
    back = state.signal_at + POLICY.cooldown
    assert [factor_at(POLICY, state, back + n * 900) for n in range(4)] == pytest.approx([0.30, 0.55, 0.80, 1.0])
    assert recovered_at(POLICY, state) == back + 3 * 900


@given(st.lists(st.floats(min_value=0, max_value=20_000, allow_nan=False), min_size=1, max_size=20),
       st.floats(min_value=0, max_value=30_000, allow_nan=False))
def test_the_factor_stays_within_its_bounds_and_only_grows_between_signals(signals: list[float],
                                                                         probe: float) -> None:
    state: SlowDown | None = None
    for at in sorted(signals):
        state = on_signal(POLICY, state, at, "x")
        assert POLICY.min_factor <= state.factor <= 1.0
    last = max(signals)
    assert state is not None
    earlier, later = last + probe / 2, last + probe
    assert POLICY.min_factor <= factor_at(POLICY, state, earlier) <= factor_at(POLICY, state, later) <= 1.0
    assert factor_at(POLICY, state, recovered_at(POLICY, state)) == 1.0


def test_slow_downs_survive_storage_and_garbage_reads_as_none() -> None:
    state = SlowDown(0.25, 10.5, 20.25, "rate_limited (4.7.0)")
    assert SlowDown.from_json(state.to_json()) == state
    for garbage in (None, "", "{", "[]", '{"factor": 2, "cut_at": 1, "signal_at": 1}',
                    '{"factor": 0.5}', '{"factor": "x", "cut_at": 1, "signal_at": 1}'):
        assert SlowDown.from_json(garbage) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"cut_factor": 1.0}, "cut_factor"), ({"min_factor": 0}, "min_factor"),
    ({"recovery_step": 0}, "recovery_step"), ({"cooldown": 0}, "cooldown"),
    ({"recovery_interval": math.inf}, "recovery_interval"), ({"cut_hold": -1}, "cut_hold"),
])
def test_adaptive_policy_refuses_nonsense(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptivePolicy(**fields)


# -- configuration --------------------------------------------------------------------------------------

def test_overrides_inherit_from_the_default_and_the_default_from_the_builtin() -> None:
    config = ThrottleConfig.model_validate({"default": {"rate": "100/min"},
                                            "destinations": {"gmail.com": {"connections": 20},
                                                             "yahoo.com": {"rate": "unlimited"}}})
    table = config.limits_table()
    assert table.default == DestinationLimits(10, Rate(100, 60))
    assert table.match("gmail.com") == ("gmail.com", DestinationLimits(20, Rate(100, 60)))
    assert table.match("yahoo.com") == ("yahoo.com", DestinationLimits(10, None))
    assert ThrottleConfig().limits_table().default == DestinationLimits(10, Rate(600, 60))
    assert ThrottleConfig().adaptive_policy() == AdaptivePolicy(recovery_interval=900.0)


@pytest.mark.parametrize(("table", "message"), [
    ({"default": {"rate": "fast"}},
     "plugins.throttle.default.rate: Value error, rate 'fast': expected COUNT/PERIOD"),
    ({"destinations": {"gmail.com": {"rat": "1/s"}}}, "plugins.throttle.destinations.gmail.com.rat: unknown key"),
    ({"destinations": {"bad..name": {"rate": "1/s"}}}, "plugins.throttle.destinations: Value error, destinations: "
                                                       "key 'bad..name'"),
    ({"rollup": "ip"}, "plugins.throttle.rollup: Input should be 'mx' or 'domain'"),
    ({"default": {"connections": -1}}, "plugins.throttle.default.connections: Input should be greater than or equal"),
    ({"cut_factor": 1}, "plugins.throttle.cut_factor: Input should be less than 1"),
])
def test_configuration_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    host = PluginHost("node.test", None, MemoryLimiter())
    with pytest.raises(ConfigError) as caught:
        Chain.from_settings(["throttle"], {"throttle": table}, host)
    assert message in str(caught.value)


def test_the_example_file_documents_every_throttle_key_with_its_default() -> None:
    text = (ROOT / "relay.toml.example").read_text()
    block = text[text.index("# [plugins.throttle]\n"):].split("\n\n", 1)[0]
    settings = [line[2:] for line in block.splitlines() if re.match(r"^# [a-z_]+ = ", line)]
    parsed = tomllib.loads("\n".join(settings))
    assert set(parsed) == set(ThrottleConfig.model_fields)
    shown, defaults = ThrottleConfig.model_validate(parsed), ThrottleConfig()
    tables = ("default", "destinations")  # compared below, through the limits they resolve to
    assert all(getattr(shown, key) == getattr(defaults, key) for key in parsed if key not in tables)
    assert shown.limits_table().default == defaults.limits_table().default
    assert shown.limits_table().match("gmail.com") == ("gmail.com", DestinationLimits(20, Rate(3000, 3600)))


def test_the_chain_runs_the_throttle_before_and_after_attempts_and_on_deferrals() -> None:
    chain = Chain.from_settings(["throttle"], {}, PluginHost("node.test", None, MemoryLimiter()))
    stages = chain.effective()
    assert stages["before_attempt"] == stages["deferred"] == stages["after_attempt"] == ["throttle"]
    assert stages["delivered"] == stages["bounced"] == stages["rcpt_to"] == []
    assert ThrottlePlugin.on_error == "continue" and not ThrottlePlugin.modifies and Stage.AFTER_ATTEMPT.value in (
        s.value for s in ThrottlePlugin.hooks())


# -- the limiter's shared values, both backends --------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
async def values(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[RateLimiter]:
    backend: RateLimiter
    if request.param == "memory":
        backend = MemoryLimiter()
    else:
        backend = RedisLimiter(RedisSettings(url=request.getfixturevalue("redis_url"), key_prefix=key_prefix))
    try:
        yield backend
    finally:
        await backend.close()


async def test_values_set_get_and_expire(values: RateLimiter) -> None:
    assert isinstance(values, ValueStore)
    assert await values.get_value("k") is None
    await values.set_value("k", "one", 60)
    await values.set_value("short", "gone soon", 0.2)
    assert await values.get_value("k") == "one" and await values.get_value("short") == "gone soon"
    await values.set_value("k", "two ünïcode", 60)
    assert await values.get_value("k") == "two ünïcode"
    await asyncio.sleep(0.3)
    assert await values.get_value("short") is None
    assert await values.scan_values("short") == {}


async def test_values_compare_and_set(values: RateLimiter) -> None:
    assert isinstance(values, ValueStore)
    assert await values.replace_value("c", None, "v1", 60)
    assert not await values.replace_value("c", None, "v2", 60)      # present: "absent" no longer holds
    assert not await values.replace_value("c", "v0", "v2", 60)      # someone else's version
    assert await values.replace_value("c", "v1", "v2", 60)
    assert await values.get_value("c") == "v2"
    assert await values.replace_value("c", "v2", "", 60)            # an empty value is a value
    assert not await values.replace_value("c", None, "v3", 60)
    assert await values.get_value("c") == ""


async def test_values_scan_by_literal_prefix(values: RateLimiter) -> None:
    assert isinstance(values, ValueStore)
    for key in ("a*b:1", "a*b:2", "aXb:3", "a*c:4"):
        await values.set_value(key, key.upper(), 60)
    assert await values.scan_values("a*b:") == {"a*b:1": "A*B:1", "a*b:2": "A*B:2"}
    assert len(await values.scan_values("a", limit=2)) == 2


async def test_values_count_live_slots(values: RateLimiter) -> None:
    assert isinstance(values, ValueStore)
    assert await values.slots_held("s") == 0
    for holder in ("h1", "h2"):
        assert (await values.acquire("s", 5, holder, 60)).allowed
    assert (await values.acquire("s", 5, "h3", 0.2)).allowed
    assert await values.slots_held("s") == 3
    await values.release("s", "h1")
    await asyncio.sleep(0.3)
    assert await values.slots_held("s") == 1


async def test_values_refuse_what_they_cannot_keep(values: RateLimiter) -> None:
    assert isinstance(values, ValueStore)
    with pytest.raises(ValueError, match="longer than"):
        await values.set_value("big", "x" * 70_000, 60)
    with pytest.raises(ValueError, match="ttl"):
        await values.set_value("k", "v", 0)
    with pytest.raises(ValueError, match="UTF-8"):
        await values.replace_value("k", None, "\udcff", 60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_values_through_the_fail_policy_raise_on_an_outage_in_both_modes() -> None:
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    for fail_open in (True, False):
        limiter = FailPolicyLimiter(RedisLimiter(settings), fail_open=fail_open)
        try:
            assert isinstance(limiter, ValueStore)
            with pytest.raises(LimiterUnavailable):
                await limiter.get_value("k")
            with pytest.raises(LimiterUnavailable):
                await limiter.replace_value("k", None, "v", 1)
        finally:
            await limiter.close()
    wrapped = FailPolicyLimiter(MemoryLimiter(), fail_open=True)
    await wrapped.set_value("k", "v", 60)
    assert await wrapped.get_value("k") == "v" and await wrapped.scan_values("") == {"k": "v"}


# -- the plugin on a shared Redis ------------------------------------------------------------------------

GMAIL = "mx:5:gmail-smtp-in.l.google.test,10:alt1.gmail-smtp-in.l.google.test"


async def test_two_nodes_together_never_exceed_a_destination_rate(nodes: Callable[[], RateLimiter]) -> None:
    """Hammered concurrently, two nodes admit the burst and nothing more: the margin is zero beyond the
    limiter's own guarantee (count + elapsed / interval)."""
    config = {"default": {"connections": 0, "rate": "40/h"}}
    a, b = make_throttle(nodes(), **config), make_throttle(nodes(), **config)
    started = time.monotonic()

    async def one(plugin: ThrottlePlugin, n: int) -> Verdict:
        ctx = attempt(GMAIL, f"u{n}@gmail.test")
        verdict = await plugin.before_attempt(ctx)
        await finish(plugin, ctx, verdict.action is Action.CONTINUE)
        return verdict

    verdicts = await asyncio.gather(*(one(a if n % 2 else b, n) for n in range(200)))
    elapsed = time.monotonic() - started
    admitted = sum(v.action is Action.CONTINUE for v in verdicts)
    assert 40 <= admitted <= 40 + math.floor(elapsed / 90)
    deferred = [v for v in verdicts if v.action is not Action.CONTINUE]
    assert all(v.action is Action.REJECT_TEMPORARY and v.code == 451 and v.enhanced == "4.4.5"
               and v.retry_at is not None for v in deferred)


async def test_two_nodes_together_never_hold_more_connections_than_allowed(
        nodes: Callable[[], RateLimiter]) -> None:
    config = {"default": {"connections": 3, "rate": "unlimited"}}
    a, b = make_throttle(nodes(), **config), make_throttle(nodes(), **config)
    in_use = peak = admitted = 0

    async def worker(plugin: ThrottlePlugin, n: int) -> None:
        nonlocal in_use, peak, admitted
        for round_ in range(5):
            ctx = attempt(GMAIL, f"u{n}.{round_}@gmail.test")
            verdict = await plugin.before_attempt(ctx)
            if verdict.action is Action.CONTINUE:
                admitted += 1
                in_use += 1
                peak = max(peak, in_use)
                await asyncio.sleep(0.005)  # the "connection" is open across an await
                in_use -= 1
            else:
                assert "of 3 connections in use" in verdict.reason
            await finish(plugin, ctx, verdict.action is Action.CONTINUE)

    await asyncio.gather(*(worker(a if n % 2 else b, n) for n in range(30)))
    assert peak <= 3 and admitted >= 3
    limiter = a.host.limiter
    assert isinstance(limiter, ValueStore) and await limiter.slots_held(CONN_PREFIX + GMAIL) == 0


async def test_a_dead_nodes_connections_come_back_after_the_lease_ttl(nodes: Callable[[], RateLimiter]) -> None:
    config = {"default": {"connections": 2, "rate": "unlimited"}, "lease_ttl": 1.0, "busy_retry": 4.0}
    dead = make_throttle(nodes(), **config)  # never started: its renewal loop died with it
    for n in range(2):
        assert (await dead.before_attempt(attempt(GMAIL, f"d{n}@gmail.test"))).action is Action.CONTINUE
    live = make_throttle(nodes(), **config)
    await live.start()
    try:
        before = time.time()
        ctx = attempt(GMAIL, "x@gmail.test")
        busy = await live.before_attempt(ctx)
        await finish(live, ctx, False)
        assert busy.action is Action.REJECT_TEMPORARY and "2 of 2 connections in use" in busy.reason
        assert busy.retry_at is not None and before + 4.0 <= busy.retry_at <= time.time() + 6.0

        async def admitted() -> bool:
            ctx = attempt(GMAIL, "x@gmail.test")
            verdict = await live.before_attempt(ctx)
            await finish(live, ctx, verdict.action is Action.CONTINUE)
            return verdict.action is Action.CONTINUE

        await wait_until(admitted, limit=15)
    finally:
        await live.stop()


async def test_a_live_node_keeps_its_connections_past_the_ttl(nodes: Callable[[], RateLimiter]) -> None:
    config = {"default": {"connections": 1, "rate": "unlimited"}, "lease_ttl": 1.5}
    holder, other = make_throttle(nodes(), **config), make_throttle(nodes(), **config)
    await holder.start()
    try:
        long_attempt = attempt(GMAIL, "long@gmail.test")
        assert (await holder.before_attempt(long_attempt)).action is Action.CONTINUE
        await asyncio.sleep(3.5)  # more than two lease TTLs: only renewal keeps the slot
        assert (await other.before_attempt(attempt(GMAIL, "o@gmail.test"))).action is Action.REJECT_TEMPORARY
        await finish(holder, long_attempt)
        assert (await other.before_attempt(attempt(GMAIL, "o@gmail.test"))).action is Action.CONTINUE
    finally:
        await holder.stop()


async def test_over_budget_is_deferred_with_retry_at_and_spaced(nodes: Callable[[], RateLimiter]) -> None:
    plugin = make_throttle(nodes(), default={"connections": 5, "rate": "2/min"})
    for n in range(2):
        assert (await plugin.before_attempt(attempt(GMAIL, f"u{n}@gmail.test"))).action is Action.CONTINUE
    now = time.time()
    ctx = attempt(GMAIL, "third@gmail.test")
    third = await plugin.before_attempt(ctx)
    assert third.action is Action.REJECT_TEMPORARY and third.reply() == "451 4.4.5 Destination rate limit, will retry"
    assert third.retry_at is not None and now + 25 <= third.retry_at <= now + 30 + 5.5
    assert "rate 2/min reached" in third.reason
    assert ctx.notes["throttle"] == []  # its connection slot was given back at once
    fourth = await plugin.before_attempt(attempt(GMAIL, "fourth@gmail.test"))
    assert fourth.retry_at is not None and fourth.retry_at >= third.retry_at + 30  # one interval later
    limiter = plugin.host.limiter
    assert isinstance(limiter, ValueStore) and await limiter.slots_held(CONN_PREFIX + GMAIL) == 2


async def test_domains_of_one_mx_set_share_a_budget_with_the_configured_limits(
        nodes: Callable[[], RateLimiter]) -> None:
    plugin = make_throttle(nodes(), default={"rate": "100/min"}, destinations={"gmail.test": {"rate": "2/h"}})
    assert (await plugin.before_attempt(attempt(GMAIL, "a@googlemail.test", "b@gmail.test"))).action is Action.CONTINUE
    assert (await plugin.before_attempt(attempt(GMAIL, "c@googlemail.test"))).action is Action.CONTINUE
    # The MX set took gmail.test's limits when it first saw that domain: googlemail.test shares them.
    assert (await plugin.before_attempt(attempt(GMAIL, "d@googlemail.test"))).action is Action.REJECT_TEMPORARY
    per_domain = make_throttle(nodes(), rollup="domain", default={"rate": "1/h"})
    assert (await per_domain.before_attempt(attempt(GMAIL, "a@one.test"))).action is Action.CONTINUE
    assert (await per_domain.before_attempt(attempt(GMAIL, "a@two.test"))).action is Action.CONTINUE
    both = await per_domain.before_attempt(attempt(GMAIL, "b@one.test", "b@three.test"))
    assert both.action is Action.REJECT_TEMPORARY and "domain:one.test" in both.reason


async def test_a_rate_signal_slows_every_node_down_and_the_rate_recovers(nodes: Callable[[], RateLimiter]) -> None:
    clock = FakeClock()
    config = {"default": {"connections": 0, "rate": "4/min"}, "state_refresh": 5.0}
    a, b = make_throttle(nodes(), clock, **config), make_throttle(nodes(), clock, **config)
    dest = "mx:10:mx.slow.test"
    with capture_logs() as logs:
        await a.deferred(deferral(dest, "x@slow.test", GREYLISTED))  # greylisting is no reason to slow down
        assert changes(logs) == []
        await a.deferred(deferral(dest, "x@slow.test"))
        await a.deferred(deferral(dest, "y@slow.test"))  # the same reply for a second recipient counts once
        assert changes(logs) == [(dest, "4/min", "2/min")]
        [cut] = [e for e in logs if e["event"] == "throttle_rate_changed"]
        assert cut["log_level"] == "warning" and cut["factor"] == 0.5 and cut["cooldown_left"] == 3600
        assert cut["reason"] == "slow-down signal: rate_limited (4.7.0, rule smtp_service_not_available)"
        # Node b reads the shared state on its first attempt and enforces the cut rate: a burst of 2, not 4.
        verdicts = [await b.before_attempt(attempt(dest, f"u{n}@slow.test")) for n in range(3)]
        assert [v.action for v in verdicts] == [Action.CONTINUE, Action.CONTINUE, Action.REJECT_TEMPORARY]
        assert changes(logs)[1:] == [(dest, "4/min", "2/min")]
        values = a.host.limiter
        assert isinstance(values, ValueStore)
        [row] = await read_status(values, ThrottleConfig.model_validate(config), clock())
        assert (row.destination, row.configured_rate, row.effective_rate, row.cooldown_left, row.seen) == (
            dest, "4/min", "2/min", 3600, True)
        clock.advance(3600)
        await b.before_attempt(attempt(dest, "later@slow.test"))
        clock.advance(900)
        await b.before_attempt(attempt(dest, "later@slow.test"))
        assert changes(logs)[2:] == [(dest, "2/min", "3/min"), (dest, "3/min", "4/min")]
        assert [e["reason"] for e in logs if e["event"] == "throttle_rate_changed"][2:] == [
            "recovering after the cool-down", "recovered"]
    [row] = await read_status(values, ThrottleConfig.model_validate(config), clock())
    assert (row.effective_rate, row.factor, row.cooldown_left) == ("4/min", 1.0, 0)


async def test_a_cut_needs_the_hold_between_cuts_and_an_unlimited_rate_has_nothing_to_cut(
        nodes: Callable[[], RateLimiter]) -> None:
    clock = FakeClock()
    plugin = make_throttle(nodes(), clock, default={"rate": "100/min"}, cut_hold=120,
                           destinations={"free.test": {"rate": "unlimited"}})
    with capture_logs() as logs:
        for _ in range(3):
            await plugin.deferred(deferral("mx:10:mx.a.test", "x@a.test"))
            clock.advance(60)
        await plugin.deferred(deferral("mx:10:mx.free.test", "x@free.test"))
    # t=0 cuts; t=60 restarts the cool-down; t=120 is past the hold and cuts again.
    assert changes(logs) == [("mx:10:mx.a.test", "100/min", "50/min"), ("mx:10:mx.a.test", "50/min", "25/min")]
    values = plugin.host.limiter
    assert isinstance(values, ValueStore)
    assert await values.get_value(SLOW_PREFIX + "mx:10:mx.free.test") is None


async def test_with_the_memory_backend_the_throttle_works_on_its_own() -> None:
    clock = FakeClock()
    plugin = make_throttle(MemoryLimiter(), clock, default={"connections": 1, "rate": "2/min"})
    first = attempt("host:smarthost.test", "a@x.test")
    assert (await plugin.before_attempt(first)).action is Action.CONTINUE
    assert (await plugin.before_attempt(attempt("host:smarthost.test", "b@x.test"))).action is Action.REJECT_TEMPORARY
    await finish(plugin, first)
    await plugin.deferred(deferral("host:smarthost.test", "a@x.test"))
    # 2/min cut to 1/min: the second message of the burst is refused even though a slot is free.
    ctx = attempt("host:smarthost.test", "c@x.test")
    assert (await plugin.before_attempt(ctx)).action is Action.REJECT_TEMPORARY
    await finish(plugin, ctx, False)


# -- the scheduler's after-attempt hook, with the throttle in a real chain -----------------------------

class Refuser(Plugin[PluginConfig]):
    """After the throttle: defers one domain, crashes for another."""

    name: ClassVar[str] = "refuser"

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        domain = ctx.recipients[0].domain
        if domain == "later.test":
            return Verdict.tempfail("later", retry_at=time.time() + 3600)
        if domain == "crash.test":
            raise RuntimeError("plugin bug")
        return CONTINUE


class AttemptRecorder(Plugin[PluginConfig]):
    name: ClassVar[str] = "recorder"
    seen: ClassVar[list[tuple[str, bool]]] = []

    async def after_attempt(self, event: AttemptFinished) -> None:
        AttemptRecorder.seen.append((event.attempt.recipients[0].domain, event.attempted))


async def enqueue(store: QueueStore, *rcpts: str) -> NewMessage:
    n = next(_ids)
    message = NewMessage(id=f"thr{n:06d}{os.getpid() % 1000:03d}", sender=SENDER,
                         recipients=[NewRecipient(r) for r in rcpts], data=BODY, received_at=time.time())
    await store.enqueue(message)
    return message


def delivery_service(store: QueueStore, chain: Chain, routes: dict[str, dict[str, Any]]) -> DeliveryService:
    settings = DeliverySettings(idle_timeout=0.5, lease_seconds=120,
                                timeouts=TimeoutSettings(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5,
                                                         data_init=5, data_block=5, data_end=5))
    return DeliveryService(store, settings, resolver=MxResolver(["127.0.0.1"], timeout=1.0, allow_private=True),
                           classifier=BounceClassifier.default(),
                           retry_policy=RetryPolicy(RetrySchedule.parse("1s*"), 3600, None),
                           router=Router.from_config(routes), chain=ChainHook(chain), hostname="relay.test")


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    store = await open_store(StoreSettings(url=f"sqlite:///{tmp_path / 'queue.db'}"))
    try:
        yield store
    finally:
        await store.close()


async def test_over_budget_recipients_are_deferred_without_counting_an_attempt(sqlite_store: QueueStore) -> None:
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        route = {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}
        limiter = MemoryLimiter()
        chain = Chain.from_settings(["throttle"], {"throttle": {"default": {"rate": "1/h"}}},
                                    PluginHost("node.test", None, limiter))
        service = delivery_service(sqlite_store, chain, {"dest.test": route})
        messages = [await enqueue(sqlite_store, f"u{n}@dest.test") for n in range(3)]
        started = time.time()
        try:
            await service.run_once()
        finally:
            await service.stop(0)
        assert len(sink.received) == 1
        rows = [row for m in messages for row in await sqlite_store.recipients_of(m.id)]
        waiting = [row for row in rows if row.state is RecipientState.QUEUED]
        assert len(waiting) == 2
        for row in waiting:
            assert row.attempts == 0 and await sqlite_store.attempts_of(row.id) == []
            assert row.next_attempt_at >= started + 3000  # one message an hour: the next slot is far off
            assert row.last_reply is not None and "451 4.4.5" in row.last_reply
        assert await limiter.slots_held(CONN_PREFIX + f"host:127.0.0.1:{sink.port}") == 0


async def test_slots_are_given_back_whatever_becomes_of_the_attempt(sqlite_store: QueueStore) -> None:
    AttemptRecorder.seen = []
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        sink.set_rule("busy.test", "421 4.7.0 slow down")
        route = {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}
        limiter = MemoryLimiter()
        host = PluginHost("node.test", None, limiter)
        chain = Chain.from_settings(["throttle", "tests.test_throttle:Refuser", "tests.test_throttle:AttemptRecorder"],
                                    {"throttle": {"rollup": "domain", "default": {"connections": 1}}}, host)
        domains = ("ok.test", "later.test", "crash.test", "busy.test")
        service = delivery_service(sqlite_store, chain, {d: route for d in domains})
        for domain in domains:
            await enqueue(sqlite_store, f"u@{domain}")
        try:
            await service.run_once()
        finally:
            await service.stop(0)
        assert [m.rcpt_tos for m in sink.received] == [["u@ok.test"]]
    assert sorted(set(AttemptRecorder.seen)) == [("busy.test", True), ("crash.test", False), ("later.test", False),
                                           ("ok.test", True)]
    for domain in domains:
        assert await limiter.slots_held(CONN_PREFIX + f"domain:{domain}") == 0
    [throttle] = [p for p in chain.plugins if isinstance(p, ThrottlePlugin)]
    assert throttle._held == {}
    counts = await sqlite_store.count_by_state()
    assert counts.get("delivered") == 1 and counts.get("queued") == 3


# -- end to end through real relays ----------------------------------------------------------------------

def relay_config(dns: DnsTestServer, routes: dict[str, Any], throttle: dict[str, Any],
                 redis: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"role": "all"},
        "redis": redis,
        "chain": {"plugins": ["throttle"]},
        "plugins": {"throttle": throttle},
        "delivery": {"routes": {"domains": routes}, "idle_timeout": 0.5,
                     "dns": {"nameservers": [dns.nameserver], "allow_private": True, "timeout": 2},
                     "retry": {"schedule": "1s*"}},
    }


def mx_to(dns: DnsTestServer, domain: str, sink: SinkServer) -> dict[str, Any]:
    dns.add(domain, "MX", f"10 mx.{domain}.")
    dns.add(f"mx.{domain}", "A", "127.0.0.1")
    return {"kind": "mx", "port": sink.port}


async def submit(port: int, *rcpts: str) -> list[str]:
    """One message per recipient over one SMTP session; the queue ids."""
    client = await RawClient.connect(port)
    assert (await client.greeting()).code == 220
    await client.ehlo()
    ids = []
    for rcpt in rcpts:
        reply = await client.mail(SENDER, [rcpt], BODY)
        assert reply.code == 250, reply
        ids.append(reply.text.rsplit(" ", 1)[1])
    await client.close()
    return ids


async def fine_rows_delivered(rows: Callable[[], Awaitable[list[RecipientRow]]]) -> bool:
    return all(row.state is RecipientState.DELIVERED for row in await rows())


def write_config(path: Path, redis: dict[str, Any], throttle: dict[str, Any]) -> Path:
    def toml_value(value: Any) -> str:
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        return json.dumps(value)

    lines = ["[redis]", *(f"{k} = {toml_value(v)}" for k, v in redis.items()),
             "[chain]", 'plugins = ["throttle"]', "[plugins.throttle]",
             *(f"{k} = {toml_value(v)}" for k, v in throttle.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "relay.cli", *args,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                   cwd=ROOT)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_421_slows_its_destination_down_and_other_mail_keeps_flowing(
        relays: RelayFactory, redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    redis = {"url": redis_url, "key_prefix": key_prefix}
    throttle = {"default": {"connections": 5, "rate": "600/min"}, "state_refresh": 0}
    async with DnsTestServer() as dns, SinkServer(SinkConfig(starttls="off")) as slow, \
            SinkServer(SinkConfig(starttls="off")) as healthy:
        slow.set_rule("slow.test", "421 4.7.0 slow down")
        routes = {"slow.test": mx_to(dns, "slow.test", slow), "fine.test": mx_to(dns, "fine.test", healthy)}
        with capture_logs() as logs:
            running = await relays.start(**relay_config(dns, routes, throttle, redis))
            await submit(running.ports["relay"], "stuck@slow.test")
            await wait_until(lambda: changes(logs))
            ids = await submit(running.ports["relay"], *(f"u{n}@fine.test" for n in range(5)))
            received = await healthy.wait_for_messages(5, timeout=30)
        slow_dest, fine_dest = f"mx:10:mx.slow.test:{slow.port}", f"mx:10:mx.fine.test:{healthy.port}"
        assert changes(logs)[0] == (slow_dest, "600/min", "300/min")
        assert all(change[0] == slow_dest for change in changes(logs))  # only the slow destination changed
        assert sorted(r for m in received for r in m.rcpt_tos) == [f"u{n}@fine.test" for n in range(5)]

        async def fine_rows() -> list[RecipientRow]:
            return [row for queue_id in ids for row in await running.store.recipients_of(queue_id)]

        # The sink has them; the relay records each result just after (grouped commits).
        await wait_until(lambda: fine_rows_delivered(fine_rows))
        assert all(row.attempts == 1 for row in await fine_rows())  # one attempt each, never deferred

        config = write_config(tmp_path / "relay.toml", redis, throttle)
        status, out, err = await run_cli("-c", str(config), "throttle", "status", "--json")
    assert status == 0, err
    rows = {row["destination"]: row for row in map(json.loads, out.splitlines())}
    assert rows[slow_dest]["configured_rate"] == "600/min" and rows[slow_dest]["effective_rate"] == "300/min"
    assert 0 < rows[slow_dest]["cooldown_left"] <= 3600 and "rate_limited" in rows[slow_dest]["reason"]
    assert rows[fine_dest]["effective_rate"] == "600/min" and rows[fine_dest]["cooldown_left"] == 0
    assert rows[fine_dest]["connections_limit"] == 5 and rows[fine_dest]["connections_in_use"] <= 5
    status, table, err = await run_cli("-c", str(config), "throttle", "status")
    assert status == 0, err
    [line] = [line for line in table.splitlines() if line.startswith(slow_dest)]
    assert "600/min" in line and "300/min" in line and "rate_limited" in line


async def test_a_destination_budget_holds_end_to_end(relays: RelayFactory, redis_url: str, key_prefix: str) -> None:
    """30 messages, 10/min: the burst of 10 goes at once, the rest trickle at one per 6 s, and nobody
    counts an attempt or bounces while waiting."""
    throttle = {"default": {"rate": "600/min"}, "destinations": {"budget.test": {"rate": "10/min"}}}
    async with DnsTestServer() as dns, SinkServer(SinkConfig(starttls="off")) as sink:
        routes = {"budget.test": mx_to(dns, "budget.test", sink)}
        running = await relays.start(**relay_config(dns, routes, throttle,
                                                    {"url": redis_url, "key_prefix": key_prefix}))
        started = time.monotonic()
        ids = await submit(running.ports["relay"], *(f"u{n}@budget.test" for n in range(30)))
        await sink.wait_for_messages(10, timeout=30)

        async def rows() -> list[RecipientRow]:
            return [row for queue_id in ids for row in await running.store.recipients_of(queue_id)]

        async def all_waiting_or_delivered() -> bool:
            found = await rows()
            return all(r.state is RecipientState.DELIVERED or (r.state is RecipientState.QUEUED and r.last_reply)
                       for r in found)

        await wait_until(all_waiting_or_delivered)
        delivered = sink.stats.messages
        elapsed = time.monotonic() - started
        assert 10 <= delivered <= 10 + math.floor(elapsed / 6)
        found = await rows()
        assert all(r.attempts == (1 if r.state is RecipientState.DELIVERED else 0) for r in found)
        assert all("451 4.4.5" in (r.last_reply or "") for r in found if r.state is RecipientState.QUEUED)
        # The budget refills: the next message goes out after about one interval.
        await sink.wait_for_messages(delivered + 1, timeout=30)
        elapsed = time.monotonic() - started
        assert sink.stats.messages <= 10 + math.floor(elapsed / 6)
    counts = await running.store.count_by_state()
    assert counts.get("bounced", 0) == 0 and counts.get("expired", 0) == 0


# -- the status command ----------------------------------------------------------------------------------

def test_status_with_the_memory_backend_says_where_the_state_is(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main
    path = tmp_path / "relay.toml"
    path.write_text('[chain]\nplugins = ["throttle"]\n')
    assert main(["-c", str(path), "throttle", "status"]) == 1
    assert MEMORY_BACKEND in capsys.readouterr().err
    path.write_text('[plugins.throttle]\ndefault = { rate = "often" }\n')
    assert main(["-c", str(path), "throttle", "status"]) == 2
    assert "plugins.throttle.default.rate: Value error, rate 'often'" in capsys.readouterr().err


async def test_status_lists_used_slowed_and_configured_destinations(nodes: Callable[[], RateLimiter],
                                                                    redis_url: str, key_prefix: str,
                                                                    tmp_path: Path) -> None:
    throttle = {"default": {"connections": 4, "rate": "100/min"}, "destinations": {"big.test": {"rate": "5/s"}}}
    plugin = make_throttle(nodes(), **throttle)
    held = attempt("mx:10:mx.used.test", "a@used.test")
    assert (await plugin.before_attempt(held)).action is Action.CONTINUE
    await plugin.deferred(deferral("mx:10:mx.slowed.test", "a@slowed.test"))
    config = write_config(tmp_path / "relay.toml", {"url": redis_url, "key_prefix": key_prefix}, throttle)
    status, out, err = await run_cli("-c", str(config), "throttle", "status", "--json")
    assert status == 0, err
    rows = {row["destination"]: row for row in map(json.loads, out.splitlines())}
    assert set(rows) == {"mx:10:mx.used.test", "mx:10:mx.slowed.test", "big.test"}
    used, slowed, big = rows["mx:10:mx.used.test"], rows["mx:10:mx.slowed.test"], rows["big.test"]
    assert (used["connections_in_use"], used["connections_limit"], used["effective_rate"], used["seen"]) == (
        1, 4, "100/min", True)
    assert (slowed["effective_rate"], slowed["factor"], slowed["seen"]) == ("50/min", 0.5, False)
    assert (big["configured_rate"], big["match"], big["seen"]) == ("5/s", "big.test", False)
    await finish(plugin, held)


def test_the_status_table_reads_well() -> None:
    from relay.plugins.throttle import DestinationStatus
    rows = [DestinationStatus("mx:10:mx.a.test", None, "600/min", "300/min", 0.5, 3725.2, 2, 10,
                              "rate_limited (4.7.0)", True),
            DestinationStatus("gmail.com", "gmail.com", "3000/h", "3000/h", 1.0, 0.0, 0, 0, "", False)]
    lines = render_table(rows).splitlines()
    assert lines[0].split() == ["DESTINATION", "LIMITS", "FROM", "RATE", "NOW", "COOL-DOWN", "CONNECTIONS", "LAST",
                                "SLOW-DOWN"]
    assert lines[1].split() == ["mx:10:mx.a.test", "default", "600/min", "300/min", "1h02m05s", "2/10",
                                "rate_limited", "(4.7.0)"]
    assert lines[2].split() == ["gmail.com", "(not", "used", "yet)", "gmail.com", "3000/h", "3000/h", "-",
                                "0/unlimited", "-"]
    assert render_table([]) == "no destination throttled or in use"
    assert [format_duration(s) for s in (0, 0.4, 59.4, 60, 3725)] == ["-", "-", "59s", "1m00s", "1h02m05s"]


"""The delivery service end to end, on both stores: a real queue (SQLite file / fresh Postgres database),
a real DNS server on loopback, real SMTP sinks per destination, and the service claiming, delivering,
retrying, bouncing, expiring and pausing destinations.

Time: the service takes a clock; tests that need "later" move that clock forward instead of sleeping, so
no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from relay.policies.bounce import BounceClassifier, Classification, Reply
from relay.policies.retry import RetryPolicy, RetrySchedule
from relay.policies.routing import Router

from relay.delivery.config import (
    CircuitBreakerSettings,
    ConcurrencySettings,
    DeliverySettings,
    TimeoutSettings,
    TlsDeliverySettings,
)
from relay.delivery.mx import MxResolver
from relay.delivery.scheduler import AttemptContext, DeliveryService
from relay.plugin import Action, Verdict
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import NewMessage, NewRecipient, QueueStore, RecipientRow, RecipientState
from tests.support.dnsserver import DnsTestServer
from tests.support.relayfx import RelayFactory

SENDER = "alice@sender.example"
BODY = b"From: alice@sender.example\r\nSubject: e2e\r\nMessage-ID: <e2e@sender.example>\r\n\r\nhello\r\n.dot\r\n"
LIFETIME = 3600.0


class Clock:
    """The service's idea of now: real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    sqlite_url = f"sqlite:///{tmp_path / 'queue.db'}"
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = await open_store(StoreSettings(url=url))
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class World:
    """DNS, sinks and routes for the test domains; builds services over one store."""

    store: QueueStore
    dns: DnsTestServer
    sinks: dict[str, SinkServer] = field(default_factory=dict)
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: list[DeliveryService] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)

    async def sink(self, domain: str, **config: Any) -> SinkServer:
        """A domain whose single MX host is a sink of its own."""
        config.setdefault("starttls", "off")
        server = SinkServer(SinkConfig(**config))
        await server.start()
        self.sinks[domain] = server
        self.mx(domain, server.port)
        return server

    def mx(self, domain: str, port: int) -> None:
        self.dns.add(domain, "MX", f"10 mx.{domain}.")
        self.dns.add(f"mx.{domain}", "A", "127.0.0.1")
        self.routes[domain] = {"kind": "mx", "port": port}

    def service(self, *, chain: Any = None, schedule: str = "1s*", lifetime: float = LIFETIME,
                warn_after: float | None = None, **settings: Any) -> DeliveryService:
        settings.setdefault("timeouts", TimeoutSettings(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5,
                                                        data_init=5, data_block=5, data_end=5))
        settings.setdefault("idle_timeout", 0.5)
        settings.setdefault("lease_seconds", 120)
        delivery = DeliverySettings(**settings)
        service = DeliveryService(
            self.store, delivery,
            resolver=MxResolver([self.dns.nameserver], timeout=1.0, allow_private=True),
            classifier=BounceClassifier.default(),
            retry_policy=RetryPolicy(RetrySchedule.parse(schedule), lifetime, warn_after),
            router=Router.from_config(self.routes), chain=chain, hostname="relay.test", clock=self.clock)
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.stop(0)
        for server in self.sinks.values():
            await server.stop()


@pytest.fixture
async def world(store: QueueStore) -> AsyncIterator[World]:
    async with DnsTestServer() as dns:
        w = World(store, dns)
        sender_sink = await w.sink("sender.example")
        assert sender_sink.port
        try:
            yield w
        finally:
            await w.close()


_counter = 0


async def enqueue(store: QueueStore, *rcpts: str, received_at: float | None = None,
                  data: bytes = BODY, sender: str = SENDER) -> NewMessage:
    global _counter
    _counter += 1
    message = NewMessage(id=f"e2e{_counter:06d}{int(time.time() * 1000) % 100000:05d}", sender=sender,
                         recipients=[NewRecipient(r) for r in rcpts], data=data,
                         received_at=time.time() if received_at is None else received_at)
    await store.enqueue(message)
    return message


async def rows(store: QueueStore, message: NewMessage) -> dict[str, RecipientRow]:
    return {row.address: row for row in await store.recipients_of(message.id)}


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


def dsn_fields(data: bytes) -> list[email.message.Message]:
    """The per-message and per-recipient field groups of a DSN's delivery-status part."""
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    groups = status.get_payload()
    assert isinstance(groups, list)
    return groups


# --- delivery ------------------------------------------------------------------------------------------

async def test_a_message_is_delivered_intact_with_its_history(world: World) -> None:
    dest = await world.sink("dest.example")
    message = await enqueue(world.store, "bob@dest.example", "carol@dest.example")
    service = world.service()
    assert await service.run_once() == 2
    [received] = dest.received
    assert received.data == BODY
    assert received.mail_from == SENDER and sorted(received.rcpt_tos) == ["bob@dest.example",
                                                                        "carol@dest.example"]
    found = await rows(world.store, message)
    assert {r.state for r in found.values()} == {RecipientState.DELIVERED}
    [attempt] = await world.store.attempts_of(found["bob@dest.example"].id)
    assert attempt.outcome == "delivered" and attempt.mx_host == "mx.dest.example"
    assert attempt.reply is not None and attempt.reply.startswith("250")
    assert dest.stats.connections_opened == 1  # one transaction carried both recipients


async def test_domains_sharing_an_mx_set_share_connections(world: World) -> None:
    dest = await world.sink("dest.example")
    world.dns.add("alias.example", "MX", "10 mx.dest.example.")
    world.routes["alias.example"] = {"kind": "mx", "port": dest.port}
    for number in range(4):
        await enqueue(world.store, f"u{number}@dest.example", f"u{number}@alias.example")
    service = world.service(concurrency=ConcurrencySettings(total=10, per_destination=1))
    assert await service.run_once() == 8
    assert dest.stats.messages == 4
    assert dest.messages_per_connection == [4]  # one connection, four messages, both domains


async def test_permanent_failure_bounces_and_the_dsn_reaches_the_sender(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("bad@dest.example", "550 5.1.1 no such user here")
    message = await enqueue(world.store, "bad@dest.example", "bob@dest.example")
    service = world.service()
    await service.run_once()
    found = await rows(world.store, message)
    assert found["bad@dest.example"].state == RecipientState.BOUNCED
    assert found["bob@dest.example"].state == RecipientState.DELIVERED
    # The DSN was queued with the results; the next round delivers it to the sender's domain.
    await service.run_once()
    [dsn] = world.sinks["sender.example"].received
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    per_message, per_rcpt = dsn_fields(dsn.data)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; bad@dest.example"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert "no such user here" in per_rcpt["Diagnostic-Code"]
    assert per_rcpt["Remote-MTA"] == "dns; mx.dest.example"


async def test_temporary_failure_is_retried_on_schedule_until_delivered(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("later@dest.example", "451 4.3.0 not now")
    message = await enqueue(world.store, "later@dest.example")
    service = world.service(schedule="1s*")
    for expected_attempts in (1, 2):
        await service.run_once()
        row = (await rows(world.store, message))["later@dest.example"]
        assert row.state == RecipientState.QUEUED and row.attempts == expected_attempts
        delay = row.next_attempt_at - world.clock()
        assert 0 < delay <= 1.1  # the schedule's 1 s with ±10 % jitter (minus the time since)
        assert await service.run_once() == 0  # not due yet: nothing claimed
        world.clock.advance(1.2)
    dest.clear_rules()
    await service.run_once()
    row = (await rows(world.store, message))["later@dest.example"]
    assert row.state == RecipientState.DELIVERED and row.attempts == 3
    outcomes = [a.outcome for a in sorted(await world.store.attempts_of(row.id), key=lambda a: a.started_at)]
    assert outcomes == ["temporary", "temporary", "delivered"]


async def test_a_retry_hint_in_the_reply_is_honoured(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("grey@dest.example", "450 4.7.1 greylisted, try again in 120 seconds")
    message = await enqueue(world.store, "grey@dest.example")
    service = world.service(schedule="1s, 10m*")
    await service.run_once()
    row = (await rows(world.store, message))["grey@dest.example"]
    assert row.state == RecipientState.QUEUED
    assert 119 <= row.next_attempt_at - world.clock() <= 133  # 120 s stretched by up to 10 %, not 1 s


async def test_null_mx_bounces_at_once_with_5_1_10(world: World) -> None:
    world.dns.add("nullmx.example", "MX", "0 .")
    message = await enqueue(world.store, "someone@nullmx.example")
    service = world.service()
    await service.run_once()
    row = (await rows(world.store, message))["someone@nullmx.example"]
    assert row.state == RecipientState.BOUNCED and row.attempts == 1
    await service.run_once()
    [dsn] = world.sinks["sender.example"].received
    per_rcpt = dsn_fields(dsn.data)[1]
    assert per_rcpt["Status"] == "5.1.10"


async def test_a_reject_route_bounces_with_its_reply(world: World) -> None:
    world.routes["blocked.example"] = {"kind": "reject", "reject_code": 550, "reject_enhanced": "5.7.1",
                                       "reject_text": "no mail to blocked.example"}
    message = await enqueue(world.store, "x@blocked.example")
    await world.service().run_once()
    row = (await rows(world.store, message))["x@blocked.example"]
    assert row.state == RecipientState.BOUNCED
    assert row.last_reply == "550 5.7.1 no mail to blocked.example"


async def test_expired_recipients_are_expired_and_bounced_with_4_4_7(world: World) -> None:
    await world.sink("dest.example")
    old = await enqueue(world.store, "bob@dest.example", received_at=time.time() - LIFETIME - 60)
    service = world.service()
    await service.run_once()
    row = (await rows(world.store, old))["bob@dest.example"]
    assert row.state == RecipientState.EXPIRED and row.attempts == 0  # never attempted: too old
    assert world.sinks["dest.example"].stats.messages == 0
    await service.run_once()
    [dsn] = world.sinks["sender.example"].received
    per_rcpt = dsn_fields(dsn.data)[1]
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "4.4.7"


async def test_a_temporary_failure_past_the_lifetime_expires(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("later@dest.example", "451 4.3.0 not now")
    # Old enough that the next retry would fall after the lifetime, young enough not to be expired yet.
    message = await enqueue(world.store, "later@dest.example", received_at=time.time() - LIFETIME + 30)
    service = world.service(schedule="1m*")
    await service.run_once()
    row = (await rows(world.store, message))["later@dest.example"]
    assert row.state == RecipientState.EXPIRED and row.attempts == 1
    await service.run_once()
    [dsn] = world.sinks["sender.example"].received
    per_rcpt = dsn_fields(dsn.data)[1]
    assert per_rcpt["Status"] == "4.4.7" and "not now" in per_rcpt["Diagnostic-Code"]


async def test_one_delay_warning_once_the_message_is_old_enough(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("later@dest.example", "451 4.3.0 not now")
    message = await enqueue(world.store, "later@dest.example")
    service = world.service(schedule="1s*", warn_after=600)
    await service.run_once()  # young: no warning
    world.clock.advance(601)
    await service.run_once()  # crosses the warning age: one "delayed" DSN
    world.clock.advance(2)
    await service.run_once()  # still failing: no second warning
    row = (await rows(world.store, message))["later@dest.example"]
    assert row.attempts == 3 and row.state == RecipientState.QUEUED
    dsns = world.sinks["sender.example"].received
    assert len(dsns) == 1
    per_rcpt = dsn_fields(dsns[0].data)[1]
    assert per_rcpt["Action"] == "delayed" and per_rcpt["Status"].startswith("4.")
    assert "Will-Retry-Until" in per_rcpt


# --- containment and the circuit breaker ---------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_circuit_breaker_opens_defers_without_counting_and_recovers(world: World) -> None:
    port = closed_port()
    world.mx("down.example", port)
    messages = [await enqueue(world.store, f"u{n}@down.example") for n in range(4)]
    service = world.service(
        concurrency=ConcurrencySettings(total=10, per_destination=1),
        circuit_breaker=CircuitBreakerSettings(failures=2, open_for=60, max_open=3600))
    await service.run_once()
    found = [(await rows(world.store, m))[f"u{n}@down.example"] for n, m in enumerate(messages)]
    assert [r.attempts for r in found] == [1, 1, 0, 0]  # two failures open it; the rest wait unattempted
    paused_until = found[2].next_attempt_at
    assert found[3].next_attempt_at == paused_until
    assert 59 <= paused_until - world.clock() <= 60

    # Still down when the pause ends: the probe fails and the pause doubles.
    world.clock.advance(61)
    await service.run_once()
    found = [(await rows(world.store, m))[f"u{n}@down.example"] for n, m in enumerate(messages)]
    assert sum(r.attempts for r in found) == 3  # one probe attempt, the others deferred again
    assert 119 <= max(r.next_attempt_at for r in found) - world.clock() <= 121

    # The destination comes back: after the pause the probe succeeds and everything flows.
    async with SinkServer(SinkConfig(port=port, starttls="off")) as back:
        world.clock.advance(122)
        await service.run_once()
        assert back.stats.messages == 4
    found = [(await rows(world.store, m))[f"u{n}@down.example"] for n, m in enumerate(messages)]
    assert all(r.state == RecipientState.DELIVERED for r in found)


async def test_hostile_and_hung_destinations_do_not_hold_up_a_healthy_one(world: World) -> None:
    healthy = await world.sink("dest.example")
    hung = await world.sink("hung.example")
    hung.set_rule("*", "stall", stage="rcpt")
    garbage = await world.sink("garbage.example")
    garbage.set_rule("*", "garbage", stage="connect")
    world.dns.behave("servfail.example", "servfail")
    world.dns.add_cname_loop("loop1.example", "loop2.example")
    stuck = await enqueue(world.store, "x@hung.example")
    await enqueue(world.store, "x@garbage.example", "y@servfail.example", "z@loop1.example")
    good = await enqueue(world.store, "bob@dest.example")
    service = world.service(timeouts=TimeoutSettings(rcpt=60))
    await service.start()
    # Delivered while the hung destination still holds its connection open (rcpt timeout: 60 s).
    await healthy.wait_for_messages(1, timeout=30)
    await wait_until(lambda: hung.connections_active == 1)  # the hung session is still open

    async def delivered() -> bool:
        return (await rows(world.store, good))["bob@dest.example"].state == RecipientState.DELIVERED

    await wait_until(delivered)
    assert hung.stats.messages == 0
    await service.stop(grace=0)
    # The hung attempt was cut off at shutdown: its claim went back, unattempted.
    row = (await rows(world.store, stuck))["x@hung.example"]
    assert row.state == RecipientState.QUEUED and row.attempts == 0
    counts = await world.store.count_by_state()
    assert counts.get("delivered") == 1 and counts.get("queued") == 4


class RecordingChain:
    """A chain that defers one domain before the attempt, crashes for another, and records outcomes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def before_attempt(self, ctx: AttemptContext) -> Verdict | None:
        domain = ctx.recipients[0].domain
        if domain == "throttled.example":
            ctx.retry_at = time.time() + 500
            return Verdict(Action.REJECT_TEMPORARY, 451, "4.7.0", "throttled", reason="test throttle")
        if domain == "crash.example":
            raise RuntimeError("plugin bug")
        ctx.data = b"X-Signed: yes\r\n" + ctx.data
        return None

    async def delivered(self, ctx: AttemptContext, recipient: RecipientRow, reply: Reply) -> None:
        self.events.append(("delivered", recipient.address))

    async def deferred(self, ctx: AttemptContext, recipient: RecipientRow, classification: Classification,
                       next_attempt_at: float) -> None:
        self.events.append(("deferred", recipient.address))

    async def bounced(self, ctx: AttemptContext, recipient: RecipientRow,
                      classification: Classification) -> None:
        self.events.append(("bounced", recipient.address))


async def test_the_chain_can_defer_change_the_data_and_observe(world: World) -> None:
    dest = await world.sink("dest.example")
    dest.set_rule("bad@dest.example", "550 5.1.1 no such user")
    dest.set_rule("later@dest.example", "451 4.3.0 later")
    throttled = await world.sink("throttled.example")
    crash = await world.sink("crash.example")
    m_throttled = await enqueue(world.store, "t@throttled.example")
    m_crash = await enqueue(world.store, "c@crash.example")
    await enqueue(world.store, "bob@dest.example", "bad@dest.example", "later@dest.example")
    world.dns.add("nullmx.example", "MX", "0 .")
    await enqueue(world.store, "n@nullmx.example")
    await enqueue(world.store, "old@dest.example", received_at=time.time() - LIFETIME - 60)
    chain = RecordingChain()
    await world.service(chain=chain).run_once()
    assert dest.received[0].data.startswith(b"X-Signed: yes\r\n")
    # Observers hear of every outcome: delivered, deferred, bounced by the remote, bounced without a
    # connection (null MX), expired; and of the three DSNs delivered to the sender in the same round.
    assert Counter(chain.events) == Counter({
        ("delivered", "bob@dest.example"): 1, ("bounced", "bad@dest.example"): 1,
        ("deferred", "later@dest.example"): 1, ("bounced", "n@nullmx.example"): 1,
        ("bounced", "old@dest.example"): 1, ("delivered", SENDER): 3})
    assert throttled.stats.connections_opened == 0 and crash.stats.connections_opened == 0
    t_row = (await rows(world.store, m_throttled))["t@throttled.example"]
    assert t_row.state == RecipientState.QUEUED and t_row.attempts == 0  # deferred, not an attempt
    c_row = (await rows(world.store, m_crash))["c@crash.example"]
    assert c_row.state == RecipientState.QUEUED and c_row.attempts == 0


# --- several workers, restarts ------------------------------------------------------------------------

async def test_two_services_on_one_postgres_never_deliver_a_recipient_twice(postgres_url: str) -> None:
    stores = [await open_store(StoreSettings(url=postgres_url)) for _ in range(2)]
    async with DnsTestServer() as dns:
        world = World(stores[0], dns)
        sinks = [await world.sink(f"d{n}.example") for n in range(4)]
        try:
            expected = []
            for number in range(120):
                rcpts = [f"u{number}@d{number % 4}.example", f"v{number}@d{(number + 1) % 4}.example"]
                await enqueue(stores[0], *rcpts)
                expected += rcpts
            services = []
            for opened in stores:
                world.store = opened
                services.append(world.service(claim_batch=10,
                                              concurrency=ConcurrencySettings(total=8, per_destination=2)))
            for service in services:
                await service.start()

            async def all_delivered() -> bool:
                return (await stores[0].count_by_state()).get("delivered", 0) == len(expected)

            await wait_until(all_delivered)
            for service in services:
                await service.stop(grace=5)
            delivered = Counter(r for sink in sinks for message in sink.received for r in message.rcpt_tos)
            assert sorted(delivered) == sorted(expected)
            assert set(delivered.values()) == {1}
            assert all(service.stats.delivered > 0 for service in services)  # both took a share
        finally:
            await world.close()
            for opened in stores:
                await opened.close()


async def test_a_service_stopped_mid_backlog_loses_nothing(world: World) -> None:
    dest = await world.sink("dest.example")
    expected = []
    for number in range(60):
        await enqueue(world.store, f"u{number}@dest.example")
        expected.append(f"u{number}@dest.example")
    first = world.service(claim_batch=5, concurrency=ConcurrencySettings(total=2, per_destination=2))
    await first.start()
    await dest.wait_for_messages(5, timeout=30)
    await first.stop(grace=5)
    second = world.service(claim_batch=5)
    await second.start()
    await dest.wait_for_messages(60, timeout=60)

    async def all_final() -> bool:
        return (await world.store.count_by_state()).get("delivered", 0) == 60

    await wait_until(all_final)
    await second.stop(grace=5)
    delivered = Counter(r for message in dest.received for r in message.rcpt_tos)
    assert sorted(delivered) == sorted(expected)
    assert set(delivered.values()) == {1}


async def test_a_smarthost_route_authenticates_over_verified_tls(world: World, relays: RelayFactory,
                                                                 tls_ca: trustme.CA, tmp_path: Path) -> None:
    upstream = await relays.start(store_url=f"sqlite:///{tmp_path / 'upstream.db'}", listeners=[
        {"name": "submission", "address": "127.0.0.1:0", "kind": "submission", "auth": "required"}])
    await upstream.add_user("smart", "s3cret-pass")
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    world.routes["far.example"] = {"kind": "smarthost", "host": "127.0.0.1",
                                   "port": upstream.ports["submission"], "tls": "verified",
                                   "username": "smart", "password": "s3cret-pass"}
    message = await enqueue(world.store, "anyone@far.example")
    await world.service(tls=TlsDeliverySettings(ca_file=ca_file)).run_once()
    row = (await rows(world.store, message))["anyone@far.example"]
    assert row.state == RecipientState.DELIVERED
    [attempt] = await world.store.attempts_of(row.id)
    assert attempt.tls_version is not None and attempt.mx_host == "127.0.0.1"
    assert (await upstream.store.count_by_state()).get("queued") == 1


async def test_many_recipients_are_split_into_transactions_of_the_configured_size(world: World) -> None:
    dest = await world.sink("dest.example")
    await enqueue(world.store, *(f"u{n}@dest.example" for n in range(7)))
    await world.service(max_recipients_per_transaction=3,
                        concurrency=ConcurrencySettings(total=10, per_destination=1)).run_once()
    assert sorted(len(m.rcpt_tos) for m in dest.received) == [1, 3, 3]
    assert dest.messages_per_connection == [3]


async def test_concurrent_results_share_commits(world: World) -> None:
    dest = await world.sink("dest.example")
    for number in range(40):
        await enqueue(world.store, f"u{number}@dest.example")
    service = world.service(concurrency=ConcurrencySettings(total=20, per_destination=20))
    assert await service.run_once() == 40
    assert dest.stats.messages == 40
    assert (await world.store.count_by_state()).get("delivered") == 40
    assert service._recorder.commits < 40  # transactions finishing together were committed together


async def test_new_mail_wakes_a_sleeping_service_at_once(world: World, store: QueueStore) -> None:
    dest = await world.sink("dest.example")
    service = world.service()
    await service.start()
    await asyncio.sleep(0.2)  # let it find the queue empty and go to sleep (for up to 30 s)
    await enqueue(store, "bob@dest.example")
    # Far less than the loop's longest sleep: only the new-mail signal can explain the delivery.
    await dest.wait_for_messages(1, timeout=10)


async def test_mail_queued_by_another_node_wakes_the_service(postgres_url: str) -> None:
    mine, other = [await open_store(StoreSettings(url=postgres_url)) for _ in range(2)]
    try:
        async with DnsTestServer() as dns:
            world = World(mine, dns)
            dest = await world.sink("dest.example")
            try:
                await world.service().start()
                await asyncio.sleep(0.2)
                await enqueue(other, "bob@dest.example")  # LISTEN/NOTIFY carries the wake-up across
                await dest.wait_for_messages(1, timeout=10)
            finally:
                await world.close()
    finally:
        await mine.close()
        await other.close()

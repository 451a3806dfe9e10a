"""Dependency and destination faults, CI-sized (issue 7, item 2).

- Each destination and DNS fault on its own: a temporary failure with the right enhanced code (null MX a
  bounce), never a crash, never a delivery that did not happen; MX hosts at loopback/private addresses
  refused by default and delivered to when ``allow_private`` is set; an opportunistic route past a broken
  STARTTLS delivers in plain text.
- Isolation: with all of them running at once, a healthy destination keeps at least 80 % of its normal
  delivery rate, measured as a ratio in the same run (:mod:`tests.reliability.faults`).
- Postgres restarted under load: ``451 4.3.0`` while it is down, the same relay process accepts again once
  it is back, and every acknowledged message is delivered.
- Redis killed or hung: fail-open keeps accepting (with a warning), fail-closed answers ``451 4.3.0`` (421 at
  the greeting), both recover when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio

from relay.delivery.config import DeliverySettings
from relay.delivery.scheduler import DeliveryService
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import NewMessage, NewRecipient, QueueStore, RecipientState, open_store
from tests.reliability.faults import MIN_RATIO, IsolationPlan, _zone, run_isolation
from tests.reliability.harness import (
    UNANSWERED,
    Outgoing,
    RecordingSink,
    RelayConfig,
    RelayProcess,
    build_message,
    check_message,
    free_port,
    log_problems,
    relay_config,
    submit_all,
)
from tests.reliability.hostile import Tarpit, hostile_sink
from tests.support.dnsserver import DnsTestServer
from tests.support.logtap import current_tap
from tests.support.pgcluster import PgCluster
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

SHORT_TIMEOUTS = {"connect": 2.0, "greeting": 2.0, "ehlo": 2.0, "mail": 2.0, "rcpt": 2.0, "data_init": 2.0,
                  "data_block": 2.0, "data_end": 2.0}


# -- each fault on its own ------------------------------------------------------------------------------------

@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    opened = await open_store(StoreSettings(url=f"sqlite:///{tmp_path}/queue.db"))
    yield opened
    await opened.close()


async def _enqueue(store: QueueStore, domains: list[str]) -> dict[str, str]:
    ids = {}
    for n, domain in enumerate(domains):
        queue_id = f"fault{n:04d}"
        await store.enqueue(NewMessage(id=queue_id, sender="", recipients=[NewRecipient(f"x@{domain}")],
                                       data=b"Subject: fault\r\n\r\n" + b"body line\r\n" * 500,
                                       received_at=time.time()))
        ids[domain] = queue_id
    return ids


async def test_each_fault_is_a_contained_temporary_failure(store: QueueStore) -> None:
    async with contextlib.AsyncExitStack() as stack:
        dns = await stack.enter_async_context(DnsTestServer())
        _zone(dns)
        healthy = await stack.enter_async_context(SinkServer(SinkConfig(starttls="off")))
        tarpit = await stack.enter_async_context(Tarpit(interval=0.5))
        sinks = {name: await stack.enter_async_context(hostile_sink(name))
                 for name in ("reset", "garbage", "endless", "brokentls")}
        routes = {"healthy.example": {"kind": "host", "host": "127.0.0.1", "port": healthy.port, "tls": "none"},
                  "tarpit.example": {"kind": "host", "host": "127.0.0.1", "port": tarpit.port, "tls": "none"},
                  "opportunistic.example": {"kind": "host", "host": "127.0.0.1", "port": sinks["brokentls"].port,
                                            "tls": "opportunistic"}}
        for name, sink in sinks.items():
            routes[f"{name}.example"] = {"kind": "host", "host": "127.0.0.1", "port": sink.port,
                                         "tls": "required" if name == "brokentls" else "none"}
        settings = DeliverySettings(timeouts=SHORT_TIMEOUTS, routes={"domains": routes},
                                    dns={"nameservers": [dns.nameserver], "timeout": 1.0})
        service = DeliveryService.from_settings(store, settings, hostname="relay.test")
        expected = {  # domain: (state, what the last reply must contain)
            "healthy.example": (RecipientState.DELIVERED, "250"),
            "opportunistic.example": (RecipientState.DELIVERED, "250"),
            "dns-timeout.example": (RecipientState.QUEUED, "4.4.3"),
            "dns-servfail.example": (RecipientState.QUEUED, "4.4.3"),
            "cname-loop.example": (RecipientState.QUEUED, "4.4.3"),
            "huge.example": (RecipientState.QUEUED, "4.4.4"),
            "null-mx.example": (RecipientState.BOUNCED, "5.1.10"),
            "mx-loopback.example": (RecipientState.QUEUED, "4.4.4"),
            "mx-private.example": (RecipientState.QUEUED, "4.4.4"),
            "tarpit.example": (RecipientState.QUEUED, "greeting"),
            "reset.example": (RecipientState.QUEUED, "data"),
            "garbage.example": (RecipientState.QUEUED, "greeting"),
            "endless.example": (RecipientState.QUEUED, "ehlo"),
            "brokentls.example": (RecipientState.QUEUED, "tls"),
        }
        ids = await _enqueue(store, list(expected))
        with current_tap().watch() as lines:
            await asyncio.wait_for(service.run_once(), 120)
            await service.stop(grace=1)
        found = {}
        for domain, queue_id in ids.items():
            [row] = await store.recipients_of(queue_id)
            found[domain] = (row.state, row.attempts, row.last_reply)
        wrong = {domain: found[domain] for domain, (state, text) in expected.items()
                 if found[domain][0] != state or text not in (found[domain][2] or "") or found[domain][1] != 1}
        assert wrong == {}, "\n".join(f"{d}: {v}" for d, v in wrong.items())
        assert healthy.stats.messages == 1 and sinks["brokentls"].stats.messages == 1   # the fall-back one
        assert all(sinks[name].stats.messages == 0 for name in ("reset", "garbage", "endless"))
        assert log_problems(lines) == []


async def test_mx_hosts_at_private_addresses_are_used_only_when_allowed(store: QueueStore) -> None:
    async with DnsTestServer() as dns, SinkServer(SinkConfig(starttls="off")) as sink:
        dns.add("inside.example", "MX", "10 mx.inside.example.")
        dns.add("mx.inside.example", "A", "127.0.0.1")
        ids = await _enqueue(store, ["inside.example"])
        for allow, state in ((False, RecipientState.QUEUED), (True, RecipientState.DELIVERED)):
            settings = DeliverySettings(routes={"default": {"kind": "mx", "port": sink.port, "tls": "none"}},
                                        dns={"nameservers": [dns.nameserver], "timeout": 1.0,
                                             "allow_private": allow},
                                        retry={"schedule": "1s*"})
            service = DeliveryService.from_settings(store, settings, hostname="relay.test")
            await asyncio.sleep(1.3 if allow else 0)        # the retry after the refusal is due
            await service.run_once()
            await service.stop(grace=1)
            [row] = await store.recipients_of(ids["inside.example"])
            assert row.state == state, (allow, row)
            if not allow:
                assert "4.4.4" in (row.last_reply or "") and sink.stats.messages == 0
        assert sink.stats.messages == 1


#: The relay's answer when the connection to Postgres died while a COMMIT was under way (relay.smtp.session).
OUTCOME_UNKNOWN = b"451 4.3.0 Queue write interrupted, outcome unknown"


# -- isolation --------------------------------------------------------------------------------------------

async def test_a_healthy_destination_keeps_its_rate_while_others_misbehave(tmp_path: Path) -> None:
    report = await run_isolation(IsolationPlan(tmp_path, healthy=3000, backlog=500, per_fault=10, rounds=2))
    print(report.summary())
    assert not report.failures(), report.summary() + "\n" + "\n".join(report.failures())
    assert report.ratio >= MIN_RATIO


# -- Postgres restarted under load --------------------------------------------------------------------------

@pytest.fixture
def own_postgres() -> Iterator[PgCluster]:
    cluster = PgCluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


async def test_postgres_restart_under_load_451_then_recovery_without_restart(tmp_path: Path,
                                                                             own_postgres: PgCluster) -> None:
    import psycopg
    with psycopg.connect(own_postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE relay")
    url = own_postgres.url.rsplit("/", 1)[0] + "/relay"
    rng = random.Random(5)
    async with RecordingSink() as sink:
        port = free_port()
        relay = RelayProcess(relay_config(RelayConfig(tmp_path, url, port, sink.port, lease_seconds=10.0)),
                             port, tmp_path)
        relay.start()
        try:
            await relay.wait_ready()
            pid = relay.pid
            replies: list[tuple[float, bytes]] = []
            stop = asyncio.Event()

            async def load() -> None:
                n = 0
                while not stop.is_set():
                    batch = [Outgoing("s@reliability.test", (f"r{n + i}@pg.example",),
                                      build_message(f"pg-{n + i}@reliability.test", [f"r{n + i}@pg.example"], rng,
                                                    size=1500)) for i in range(20)]
                    n += 20
                    answers = await submit_all(port, batch, clients=4, per_connection=5)
                    replies.extend((time.monotonic(), message.data, answer)
                                   for message, answer in zip(batch, answers, strict=True))

            loader = asyncio.create_task(load())
            await asyncio.sleep(2.0)
            down_at = time.monotonic()
            await asyncio.to_thread(own_postgres.stop, "fast")
            await asyncio.sleep(4.0)
            up_at = time.monotonic()
            await asyncio.to_thread(own_postgres.start)
            deadline = time.monotonic() + 60
            while not any(t > up_at and a.startswith(b"250") for t, _, a in replies) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            stop.set()
            await loader
            assert relay.pid == pid and relay.proc is not None and relay.proc.poll() is None   # never restarted
            refused = [a for _, _, a in replies if a not in (b"", UNANSWERED) and not a.startswith(b"250")]
            assert any(a.startswith(b"451 4.3.0") for t, _, a in replies if down_at <= t <= up_at + 1), refused[:5]
            assert all(a.startswith(b"451 4.3.0") for a in refused), refused[:5]
            assert any(a.startswith(b"250") for t, _, a in replies if t > up_at)
            outcome = {check_message(data).message_id: a for _, data, a in replies}
            acked = {mid for mid, a in outcome.items() if a.startswith(b"250")}
            assert len(acked) >= 20
            # Every acknowledged message is delivered; none that was refused is; the rest whole or not at all.
            deadline = time.monotonic() + 120
            while not acked <= {d.message_id for d in sink.deliveries} and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            delivered = {d.message_id for d in sink.deliveries}
            assert acked <= delivered, sorted(acked - delivered)[:5]
            # Not acknowledged yet delivered only where the outcome was unknown to the relay as well: the
            # reply never came (UNANSWERED), or the relay said so (the connection died during COMMIT).
            assert all(outcome.get(mid, b"").startswith(b"250") or outcome.get(mid) == UNANSWERED
                       or outcome.get(mid, b"").startswith(OUTCOME_UNKNOWN)
                       for mid in delivered), sorted((mid, outcome.get(mid)) for mid in delivered - acked)[:5]
            assert all(d.intact for d in sink.deliveries)
            assert await relay.stop() == 0
        finally:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.kill()
    outage = frozenset({"store_operation_failed", "queue_write_failed", "queue_write_outcome_unknown",
                        "delivery_loop_error", "enqueue_failed",
                        "delivery_record_failed", "delivery_new_mail_watch_error", "new_mail_listener_lost",
                        "delivery_heartbeat_failed", "lease_renewal_failed", "delivery_release_failed",
                        "webhook_dispatch_failed",
                        # asyncpg (through the standard library) about connections the restart cut off
                        "Failed to restore the pool connection floor", "Resetting connection with an active",
                        "Future exception was never retrieved\nfuture: <Future finished exception="
                        "ConnectionDoesNotExistError"})
    problems = log_problems(relay.log_lines(), allowed_errors=outage)
    assert problems == [], problems[:3]


# -- Redis killed or hung ----------------------------------------------------------------------------------

class RedisServer:
    """A redis-server of the test's own on a fixed port: killed, stopped (SIGSTOP) and started by its PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.asyncio.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            for _ in range(200):
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        server.kill()


async def _mail(port: int) -> tuple[int, int]:
    """(greeting code, final code) of one message from a trusted client; 0 for a step not reached."""
    client = await RawClient.connect(port)
    greeting = await client.greeting()
    if greeting.code != 220:
        await client.close()
        return greeting.code, 0
    await client.ehlo()
    reply = await client.mail("a@example.org", ["b@example.com"], b"Subject: redis\r\n\r\nhi\r\n")
    await client.close()
    return greeting.code, reply.code


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_redis_outage_fail_open_keeps_accepting_with_a_warning(relays: RelayFactory, own_redis: RedisServer,
                                                                   outage: str) -> None:
    running = await relays.start(redis={"url": own_redis.url, "fail_open": True, "timeout": 0.5},
                                 limits={"messages_per_ip": {"count": 10000, "period": 60},
                                         "connection_rate_per_ip": {"count": 10000, "period": 60}})
    port = running.ports["relay"]
    assert await _mail(port) == (220, 250)
    with current_tap().watch() as lines:
        if outage == "killed":
            own_redis.kill()
        else:
            own_redis.signal(signal.SIGSTOP)
        assert [await _mail(port) for _ in range(3)] == [(220, 250)] * 3
    assert any('"rate_limiter_unavailable"' in line and '"warning"' in line for line in lines)
    if outage == "killed":
        await own_redis.start()
    else:
        own_redis.signal(signal.SIGCONT)
    with current_tap().watch() as lines:
        assert await _mail(port) == (220, 250)
    assert any('"rate_limiter_recovered"' in line for line in lines)


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_redis_outage_fail_closed_answers_451_then_recovers(relays: RelayFactory, own_redis: RedisServer,
                                                                  outage: str) -> None:
    running = await relays.start(redis={"url": own_redis.url, "fail_open": False, "timeout": 0.5},
                                 limits={"messages_per_ip": {"count": 10000, "period": 60},
                                         "connection_rate_per_ip": {"count": 0, "period": 60}})
    gated = await relays.start(redis={"url": own_redis.url, "fail_open": False, "timeout": 0.5},
                               store_url=f"sqlite:///{relays.tmp_path}/gated.db",
                               limits={"connection_rate_per_ip": {"count": 10000, "period": 60}})
    assert await _mail(running.ports["relay"]) == (220, 250)
    if outage == "killed":
        own_redis.kill()
    else:
        own_redis.signal(signal.SIGSTOP)
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    reply = await client.cmd("MAIL FROM:<a@example.org>")
    assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
    await client.close()
    gate = await RawClient.connect(gated.ports["relay"])
    greeting = await gate.greeting()
    assert (greeting.code, greeting.enhanced) == (421, "4.3.0"), greeting
    assert await gate.closed()
    assert sum((await running.store.count_by_state()).values()) == 1
    if outage == "killed":
        await own_redis.start()
    else:
        own_redis.signal(signal.SIGCONT)
    assert await _mail(running.ports["relay"]) == (220, 250)
    assert await _mail(gated.ports["relay"]) == (220, 250)



"""/metrics, /healthz and /readyz of a real relay (role all) on both stores: real SMTP traffic in, real
deliveries to sinks found through a DNS server on loopback, a throttle deferral, then one scrape parsed
with prometheus_client's own parser. Counters are compared before/after (they are process-wide).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.ids import new_queue_id
from relay.sink import SinkConfig, SinkServer
from relay.store.base import NewMessage, NewRecipient, RecipientQuery, RecipientResult, RecipientState
from tests.support.dnsserver import DnsTestServer
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
BODY = b"From: app@sender.example\r\nSubject: metrics\r\n\r\nhello\r\n"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def dns() -> AsyncIterator[DnsTestServer]:
    async with DnsTestServer() as server:
        yield server


@pytest.fixture
async def sinks() -> AsyncIterator[dict[str, SinkServer]]:
    started: dict[str, SinkServer] = {}
    yield started
    for sink in started.values():
        await sink.stop()


async def sink_for(domain: str, dns: DnsTestServer, sinks: dict[str, SinkServer]) -> SinkServer:
    sink = SinkServer(SinkConfig(starttls="off"))
    await sink.start()
    sinks[domain] = sink
    dns.add(domain, "MX", f"10 mx.{domain}.")
    dns.add(f"mx.{domain}", "A", "127.0.0.1")
    return sink


def base(running: RunningRelay) -> str:
    assert running.relay.http is not None and running.relay.http.port
    return f"http://127.0.0.1:{running.relay.http.port}"


async def scrape(http: aiohttp.ClientSession, running: RunningRelay) -> Samples:
    async with http.get(base(running) + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _ in samples)


async def submit(port: int, sender: str, recipients: list[str]) -> str:
    client = await RawClient.connect(port)
    assert (await client.greeting()).code == 220
    await client.ehlo()
    reply = await client.mail(sender, recipients, BODY)
    await client.cmd("QUIT")
    await client.close()
    return str(reply)


async def wait_until(condition: Any, what: str, limit: float = 30.0) -> None:
    """Poll a condition (a delivery happening in the relay's loop); bounded, never a timing assertion."""
    deadline = time.monotonic() + limit
    while not await condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


async def start_relay(relays: RelayFactory, store_url: str, dns: DnsTestServer,
                      routes: dict[str, Any], **sections: Any) -> RunningRelay:
    return await relays.start(
        store_url=store_url, server={"role": "all"},
        http={"address": "127.0.0.1:0", "metrics_queue_cache": 0.001},
        delivery={"dns": {"nameservers": [dns.nameserver], "allow_private": True, "timeout": 2.0},
                  "routes": {"domains": routes}, "retry": {"schedule": "1h*"}, "idle_timeout": 0.2},
        **sections)


async def test_metrics_after_real_traffic_and_deliveries(relays: RelayFactory, store_url: str,
                                                         http: aiohttp.ClientSession, dns: DnsTestServer,
                                                         sinks: dict[str, SinkServer],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh bounded label set: big.example earns a label of its own (10 outcomes), the rest is "other".
    monkeypatch.setattr(metrics, "DESTINATIONS", metrics.DestinationLabels(capacity=1, promote_after=10))
    await sink_for("big.example", dns, sinks)
    small = await sink_for("small.example", dns, sinks)
    await sink_for("slow.example", dns, sinks)
    small.set_rule("gone@small.example", "550 5.1.1 no such user")
    sender_sink = await sink_for("sender.example", dns, sinks)
    routes = {d: {"kind": "mx", "port": s.port, "tls": "none"} for d, s in sinks.items()}
    running = await start_relay(
        relays, store_url, dns, routes, chain={"plugins": ["throttle"]},
        plugins={"throttle": {"default": {"connections": 0, "rate": "unlimited"}, "rollup": "domain",
                              "destinations": {"slow.example": {"rate": "1/h"}}}})
    before = await scrape(http, running)
    port = running.ports["relay"]

    big_rcpts = [f"user{i}@big.example" for i in range(10)]
    assert (await submit(port, "app@sender.example", big_rcpts)).startswith("250")
    assert (await submit(port, "app@sender.example", ["ok@small.example", "gone@small.example"])).startswith("250")
    for _ in range(2):  # the second one is over slow.example's rate: deferred by the throttle
        assert (await submit(port, "app@sender.example", ["someone@slow.example"])).startswith("250")
    # Refused: submission needs AUTH before MAIL.
    client = await RawClient.connect(running.ports["submission"], host="127.0.0.2")
    await client.greeting()
    await client.ehlo()
    assert (await client.cmd("MAIL FROM:<app@sender.example>")).code == 530
    await client.close()

    async def settled() -> bool:
        now = await scrape(http, running)

        def moved(**labels: str) -> float:
            return value(now, "relay_delivery_recipients_total", **labels) - value(
                before, "relay_delivery_recipients_total", **labels)

        # 10 + 1 + 1 delivered, the DSN to the sender delivered too, one bounce, one throttle deferral.
        return moved(outcome="delivered") >= 13 and moved(outcome="bounced") >= 1 and moved(outcome="deferred") >= 1

    await wait_until(settled, "deliveries, the throttle deferral and the bounce")
    after = await scrape(http, running)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_smtp_connections_opened_total", listener="relay") == 4
    assert delta("relay_smtp_connections_opened_total", listener="submission") == 1
    assert delta("relay_smtp_messages_accepted_total", listener="relay") == 4
    assert delta("relay_smtp_recipients_accepted_total", listener="relay") == 14
    assert delta("relay_smtp_message_size_bytes_count") == 4
    assert delta("relay_store_enqueue_seconds_count") == 4
    assert delta("relay_smtp_rejections_total", stage="mail", code="530", status="5.7.0") == 1
    assert value(after, "relay_smtp_connections_open", listener="relay") == 0

    # big.example got its label at its 10th outcome (the first nine went to "other"); nothing else did.
    assert delta("relay_delivery_recipients_total", outcome="delivered", destination="big.example") == 1
    assert delta("relay_delivery_recipients_total", outcome="delivered", destination="other") == 12
    assert {dict(ls).get("destination") for (n, ls) in after if n == "relay_delivery_recipients_total"} <= {
        "big.example", "other"} | {dict(ls).get("destination") for (n, ls) in before
                                   if n == "relay_delivery_recipients_total"}
    assert delta("relay_delivery_recipients_total", outcome="bounced", category="invalid_recipient",
                 destination="other") == 1
    assert delta("relay_delivery_recipients_total", outcome="deferred", category="not_attempted") == 1
    assert len(sender_sink.received) == 1  # the DSN
    assert delta("relay_delivery_dsns_total", kind="failed") == 1
    assert delta("relay_delivery_attempt_duration_seconds_count", result="delivered") >= 3
    assert delta("relay_delivery_attempt_duration_seconds_count", result="partial") == 1
    assert delta("relay_delivery_connections_total", result="ok") >= 3
    assert value(after, "relay_dns_cache_lookups_total", result="miss") >= 4
    assert value(after, "relay_throttle_deferrals_total", reason="rate") >= 1
    assert value(after, "relay_store_commits_total") >= 1  # group commits since this store opened
    assert has(after, "relay_delivery_attempt_duration_seconds_bucket")
    assert has(after, "process_resident_memory_bytes")

    # The throttled recipient waits (queued, young); the counts are what the store holds.
    assert value(after, "relay_queue_stats_up") == 1
    assert value(after, "relay_queue_recipients", state="queued", age="0-5m") == 1
    assert value(after, "relay_queue_recipients", state="held") == 0
    assert value(after, "relay_webhook_undispatched_events") >= 0

    async def lag_sampled() -> bool:
        return value(await scrape(http, running), "relay_event_loop_lag_seconds_count") > 0

    await wait_until(lag_sampled, "an event-loop lag sample")


async def test_queue_gauges_follow_the_store(relays: RelayFactory, store_url: str, http: aiohttp.ClientSession,
                                             dns: DnsTestServer) -> None:
    running = await start_relay(relays, store_url, dns, {})
    store = running.store
    now = time.time()
    later = now + 3600  # not due during the test: the gauges see them as they are
    for received, rcpts in ((now - 7200, ("a@one.example", "b@one.example")), (now, ("c@two.example",))):
        await store.enqueue(NewMessage(id=new_queue_id(), sender="s@sender.example",
                                       recipients=[NewRecipient(r) for r in rcpts], data=BODY,
                                       received_at=received, first_attempt_at=later))
    held = [e.recipient.id for e in await store.find_recipients(RecipientQuery(domain="one.example"), now=now)][:1]
    await store.claim_recipients(held, "test", 60, now=now)
    await store.record_results([RecipientResult(held[0], RecipientState.HELD, None, None, None,
                                                count_attempt=False)], "test")

    samples = await scrape(http, running)
    assert value(samples, "relay_queue_recipients", state="queued", age="0-5m") == 1
    assert value(samples, "relay_queue_recipients", state="queued", age="80-160m") == 1
    assert value(samples, "relay_queue_recipients", state="held", age="80-160m") == 1
    assert value(samples, "relay_queue_recipients", state="held", age="0-5m") == 0
    assert 7200 <= value(samples, "relay_queue_oldest_age_seconds", state="held") < 7200 + 600
    assert len([k for k in samples if k[0] == "relay_queue_recipients"]) == 2 * len(metrics.age_labels())


async def test_healthz_and_readyz(relays: RelayFactory, store_url: str, http: aiohttp.ClientSession,
                                  dns: DnsTestServer) -> None:
    running = await start_relay(relays, store_url, dns, {})
    async with http.get(base(running) + "/healthz") as response:
        assert response.status == 200 and await response.text() == "ok"
    async with http.get(base(running) + "/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ready", "failed": [],
                                          "checks": {"store": "ok", "listeners": "ok", "delivery": "ok"}}

    await running.store.close()
    async with http.get(base(running) + "/readyz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "unavailable" and body["failed"] == ["store"]
    assert body["checks"]["store"] == "unreachable" and body["checks"]["listeners"] == "ok"
    # Metrics still answer, without queue figures.
    samples = await scrape(http, running)
    assert value(samples, "relay_queue_stats_up") == 0 and not has(samples, "relay_queue_recipients")
    # Liveness checks nothing else.
    async with http.get(base(running) + "/healthz") as response:
        assert response.status == 200


async def test_readyz_names_redis_when_it_is_down(relays: RelayFactory, http: aiohttp.ClientSession,
                                                  dns: DnsTestServer, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: Redis is down
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    running = await start_relay(relays, f"sqlite:///{tmp_path}/queue.db", dns, {},
                                redis={"url": f"redis://127.0.0.1:{dead}/0", "timeout": 0.5})
    async with http.get(base(running) + "/readyz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["failed"] == ["redis"] and body["checks"]["store"] == "ok"


async def test_readyz_with_redis_up(relays: RelayFactory, http: aiohttp.ClientSession, dns: DnsTestServer,
                                    tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    running = await start_relay(relays, f"sqlite:///{tmp_path}/queue.db", dns, {},
                                redis={"url": redis_url, "key_prefix": key_prefix})
    async with http.get(base(running) + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["checks"]["redis"] == "ok"


async def test_readyz_before_the_listeners_and_after_they_stop(relays: RelayFactory, http: aiohttp.ClientSession,
                                                               dns: DnsTestServer, tmp_path: Path) -> None:
    running = await start_relay(relays, f"sqlite:///{tmp_path}/queue.db", dns, {})
    assert running.relay.smtp is not None
    await running.relay.smtp.stop_accepting()
    async with http.get(base(running) + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["failed"] == ["listeners"]


def test_destination_labels_are_bounded() -> None:
    labels = metrics.DestinationLabels(capacity=2, promote_after=3)
    seen = [labels.label(d) for d in ["a.example"] * 3 + ["b.example"] * 2 + ["c.example"] * 3 + ["b.example"]]
    assert seen == ["other", "other", "a.example", "other", "other", "other", "other", "c.example", "other"]
    assert labels.labelled == {"a.example", "c.example"}
    assert labels.label("b.example") == "other"  # full: nothing else ever gets a label
    # The sketch is bounded: many one-off domains churn through capacity * 10 slots.
    many = metrics.DestinationLabels(capacity=1, promote_after=5)
    for i in range(1000):
        assert many.label(f"d{i}.example") == "other"
    assert len(many._counts) <= 10


def test_rejection_labels_stay_in_closed_sets() -> None:
    before = metrics.REJECTIONS.labels("rcpt", "other", "none")._value.get()
    metrics.smtp_rejection("rcpt", b"5xx garbage reply")
    metrics.smtp_rejection("rcpt", b"550 not-a-status text")
    assert metrics.REJECTIONS.labels("rcpt", "other", "none")._value.get() == before + 1
    assert metrics.age_labels((300.0, 600.0)) == ["0-5m", "5-10m", "10m+"]

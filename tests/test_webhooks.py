"""Webhooks against a real aiohttp server on loopback that verifies every signature.

Most tests drive the webhook service step by step (``dispatch_once``, ``serve_once``) with a clock they
advance themselves, so retries, back-off, dead-lettering and pauses are checked without waiting for real
time; one test runs a whole relay (SMTP in, delivery to a sink, events out) with its loops, and one runs two
services on one Postgres database at once. Nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from relay.alerts import Alerts
from relay.eventsconfig import AlertSettings, EventsSettings, WebhookSettings
from relay.plugin import Suppression
from relay.settings import StoreSettings, parse_settings, placeholder_secrets
from relay.sink import SinkConfig, SinkServer
from relay.store import QueueStore, open_store
from relay.store.base import Event
from relay.webhooks import (
    REPLAY_WINDOW,
    SIGNATURE_HEADER,
    WebhookService,
    backoff_delay,
    payload,
    sign,
    signature_header,
    verify_signature,
)
from tests.support.logtap import register_secret
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

SECRET = "whsec-test-0123456789abcdef"
OLD_SECRET = "whsec-old-fedcba9876543210"
# The relay must never log a webhook secret: the session-wide log scan (tests/conftest.py) checks for these.
register_secret(SECRET, with_base64=False)
register_secret(OLD_SECRET, with_base64=False)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signed: bool

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """An HTTP endpoint: records each POST, checks its signature, answers the scripted statuses (then 200)."""

    secret: str = SECRET
    clock: Callable[[], float] = time.time
    statuses: list[int] = field(default_factory=list)
    fail_always: bool = False
    requests: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify_signature(request.headers.get(SIGNATURE_HEADER, ""), body, self.secret, now=self.clock())
        self.requests.append(Received(dict(request.headers), body, signed))
        status = 500 if self.fail_always else (self.statuses.pop(0) if self.statuses else 200)
        return web.Response(status=status, text="ok" if status < 300 else "upstream broke")

    def types(self) -> list[str]:
        return [r.json["type"] for r in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[QueueStore]:
    opened = await open_store(StoreSettings(url=store_url, pool_size=3))
    try:
        yield opened
    finally:
        await opened.close()


def hook(url: str, **overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {"name": "app", "url": url, "secret": SECRET, "timeout": 5.0, "backoff_first": 10.0,
                              "backoff_max": 80.0, "retry_for": 3600.0, "pause_after": 0} | overrides
    return WebhookSettings(**values)


@pytest.fixture
async def services() -> AsyncIterator[list[WebhookService]]:
    made: list[WebhookService] = []
    yield made
    for service in made:
        await service.stop(grace=1)


async def driven(services: list[WebhookService], store: QueueStore, clock: Clock, *hooks: WebhookSettings,
                 alerts: Alerts | None = None) -> WebhookService:
    service = WebhookService(store, EventsSettings(), list(hooks), owner=f"test:{uuid.uuid4().hex[:6]}",
                             alerts=alerts, clock=clock, rng=random.Random(7))
    await service.open()
    services.append(service)
    return service


def event(type_: str, created_at: float, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, type=type_, created_at=created_at, message_id="Q1", recipient="r@dest.example",
                 data=data)


# -- the signature -----------------------------------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_old_timestamps_and_other_keys() -> None:
    body = payload(event("delivered", 1_700_000_000.5, reply="250 ok"))
    now = 1_700_000_100
    header = signature_header([SECRET], now, body)
    assert header == f"t={now},v1={sign(SECRET, now, body)}"
    assert verify_signature(header, body, SECRET, now=now + 10)
    assert not verify_signature(header, body + b" ", SECRET, now=now)
    assert not verify_signature(header, body, "another-secret-of-16", now=now)
    assert not verify_signature(header, body, SECRET, now=now + REPLAY_WINDOW + 1)  # a replayed old request
    assert not verify_signature("v1=" + sign(SECRET, now, body), body, SECRET, now=now)  # no timestamp
    # During a rotation every secret signs: receivers holding either one accept.
    rotating = signature_header([SECRET, OLD_SECRET], now, body)
    assert verify_signature(rotating, body, SECRET, now=now) and verify_signature(rotating, body, OLD_SECRET, now=now)


def test_payload_is_the_event_with_its_details() -> None:
    item = Event(id="e1", type="bounced", created_at=12.5, message_id="Q9", recipient="ü@dest.example",
                 data={"category": "invalid_recipient", "status": "5.1.1"})
    assert json.loads(payload(item)) == {"id": "e1", "type": "bounced", "timestamp": 12.5, "message_id": "Q9",
                                         "recipient": "ü@dest.example",
                                         "details": {"category": "invalid_recipient", "status": "5.1.1"}}
    assert payload(item) == payload(item)  # the same bytes on every attempt


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempts, ceiling in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (9, 80.0)):
        delays = [backoff_delay(attempts, 10.0, 80.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not all the same


def test_webhook_secrets_are_checked_like_other_secrets() -> None:
    settings = parse_settings('[[webhooks]]\nurl = "https://hooks.example/relay"\nsecret = "CHANGE-ME"\n')
    assert placeholder_secrets(settings) == ["webhooks[0].secret"]
    with pytest.raises(Exception, match="at least 16"):
        parse_settings('[[webhooks]]\nurl = "https://hooks.example/relay"\nsecret = "short"\n')
    with pytest.raises(Exception, match="share a name"):
        parse_settings('[[webhooks]]\nurl = "https://a.example/x"\nsecret = "0123456789abcdef"\n'
                       '[[webhooks]]\nurl = "https://a.example/x"\nsecret = "0123456789abcdef"\n')
    assert "token" not in parse_settings(
        '[[webhooks]]\nurl = "https://u:p@a.example/x?token=1"\nsecret = "0123456789abcdef"\n').webhooks[0].label


# -- driven step by step -----------------------------------------------------------------------------------


async def test_events_are_posted_signed_to_the_endpoints_that_want_them(
        store: QueueStore, receiver: Receiver, services: list[WebhookService]) -> None:
    clock = Clock()
    receiver.clock = clock
    other = Receiver(clock=clock)
    await other.start()
    try:
        service = await driven(services, store, clock, hook(receiver.url),
                               hook(other.url, name="bounces", events=["bounced"]))
        sent = [event("delivered", clock.now - 2, reply="250 ok"), event("bounced", clock.now - 1, status="5.1.1")]
        await store.record_events(sent)

        assert await service.dispatch_once() == 2
        await service.serve_once("app")
        await service.serve_once("bounces")
    finally:
        await other.stop()

    assert [r.json["id"] for r in receiver.requests] == [e.id for e in sent]  # oldest first
    assert [r.json["id"] for r in other.requests] == [sent[1].id]
    first = receiver.requests[0]
    assert first.signed and other.requests[0].signed
    assert first.json == {"id": sent[0].id, "type": "delivered", "timestamp": sent[0].created_at, "message_id": "Q1",
                          "recipient": "r@dest.example", "details": {"reply": "250 ok"}}
    assert (first.headers["X-Relay-Event-Id"], first.headers["X-Relay-Event-Type"],
            first.headers["X-Relay-Attempt"], first.headers["Content-Type"]) == (
        sent[0].id, "delivered", "1", "application/json")
    assert await store.list_webhook_deliveries(dead=False) == []  # all delivered


async def test_failures_are_retried_with_growing_backoff_until_delivered(
        store: QueueStore, receiver: Receiver, services: list[WebhookService]) -> None:
    clock = Clock()
    receiver.clock = clock
    receiver.statuses = [500, 503, 500]
    service = await driven(services, store, clock, hook(receiver.url))
    item = event("bounced", clock.now)
    await store.record_events([item])
    await service.dispatch_once()

    delays = []
    for attempt in (1, 2, 3):
        await service.serve_once("app")
        [waiting] = await store.list_webhook_deliveries(endpoint="app", dead=False)
        assert (waiting.attempts, waiting.last_error) == (attempt, f"HTTP {[500, 503, 500][attempt - 1]}: "
                                                                   "upstream broke")
        delay = waiting.next_attempt_at - clock.now
        ceiling = 10.0 * 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling
        delays.append(delay)
        await service.serve_once("app")  # not due yet: nothing is sent
        assert len(receiver.requests) == attempt
        clock.advance(delay)
    await service.serve_once("app")

    assert [r.headers["X-Relay-Attempt"] for r in receiver.requests] == ["1", "2", "3", "4"]
    assert {r.json["id"] for r in receiver.requests} == {item.id}
    assert all(r.signed for r in receiver.requests)
    assert len({r.body for r in receiver.requests}) == 1  # the same body every time; only t= changes
    assert delays[0] < delays[2]
    assert await store.list_webhook_deliveries(dead=False) == []
    assert await store.list_webhook_deliveries(dead=True) == []


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def write_config(tmp_path: Path, store_url: str, receiver: Receiver) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nhostname = "cli.test"\nstate_dir = "{tmp_path}/state"\n'
                      f'[store]\nurl = "{store_url}"\n'
                      f'[[webhooks]]\nname = "app"\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n')
    return config


async def test_dead_lettered_after_the_retry_window_then_replayed(
        store: QueueStore, store_url: str, receiver: Receiver, services: list[WebhookService],
        tmp_path: Path) -> None:
    clock = Clock()
    receiver.clock = clock
    receiver.fail_always = True
    service = await driven(services, store, clock, hook(receiver.url, retry_for=30.0, backoff_first=4.0,
                                                        backoff_max=8.0))
    item = event("complained", clock.now)
    await store.record_events([item])
    await service.dispatch_once()
    for _ in range(20):
        await service.serve_once("app")
        waiting = await store.list_webhook_deliveries(endpoint="app", dead=False)
        if not waiting:
            break
        clock.now = max(clock.now, waiting[0].next_attempt_at)

    [letter] = await store.list_webhook_deliveries(dead=True)
    assert (letter.event.id, letter.endpoint, letter.last_error) == (item.id, "app", "HTTP 500: upstream broke")
    tries = len(receiver.requests)
    assert 4 <= tries <= 9  # 30 s of 4-8 s back-off, and a last try at the end of the window
    assert letter.dead_at is not None and letter.dead_at >= letter.created_at + 30.0

    config = write_config(tmp_path, store_url, receiver)
    listed = await asyncio.to_thread(relay_cli, config, "events", "dead-letters", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["event_id"], row["endpoint"], row["attempts"], row["type"]) == (item.id, "app", tries, "complained")

    status = await asyncio.to_thread(relay_cli, config, "events", "status", "--json")
    assert status.returncode == 0, status.stderr
    [state] = [json.loads(line) for line in status.stdout.splitlines()]
    assert (state["endpoint"], state["waiting"], state["dead"], state["last_error"]) == (
        "app", 0, 1, "HTTP 500: upstream broke")
    events = await asyncio.to_thread(relay_cli, config, "events", "list", "--type", "complained", "--json")
    assert [json.loads(line)["id"] for line in events.stdout.splitlines()] == [item.id]

    unknown = await asyncio.to_thread(relay_cli, config, "events", "replay", "--id", "nope")
    assert unknown.returncode == 2 and "no such event" in unknown.stderr
    replayed = await asyncio.to_thread(relay_cli, config, "events", "replay", "--id", item.id)
    assert replayed.returncode == 0 and "queued 1 delivery for app" in replayed.stdout, replayed.stderr

    receiver.fail_always = False
    clock.now = time.time() + 1  # the CLI queued it at the real time
    await service.serve_once("app")
    assert receiver.requests[-1].json["id"] == item.id and receiver.requests[-1].headers["X-Relay-Attempt"] == "1"
    assert await store.list_webhook_deliveries(dead=True) == []
    assert await store.list_webhook_deliveries(dead=False) == []
    # Replaying the dead letters of a period finds none now.
    again = await asyncio.to_thread(relay_cli, config, "events", "replay", "--since", "1h")
    assert again.returncode == 0 and "queued 0 deliveries" in again.stdout


async def test_a_failing_endpoint_pauses_with_one_alert_and_resumes_by_itself(
        store: QueueStore, receiver: Receiver, services: list[WebhookService]) -> None:
    clock = Clock()
    receiver.clock = clock
    receiver.fail_always = True
    alerts = Alerts(store, AlertSettings(period=3600.0), clock=clock)
    service = await driven(services, store, clock, hook(receiver.url, pause_after=3, pause_for=60.0,
                                                        backoff_first=1.0, backoff_max=1.0), alerts=alerts)
    await store.record_events([event("delivered", clock.now - 3 + i) for i in range(3)])
    await service.dispatch_once()

    with structlog.testing.capture_logs() as logs:
        await service.serve_once("app")     # three failures: paused
        clock.advance(5)
        await service.serve_once("app")     # paused: nothing is sent although retries are due
    assert len(receiver.requests) == 3
    paused = [line for line in logs if line["event"] == "webhook_endpoint_paused"]
    assert len(paused) == 1 and paused[0]["log_level"] == "error" and paused[0]["endpoint"] == "app"
    [alert] = await store.list_events(type="alert")
    assert (alert.data["kind"], alert.data["level"], alert.data["scope"]) == ("webhook_paused", "critical",
                                                                             "webhook:app")
    assert not any(SECRET in repr(line) for line in logs)  # secrets never reach the log

    clock.advance(60)                      # the pause is over: one probe, which fails: paused again
    await service.serve_once("app")
    assert len(receiver.requests) == 4
    assert len(await store.list_events(type="alert")) == 1  # one alert per period

    clock.advance(61)
    receiver.fail_always = False           # the endpoint is back: the probe succeeds, the rest follows
    with structlog.testing.capture_logs() as logs:
        await service.serve_once("app")    # the probe: one event
        await service.serve_once("app")    # normal again: the other two
    assert len(receiver.requests) == 7
    assert sorted(r.headers["X-Relay-Attempt"] for r in receiver.requests[4:]) == ["2", "2", "3"]
    assert [line["event"] for line in logs if line["event"] == "webhook_endpoint_resumed"] == [
        "webhook_endpoint_resumed"]
    assert await store.list_webhook_deliveries(dead=False) == []
    [health] = await store.endpoint_health()
    assert (health.consecutive_failures, health.paused_until) == (0, None)


async def test_two_nodes_never_send_one_event_to_one_endpoint_twice(
        postgres_url: str, receiver: Receiver, services: list[WebhookService]) -> None:
    one = await open_store(StoreSettings(url=postgres_url, pool_size=4))
    two = await open_store(StoreSettings(url=postgres_url, pool_size=4))
    try:
        settings = EventsSettings(poll_interval=0.05, claim_batch=7)
        for store in (one, two):
            service = WebhookService(store, settings, [hook(receiver.url)], owner=f"node:{id(store)}")
            services.append(service)
        now = time.time()
        sent = [event("delivered", now - 1 + i * 0.001) for i in range(120)]
        await one.record_events(sent)
        for service in services:
            await service.start()
        async with asyncio.timeout(60):
            while len(receiver.requests) < len(sent):
                await asyncio.sleep(0.05)
        for service in services:
            await service.stop(grace=5)
        services.clear()
    finally:
        await one.close()
        await two.close()
    ids = [r.json["id"] for r in receiver.requests]
    assert sorted(ids) == sorted(e.id for e in sent)  # every event once, none twice


# -- a whole relay -----------------------------------------------------------------------------------------


async def test_a_running_relay_reports_queued_delivered_and_bounced(
        relays: RelayFactory, store_url: str, receiver: Receiver) -> None:
    bounces = Receiver()
    await bounces.start()
    sink = SinkServer(SinkConfig(starttls="off"))
    await sink.start()
    sink.set_rule("nobody@dest.example", "550 5.1.1 no such user here")
    try:
        running = await relays.start(
            store_url=store_url, server={"role": "all"},
            delivery={"routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port,
                                             "tls": "none"}}},
            events={"poll_interval": 0.05},
            webhooks=[{"name": "app", "url": receiver.url, "secret": SECRET},
                      {"name": "bounces", "url": bounces.url, "secret": SECRET, "events": ["bounced"]}])
        client = await RawClient.connect(running.ports["relay"])
        await client.greeting()
        await client.ehlo()
        reply = await client.mail("app@sender.example", ["someone@dest.example", "nobody@dest.example"],
                                  b"From: app@sender.example\r\nSubject: hi\r\n\r\nHello.\r\n")
        assert reply.code == 250, reply
        queue_id = reply.text.rsplit(" ", 1)[1]
        await client.close()
        async with asyncio.timeout(60):
            while not ({"queued", "delivered", "bounced"} <= set(receiver.types()) and bounces.requests):
                await asyncio.sleep(0.05)
    finally:
        await sink.stop()
        await bounces.stop()

    assert all(r.signed for r in receiver.requests + bounces.requests)
    mine = [r.json for r in receiver.requests if r.json["message_id"] == queue_id]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for item in mine:
        by_type.setdefault(item["type"], []).append(item)
    [queued] = by_type["queued"]      # one per message, naming its recipients
    assert queued["recipient"] is None and queued["id"] == f"q-{queue_id}"
    assert queued["details"]["recipients"] == ["someone@dest.example", "nobody@dest.example"]
    assert (queued["details"]["sender_domain"], queued["details"]["domains"]) == ("sender.example",
                                                                                   {"dest.example": 2})
    [delivered] = by_type["delivered"]
    assert delivered["recipient"] == "someone@dest.example" and delivered["details"]["reply"].startswith("250")
    [bounced] = by_type["bounced"]
    details = bounced["details"]
    assert bounced["recipient"] == "nobody@dest.example"
    assert (details["category"], details["status"], details["bounce_type"]) == ("invalid_recipient", "5.1.1", "hard")
    assert "no such user here" in details["reply"]
    assert [r.json["type"] for r in bounces.requests] == ["bounced"]
    assert bounces.requests[0].json["id"] == bounced["id"]  # one event id, whichever endpoint gets it


def commented_block(header: str) -> dict[str, Any]:
    """The commented-out ``header`` block of relay.toml.example (up to the next blank line), parsed."""
    import re
    import tomllib
    text = (Path(__file__).parent.parent / "relay.toml.example").read_text()
    block = text[text.index(f"# {header}"):]
    block = block[:block.index("\n\n")]
    code = [line[2:] for line in block.splitlines() if re.match(r"# (\[\[?[a-z.]+\]\]?|[a-z_]+ = )", line)]
    parsed: dict[str, Any] = tomllib.loads("\n".join(code))
    return parsed


def test_the_example_documents_every_webhook_key_with_its_default() -> None:
    [table] = commented_block("[[webhooks]]")["webhooks"]
    assert set(table) == set(WebhookSettings.model_fields)
    example = WebhookSettings.model_validate(table)
    defaults = WebhookSettings(url=example.url, secret=example.secret)
    examples_only = {"name", "url", "events", "secret"}
    assert {k: v for k, v in example.model_dump().items() if k not in examples_only} == {
        k: v for k, v in defaults.model_dump().items() if k not in examples_only}


def test_the_verification_snippet_in_the_docs_accepts_what_the_relay_signs() -> None:
    import re
    text = (Path(__file__).parent.parent / "docs" / "webhooks.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)
    verify = namespace["verify"]
    body = payload(event("bounced", 1_764_000_120.5, status="5.1.1"))
    header = signature_header([SECRET, OLD_SECRET], 1_764_000_123, body)
    assert verify(header, body, SECRET, now=1_764_000_123 + 299)
    assert verify(header, body, OLD_SECRET, now=1_764_000_123)
    assert not verify(header, body, SECRET, now=1_764_000_123 + 301)       # outside the replay window
    assert not verify(header, body.replace(b"5.1.1", b"5.1.2"), SECRET, now=1_764_000_123)
    assert not verify("t=1764000123", body, SECRET, now=1_764_000_123)


async def test_a_reload_applies_new_webhook_endpoints(tmp_path: Path, tls_ca: Any, receiver: Receiver) -> None:
    from tests.support.configfile import ConfigFile
    later = Receiver()
    await later.start()
    config = ConfigFile(tmp_path, tls_ca)
    base: dict[str, Any] = {"server": {"role": "all"}, "events": {"poll_interval": 0.05}}
    config.write(**base, webhooks=[{"name": "app", "url": receiver.url, "secret": SECRET, "events": ["alert"]}])
    relay = await config.start()
    try:
        assert relay.webhooks is not None and [e.name for e in relay.webhooks.endpoints] == ["app"]
        config.write(**base, webhooks=[{"name": "app", "url": receiver.url, "secret": SECRET, "events": ["alert"]},
                                       {"name": "later", "url": later.url, "secret": OLD_SECRET}])
        outcome = await relay.reload()
        assert outcome.ok, outcome
        assert [e.name for e in relay.webhooks.endpoints] == ["app", "later"]
        assert relay.store is not None
        await relay.store.record_events([event("opened", time.time())])
        async with asyncio.timeout(30):
            while not later.requests:
                await asyncio.sleep(0.05)
        later.secret = OLD_SECRET
        assert later.requests[0].json["type"] == "opened"
        assert verify_signature(later.requests[0].headers[SIGNATURE_HEADER], later.requests[0].body, OLD_SECRET)
        assert receiver.requests == []     # "app" wants alerts only
    finally:
        await relay.stop(grace=1)
        await later.stop()


async def test_expired_and_dropped_recipients_have_their_events(relays: RelayFactory, store_url: str) -> None:
    sink = SinkServer(SinkConfig(starttls="off"))
    await sink.start()
    sink.set_rule("late@dest.example", "451 4.3.2 come back tomorrow")
    try:
        running = await relays.start(
            store_url=store_url, server={"role": "all"}, chain={"plugins": ["blacklist"]},
            plugins={"blacklist": {"action": "drop"}},
            delivery={"routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}},
                      # The next try (in an hour) would fall after the lifetime: the first 451 expires it.
                      "retry": {"schedule": "1h*", "max_lifetime": 60.0, "delay_warning_after": 0}})
        await running.store.add_suppression(Suppression("gone@dest.example", "address", "complaint", "test",
                                                        time.time()))
        client = await RawClient.connect(running.ports["relay"])
        await client.greeting()
        await client.ehlo()
        reply = await client.mail("", ["late@dest.example", "gone@dest.example"], b"Subject: x\r\n\r\nHi\r\n")
        await client.close()
        assert reply.code == 250, reply
        async with asyncio.timeout(60):
            while len(await running.store.list_events(type="expired")) + len(
                    await running.store.list_events(type="dropped")) < 2:
                await asyncio.sleep(0.05)
    finally:
        await sink.stop()
    [expired] = await running.store.list_events(type="expired")
    assert expired.recipient == "late@dest.example"
    assert (expired.data["status"], expired.data["bounce_type"], expired.data["sender_domain"]) == ("4.4.7", "soft", "")
    assert "come back tomorrow" in expired.data["reply"]
    [dropped] = await running.store.list_events(type="dropped")
    assert dropped.recipient == "gone@dest.example" and "complaint" in dropped.data["reason"]
    states = {r.address: r.state.value for r in await running.store.recipients_of(expired.message_id or "")}
    assert states == {"late@dest.example": "expired", "gone@dest.example": "deleted"}

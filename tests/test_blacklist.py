"""The blacklist plugin end to end: a real relay (both stores), real SMTP clients, and for delivery the
relay's own delivery loop sending to a real SMTP sink on loopback.

Nothing here is timed: tests that wait for the delivery loop poll the store for a state with a generous
bound, and every assertion is about what happened, not how fast.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from relay.plugins.blacklist import BlacklistConfig
from relay.policies.bounce import BounceClassifier, Reply

from relay.plugin import Suppression
from relay.sink import SinkConfig, SinkServer
from relay.store.base import RecipientRow, RecipientState
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

SENDER = "app@sender.example"
BODY = b"From: app@sender.example\r\nTo: someone@dest.example\r\nSubject: hello\r\n\r\nHello.\r\n"
GENERIC = "5.7.1 Recipient address rejected"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    server = SinkServer(SinkConfig(starttls="off"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def start(relays: RelayFactory, store_url: str, *, sink: SinkServer | None = None,
                **config: Any) -> RunningRelay:
    """A relay with the blacklist in its chain; with a sink, also its delivery loop sending there."""
    sections: dict[str, Any] = {"chain": {"plugins": ["blacklist"]}, "plugins": {"blacklist": config}}
    if sink is not None:
        sections["server"] = {"role": "all"}
        sections["delivery"] = {
            "routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}},
            "retry": {"schedule": "1s*", "delay_warning_after": 0}, "idle_timeout": 0.5}
    return await relays.start(store_url=store_url, **sections)


def entry(value: str, kind: Any = "address", *, reason: str = "manual", scope: str = "",
          expires_at: float | None = None) -> Suppression:
    return Suppression(value=value, kind=kind, reason=reason, source="test", created_at=time.time(),
                       expires_at=expires_at, scope=scope)


async def session(running: RunningRelay, sender: str = SENDER, *, utf8: bool = False) -> RawClient:
    client = await RawClient.connect(running.ports["relay"])
    assert (await client.greeting()).code == 220
    await client.ehlo()
    reply = await client.cmd(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
    assert reply.code == 250, reply
    return client


async def send(running: RunningRelay, recipients: list[str]) -> str:
    """One message accepted for every recipient; its queue id."""
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    reply = await client.mail(SENDER, recipients, BODY)
    assert reply.code == 250, reply
    await client.close()
    return reply.text.rsplit(" ", 1)[1]


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


async def recipient(running: RunningRelay, queue_id: str, address: str) -> RecipientRow:
    [row] = [r for r in await running.store.recipients_of(queue_id) if r.address == address]
    return row


def delivered_to(sink: SinkServer) -> list[str]:
    return [rcpt for message in sink.received if message.mail_from for rcpt in message.rcpt_tos]


# -- RCPT ------------------------------------------------------------------------------------------------


async def test_suppressed_address_and_domain_are_rejected_at_rcpt(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url)
    await running.store.add_suppression(entry("Blocked@Example.org", reason="complaint"))
    await running.store.add_suppression(entry("blocked.example", "domain"))
    client = await session(running)
    for address in ("blocked@example.org", "anyone@BLOCKED.example"):
        reply = await client.cmd(f"RCPT TO:<{address}>")
        # The same generic text whatever the reason: a client must not learn of a complaint.
        assert (reply.code, reply.text) == (550, GENERIC), reply
    assert (await client.cmd("RCPT TO:<ok@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<someone@sub.blocked.example>")).code == 250  # exact domain only
    assert (await client.cmd("DATA")).code == 354
    reply = await client.cmd(BODY + b".")
    assert reply.code == 250
    queue_id = reply.text.rsplit(" ", 1)[1]
    rows = await running.store.recipients_of(queue_id)
    assert sorted(r.address for r in rows) == ["ok@example.org", "someone@sub.blocked.example"]


async def test_case_and_idna_spellings_still_match(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url)
    await running.store.add_suppression(entry("Mixed.Case@Example.NET"))
    await running.store.add_suppression(entry("jörg@bücher.example"))
    await running.store.add_suppression(entry("xn--strae-oqa.example", "domain"))
    client = await session(running, utf8=True)
    for address in ("mixed.case@example.net", "MIXED.CASE@EXAMPLE.NET", "JÖRG@xn--bcher-kva.example",
                    "jörg@BÜCHER.example", "x@Straße.example", "y@XN--STRAE-OQA.EXAMPLE"):
        reply = await client.cmd(f"RCPT TO:<{address}>")
        assert (reply.code, reply.text) == (550, GENERIC), (address, reply)
    # The stdlib's IDNA 2003 would map ß to ss: strasse.example is another domain.
    assert (await client.cmd("RCPT TO:<x@strasse.example>")).code == 250


async def test_expired_and_other_senders_entries_do_not_match(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url)
    await running.store.add_suppression(entry("old@example.org", reason="hard_bounce", expires_at=time.time() - 1))
    await running.store.add_suppression(entry("soon@example.org", reason="hard_bounce",
                                              expires_at=time.time() + 3600))
    await running.store.add_suppression(entry("unsub@example.org", reason="unsubscribe", scope="sender.example"))
    await running.store.add_suppression(entry("other@example.org", reason="unsubscribe", scope="shop.example"))
    client = await session(running)
    assert (await client.cmd("RCPT TO:<old@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<soon@example.org>")).code == 550
    assert (await client.cmd("RCPT TO:<unsub@example.org>")).code == 550   # unsubscribed from this sender
    assert (await client.cmd("RCPT TO:<other@example.org>")).code == 250   # only from another sender


async def test_client_ip_on_the_list_is_refused_at_connect(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url)
    await running.store.add_suppression(entry("127.0.0.1", "ip", reason="other"))
    client = await RawClient.connect(running.ports["relay"])
    greeting = await client.greeting()
    assert (greeting.code, greeting.text) == (554, "5.7.1 Access denied")
    assert await client.closed()


async def test_ip_check_can_be_turned_off(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url, check_ip=False)
    await running.store.add_suppression(entry("127.0.0.1", "ip", reason="other"))
    client = await RawClient.connect(running.ports["relay"])
    assert (await client.greeting()).code == 220


async def test_a_store_failure_answers_451_never_accepts(relays: RelayFactory, tmp_path: Path) -> None:
    running = await start(relays, f"sqlite:///{tmp_path}/queue.db", check_ip=False)
    client = await session(running)
    await running.store.close()  # the lookup can no longer be made
    reply = await client.cmd("RCPT TO:<anyone@example.org>")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")


# -- drop mode and delivery --------------------------------------------------------------------------------


async def test_drop_mode_accepts_and_never_delivers(relays: RelayFactory, store_url: str,
                                                    sink: SinkServer) -> None:
    running = await start(relays, store_url, sink=sink, action="drop")
    await running.store.add_suppression(entry("dropped@dest.example", reason="complaint"))
    queue_id = await send(running, ["dropped@dest.example", "kept@dest.example"])  # both accepted
    await wait_until(lambda: _state(running, queue_id, "dropped@dest.example", RecipientState.DELETED))
    await wait_until(lambda: _state(running, queue_id, "kept@dest.example", RecipientState.DELIVERED))
    assert delivered_to(sink) == ["kept@dest.example"]
    dropped = await recipient(running, queue_id, "dropped@dest.example")
    assert dropped.attempts == 0 and await running.store.attempts_of(dropped.id) == []
    # No DSN: nothing else was ever queued (a DSN is queued with the results that cause it).
    assert sum((await running.store.count_by_state()).values()) == 2


async def test_recipient_suppressed_after_queueing_is_not_sent(relays: RelayFactory, store_url: str,
                                                               sink: SinkServer) -> None:
    sink.set_rule("later@dest.example", "451 4.3.0 not now")
    running = await start(relays, store_url, sink=sink)
    queue_id = await send(running, ["later@dest.example", "now@dest.example"])
    await wait_until(lambda: _state(running, queue_id, "now@dest.example", RecipientState.DELIVERED))

    async def deferred_once() -> bool:
        row = await recipient(running, queue_id, "later@dest.example")
        return row.state == RecipientState.QUEUED and row.attempts >= 1

    await wait_until(deferred_once)
    await running.store.add_suppression(entry("LATER@dest.example", reason="complaint"))
    sink.clear_rules()  # the destination would take it now: only the suppression stops it
    await wait_until(lambda: _state(running, queue_id, "later@dest.example", RecipientState.BOUNCED))
    row = await recipient(running, queue_id, "later@dest.example")
    assert row.last_reply is not None and GENERIC in row.last_reply
    last = max(await running.store.attempts_of(row.id), key=lambda a: a.started_at)
    assert (last.mx_host, last.category, last.outcome) == (None, "plugin_rejected", "permanent")
    assert "later@dest.example" not in delivered_to(sink)
    # The sender hears of it as if it had been refused at RCPT: a DSN with the generic reply.
    [dsn] = await _dsns(sink, 1)
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "later@dest.example" in text and "5.7.1" in text and "complaint" not in text


async def test_hard_bounce_feeds_the_list_but_a_spam_block_does_not(relays: RelayFactory, store_url: str,
                                                                    sink: SinkServer) -> None:
    spam_reply = "550 5.7.1 Service unavailable; client host blocked using Spamhaus"
    classifier = BounceClassifier.default()
    assert classifier.classify(Reply.parse(spam_reply)).category == "spam_block"
    assert classifier.classify(Reply.parse("550 5.1.1 no such user")).category == "invalid_recipient"
    sink.set_rule("spam@dest.example", spam_reply)
    sink.set_rule("bad@dest.example", "550 5.1.1 no such user")
    running = await start(relays, store_url, sink=sink)
    before = time.time()
    # spam@ first: observers run in recipient order, so once bad@'s entry exists spam@ was seen too.
    queue_id = await send(running, ["spam@dest.example", "bad@dest.example"])
    await wait_until(lambda: running.store.find_suppression("Bad@dest.example"))
    found = await running.store.find_suppression("bad@dest.example")
    assert found is not None
    assert (found.kind, found.value, found.reason, found.source, found.scope) == (
        "address", "bad@dest.example", "hard_bounce", "delivery", "")
    assert found.expires_at is not None and found.expires_at - found.created_at == 30 * 86400.0
    assert found.created_at >= before
    assert await running.store.find_suppression("spam@dest.example") is None
    [event] = await running.store.list_events(type="suppressed")
    assert (event.recipient, event.message_id) == ("bad@dest.example", queue_id)
    assert event.data == {"value": "bad@dest.example", "kind": "address", "reason": "hard_bounce",
                          "source": "delivery", "scope": "", "expires_at": found.expires_at}
    assert await running.store.count_suppressions() == 1
    # Next time the address is refused at RCPT.
    client = await session(running)
    assert (await client.cmd("RCPT TO:<bad@dest.example>")).code == 550


async def test_public_suppress_adds_with_the_reasons_lifetime_and_records_an_event(
        relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url, hard_bounce_ttl=3600.0)
    assert running.relay.chain is not None
    plugin = running.relay.chain.plugins[0].host.extra["blacklist"]
    complaint = await plugin.suppress("Someone@Example.org", "complaint", source="fbl", message_id="Q1")
    unsubscribe = await plugin.suppress("reader@example.org", "unsubscribe", source="tracking",
                                        scope="News.Sender.Example")
    bounce = await plugin.suppress("gone@example.org", "hard_bounce", source="delivery", now=1000.0)
    assert (complaint.value, complaint.expires_at) == ("someone@example.org", None)
    assert (unsubscribe.scope, unsubscribe.expires_at) == ("news.sender.example", None)
    assert bounce.expires_at == 4600.0
    assert await running.store.find_suppression("someone@example.org") == complaint
    assert await running.store.find_suppression("reader@example.org") is None
    assert await running.store.find_suppression("reader@example.org", scope="news.sender.example") == unsubscribe
    events = await running.store.list_events(type="suppressed")
    assert sorted((e.recipient, e.data["reason"], e.message_id) for e in events) == [
        ("gone@example.org", "hard_bounce", None), ("reader@example.org", "unsubscribe", None),
        ("someone@example.org", "complaint", "Q1")]
    assert len({e.id for e in events}) == 3


async def _state(running: RunningRelay, queue_id: str, address: str, state: RecipientState) -> bool:
    return (await recipient(running, queue_id, address)).state == state


async def _dsns(sink: SinkServer, count: int) -> list[bytes]:
    """The first ``count`` messages the sink got from the null sender (DSNs), waiting for them."""
    await wait_until(lambda: sum(1 for m in sink.received if not m.mail_from) >= count)
    return [m.data for m in sink.received if not m.mail_from][:count]


def test_the_example_configuration_documents_the_defaults() -> None:
    """relay.toml.example's commented [plugins.blacklist] block parses, validates and states the defaults."""
    text = (Path(__file__).parent.parent / "relay.toml.example").read_text()
    block = text[text.index("# [plugins.blacklist]"):]
    block = block[:block.index("\n\n")]
    code = [line[2:] for line in block.splitlines() if re.match(r"# (\[plugins\.blacklist\]|[a-z_]+ = )", line)]
    table = tomllib.loads("\n".join(code))["plugins"]["blacklist"]
    assert set(table) == set(BlacklistConfig.model_fields)
    assert BlacklistConfig.model_validate(table) == BlacklistConfig()

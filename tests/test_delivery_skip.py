"""``AttemptContext.skip``: a chain step takes single recipients out of an attempt, the others are sent.

A real delivery service over both stores sends to a real sink through a host route; the chain here is a
small stand-in that skips recipients by address (the blacklist plugin's use is in test_blacklist.py).
"""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from relay.policies.bounce import BounceClassifier, Classification, Reply
from relay.policies.retry import RetryPolicy, RetrySchedule
from relay.policies.routing import Router

from relay.delivery.config import DeliverySettings, TimeoutSettings
from relay.delivery.mx import MxResolver
from relay.delivery.scheduler import AttemptContext, DeliveryService
from relay.plugin import Action, Verdict
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import NewMessage, NewRecipient, QueueStore, RecipientRow, RecipientState

SENDER = "app@sender.example"
BODY = b"From: app@sender.example\r\nSubject: skip\r\n\r\nhello\r\n"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    url = f"sqlite:///{tmp_path}/queue.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = await open_store(StoreSettings(url=url, pool_size=3))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    server = SinkServer(SinkConfig(starttls="off"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class SkippingChain:
    """Skips recipients by address with the verdict given; records the observers' calls."""

    def __init__(self, verdicts: dict[str, Verdict]) -> None:
        self.verdicts = verdicts
        self.seen: list[list[str]] = []
        self.events: list[tuple[str, str, str]] = []

    async def before_attempt(self, ctx: AttemptContext) -> Verdict | None:
        self.seen.append([r.address for r in ctx.recipients])
        for rcpt in ctx.recipients:
            if rcpt.address in self.verdicts:
                ctx.skip[rcpt.id] = self.verdicts[rcpt.address]
        return None

    async def delivered(self, ctx: AttemptContext, recipient: RecipientRow, reply: Reply) -> None:
        self.events.append(("delivered", recipient.address, ""))

    async def deferred(self, ctx: AttemptContext, recipient: RecipientRow, classification: Classification,
                       next_attempt_at: float) -> None:
        self.events.append(("deferred", recipient.address, classification.category))

    async def bounced(self, ctx: AttemptContext, recipient: RecipientRow,
                      classification: Classification) -> None:
        self.events.append(("bounced", recipient.address, classification.category))


def service(store: QueueStore, sink: SinkServer, chain: SkippingChain) -> DeliveryService:
    timeouts = TimeoutSettings(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data_init=5, data_block=5,
                               data_end=5)
    return DeliveryService(
        store, DeliverySettings(timeouts=timeouts, idle_timeout=0.5),
        resolver=MxResolver(["127.0.0.1:53"], timeout=1.0, allow_private=True),
        classifier=BounceClassifier.default(),
        retry_policy=RetryPolicy(RetrySchedule.parse("1h*"), 86400.0, None),
        router=Router.from_config({}, {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}),
        chain=chain, hostname="relay.test")


async def enqueue(store: QueueStore, *rcpts: str) -> NewMessage:
    message = NewMessage(id=f"skip{time.time_ns()}", sender=SENDER, recipients=[NewRecipient(r) for r in rcpts],
                         data=BODY, received_at=time.time())
    await store.enqueue(message)
    return message


async def test_skipped_recipients_are_settled_by_their_verdicts_and_the_rest_is_sent(
        store: QueueStore, sink: SinkServer) -> None:
    retry_at = time.time() + 7200
    chain = SkippingChain({
        "rejected@dest.example": Verdict.reject("Recipient address rejected", reason="test"),
        "later@dest.example": Verdict.tempfail("not now", retry_at=retry_at),
        "dropped@dest.example": Verdict(Action.ACCEPT, 250, "2.0.0", "dropped", reason="test"),
        "ignored@dest.example": Verdict(Action.CONTINUE),
    })
    message = await enqueue(store, "rejected@dest.example", "later@dest.example", "dropped@dest.example",
                            "ignored@dest.example", "sent@dest.example")
    delivery = service(store, sink, chain)
    try:
        await delivery.run_once()
    finally:
        await delivery.stop(0)
    rows = {r.address: r for r in await store.recipients_of(message.id)}
    # One transaction, with only the recipients nobody skipped.
    [received] = [m for m in sink.received if m.mail_from]
    assert sorted(received.rcpt_tos) == ["ignored@dest.example", "sent@dest.example"]
    assert rows["sent@dest.example"].state == rows["ignored@dest.example"].state == RecipientState.DELIVERED

    rejected = rows["rejected@dest.example"]
    assert rejected.state == RecipientState.BOUNCED
    assert rejected.last_reply == "550 5.7.1 Recipient address rejected"
    [attempt] = await store.attempts_of(rejected.id)
    assert (attempt.category, attempt.outcome, attempt.mx_host) == ("plugin_rejected", "permanent", None)

    later = rows["later@dest.example"]
    assert (later.state, later.attempts, later.next_attempt_at) == (RecipientState.QUEUED, 0, retry_at)
    assert later.last_reply == "deferred: 451 4.7.1 not now"
    assert await store.attempts_of(later.id) == []

    dropped = rows["dropped@dest.example"]
    assert (dropped.state, dropped.attempts) == (RecipientState.DELETED, 0)
    assert await store.attempts_of(dropped.id) == []

    observed = sorted(e for e in chain.events if e[1].endswith("@dest.example"))  # not the DSN's delivery
    assert observed == [("bounced", "rejected@dest.example", "plugin_rejected"),
                                    ("delivered", "ignored@dest.example", ""),
                                    ("delivered", "sent@dest.example", "")]
    # Delivered: the two recipients and the DSN to the sender.
    assert (delivery.stats.delivered, delivery.stats.bounced, delivery.stats.dropped) == (3, 1, 1)
    # The DSN (queued with the bounce, delivered in the same run) names the rejected recipient only.
    [dsn] = [m.data for m in sink.received if not m.mail_from]
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status").as_string()
    assert "rejected@dest.example" in status and "later@dest.example" not in status
    assert "dropped@dest.example" not in status


async def test_when_every_recipient_is_skipped_nothing_is_sent(store: QueueStore, sink: SinkServer) -> None:
    chain = SkippingChain({"a@dest.example": Verdict(Action.ACCEPT, 250, "2.0.0", "dropped"),
                           "b@dest.example": Verdict(Action.ACCEPT, 250, "2.0.0", "dropped")})
    message = await enqueue(store, "a@dest.example", "b@dest.example")
    delivery = service(store, sink, chain)
    try:
        await delivery.run_once()
    finally:
        await delivery.stop(0)
    assert {r.state for r in await store.recipients_of(message.id)} == {RecipientState.DELETED}
    assert sink.connections_opened == 0
    assert chain.seen == [["a@dest.example", "b@dest.example"]]


"""The outbox and its consumers on both stores: events written with their state change, webhook fan-out,
leased deliveries, dead letters and replay, endpoint health, event tallies, hourly stats and alerts.

Every test runs once per store (SQLite in tmp_path, a fresh Postgres database). Times are given explicitly
(``now``), so nothing depends on how fast the test runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay.ids import new_queue_id
from relay.settings import StoreSettings
from relay.store import (
    AttemptRecord,
    NewMessage,
    NewRecipient,
    QueueStore,
    RecipientResult,
    RecipientState,
    StoreError,
    open_store,
)
from relay.store.base import Event, HourlyStats, WebhookResult, WebhookTarget

OpenStore = Callable[..., Awaitable[QueueStore]]
OWNER = "node-a:1:test"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spool/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def open_stores(store_url: str) -> AsyncIterator[OpenStore]:
    opened: list[QueueStore] = []

    async def opener() -> QueueStore:
        store = await open_store(StoreSettings(url=store_url, pool_size=3))
        opened.append(store)
        return store

    yield opener
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(open_stores: OpenStore) -> QueueStore:
    return await open_stores()


def message(*rcpts: str, sender: str = "app@Sender.example", received_at: float | None = None) -> NewMessage:
    msg_id = new_queue_id()
    return NewMessage(id=msg_id, sender=sender, recipients=[NewRecipient(a) for a in rcpts],
                      data=f"Subject: {msg_id}\r\n\r\nbody\r\n".encode(),
                      received_at=time.time() if received_at is None else received_at)


def event(type_: str, created_at: float, *, message_id: str | None = None, recipient: str | None = None,
          **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, type=type_, created_at=created_at, message_id=message_id,
                 recipient=recipient, data=data)


async def claim_all(store: QueueStore, now: float) -> dict[str, int]:
    claims = await store.claim_due(now + 1, 100, OWNER, 300)
    return {c.recipient.address: c.recipient.id for c in claims}


# -- events with their state change ---------------------------------------------------------------------


async def test_enqueue_writes_the_queued_event_with_the_message(store: QueueStore) -> None:
    many = message("a@Dest.example", "b@other.example", "c@dest.example")
    one = message("solo@dest.example", sender="")
    await store.enqueue(many)
    await store.enqueue(one)

    queued = {e.message_id: e for e in await store.list_events(type="queued")}
    assert set(queued) == {many.id, one.id}
    event_of_many = queued[many.id]
    assert (event_of_many.id, event_of_many.recipient, event_of_many.created_at) == (
        f"q-{many.id}", None, many.received_at)
    assert event_of_many.data == {
        "sender": "app@Sender.example", "sender_domain": "sender.example", "size": len(many.data),
        "recipients": ["a@Dest.example", "b@other.example", "c@dest.example"],
        "domains": {"dest.example": 2, "other.example": 1}, "auth_user": None, "client_ip": ""}
    assert (queued[one.id].recipient, queued[one.id].data["sender_domain"]) == ("solo@dest.example", "")


async def test_a_refused_enqueue_writes_no_event(store: QueueStore) -> None:
    first = message("a@dest.example")
    await store.enqueue(first)
    clash = NewMessage(id=first.id, sender="x@y.example", recipients=[NewRecipient("c@dest.example")],
                       data=b"x\r\n", received_at=time.time())
    with pytest.raises(StoreError):
        await store.enqueue(clash)
    assert [e.recipient for e in await store.list_events(type="queued")] == ["a@dest.example"]
    assert [e.message_id for e in await store.list_events(type="queued")] == [first.id]


def delivered(recipient_id: int, now: float, *events: Event, outcome: str | None = "delivered") -> RecipientResult:
    attempt = AttemptRecord(recipient_id, now, 0.1, "mx.dest.example", None, "250 ok", None,
                            outcome)  # type: ignore[arg-type]  # None: a row the database refuses (see below)
    return RecipientResult(recipient_id, RecipientState.DELIVERED, None, "250 ok", attempt, events=events)


async def test_record_results_writes_the_events_of_applied_results(store: QueueStore) -> None:
    now = time.time()
    msg = message("a@dest.example", "b@dest.example")
    await store.enqueue(msg)
    ids = await claim_all(store, now)
    ok = event("delivered", now, message_id=msg.id, recipient="a@dest.example", reply="250 ok")
    # b's lease belongs to someone else by the time the result arrives: neither state nor event.
    stray = event("delivered", now, message_id=msg.id, recipient="b@dest.example")
    await store.release([ids["b@dest.example"]], OWNER)

    await store.record_results([delivered(ids["a@dest.example"], now, ok),
                                delivered(ids["b@dest.example"], now, stray)], OWNER)

    assert [(e.id, e.recipient, e.data) for e in await store.list_events(type="delivered")] == [
        (ok.id, "a@dest.example", {"reply": "250 ok"})]
    states = {r.address: r.state for r in await store.recipients_of(msg.id)}
    assert states == {"a@dest.example": RecipientState.DELIVERED, "b@dest.example": RecipientState.QUEUED}


async def test_an_aborted_transaction_writes_neither_state_nor_event(store: QueueStore) -> None:
    now = time.time()
    msg = message("a@dest.example", "b@dest.example")
    await store.enqueue(msg)
    ids = await claim_all(store, now)
    good = delivered(ids["a@dest.example"], now, event("delivered", now, message_id=msg.id))
    # The second result's attempt row breaks a NOT NULL constraint inside the transaction: all rolls back.
    bad = delivered(ids["b@dest.example"], now, event("delivered", now, message_id=msg.id), outcome=None)

    with pytest.raises(StoreError):
        await store.record_results([good, bad], OWNER)

    assert await store.list_events(type="delivered") == []
    assert {r.state for r in await store.recipients_of(msg.id)} == {RecipientState.QUEUED}
    # Retried without the bad row, the same events are written once.
    await store.record_results([good], OWNER)
    assert [e.id for e in await store.list_events(type="delivered")] == [good.events[0].id]


async def test_record_events_is_idempotent_by_id(store: QueueStore) -> None:
    now = time.time()
    first = event("complained", now, recipient="x@dest.example")
    await store.record_events([first, event("alert", now)])
    await store.record_events([first])
    assert len(await store.list_events(type="complained")) == 1
    assert await store.get_event(first.id) == first
    assert await store.get_event("missing") is None


# -- webhook fan-out and deliveries ----------------------------------------------------------------------

ALL = WebhookTarget("all")
BOUNCES = WebhookTarget("bounces", frozenset({"bounced", "complained"}))


async def test_dispatch_fans_out_per_filter_once(store: QueueStore) -> None:
    now = time.time()
    await store.record_events([event("bounced", now - 2), event("opened", now - 1), event("complained", now)])

    assert await store.dispatch_events([ALL, BOUNCES], now + 1, 100) == 3
    assert await store.dispatch_events([ALL, BOUNCES], now + 1, 100) == 0  # taken once
    waiting_all = await store.list_webhook_deliveries(endpoint="all", dead=False)
    waiting_bounces = await store.list_webhook_deliveries(endpoint="bounces", dead=False)
    assert [d.event.type for d in waiting_all] == ["bounced", "opened", "complained"]
    assert sorted(d.event.type for d in waiting_bounces) == ["bounced", "complained"]
    assert {d.attempts for d in waiting_all} == {0}


async def test_events_not_yet_due_are_not_dispatched(store: QueueStore) -> None:
    now = time.time()
    await store.record_events([event("opened", now + 60)])
    assert await store.dispatch_events([ALL], now, 100) == 0
    assert await store.dispatch_events([ALL], now + 61, 100) == 1


async def test_concurrent_dispatchers_never_take_one_event_twice(open_stores: OpenStore) -> None:
    one, two = await open_stores(), await open_stores()
    now = time.time()
    await one.record_events([event("delivered", now - i * 0.001) for i in range(300)])

    counts = await asyncio.gather(*(s.dispatch_events([ALL], now + 1, 25) for s in (one, two) for _ in range(10)))

    assert sum(counts) == 300
    waiting = await one.list_webhook_deliveries(endpoint="all", dead=False, limit=1000)
    assert len(waiting) == 300 and len({d.event.id for d in waiting}) == 300


async def test_a_delivery_is_leased_to_one_claimer(open_stores: OpenStore) -> None:
    one, two = await open_stores(), await open_stores()
    now = time.time()
    await one.record_events([event("delivered", now - 1) for _ in range(5)])
    await one.dispatch_events([ALL], now, 100)

    first, second = await asyncio.gather(one.claim_webhook_deliveries("all", now, 3, "a", 30),
                                         two.claim_webhook_deliveries("all", now, 3, "b", 30))
    assert len(first) + len(second) == 5
    assert not {d.event.id for d in first} & {d.event.id for d in second}
    assert await one.claim_webhook_deliveries("all", now + 10, 10, "c", 30) == []  # leases running
    # A crashed holder's rows come back once its lease has run out.
    assert len(await two.claim_webhook_deliveries("all", now + 31, 10, "c", 30)) == 5


async def test_webhook_results_only_count_from_the_lease_holder(store: QueueStore) -> None:
    now = time.time()
    await store.record_events([event("delivered", now - 1) for _ in range(3)])
    await store.dispatch_events([ALL], now, 100)
    ok, retry, dead = await store.claim_webhook_deliveries("all", now, 10, "a", 30)

    await store.record_webhook_results([
        WebhookResult("all", ok.event.id, delivered=True),
        WebhookResult("all", retry.event.id, delivered=False, next_attempt_at=now + 60, error="HTTP 500"),
        WebhookResult("all", dead.event.id, delivered=False, dead=True, error="HTTP 503"),
    ], "someone-else", now)
    assert len(await store.list_webhook_deliveries(endpoint="all", dead=False)) == 3  # ignored

    await store.record_webhook_results([
        WebhookResult("all", ok.event.id, delivered=True),
        WebhookResult("all", retry.event.id, delivered=False, next_attempt_at=now + 60, error="HTTP 500"),
        WebhookResult("all", dead.event.id, delivered=False, dead=True, error="HTTP 503"),
    ], "a", now)

    waiting = await store.list_webhook_deliveries(endpoint="all", dead=False)
    assert [(d.event.id, d.attempts, d.next_attempt_at, d.last_error) for d in waiting] == [
        (retry.event.id, 1, now + 60, "HTTP 500")]
    letters = await store.list_webhook_deliveries(dead=True)
    assert [(d.event.id, d.endpoint, d.dead_at, d.last_error) for d in letters] == [
        (dead.event.id, "all", now, "HTTP 503")]
    assert await store.claim_webhook_deliveries("all", now + 59, 10, "b", 30) == []
    assert [d.event.id for d in await store.claim_webhook_deliveries("all", now + 60, 10, "b", 30)] == [
        retry.event.id]


async def test_replay_by_id_since_and_dead_letters(store: QueueStore) -> None:
    now = time.time()
    old, new, other = event("bounced", now - 100), event("bounced", now - 10), event("opened", now - 5)
    await store.record_events([old, new, other])
    await store.dispatch_events([ALL], now, 100)
    claims = {d.event.id: d for d in await store.claim_webhook_deliveries("all", now, 10, "a", 30)}
    await store.record_webhook_results([
        WebhookResult("all", old.id, delivered=False, dead=True, error="x"),
        WebhookResult("all", new.id, delivered=False, dead=True, error="x"),
        WebhookResult("all", other.id, delivered=True),
    ], "a", now)
    assert len(claims) == 3

    # Dead letters since a time: only the dead, only the recent.
    assert await store.replay_webhook_deliveries([ALL], now + 1, since=now - 50) == 1
    waiting = await store.list_webhook_deliveries(endpoint="all", dead=False)
    assert [(d.event.id, d.attempts, d.created_at) for d in waiting] == [(new.id, 0, now + 1)]
    assert [d.event.id for d in await store.list_webhook_deliveries(dead=True)] == [old.id]

    # By id: whatever became of it, to every target wanting its type — also one that never had it.
    assert await store.replay_webhook_deliveries([ALL, BOUNCES], now + 2, event_ids=[other.id, old.id]) == 3
    assert {d.event.id for d in await store.list_webhook_deliveries(endpoint="all", dead=False)} == {
        new.id, other.id, old.id}
    assert [d.event.id for d in await store.list_webhook_deliveries(endpoint="bounces", dead=False)] == [old.id]

    # Everything since a time to a new target.
    assert await store.replay_webhook_deliveries([WebhookTarget("late")], now + 3, since=now - 50,
                                                 dead_only=False) == 2


async def test_replay_leaves_a_delivery_in_flight_alone(store: QueueStore) -> None:
    now = time.time()
    one = event("bounced", now - 1)
    await store.record_events([one])
    await store.dispatch_events([ALL], now, 100)
    [held] = await store.claim_webhook_deliveries("all", now, 10, "a", 30)
    assert await store.replay_webhook_deliveries([ALL], now + 1, event_ids=[one.id]) == 0
    await store.record_webhook_results([WebhookResult("all", one.id, delivered=True)], "a", now + 2)
    assert held.lease_until == now + 30


async def test_purging_events_removes_their_deliveries(store: QueueStore) -> None:
    now = time.time()
    await store.record_events([event("bounced", now - 1000), event("bounced", now - 1)])
    await store.dispatch_events([ALL], now, 100)
    assert await store.purge_events(now - 500) == 1
    assert len(await store.list_events()) == 1
    assert len(await store.list_webhook_deliveries(endpoint="all", dead=False)) == 1


async def test_endpoint_pauses_after_consecutive_failures_and_probes_after(store: QueueStore) -> None:
    now = time.time()
    outcome = store.record_endpoint_outcome
    health = await outcome("hook", successes=0, failures=2, now=now, pause_after=3, pause_for=60, error="HTTP 500")
    assert (health.consecutive_failures, health.paused_until, health.paused_now) == (2, None, False)
    health = await outcome("hook", successes=0, failures=1, now=now + 1, pause_after=3, pause_for=60,
                           error="HTTP 502")
    assert (health.paused_until, health.paused_now, health.last_error) == (now + 61, True, "HTTP 502")
    # Failures reported while paused (a batch that was in flight) do not pause it again.
    health = await outcome("hook", successes=0, failures=1, now=now + 2, pause_after=3, pause_for=60)
    assert (health.paused_until, health.paused_now) == (now + 61, False)
    # After the pause one failure is enough: the probe failed.
    health = await outcome("hook", successes=0, failures=1, now=now + 70, pause_after=3, pause_for=60)
    assert (health.paused_until, health.paused_now) == (now + 130, True)
    # A success resumes.
    health = await outcome("hook", successes=1, failures=0, now=now + 140, pause_after=3, pause_for=60)
    assert (health.consecutive_failures, health.paused_until, health.paused_now) == (0, None, False)
    [seen] = await store.endpoint_health()
    assert (seen.endpoint, seen.consecutive_failures, seen.paused_until) == ("hook", 0, None)


async def test_concurrent_outcomes_pause_an_endpoint_once(open_stores: OpenStore) -> None:
    one, two = await open_stores(), await open_stores()
    now = time.time()
    answers = await asyncio.gather(*(s.record_endpoint_outcome("hook", successes=0, failures=1, now=now,
                                                               pause_after=5, pause_for=60)
                                     for s in (one, two) for _ in range(10)))
    assert sum(a.paused_now for a in answers) == 1
    assert max(a.consecutive_failures for a in answers) == 20


# -- statistics and alerts -------------------------------------------------------------------------------


async def test_tally_counts_by_type_domain_and_bounce_type(store: QueueStore) -> None:
    hour = 1_700_000_000 // 3600 * 3600.0
    tracked = message("reader@dest.example", sender="news@brand.example", received_at=hour + 10)
    await store.enqueue(tracked)  # its queued event is in the hour too
    await store.enqueue(message("x@dest.example", "y@dest.example", "z@third.example", sender="ops@brand.example",
                                received_at=hour + 11))
    common = {"sender_domain": "brand.example", "domain": "dest.example"}
    await store.record_events([
        event("delivered", hour + 20, recipient="a@dest.example", **common),
        event("delivered", hour + 21, recipient="b@dest.example", **common),
        event("bounced", hour + 22, recipient="c@dest.example", bounce_type="hard", **common),
        event("bounced", hour + 23, recipient="d@other.example", bounce_type="soft", sender_domain="brand.example",
              domain="other.example"),
        # Tracking events carry no sender domain: it comes from their message.
        event("opened", hour + 30, message_id=tracked.id, recipient="reader@dest.example"),
        event("suppressed", hour + 40, recipient="c@dest.example"),   # not a volume
        event("delivered", hour + 3600, recipient="late@dest.example", **common),  # the next hour
    ])

    tally = {(t.type, t.sender_domain, t.domain, t.bounce_type): t.count
             for t in await store.tally_events(hour, hour + 3600)}

    assert tally == {
        ("queued", "brand.example", "dest.example", ""): 3,      # recipients, not messages
        ("queued", "brand.example", "third.example", ""): 1,
        ("delivered", "brand.example", "dest.example", ""): 2,
        ("bounced", "brand.example", "dest.example", "hard"): 1,
        ("bounced", "brand.example", "other.example", "soft"): 1,
        ("opened", "brand.example", "dest.example", ""): 1,
    }


async def test_hourly_stats_are_replaced_whole(store: QueueStore) -> None:
    hour = 1_700_000_000 // 3600 * 3600.0
    await store.replace_hourly_stats(hour, [HourlyStats("sender", hour, "a.example", sent=5),
                                            HourlyStats("destination", hour, "b.example", delivered=4)], hour + 5)
    await store.replace_hourly_stats(hour + 3600, [HourlyStats("sender", hour + 3600, "a.example", sent=1)],
                                     hour + 3605)
    await store.replace_hourly_stats(hour, [HourlyStats("sender", hour, "a.example", sent=7, clicked=2)], hour + 9)

    assert await store.read_hourly_stats("sender", hour, hour + 7200) == [
        HourlyStats("sender", hour, "a.example", sent=7, clicked=2),
        HourlyStats("sender", hour + 3600, "a.example", sent=1)]
    assert await store.read_hourly_stats("destination", hour, hour + 7200) == []
    assert await store.read_hourly_stats("sender", hour, hour + 7200, domain="b.example") == []
    assert await store.purge_hourly_stats(hour + 3600) == 1   # retention: the older hour goes
    assert [row.hour for row in await store.read_hourly_stats("sender", hour, hour + 7200)] == [hour + 3600]


async def test_an_alert_is_raised_once_per_period_unless_it_escalates(open_stores: OpenStore) -> None:
    one, two = await open_stores(), await open_stores()
    now = time.time()
    raised = await asyncio.gather(*(s.claim_alert("bounce_rate", "destination:x.example", "warning", now, 3600)
                                    for s in (one, two) for _ in range(5)))
    assert sum(raised) == 1
    assert not await one.claim_alert("bounce_rate", "destination:x.example", "warning", now + 10, 3600)
    assert await one.claim_alert("bounce_rate", "destination:y.example", "warning", now + 10, 3600)
    assert await one.claim_alert("bounce_rate", "destination:x.example", "critical", now + 20, 3600)
    assert not await one.claim_alert("bounce_rate", "destination:x.example", "critical", now + 30, 3600)
    assert not await one.claim_alert("bounce_rate", "destination:x.example", "warning", now + 40, 3600)
    assert await two.claim_alert("bounce_rate", "destination:x.example", "warning", now + 3620, 3600)

"""The operations part of the QueueStore contract (queue shape, admin selections and claims, wake-ups, event
look-ups, webhook backlog), on both stores: SQLite in tmp_path and a fresh Postgres database.

Times are passed explicitly (``now``), so nothing here depends on how fast it runs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import psycopg

from relay.ids import new_queue_id
from relay.store import NewMessage, NewRecipient, QueueStore, RecipientResult, RecipientState
from relay.store.base import Event, RecipientQuery, WebhookBacklog
from relay.store.sqlite import sqlite_path
from tests.test_store_contract import OpenStore, open_stores, settings_for, store, store_url

__all__ = ["open_stores", "settings_for", "store", "store_url"]  # fixtures shared with the contract tests

MINUTE = 60.0
EDGES = [5 * MINUTE, 10 * MINUTE, 20 * MINUTE]


def message(rcpts: tuple[str, ...], *, sender: str = "sender@example.org", received_at: float,
            msg_id: str | None = None) -> NewMessage:
    msg_id = msg_id or new_queue_id()
    return NewMessage(id=msg_id, sender=sender, recipients=[NewRecipient(a) for a in rcpts],
                      data=f"Subject: {msg_id}\r\n\r\nbody\r\n".encode(), received_at=received_at)


async def settle(store: QueueStore, owner: str, ids: list[int], state: RecipientState, now: float) -> None:
    """Lease the recipients as an admin command does and give them a state."""
    claims = await store.claim_recipients(ids, owner, 60, now=now, states=list(RecipientState))
    assert sorted(c.recipient.id for c in claims) == sorted(ids)
    await store.record_results([RecipientResult(i, state, None, None, None, count_attempt=False) for i in ids],
                               owner)


async def test_queue_shape_counts_by_state_domain_and_age(store: QueueStore) -> None:
    now = time.time()
    young = message(("a@one.example", "b@two.example"), received_at=now - 60)
    middle = message(("c@one.example",), received_at=now - 7 * MINUTE)
    old = message(("d@one.example", "e@two.example"), received_at=now - 3600)
    for msg in (young, middle, old):
        await store.enqueue(msg)
    held = [r.id for r in await store.recipients_of(old.id) if r.domain == "two.example"]
    await settle(store, "admin", held, RecipientState.HELD, now)
    delivered = [r.id for r in await store.recipients_of(middle.id)]
    await settle(store, "admin", delivered, RecipientState.DELIVERED, now)

    cells = {(c.state, c.bucket): (c.count, c.oldest) for c in await store.queue_shape(now, EDGES)}
    assert cells == {("queued", 0): (2, young.received_at), ("queued", 3): (1, old.received_at),
                     ("held", 3): (1, old.received_at)}
    by_domain = {(c.state, c.domain, c.bucket): c.count for c in await store.queue_shape(now, EDGES, by_domain=True)}
    assert by_domain == {("queued", "one.example", 0): 1, ("queued", "two.example", 0): 1,
                         ("queued", "one.example", 3): 1, ("held", "two.example", 3): 1}
    every = await store.queue_shape(now, EDGES, states=list(RecipientState))
    assert {(c.state, c.bucket): c.count for c in every}[("delivered", 1)] == 1
    assert await store.queue_shape(now, EDGES, states=[]) == []


async def test_find_recipients_filters_and_pages(store: QueueStore) -> None:
    now = time.time()
    first = message(("x@one.example", "Y@Two.Example"), sender="Alice@Shop.Example", received_at=now - 7200)
    second = message(("z@one.example",), sender="bob@other.example", received_at=now - 60)
    await store.enqueue(first)
    await store.enqueue(second)

    async def find(**fields: Any) -> list[str]:
        entries = await store.find_recipients(RecipientQuery(**fields), now=now)
        return [e.recipient.address for e in entries]

    assert await find() == ["x@one.example", "Y@Two.Example", "z@one.example"]
    assert await find(domain="TWO.example") == ["Y@Two.Example"]
    assert await find(sender="alice@shop.example") == ["x@one.example", "Y@Two.Example"]
    assert await find(sender="shop.example") == ["x@one.example", "Y@Two.Example"]
    assert await find(sender="op.example") == []  # a domain matches whole, never a suffix
    assert await find(sender="%.example") == []  # LIKE wildcards are literal
    assert await find(recipient="y@two.example") == ["Y@Two.Example"]
    assert await find(message_ids=(second.id,)) == ["z@one.example"]
    assert await find(received_before=now - 3600) == ["x@one.example", "Y@Two.Example"]
    assert await find(states=(RecipientState.HELD,)) == []

    page1 = await store.find_recipients(RecipientQuery(), now=now, limit=2)
    page2 = await store.find_recipients(RecipientQuery(), now=now, limit=2, after_id=page1[-1].recipient.id)
    assert [e.recipient.address for e in page1 + page2] == ["x@one.example", "Y@Two.Example", "z@one.example"]
    entry = page1[0]
    assert (entry.sender, entry.received_at, entry.size, entry.leased) == (
        "Alice@Shop.Example", first.received_at, first.size, False)

    await store.claim_due(now, 1, "worker", 300)
    leased = [e.leased for e in await store.find_recipients(RecipientQuery(), now=now)]
    assert leased == [True, False, False]
    assert [e.leased for e in await store.find_recipients(RecipientQuery(), now=now + 301)] == [False] * 3


async def test_claim_recipients_takes_only_free_rows_in_the_asked_states(store: QueueStore) -> None:
    now = time.time()
    msg = message(("a@one.example", "b@one.example", "c@one.example"), received_at=now - 10)
    await store.enqueue(msg)
    a, b, c = [r.id for r in await store.recipients_of(msg.id)]
    (worker_claim,) = await store.claim_due(now, 1, "worker", 300)
    assert worker_claim.recipient.id == a
    await settle(store, "admin", [c], RecipientState.HELD, now)

    claims = await store.claim_recipients([a, b, c], "admin", 60, now=now)
    assert [cl.recipient.id for cl in claims] == [b, c]  # a is the worker's
    assert claims[0].message.id == msg.id and claims[0].lease_until == now + 60
    assert await store.claim_recipients([b], "other", 60, now=now) == []  # leased by admin now
    # Once the admin's lease has run out, the held row can be taken again — in the asked states only.
    later = await store.claim_recipients([b, c], "other", 60, now=now + 400, states=[RecipientState.HELD])
    assert [cl.recipient.id for cl in later] == [c]
    await store.release([c], "other")
    # The worker's results still count; the admin's lease on b is its own.
    await store.record_results([RecipientResult(a, RecipientState.DELIVERED, None, "250 ok", None)], "worker")
    await store.record_results([RecipientResult(b, RecipientState.DELETED, None, "deleted", None,
                                                count_attempt=False)], "admin")
    states = {r.id: r.state for r in await store.recipients_of(msg.id)}
    assert states[a] is RecipientState.DELIVERED and states[b] is RecipientState.DELETED
    assert await store.claim_recipients([a, b], "admin", 60, now=now + 1000) == []  # final states
    assert await store.claim_recipients([], "admin", 60, now=now) == []


async def test_notify_new_mail_wakes_a_waiter(store: QueueStore) -> None:
    waiter = asyncio.ensure_future(store.wait_for_new_mail(30))
    await asyncio.sleep(0)
    await store.notify_new_mail()
    assert await waiter is True


async def test_a_commit_by_another_process_wakes_a_sqlite_waiter(store_url: str, store: QueueStore) -> None:
    """SQLite has no cross-process signal: the wait polls the file's data version."""
    if not store_url.startswith("sqlite"):
        # Postgres: a NOTIFY from another connection (what another process sends) wakes the waiter.
        waiter = asyncio.ensure_future(store.wait_for_new_mail(30))
        await asyncio.sleep(0)
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('relay_new_mail', '')")
        assert await waiter is True
        return
    waiter = asyncio.ensure_future(store.wait_for_new_mail(30))
    await asyncio.sleep(0)
    while not waiter.done():
        # Another connection writes (as `relay queue retry` in another process does) until it is seen.
        await asyncio.to_thread(_touch_sqlite, store_url)
        await asyncio.wait({waiter}, timeout=0.5)
    assert waiter.result() is True


def _touch_sqlite(url: str) -> None:
    with sqlite3.connect(sqlite_path(url)) as conn:
        conn.execute("UPDATE recipients SET updated_at = updated_at WHERE id = -1")
        conn.execute("INSERT INTO users (username, password_hash, allowed_sender_domains, created_at) "
                     "VALUES (?, 'x', '[]', 0) ON CONFLICT (username) DO NOTHING", (new_queue_id(),))


async def test_message_events_and_webhook_backlog(store_url: str, store: QueueStore) -> None:
    now = time.time()
    assert await store.webhook_backlog() == WebhookBacklog(0, {}, {}, None)
    mine, other = new_queue_id(), new_queue_id()
    await store.record_event(Event("e2", "opened", now + 2, mine, "a@one.example", {"ip": "192.0.2.1"}))
    await store.record_event(Event("e1", "suppressed", now + 1, mine, "a@one.example"))
    await store.record_event(Event("e3", "clicked", now + 3, other, "b@one.example"))
    events = await store.message_events(mine)
    assert [(e.id, e.type, e.data) for e in events] == [("e1", "suppressed", {}), ("e2", "opened", {"ip": "192.0.2.1"})]
    assert await store.message_events("nothing") == []
    assert (await store.webhook_backlog()).undispatched == 3

    # What the webhook loop writes: e1 and e2 fanned out to two endpoints, one delivery done, one dead.
    _sql(store_url, "UPDATE events SET delivered_at = {p} WHERE id IN ('e1', 'e2')", now)
    for endpoint, event, created, delivered, dead in (("crm", "e1", now + 5, None, None),
                                                      ("crm", "e2", now + 6, None, None),
                                                      ("audit", "e1", now + 7, now + 8, None),
                                                      ("audit", "e2", now + 9, None, now + 10)):
        _sql(store_url, "INSERT INTO webhook_deliveries (endpoint, event_id, created_at, next_attempt_at, "
                        "delivered_at, dead_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
             endpoint, event, created, created, delivered, dead)
    assert await store.webhook_backlog() == WebhookBacklog(1, {"crm": 2}, {"audit": 1}, now + 5)


def _sql(url: str, statement: str, *values: Any) -> None:
    """Write as another component (the webhook loop) would, on another connection."""
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute(statement.replace("{p}", "?"), values)
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement.replace("{p}", "%s"), values)


async def test_operations_on_a_second_store_object(open_stores: OpenStore) -> None:
    """Another process (the admin CLI) sees and claims what the relay queued."""
    relay_store, admin_store = await open_stores(), await open_stores()
    now = time.time()
    msg = message(("a@one.example",), received_at=now)
    await relay_store.enqueue(msg)
    (entry,) = await admin_store.find_recipients(RecipientQuery(message_ids=(msg.id,)), now=now)
    (claim,) = await admin_store.claim_recipients([entry.recipient.id], "admin", 60, now=now)
    assert await relay_store.claim_due(now, 10, "worker", 60) == []
    await admin_store.record_results([RecipientResult(claim.recipient.id, RecipientState.QUEUED, now, None, None,
                                                      count_attempt=False)], "admin")
    assert [c.recipient.id for c in await relay_store.claim_due(now, 10, "worker", 60)] == [entry.recipient.id]
    assert json.dumps(entry.recipient.address) == '"a@one.example"'

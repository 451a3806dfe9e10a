"""The QueueStore contract, checked on both implementations (SQLite in tmp_path, a fresh Postgres database).

Every test runs once per store through the parametrized ``store_url`` fixture; ``open_stores`` opens
further store objects on the same database (a second relay process, as far as the store can tell).
Lease times are given explicitly through ``now`` so that nothing here depends on how fast it runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
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
    UnknownUser,
    User,
    UserExists,
    migrate_store,
    open_store,
)
from relay.store.base import Bounce, bounces_to_commit
from relay.store.migrations import load_migrations, split_sqlite_statements
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SqliteStore, sqlite_path

OpenStore = Callable[..., Awaitable[QueueStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spool/queue.db"  # tmp_path is absolute: four slashes
    url: str = request.getfixturevalue("postgres_url")
    return url


def settings_for(url: str, **overrides: Any) -> StoreSettings:
    # A small pool: the suite shares one Postgres server with everything else that runs.
    return StoreSettings(url=url, **({"pool_size": 3} | overrides))


@pytest.fixture
async def open_stores(store_url: str) -> AsyncIterator[OpenStore]:
    opened: list[QueueStore] = []

    async def opener(**overrides: Any) -> QueueStore:
        store = await open_store(settings_for(store_url, **overrides))
        opened.append(store)
        return store

    yield opener
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(open_stores: OpenStore) -> QueueStore:
    return await open_stores()


def message(msg_id: str | None = None, rcpts: tuple[str, ...] = ("rcpt@example.com",), *,
            data: bytes | None = None, received_at: float | None = None, **fields: Any) -> NewMessage:
    msg_id = msg_id or new_queue_id()
    body = data if data is not None else f"Subject: {msg_id}\r\n\r\nbody\r\n".encode()
    return NewMessage(id=msg_id, sender="sender@example.org", recipients=[NewRecipient(a) for a in rcpts],
                      data=body, received_at=time.time() if received_at is None else received_at, **fields)


def attempt(recipient_id: int, outcome: str, started_at: float, reply: str = "250 2.0.0 ok") -> AttemptRecord:
    return AttemptRecord(recipient_id=recipient_id, started_at=started_at, duration=0.25,
                         mx_host="mx.example.com", tls_version="TLSv1.3", reply=reply, category="test",
                         outcome=outcome)


def final(recipient_id: int, state: RecipientState, now: float, outcome: str = "delivered") -> RecipientResult:
    return RecipientResult(recipient_id=recipient_id, state=state, next_attempt_at=None,
                           last_reply="250 2.0.0 ok", attempt=attempt(recipient_id, outcome, now))


def recorded_migrations(url: str) -> list[tuple[str, str]]:
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            return list(conn.execute("SELECT version, name FROM schema_migrations ORDER BY version"))
    with psycopg.connect(url) as pg:
        return [(v, n) for v, n in pg.execute("SELECT version, name FROM schema_migrations ORDER BY version")]


def shipped_migrations(url: str) -> list[tuple[str, str]]:
    """Every migration this relay ships for the store kind, as schema_migrations records them."""
    return [(m.version, m.name) for m in load_migrations("sqlite" if url.startswith("sqlite") else "postgres")]


async def ids_of(store: QueueStore, msg: NewMessage) -> list[int]:
    return [row.id for row in await store.recipients_of(msg.id)]


# -- enqueue ---------------------------------------------------------------------------------------------


async def test_enqueue_reads_back_identical(store: QueueStore) -> None:
    data = b"Subject: t\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n"  # every byte value, NUL included
    msg = message(rcpts=("Alice@Example.COM", "bob@example.net", "carol@Sub.Example.Net"), data=data,
                  client_ip="192.0.2.7", client_helo="client.example", auth_user="alice", listener="submission",
                  envid="ENV-1", ret="HDRS", smtputf8=True)
    await store.enqueue(msg)

    assert await store.message_data(msg.id) == data
    stored = await store.get_message(msg.id)
    assert stored is not None
    assert (stored.id, stored.sender, stored.size, stored.received_at) == (msg.id, msg.sender, len(data),
                                                                           msg.received_at)
    assert (stored.client_ip, stored.client_helo, stored.auth_user, stored.listener) == (
        "192.0.2.7", "client.example", "alice", "submission")
    assert (stored.envid, stored.ret, stored.smtputf8) == ("ENV-1", "HDRS", True)

    rows = await store.recipients_of(msg.id)
    assert [r.address for r in rows] == ["Alice@Example.COM", "bob@example.net", "carol@Sub.Example.Net"]
    assert [r.domain for r in rows] == ["example.com", "example.net", "sub.example.net"]
    assert {r.state for r in rows} == {RecipientState.QUEUED}
    assert {r.attempts for r in rows} == {0}
    assert {r.next_attempt_at for r in rows} == {msg.received_at}  # due at once
    assert len({r.id for r in rows}) == 3
    counts = await store.count_by_state()
    assert counts["queued"] == 3 and counts["delivered"] == 0


async def test_enqueue_keeps_dsn_parameters_and_first_attempt_time(store: QueueStore) -> None:
    later = time.time() + 3600
    msg = NewMessage(id=new_queue_id(), sender="", data=b"x\r\n", received_at=time.time(),
                     first_attempt_at=later,
                     recipients=[NewRecipient("a@example.com", notify="SUCCESS,FAILURE",
                                              orcpt="rfc822;a@example.com")])
    await store.enqueue(msg)
    (row,) = await store.recipients_of(msg.id)
    assert (row.notify, row.orcpt, row.next_attempt_at) == ("SUCCESS,FAILURE", "rfc822;a@example.com", later)
    stored = await store.get_message(msg.id)
    assert stored is not None and stored.sender == "" and stored.auth_user is None


async def test_unknown_message_reads(store: QueueStore) -> None:
    assert await store.get_message("nope") is None
    assert await store.recipients_of("nope") == []
    with pytest.raises(StoreError):
        await store.message_data("nope")


async def test_concurrent_enqueues_share_commits(open_stores: OpenStore) -> None:
    # A generous batch window makes the batching visible in the counters without depending on speed.
    store = await open_stores(commit_batch_wait_ms=100, commit_batch_max=64)
    assert isinstance(store, SqliteStore | PostgresStore)
    messages = [message(rcpts=(f"r{i}@example.com", f"s{i}@example.org")) for i in range(200)]
    await asyncio.gather(*(store.enqueue(m) for m in messages))

    for msg in messages:
        assert await store.message_data(msg.id) == msg.data
        assert len(await store.recipients_of(msg.id)) == 2
    assert (await store.count_by_state())["queued"] == 400
    assert store.stats.messages == 200
    assert store.stats.batches < 200  # several messages per transaction


async def test_a_batch_wider_than_one_insert_statement_stores_every_row(open_stores: OpenStore) -> None:
    # SQLite writes a batch with multi-row INSERTs of at most 200 rows: 250 messages with 1-3 recipients in
    # one batch need several statements per table, and every row must land once.
    store = await open_stores(commit_batch_wait_ms=300, commit_batch_max=256)
    assert isinstance(store, SqliteStore | PostgresStore)
    messages = [message(rcpts=tuple(f"r{i}-{n}@d{n}.example" for n in range(1 + i % 3))) for i in range(250)]
    await asyncio.gather(*(store.enqueue(m) for m in messages))
    assert store.stats.batches <= 2      # one transaction (two if the window closed early)
    for msg in messages:
        assert await store.message_data(msg.id) == msg.data
        assert [r.address for r in await store.recipients_of(msg.id)] == [r.address for r in msg.recipients]
    assert (await store.count_by_state())["queued"] == sum(len(m.recipients) for m in messages)


async def test_big_messages_split_batches(open_stores: OpenStore) -> None:
    store = await open_stores(commit_batch_wait_ms=500)
    assert isinstance(store, SqliteStore | PostgresStore)
    big = [message(data=bytes([i]) * (33 * 1024 * 1024)) for i in range(3)]  # 99 MiB in all
    await asyncio.gather(*(store.enqueue(m) for m in big))
    assert store.stats.messages == 3
    assert store.stats.batches >= 2  # the 64 MiB cap closed a batch before the window or the count did
    for msg in big:
        assert await store.message_data(msg.id) == msg.data


async def test_failed_enqueue_leaves_nothing_and_spares_its_batch(open_stores: OpenStore) -> None:
    store = await open_stores(commit_batch_wait_ms=100)
    original = message("dup-id", rcpts=("one@example.com",), data=b"original\r\n")
    await store.enqueue(original)

    clash = message("dup-id", rcpts=("x@example.com", "y@example.com"), data=b"clash\r\n")
    before, after = message(), message()
    results = await asyncio.gather(store.enqueue(before), store.enqueue(clash), store.enqueue(after),
                                   return_exceptions=True)

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError)
    for ok in (before, after):
        assert await store.message_data(ok.id) == ok.data
        assert len(await store.recipients_of(ok.id)) == 1
    # The clash wrote nothing: the original message is whole and alone.
    assert await store.message_data("dup-id") == b"original\r\n"
    assert [r.address for r in await store.recipients_of("dup-id")] == ["one@example.com"]
    assert (await store.count_by_state())["queued"] == 3


async def test_message_without_recipients_is_refused(store: QueueStore) -> None:
    empty = NewMessage(id=new_queue_id(), sender="a@example.com", recipients=[], data=b"x\r\n",
                       received_at=time.time())
    with pytest.raises(StoreError):
        await store.enqueue(empty)
    assert await store.get_message(empty.id) is None


# -- claims -------------------------------------------------------------------------------------------------


async def test_claim_due_hands_out_only_due_unleased_queued_rows(store: QueueStore) -> None:
    now = time.time()
    held, leased, done = (message(received_at=now - 100) for _ in range(3))
    for msg in (held, leased, done):
        await store.enqueue(msg)
    setup = await store.claim_due(now, 10, "setup", 300)
    assert len(setup) == 3
    (held_id,), (done_id,) = await ids_of(store, held), await ids_of(store, done)
    await store.record_results([
        RecipientResult(held_id, RecipientState.HELD, None, "held by operator", None, count_attempt=False),
        final(done_id, RecipientState.DELIVERED, now),
    ], "setup")  # `leased` stays leased by "setup"

    due_old = message(rcpts=("a@example.com",), received_at=now - 50, client_ip="192.0.2.1")
    due_new = message(rcpts=("b@example.com", "c@example.com"), received_at=now - 10)
    not_yet = message(received_at=now - 50, first_attempt_at=now + 3600)
    for msg in (due_new, not_yet, due_old):
        await store.enqueue(msg)

    claims = await store.claim_due(now, 10, "w1", 60)
    assert [c.recipient.address for c in claims] == ["a@example.com", "b@example.com", "c@example.com"]
    assert [c.message.id for c in claims] == [due_old.id, due_new.id, due_new.id]
    assert {c.lease_until for c in claims} == {now + 60}
    assert claims[0].message.client_ip == "192.0.2.1" and claims[0].message.size == len(due_old.data)
    assert {c.recipient.state for c in claims} == {RecipientState.QUEUED}
    assert await store.claim_due(now, 10, "w2", 60) == []


async def test_claim_due_respects_limit_and_order(store: QueueStore) -> None:
    now = time.time()
    msgs = [message(received_at=now - 100 + i) for i in range(5)]
    for msg in reversed(msgs):
        await store.enqueue(msg)
    first = await store.claim_due(now, 2, "w", 60)
    rest = await store.claim_due(now, 10, "w", 60)
    assert [c.message.id for c in first + rest] == [m.id for m in msgs]
    assert await store.claim_due(now, 0, "w", 60) == []


async def test_two_claimers_never_share_a_recipient(open_stores: OpenStore) -> None:
    first, second = await open_stores(), await open_stores()
    now = time.time()
    messages = [message(rcpts=(f"a{i}@example.com", f"b{i}@example.com", f"c{i}@example.net"),
                        received_at=now - 60) for i in range(60)]
    await asyncio.gather(*(first.enqueue(m) for m in messages))
    expected = {rid for m in messages for rid in await ids_of(first, m)}

    async def due_worker(store: QueueStore, owner: str) -> list[int]:
        got: list[int] = []
        while claims := await store.claim_due(now, 7, owner, 120):
            got.extend(c.recipient.id for c in claims)
        return got

    async def expiry_worker(store: QueueStore, owner: str) -> list[int]:
        got: list[int] = []
        while claims := await store.claim_expired(now, 5, owner, 120):
            got.extend(c.recipient.id for c in claims)
        return got

    results = await asyncio.gather(due_worker(first, "a1"), due_worker(second, "b1"),
                                   expiry_worker(first, "a2"), expiry_worker(second, "b2"),
                                   due_worker(first, "a3"), expiry_worker(second, "b3"))
    claimed = [rid for got in results for rid in got]
    assert len(claimed) == len(set(claimed)) == 180
    assert set(claimed) == expected


async def test_expired_lease_comes_back(store: QueueStore) -> None:
    now = time.time()
    msg = message(received_at=now - 5)
    await store.enqueue(msg)
    (claim,) = await store.claim_due(now, 10, "crashed", 30)
    assert await store.claim_due(now + 10, 10, "other", 30) == []
    (again,) = await store.claim_due(now + 31, 10, "other", 30)
    assert again.recipient.id == claim.recipient.id and again.lease_until == now + 61

    # The first worker comes back too late: its word no longer counts.
    await store.record_results([final(claim.recipient.id, RecipientState.DELIVERED, now)], "crashed")
    (row,) = await store.recipients_of(msg.id)
    assert (row.state, row.attempts) == (RecipientState.QUEUED, 0)
    assert await store.attempts_of(row.id) == []
    await store.record_results([final(claim.recipient.id, RecipientState.DELIVERED, now)], "other")
    (row,) = await store.recipients_of(msg.id)
    assert (row.state, row.attempts) == (RecipientState.DELIVERED, 1)


async def test_release_gives_leases_back(store: QueueStore) -> None:
    now = time.time()
    msg = message(rcpts=("a@example.com", "b@example.com"), received_at=now - 5)
    await store.enqueue(msg)
    claims = await store.claim_due(now, 10, "owner", 300)
    ids = [c.recipient.id for c in claims]

    await store.release(ids, "someone-else")  # not theirs: no effect
    assert await store.claim_due(now, 10, "thief", 300) == []
    await store.release(ids, "owner")
    await store.release([], "owner")
    again = await store.claim_due(now, 10, "next", 300)
    assert sorted(c.recipient.id for c in again) == sorted(ids)
    assert {row.attempts for row in await store.recipients_of(msg.id)} == {0}


async def test_claim_expired_takes_held_and_not_yet_due(store: QueueStore) -> None:
    now = time.time()
    old = message(rcpts=("queued@example.com", "held@example.com", "done@example.com"),
                  received_at=now - 10 * 86400)
    await store.enqueue(old)
    queued_id, held_id, done_id = await ids_of(store, old)
    await store.claim_due(now, 10, "setup", 300)
    await store.record_results([
        RecipientResult(held_id, RecipientState.HELD, None, None, None, count_attempt=False),
        final(done_id, RecipientState.DELIVERED, now),
    ], "setup")
    await store.release([queued_id], "setup")
    old_later = message(received_at=now - 9 * 86400, first_attempt_at=now + 3600)
    young = message(received_at=now - 60)
    await store.enqueue(old_later)
    await store.enqueue(young)
    (later_id,) = await ids_of(store, old_later)

    expired = await store.claim_expired(now - 86400, 100, "reaper", 120)
    assert [c.recipient.id for c in expired] == [queued_id, held_id, later_id]
    assert [c.recipient.state for c in expired] == [RecipientState.QUEUED, RecipientState.HELD,
                                                    RecipientState.QUEUED]
    assert expired[0].message.received_at == old.received_at
    assert await store.claim_expired(now - 86400, 100, "reaper2", 120) == []  # leased now
    assert [c.message.id for c in await store.claim_due(now, 100, "w", 60)] == [young.id]

    await store.record_results([
        RecipientResult(c.recipient.id, RecipientState.EXPIRED, None, "expired", None, count_attempt=False)
        for c in expired], "reaper")
    states = {r.id: r.state for r in await store.recipients_of(old.id)}
    assert states == {queued_id: RecipientState.EXPIRED, held_id: RecipientState.EXPIRED,
                      done_id: RecipientState.DELIVERED}


# -- results ------------------------------------------------------------------------------------------------


async def test_record_results_applies_states_history_and_bounces(store: QueueStore) -> None:
    now = time.time()
    msg = message(rcpts=("ok@example.com", "later@example.com", "gone@example.com", "slow@example.com"),
                  received_at=now - 5)
    await store.enqueue(msg)
    await store.claim_due(now, 10, "w", 300)
    ok, later, gone, slow = await ids_of(store, msg)
    delivered = attempt(ok, "delivered", now)
    deferred = attempt(later, "temporary", now, reply="451 4.7.1 try later")
    failed = attempt(gone, "permanent", now, reply="550 5.1.1 no such user")
    bounce = NewMessage(id=new_queue_id(), sender="", recipients=[NewRecipient("sender@example.org")],
                        data=b"Subject: Undelivered\r\n\r\nsorry\r\n", received_at=now)

    await store.record_results([
        RecipientResult(ok, RecipientState.DELIVERED, None, "250 2.0.0 ok", delivered),
        RecipientResult(later, RecipientState.QUEUED, now + 600, "451 4.7.1 try later", deferred),
        RecipientResult(gone, RecipientState.BOUNCED, None, "550 5.1.1 no such user", failed),
        RecipientResult(slow, RecipientState.QUEUED, now + 60, None, None, count_attempt=False),
    ], "w", bounces=[Bounce(bounce, (gone,))])

    rows = {r.id: r for r in await store.recipients_of(msg.id)}
    assert [rows[i].state for i in (ok, later, gone, slow)] == [
        RecipientState.DELIVERED, RecipientState.QUEUED, RecipientState.BOUNCED, RecipientState.QUEUED]
    assert [rows[i].attempts for i in (ok, later, gone, slow)] == [1, 1, 1, 0]
    assert rows[later].next_attempt_at == now + 600 and rows[slow].next_attempt_at == now + 60
    assert rows[gone].last_reply == "550 5.1.1 no such user" and rows[slow].last_reply is None
    assert await store.attempts_of(ok) == [delivered]
    assert await store.attempts_of(later) == [deferred]
    assert await store.attempts_of(gone) == [failed]
    assert await store.attempts_of(slow) == []

    assert await store.message_data(bounce.id) == bounce.data
    (bounce_row,) = await store.recipients_of(bounce.id)
    assert bounce_row.state is RecipientState.QUEUED
    # Leases ended: the retries and the bounce are claimable when due.
    claimed = await store.claim_due(now + 600, 10, "w2", 60)
    assert sorted(c.recipient.id for c in claimed) == sorted([slow, later, bounce_row.id])
    counts = await store.count_by_state()
    assert (counts["delivered"], counts["bounced"], counts["queued"]) == (1, 1, 3)


async def test_record_results_is_all_or_nothing(store: QueueStore) -> None:
    now = time.time()
    existing = message(received_at=now - 5)
    msg = message(rcpts=("a@example.com", "b@example.com"), received_at=now - 5)
    await store.enqueue(existing)
    await store.enqueue(msg)
    await store.claim_due(now, 10, "w", 300)
    a, b = await ids_of(store, msg)
    results = [final(a, RecipientState.DELIVERED, now), final(b, RecipientState.BOUNCED, now, "permanent")]
    clashing_bounce = message(existing.id, rcpts=("sender@example.org",))

    with pytest.raises(StoreError):
        await store.record_results(results, "w", bounces=[Bounce(clashing_bounce, (b,))])
    rows = await store.recipients_of(msg.id)
    assert [(r.state, r.attempts) for r in rows] == [(RecipientState.QUEUED, 0)] * 2
    assert await store.attempts_of(a) == [] and await store.attempts_of(b) == []
    assert len(await store.recipients_of(existing.id)) == 1
    assert await store.claim_due(now, 10, "other", 60) == []  # the leases were not ended either

    await store.record_results(results, "w")
    assert [r.state for r in await store.recipients_of(msg.id)] == [RecipientState.DELIVERED,
                                                                   RecipientState.BOUNCED]


async def test_record_results_ignores_rows_leased_by_another_owner(store: QueueStore) -> None:
    now = time.time()
    mine, theirs = message(received_at=now - 5), message(received_at=now - 4)
    await store.enqueue(mine)
    await store.enqueue(theirs)
    (my_claim,) = await store.claim_due(now, 1, "me", 300)
    (their_claim,) = await store.claim_due(now, 1, "them", 300)
    assert my_claim.message.id == mine.id and their_claim.message.id == theirs.id

    await store.record_results([final(my_claim.recipient.id, RecipientState.DELIVERED, now),
                                final(their_claim.recipient.id, RecipientState.DELIVERED, now)], "me")
    (my_row,), (their_row,) = await store.recipients_of(mine.id), await store.recipients_of(theirs.id)
    assert (my_row.state, my_row.attempts) == (RecipientState.DELIVERED, 1)
    assert (their_row.state, their_row.attempts) == (RecipientState.QUEUED, 0)
    assert await store.attempts_of(their_row.id) == []
    assert await store.claim_due(now, 10, "third", 60) == []  # still theirs


async def test_renew_extends_only_the_owners_leases(store: QueueStore) -> None:
    now = time.time()
    mine, theirs = message(rcpts=("a@example.com", "b@example.com"), received_at=now - 5), message(received_at=now - 4)
    await store.enqueue(mine)
    await store.enqueue(theirs)
    a, b = (c.recipient.id for c in await store.claim_due(now, 2, "me", 30))
    (their_claim,) = await store.claim_due(now, 1, "them", 30)
    t = their_claim.recipient.id
    assert await store.renew([], "me", 600) == set()

    assert await store.renew([a, b, t], "me", 600) == {a, b}
    # Past the first term only the lease that was not renewed comes back; a and b are still "me"'s.
    (taken,) = await store.claim_due(now + 31, 10, "other", 3600)
    assert taken.recipient.id == t
    assert await store.claim_due(time.time() + 599, 10, "other", 30) == []
    await store.record_results([final(a, RecipientState.DELIVERED, now)], "me")  # a is still mine
    assert [r.state for r in await store.recipients_of(mine.id)] == [RecipientState.DELIVERED,
                                                                   RecipientState.QUEUED]


async def test_renew_never_resurrects_a_lost_lease(store: QueueStore) -> None:
    now = time.time()
    msg = message(rcpts=("a@example.com", "b@example.com", "c@example.com"), received_at=now - 5)
    await store.enqueue(msg)
    a, b, c = (claim.recipient.id for claim in await store.claim_due(now, 10, "me", 30))
    # a: taken over by another worker once the lease ran out; b: recorded; c: released.
    (taken,) = await store.claim_due(now + 31, 1, "other", 300)
    assert taken.recipient.id == a
    await store.record_results([final(b, RecipientState.DELIVERED, now)], "me")
    await store.release([c], "me")

    assert await store.renew([a, b, c], "me", 3600) == set()
    assert await store.renew([a], "other", 300) == {a}  # the new holder's lease is untouched by "me"
    (again,) = await store.claim_due(now, 10, "third", 30)  # c stays free: claimable at once
    assert again.recipient.id == c
    await store.record_results([final(a, RecipientState.DELIVERED, now)], "me")  # ignored: not mine
    rows = {r.id: r for r in await store.recipients_of(msg.id)}
    assert (rows[a].state, rows[a].attempts) == (RecipientState.QUEUED, 0)
    assert rows[b].state is RecipientState.DELIVERED


async def test_renew_keeps_a_lapsed_lease_nobody_took_and_never_shortens_one(store: QueueStore) -> None:
    now = time.time()
    lapsed, long = message(received_at=now - 500), message(received_at=now - 400)
    await store.enqueue(lapsed)
    await store.enqueue(long)
    first, far = await store.claim_due(now, 2, "me", 3600)
    await store.release([first.recipient.id], "me")
    (old,) = await store.claim_due(now - 100, 1, "me", 10)  # leased again, till 90 s ago
    assert old.message.id == lapsed.id and far.message.id == long.id

    # Nobody claimed the lapsed row meanwhile, so nobody can have started on it: it is still "me"'s.
    assert await store.renew([old.recipient.id, far.recipient.id], "me", 60) == {old.recipient.id,
                                                                                 far.recipient.id}
    assert await store.claim_due(now + 59, 10, "other", 30) == []
    (back,) = await store.claim_due(time.time() + 61, 10, "other", 30)
    assert back.recipient.id == old.recipient.id  # renewed for 60 s; the 3600 s lease was not cut short


def dsn_for(*recipient_ids: int) -> Bounce:
    return Bounce(message(rcpts=("sender@example.org",), data=b"Subject: failure notice\r\n\r\nsorry\r\n"),
                  recipient_ids)


async def test_a_bounce_is_committed_only_with_all_the_results_it_reports_on(store: QueueStore) -> None:
    now = time.time()
    msg = message(rcpts=("x@example.com", "y@example.com"), received_at=now - 5)
    other = message(rcpts=("z@example.com",), received_at=now - 4)
    await store.enqueue(msg)
    await store.enqueue(other)
    x, y, z = (claim.recipient.id for claim in await store.claim_due(now, 10, "me", 300))
    (taken,) = await store.claim_due(now + 1000, 1, "thief", 300)  # x: the lease was lost to another worker
    assert taken.recipient.id == x
    both, alone = dsn_for(x, y), dsn_for(z)

    await store.record_results([final(x, RecipientState.BOUNCED, now, "permanent"),
                                final(y, RecipientState.BOUNCED, now, "permanent"),
                                final(z, RecipientState.BOUNCED, now, "permanent")], "me", bounces=[both, alone])

    # The DSN for x and y is not committed, and y's result is left out with it (it stays leased to "me"):
    # x's new holder reports x, y is tried again and reported then — each once, none twice or never.
    assert await store.get_message(both.message.id) is None
    rows = {r.id: r for r in await store.recipients_of(msg.id)}
    assert [(rows[i].state, rows[i].attempts) for i in (x, y)] == [(RecipientState.QUEUED, 0)] * 2
    assert await store.attempts_of(x) == [] and await store.attempts_of(y) == []
    # The other bounce of the same call was whole: it is committed with its result.
    assert await store.message_data(alone.message.id) == alone.message.data
    ((z_row,), dsn_rows) = await store.recipients_of(other.id), await store.recipients_of(alone.message.id)
    assert z_row.state is RecipientState.BOUNCED and len(dsn_rows) == 1
    assert await store.claim_due(now, 10, "third", 60) == []  # x and y are still leased
    assert await store.renew([y], "me", 300) == {y}

    # Recorded again by its holder, y and a DSN of its own go through.
    only_y = dsn_for(y)
    await store.record_results([final(y, RecipientState.BOUNCED, now, "permanent")], "me", bounces=[only_y])
    assert await store.message_data(only_y.message.id) == only_y.message.data
    assert {r.id: r.state for r in await store.recipients_of(msg.id)}[y] is RecipientState.BOUNCED


async def test_a_bounce_whose_results_were_all_ignored_is_not_committed(store: QueueStore) -> None:
    now = time.time()
    msg = message(received_at=now - 5)
    await store.enqueue(msg)
    (claim,) = await store.claim_due(now, 10, "late", 30)
    await store.claim_due(now + 31, 10, "other", 30)  # the late worker's lease ran out and was taken
    dsn = dsn_for(claim.recipient.id)
    await store.record_results([final(claim.recipient.id, RecipientState.BOUNCED, now, "permanent")], "late",
                               bounces=[dsn])
    assert await store.get_message(dsn.message.id) is None
    counts = await store.count_by_state()
    assert (counts["queued"], counts["bounced"]) == (1, 0)  # no DSN recipient queued either


async def test_a_bounce_must_report_on_results_recorded_with_it(store: QueueStore) -> None:
    now = time.time()
    msg = message(rcpts=("a@example.com", "b@example.com"), received_at=now - 5)
    await store.enqueue(msg)
    a, b = (claim.recipient.id for claim in await store.claim_due(now, 10, "w", 300))
    for bad in (dsn_for(b), dsn_for()):
        with pytest.raises(ValueError, match="must report on recipients recorded with it"):
            await store.record_results([final(a, RecipientState.BOUNCED, now, "permanent")], "w", bounces=[bad])
        assert await store.get_message(bad.message.id) is None
    assert [(r.state, r.attempts) for r in await store.recipients_of(msg.id)] == [(RecipientState.QUEUED, 0)] * 2


def test_bounces_to_commit_drops_whole_groups_until_nothing_changes() -> None:
    first, second, third = dsn_for(1, 2), dsn_for(2, 3), dsn_for(4)
    assert bounces_to_commit([first, second, third], {1, 2, 3, 4}) == ([first, second, third], set())
    # 3 was lost: the second DSN goes, which leaves 2 out, which takes the first DSN (and 1) with it.
    assert bounces_to_commit([first, second, third], {1, 2, 4}) == ([third], {1, 2})
    assert bounces_to_commit([first], set()) == ([], set())


async def test_next_due_at_follows_due_times_and_leases(store: QueueStore) -> None:
    assert await store.next_due_at() is None
    now = time.time()
    a = message(received_at=now, first_attempt_at=now + 100)
    b = message(received_at=now, first_attempt_at=now + 50)
    await store.enqueue(a)
    await store.enqueue(b)
    assert await store.next_due_at() == now + 50

    (claim_b,) = await store.claim_due(now + 60, 10, "w", 300)
    assert claim_b.message.id == b.id
    assert await store.next_due_at() == now + 100  # b is in flight until now + 360
    await store.record_results([RecipientResult(claim_b.recipient.id, RecipientState.QUEUED, now + 30,
                                                "451 4.4.1 later", None)], "w")
    assert await store.next_due_at() == now + 30

    claims = await store.claim_due(now + 200, 10, "w", 300)
    assert len(claims) == 2
    assert await store.next_due_at() == now + 500  # only leased rows left: due when the leases end
    await store.record_results([final(c.recipient.id, RecipientState.DELIVERED, now) for c in claims], "w")
    assert await store.next_due_at() is None


# -- new mail signal -----------------------------------------------------------------------------------------


async def test_wait_for_new_mail_wakes_on_enqueue_by_another_store(open_stores: OpenStore) -> None:
    listener, sender = await open_stores(), await open_stores()
    assert await listener.wait_for_new_mail(0.05) is False

    waiting = asyncio.create_task(listener.wait_for_new_mail(60))
    await asyncio.sleep(0)
    await sender.enqueue(message())
    assert await waiting is True

    # Bounces written with results are new mail too.
    now = time.time()
    claims = await sender.claim_due(now + 1, 10, "w", 60)
    waiting = asyncio.create_task(listener.wait_for_new_mail(60))
    await sender.record_results([final(claims[0].recipient.id, RecipientState.BOUNCED, now, "permanent")],
                                "w", bounces=[Bounce(message(rcpts=("sender@example.org",)),
                                                     (claims[0].recipient.id,))])
    assert await waiting is True


async def test_wait_for_new_mail_wakes_on_own_enqueue(store: QueueStore) -> None:
    await store.enqueue(message())
    assert await store.wait_for_new_mail(60) is True


# -- purge ---------------------------------------------------------------------------------------------------


async def test_purge_removes_finished_messages_and_old_history(store: QueueStore) -> None:
    now = time.time()
    done = message(rcpts=("a@example.com", "b@example.com"), received_at=now - 7200)
    half = message(rcpts=("c@example.com", "d@example.com"), received_at=now - 7200)
    fresh = message(received_at=now - 7200)
    for msg in (done, half, fresh):
        await store.enqueue(msg)
    await store.claim_due(now, 10, "w", 300)
    a, b = await ids_of(store, done)
    c, d = await ids_of(store, half)
    (e,) = await ids_of(store, fresh)
    old_try = attempt(a, "delivered", now - 5000)
    new_try = attempt(b, "delivered", now - 10)
    await store.record_results([
        RecipientResult(a, RecipientState.DELIVERED, None, "250 ok", old_try),
        RecipientResult(b, RecipientState.DELIVERED, None, "250 ok", new_try),
        final(c, RecipientState.DELIVERED, now),
        RecipientResult(d, RecipientState.QUEUED, now + 600, "451 later", attempt(d, "temporary", now)),
    ], "w")
    await store.release([e], "w")

    assert await store.purge(finished_before=now - 3600, history_before=0) == 0  # finished just now
    removed = await store.purge(finished_before=time.time() + 1, history_before=now - 1000)

    assert removed == 1
    assert await store.get_message(done.id) is None
    assert await store.recipients_of(done.id) == []
    with pytest.raises(StoreError):
        await store.message_data(done.id)
    assert await store.attempts_of(a) == []           # older than history_before
    assert await store.attempts_of(b) == [new_try]    # history outlives the message
    assert await store.get_message(half.id) is not None and len(await store.recipients_of(half.id)) == 2
    assert await store.get_message(fresh.id) is not None
    counts = await store.count_by_state()
    assert (counts["delivered"], counts["queued"]) == (1, 2)


# -- users ---------------------------------------------------------------------------------------------------


async def test_users_lifecycle(store: QueueStore) -> None:
    alice = User(username="alice", password_hash="$2b$12$hash", allowed_sender_domains=("example.com",
                                                                                         "example.org"),
                 expires_at=time.time() + 86400, quota_per_minute=10, quota_per_day=1000, created_at=1000.0)
    bob = User(username="bob", password_hash="$2b$12$other")
    await store.add_user(bob)
    await store.add_user(alice)

    assert await store.get_user("alice") == alice
    stored_bob = await store.get_user("bob")
    assert stored_bob is not None and stored_bob.allowed_sender_domains == () and stored_bob.created_at > 0
    assert await store.get_user("carol") is None
    assert [u.username for u in await store.list_users()] == ["alice", "bob"]
    with pytest.raises(UserExists):
        await store.add_user(User(username="alice", password_hash="x"))

    changed = User(username="alice", password_hash="$2b$12$new", allowed_sender_domains=(),
                   expires_at=None, disabled=True, quota_per_minute=0, quota_per_day=5)
    await store.update_user(changed)
    got = await store.get_user("alice")
    assert got is not None
    assert (got.password_hash, got.allowed_sender_domains, got.expires_at, got.disabled) == (
        "$2b$12$new", (), None, True)
    assert (got.quota_per_minute, got.quota_per_day, got.created_at) == (0, 5, 1000.0)  # creation kept

    with pytest.raises(UnknownUser):
        await store.update_user(User(username="carol", password_hash="x"))
    await store.delete_user("bob")
    assert await store.get_user("bob") is None
    with pytest.raises(UnknownUser):
        await store.delete_user("bob")
    assert issubclass(UserExists, StoreError) and issubclass(UnknownUser, StoreError)


# -- migrations and restarts ---------------------------------------------------------------------------------


async def test_migrations_applied_once_and_recorded(store_url: str, open_stores: OpenStore) -> None:
    # Two relays starting together on a fresh database: exactly one of them migrates.
    first, second = await asyncio.gather(open_stores(), open_stores())
    assert isinstance(first, SqliteStore | PostgresStore) and isinstance(second, SqliteStore | PostgresStore)
    versions = [version for version, _ in shipped_migrations(store_url)]
    assert versions[0] == "0001"
    assert sorted([first.migrations_applied, second.migrations_applied]) == [[], versions]
    third = await open_stores()
    assert isinstance(third, SqliteStore | PostgresStore) and third.migrations_applied == []
    assert await migrate_store(settings_for(store_url)) == []
    assert recorded_migrations(store_url) == shipped_migrations(store_url)


async def test_migrate_store_on_a_fresh_database(store_url: str, open_stores: OpenStore) -> None:
    versions = [version for version, _ in shipped_migrations(store_url)]
    assert await migrate_store(settings_for(store_url)) == versions
    assert await migrate_store(settings_for(store_url)) == []
    store = await open_stores()
    assert isinstance(store, SqliteStore | PostgresStore) and store.migrations_applied == []
    await store.ping()
    assert recorded_migrations(store_url) == shipped_migrations(store_url)


async def test_reopening_keeps_the_queue(open_stores: OpenStore) -> None:
    now = time.time()
    store = await open_stores()
    msgs = [message(rcpts=("a@example.com", "b@example.com"), received_at=now - 10) for _ in range(5)]
    for msg in msgs:
        await store.enqueue(msg)
    await store.add_user(User(username="alice", password_hash="h", created_at=5.0))
    first = await store.claim_due(now, 1, "w", 300)
    await store.record_results([final(first[0].recipient.id, RecipientState.DELIVERED, now)], "w")
    before = {m.id: await store.recipients_of(m.id) for m in msgs}
    await store.close()
    with pytest.raises(StoreError):
        await store.enqueue(message())

    reopened = await open_stores()
    await reopened.ping()
    for msg in msgs:
        assert await reopened.message_data(msg.id) == msg.data
        assert await reopened.recipients_of(msg.id) == before[msg.id]
    assert await reopened.attempts_of(first[0].recipient.id) != []
    assert await reopened.get_user("alice") == User(username="alice", password_hash="h", created_at=5.0)
    assert len(await reopened.claim_due(now, 100, "w2", 60)) == 9
    await reopened.enqueue(message())


async def test_closed_store_refuses_work(store: QueueStore) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.claim_due(time.time(), 10, "w", 60)
    await store.close()  # closing twice is harmless


# -- store-specific details --------------------------------------------------------------------------------


async def test_sqlite_file_is_in_wal_mode(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/a/b/queue.db"
    store = await open_store(StoreSettings(url=url))
    try:
        await store.enqueue(message())
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "a" / "b" / "queue.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_urls() -> None:
    assert str(sqlite_path("sqlite:///var/queue.db")) == "var/queue.db"
    assert str(sqlite_path("sqlite:////srv/relay/queue.db")) == "/srv/relay/queue.db"
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        with pytest.raises(StoreError):
            sqlite_path(bad)


def test_sqlite_statement_splitting() -> None:
    script = ("-- header\nCREATE TABLE t (a TEXT DEFAULT 'x;y');\n"
              "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'z;'; END;\n-- trailer\n")
    statements = split_sqlite_statements(script)
    assert len(statements) == 2
    assert statements[0].endswith("DEFAULT 'x;y');") and statements[1].endswith("END;")


async def test_claims_read_the_due_index_in_claim_order_when_due_times_tie(postgres_url: str) -> None:
    """A backlog sharing one due time (queued in a burst, released from hold, flushed) must not make each
    claim read and sort every tied row: the plan is an index scan of (next_attempt_at, id), no Sort.
    (bench/claims.py measures it: 1,000,000 tied rows claimed as fast as 10,000.)"""
    store = await open_store(settings_for(postgres_url))
    try:
        now = time.time()
        await asyncio.gather(*(store.enqueue(NewMessage(
            id=new_queue_id(), sender="s@example.com", data=b"x\r\n", received_at=now,
            recipients=[NewRecipient(f"r{n}-{i}@example.org") for i in range(100)])) for n in range(50)))
    finally:
        await store.close()
    picked = ("SELECT id FROM recipients WHERE state = 'queued' AND next_attempt_at <= %(now)s "
              "AND (lease_until IS NULL OR lease_until < %(now)s) ORDER BY next_attempt_at, id LIMIT 100 "
              "FOR UPDATE SKIP LOCKED")
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("ANALYZE recipients")
        plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + picked, {"now": now + 1}))
        assert db.execute("SELECT count(*) FROM recipients WHERE next_attempt_at = %s", (now,)).fetchone() == (5000,)
    assert "recipients_due_order" in plan, plan
    assert "Sort" not in plan, plan

"""The suppression list and the event outbox of the QueueStore, checked on both stores.

Same fixture pattern as ``tests/test_store_contract.py``: every test runs once on a SQLite file in
tmp_path and once on a fresh Postgres database. Times are passed explicitly (``now``), so nothing here
depends on how fast it runs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.plugin import Event, EventRecorder, Suppression, SuppressionList
from relay.settings import StoreSettings
from relay.store import QueueStore, open_store
from relay.store.migrations import load_migrations
from relay.store.sqlite import sqlite_path
from relay.store.suppressions import FIND_SUPPRESSION, lookup_keys, sql

NOW = 1_700_000_000.0
DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spool/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[QueueStore]:
    opened = await open_store(StoreSettings(url=store_url, pool_size=3))
    try:
        yield opened
    finally:
        await opened.close()


def entry(value: str, kind: Any = "address", *, reason: str = "manual", scope: str = "",
          expires_at: float | None = None, created_at: float = NOW, note: str = "", source: str = "test"
          ) -> Suppression:
    return Suppression(value=value, kind=kind, reason=reason, source=source, created_at=created_at,
                       expires_at=expires_at, note=note, scope=scope)


def raw_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            return [tuple(row) for row in conn.execute(query)]
    with psycopg.connect(url) as pg:
        return [tuple(row) for row in pg.execute(query)]


# -- the plugin API's protocols ------------------------------------------------------------------------------


async def test_both_stores_are_the_plugin_apis_suppression_list_and_outbox(store: QueueStore,
                                                                        store_url: str) -> None:
    assert isinstance(store, SuppressionList) and isinstance(store, EventRecorder)
    kind = "sqlite" if store_url.startswith("sqlite") else "postgres"
    assert ("0002", "suppression_events") in [(m.version, m.name) for m in load_migrations(kind)]
    assert ("0002", "suppression_events") in raw_rows(store_url, "SELECT version, name FROM schema_migrations")


# -- adding and finding --------------------------------------------------------------------------------------


async def test_address_entry_matches_every_spelling_of_the_address(store: QueueStore) -> None:
    await store.add_suppression(entry(" <Bob.Smith@Bücher.Example.> "))
    [stored] = await store.list_suppressions()
    assert stored.value == "bob.smith@xn--bcher-kva.example"
    for spelling in ("bob.smith@xn--bcher-kva.example", "BOB.SMITH@BÜCHER.EXAMPLE", "<bob.smith@XN--BCHER-KVA.example>",
                     "Bob.Smith@bücher.example."):
        found = await store.find_suppression(spelling, now=NOW)
        assert found is not None and found.value == "bob.smith@xn--bcher-kva.example", spelling
    # Neither a sub-address nor another local part is the same mailbox.
    assert await store.find_suppression("bob.smith+tag@bücher.example", now=NOW) is None
    assert await store.find_suppression("bobsmith@bücher.example", now=NOW) is None


async def test_domain_entry_covers_its_exact_domain_only(store: QueueStore) -> None:
    await store.add_suppression(entry("Example.COM", "domain", reason="manual"))
    found = await store.find_suppression("anyone@example.com", now=NOW)
    assert found is not None and (found.kind, found.value) == ("domain", "example.com")
    assert await store.find_suppression("anyone@EXAMPLE.com.", now=NOW) is not None
    assert await store.find_suppression("anyone@mail.example.com", now=NOW) is None
    assert await store.find_suppression("anyone@example.com.au", now=NOW) is None


async def test_ip_entries_match_only_a_given_ip_of_their_kind(store: QueueStore) -> None:
    await store.add_suppression(entry("::ffff:192.0.2.7", "ip", reason="other"))
    [stored] = await store.list_suppressions()
    assert stored.value == "192.0.2.7"
    assert await store.find_suppression("", ip="192.0.2.7", now=NOW) is not None
    assert await store.find_suppression("a@example.org", ip="::ffff:192.0.2.7", now=NOW) is not None
    assert await store.find_suppression("a@example.org", now=NOW) is None
    assert await store.find_suppression("", ip="192.0.2.8", now=NOW) is None
    # A value is pinned to its kind: a domain entry spelled like the IP does not match the IP.
    await store.add_suppression(entry("198.51.100.1", "domain"))
    assert await store.find_suppression("", ip="198.51.100.1", now=NOW) is None


async def test_address_wins_over_domain_wins_over_ip(store: QueueStore) -> None:
    await store.add_suppression(entry("192.0.2.1", "ip", reason="other"))
    await store.add_suppression(entry("example.net", "domain", reason="manual"))
    await store.add_suppression(entry("x@example.net", reason="complaint"))
    found = await store.find_suppression("x@example.net", ip="192.0.2.1", now=NOW)
    assert found is not None and (found.kind, found.reason) == ("address", "complaint")
    found = await store.find_suppression("y@example.net", ip="192.0.2.1", now=NOW)
    assert found is not None and found.kind == "domain"
    found = await store.find_suppression("y@example.org", ip="192.0.2.1", now=NOW)
    assert found is not None and found.kind == "ip"


async def test_scoped_entries_apply_only_to_their_sender_domain(store: QueueStore) -> None:
    await store.add_suppression(entry("u@example.org", reason="unsubscribe", scope="News.Shop.Example"))
    found = await store.find_suppression("u@example.org", scope="news.shop.example", now=NOW)
    assert found is not None and (found.scope, found.reason) == ("news.shop.example", "unsubscribe")
    assert await store.find_suppression("U@Example.org", scope="NEWS.shop.example", now=NOW) is not None
    assert await store.find_suppression("u@example.org", scope="billing.shop.example", now=NOW) is None
    assert await store.find_suppression("u@example.org", now=NOW) is None
    # A global entry applies whatever the sender.
    await store.add_suppression(entry("v@example.org", reason="complaint"))
    for scope in ("", "news.shop.example", "other.example"):
        assert await store.find_suppression("v@example.org", scope=scope, now=NOW) is not None
    # Both exist for one address: the scoped one is the more specific answer.
    await store.add_suppression(entry("v@example.org", reason="unsubscribe", scope="news.shop.example"))
    found = await store.find_suppression("v@example.org", scope="news.shop.example", now=NOW)
    assert found is not None and found.reason == "unsubscribe"


async def test_expired_entries_never_match(store: QueueStore) -> None:
    await store.add_suppression(entry("old@example.org", reason="hard_bounce", expires_at=NOW - 1))
    await store.add_suppression(entry("edge@example.org", reason="hard_bounce", expires_at=NOW))
    await store.add_suppression(entry("live@example.org", reason="hard_bounce", expires_at=NOW + DAY))
    await store.add_suppression(entry("old.example", "domain", expires_at=NOW - 1))
    assert await store.find_suppression("old@example.org", now=NOW) is None
    assert await store.find_suppression("edge@example.org", now=NOW) is None  # expiry is exclusive
    assert await store.find_suppression("someone@old.example", now=NOW) is None
    assert await store.find_suppression("live@example.org", now=NOW) is not None
    assert await store.find_suppression("live@example.org", now=NOW + DAY + 1) is None
    # Without an explicit time the store uses the clock: an entry that expired long ago stays out.
    await store.add_suppression(entry("gone@example.org", expires_at=time.time() - 60))
    assert await store.find_suppression("gone@example.org") is None


async def test_re_adding_refreshes_reason_expiry_and_note(store: QueueStore) -> None:
    await store.add_suppression(entry("r@example.org", reason="hard_bounce", expires_at=NOW + DAY, note="first",
                                      source="delivery"))
    await store.add_suppression(entry("R@EXAMPLE.ORG", reason="complaint", expires_at=None, note="second",
                                      source="fbl", created_at=NOW + 5))
    [stored] = await store.list_suppressions()
    assert (stored.reason, stored.expires_at, stored.note, stored.source, stored.created_at) == (
        "complaint", None, "second", "fbl", NOW + 5)
    assert await store.count_suppressions() == 1
    assert await store.find_suppression("r@example.org", now=NOW + 10 * DAY) is not None


async def test_remove_by_any_spelling(store: QueueStore) -> None:
    await store.add_suppression(entry("gone@bücher.example"))
    await store.add_suppression(entry("gone@bücher.example", scope="shop.example"))
    assert await store.remove_suppression("GONE@xn--bcher-kva.example", "address") is True
    assert await store.remove_suppression("gone@bücher.example", "address") is False
    # The scoped entry is a different entry.
    assert await store.find_suppression("gone@bücher.example", scope="shop.example", now=NOW) is not None
    assert await store.remove_suppression("gone@bücher.example", "address", scope="SHOP.example") is True
    assert await store.count_suppressions() == 0


async def test_list_pages_in_key_order_and_filters_by_reason(store: QueueStore) -> None:
    values = [f"user{n:02d}@example.org" for n in range(25)]
    await store.add_suppressions([entry(v, reason="hard_bounce" if n % 5 else "complaint")
                                  for n, v in enumerate(reversed(values))])
    pages = [await store.list_suppressions(limit=10, offset=offset) for offset in (0, 10, 20, 30)]
    assert [len(page) for page in pages] == [10, 10, 5, 0]
    assert [s.value for page in pages for s in page] == sorted(values)
    complaints = await store.list_suppressions(reason="complaint")
    assert len(complaints) == 5 and {s.reason for s in complaints} == {"complaint"}
    assert await store.count_suppressions() == 25
    assert await store.count_suppressions(reason="complaint") == 5
    assert await store.count_suppressions(reason="unsubscribe") == 0


async def test_bulk_add_is_idempotent(store: QueueStore) -> None:
    batch = [entry(f"bulk{n}@example.org") for n in range(300)] + [entry("bulk.example", "domain")]
    await store.add_suppressions(batch)
    await store.add_suppressions(batch)
    await store.add_suppressions([])
    assert await store.count_suppressions() == 301


async def test_purge_removes_only_expired_entries(store: QueueStore) -> None:
    await store.add_suppressions([
        entry("a@example.org", expires_at=NOW - 10), entry("b@example.org", expires_at=time.time() + DAY),
        entry("c@example.org"), entry("d.example", "domain", expires_at=NOW - 1)])
    assert await store.purge_expired_suppressions(now=NOW) == 2
    assert [s.value for s in await store.list_suppressions()] == ["b@example.org", "c@example.org"]
    assert await store.purge_expired_suppressions(now=NOW) == 0
    # The queue's regular purge drops expired entries too (by the clock).
    await store.add_suppression(entry("e@example.org", expires_at=time.time() - 1))
    await store.purge(finished_before=0, history_before=0)
    assert [s.value for s in await store.list_suppressions()] == ["b@example.org", "c@example.org"]


async def test_bad_entries_are_refused(store: QueueStore) -> None:
    with pytest.raises(ValueError, match="kind"):
        await store.add_suppression(entry("x@example.org", "mailbox"))
    with pytest.raises(ValueError, match="value"):
        await store.add_suppression(entry("  ", "domain"))
    with pytest.raises(ValueError, match="scope"):
        await store.add_suppression(entry("192.0.2.1", "ip", scope="shop.example"))
    with pytest.raises(ValueError, match="kind"):
        await store.remove_suppression("x@example.org", "mailbox")
    assert await store.count_suppressions() == 0


async def test_lookup_is_one_indexed_query(store_url: str, store: QueueStore) -> None:
    await store.add_suppressions([entry(f"p{n}@example.org") for n in range(50)])
    params = lookup_keys("p1@example.org", "192.0.2.1", "shop.example", NOW).params()
    if store_url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(store_url)) as conn:
            plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql(FIND_SUPPRESSION, "?"),
                                                             params))
        # Every probe is a search on the key (SQLite even pins kind and scope); never a scan.
        assert "SEARCH suppressions USING PRIMARY KEY (value=?" in plan and "SCAN" not in plan, plan
        return
    query = sql(FIND_SUPPRESSION, "$")
    for number, value in enumerate(params, start=1):
        literal = str(value) if isinstance(value, float) else "'" + value.replace("'", "''") + "'"
        query = query.replace(f"${number}", literal)
    with psycopg.connect(store_url) as pg:
        # Off, the planner still scans when no index can serve the query: seeing the key proves one can.
        pg.execute("SET enable_seqscan = off")
        plan = " ".join(row[0] for row in pg.execute("EXPLAIN " + query))
    assert "suppressions_pkey" in plan and "Seq Scan" not in plan, plan


# -- the event outbox -------------------------------------------------------------------------------------


async def test_events_are_recorded_listed_and_idempotent(store: QueueStore, store_url: str) -> None:
    first = Event(id="ev-1", type="suppressed", created_at=NOW, message_id="Q1", recipient="a@example.org",
                  data={"reason": "hard_bounce", "nested": {"n": [1, 2]}, "text": "Grüße"})
    second = Event(id="ev-2", type="unsubscribed", created_at=NOW + 1)
    third = Event(id="ev-3", type="suppressed", created_at=NOW + 2, data={"reason": "complaint"})
    for event in (third, first, second):
        await store.record_event(event)
    await store.record_event(Event(id="ev-1", type="changed", created_at=NOW + 99))  # known id: ignored
    assert await store.list_events() == [first, second, third]
    assert await store.list_events(type="suppressed") == [first, third]
    assert await store.list_events(since=NOW + 1) == [second, third]
    assert await store.list_events(type="suppressed", since=NOW + 1, limit=5) == [third]
    assert await store.list_events(limit=1) == [first]
    # The delivery columns the webhook sender works from: due at once, nothing tried yet.
    rows = raw_rows(store_url, "SELECT id, attempts, next_attempt_at, delivered_at, dead_at, last_error "
                               "FROM events ORDER BY id")
    assert rows == [("ev-1", 0, NOW, None, None, None), ("ev-2", 0, NOW + 1, None, None, None),
                    ("ev-3", 0, NOW + 2, None, None, None)]
    [data] = raw_rows(store_url, "SELECT data FROM events WHERE id = 'ev-1'")
    decoded = data[0] if isinstance(data[0], dict) else json.loads(data[0])
    assert decoded == first.data


async def test_an_event_without_id_is_refused(store: QueueStore) -> None:
    with pytest.raises(ValueError, match="id"):
        await store.record_event(Event(id="", type="suppressed", created_at=NOW))
    assert await store.list_events() == []

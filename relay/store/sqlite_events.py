"""The embedded store's side of webhooks, statistics and alerts (mixed into :class:`SqliteStore`).

Writes run as jobs of the store's writer thread inside ``BEGIN IMMEDIATE`` transactions, so a fan-out,
a claim or a health update reads and writes under the database write lock: nothing interleaves with it
(the embedded store is single-node; leases still guard against a crashed worker's rows).
"""

# S608: SQL here is assembled only from constants of this package; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from relay.store import eventsql as q
from relay.store import suppressions as lists
from relay.store.base import (
    EndpointHealth,
    Event,
    EventTally,
    HourlyStats,
    WebhookDelivery,
    WebhookResult,
    WebhookTarget,
)

T = TypeVar("T")

_INSERT_EVENT = q.sql(q.INSERT_EVENT, "?")
_INSERT_DELIVERY = q.sql(q.INSERT_DELIVERY, "?")
_RECORD_DELIVERY = q.sql(q.RECORD_DELIVERY, "?")
_ENSURE_HEALTH = q.sql(q.ENSURE_HEALTH, "?")
_UPDATE_HEALTH = q.sql(q.UPDATE_HEALTH, "?")
_STATS_INSERT = q.sql(q.STATS_INSERT, "?")
_STATS_SELECT = q.sql(q.STATS_SELECT, "?") + "AND (?4 IS NULL OR domain = ?4) ORDER BY hour, domain"
_CLAIM_ALERT = q.sql(q.CLAIM_ALERT, "?")

_ANY_UNDISPATCHED = ("SELECT 1 FROM events WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= ? "
                     "LIMIT 1")
_ANY_DUE = ("SELECT 1 FROM webhook_deliveries WHERE endpoint = ?1 AND delivered_at IS NULL AND dead_at IS NULL "
            "AND next_attempt_at <= ?2 AND (lease_until IS NULL OR lease_until < ?2) LIMIT 1")
_PICK_UNDISPATCHED = ("SELECT id, type, next_attempt_at FROM events WHERE delivered_at IS NULL AND dead_at IS NULL "
                      "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?")
_CLAIM_DELIVERIES = (
    "UPDATE webhook_deliveries SET lease_owner = ?4, lease_until = ?5 WHERE endpoint = ?1 AND event_id IN ("
    " SELECT event_id FROM webhook_deliveries WHERE endpoint = ?1 AND delivered_at IS NULL AND dead_at IS NULL"
    "  AND next_attempt_at <= ?2 AND (lease_until IS NULL OR lease_until < ?2)"
    " ORDER BY next_attempt_at LIMIT ?3) RETURNING event_id")
_DELIVERIES_BY_ID = (f"SELECT {q.DELIVERY_SELECT} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id "
                     "WHERE d.endpoint = ? AND d.event_id IN (SELECT value FROM json_each(?)) "
                     "ORDER BY d.next_attempt_at, d.event_id")
_LIST_DEAD = (f"SELECT {q.DELIVERY_SELECT} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id "
              "WHERE d.dead_at IS NOT NULL AND (?1 IS NULL OR d.endpoint = ?1) AND e.created_at >= ?2 "
              "ORDER BY d.dead_at DESC, d.event_id LIMIT ?3")
_LIST_WAITING = (f"SELECT {q.DELIVERY_SELECT} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id "
                 "WHERE d.delivered_at IS NULL AND d.dead_at IS NULL AND (?1 IS NULL OR d.endpoint = ?1) "
                 "AND e.created_at >= ?2 ORDER BY d.next_attempt_at, d.event_id LIMIT ?3")
_REPLAY_SET = q.REPLAY_SET.format(now="?1")
# ?2 endpoint, ?3 its types (JSON array or NULL), ?4 event ids (JSON array or NULL), ?5 since (or NULL).
_REPLAY_QUEUE = (
    "INSERT INTO webhook_deliveries (endpoint, event_id, created_at, next_attempt_at) "
    "SELECT ?2, id, ?1, ?1 FROM events WHERE (?3 IS NULL OR type IN (SELECT value FROM json_each(?3))) "
    "AND (?4 IS NULL OR id IN (SELECT value FROM json_each(?4))) AND (?5 IS NULL OR created_at >= ?5) "
    f"ON CONFLICT (endpoint, event_id) DO UPDATE SET {_REPLAY_SET} "
    "WHERE webhook_deliveries.lease_until IS NULL OR webhook_deliveries.lease_until < ?1")
_REPLAY_DEAD = (
    f"UPDATE webhook_deliveries SET {_REPLAY_SET} WHERE endpoint = ?2 AND dead_at IS NOT NULL "
    "AND event_id IN (SELECT id FROM events WHERE created_at >= ?3 "
    "AND (?4 IS NULL OR type IN (SELECT value FROM json_each(?4))))")
_PURGE_EVENTS = f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ? LIMIT {q.PURGE_CHUNK})"

# The domain after the last "@" of an address column (the whole value when it has none).
def _after_at(column: str) -> str:
    return f"replace({column}, rtrim({column}, replace({column}, '@', '')), '')"


_SENDER_DOMAIN_IN_DATA = "json_extract(e.data, '$.sender_domain')"
_TALLY = (
    f"SELECT e.type AS type, lower(COALESCE({_SENDER_DOMAIN_IN_DATA}, {_after_at('m.sender')}, '')) AS sender_domain,"
    f" lower(COALESCE(json_extract(e.data, '$.domain'), {_after_at('e.recipient')}, '')) AS domain,"
    " COALESCE(json_extract(e.data, '$.bounce_type'), '') AS bounce_type, COUNT(*) AS n "
    # The message is looked up only for events that do not carry their sender domain (tracking's).
    f"FROM events e LEFT JOIN messages m ON m.id = e.message_id AND {_SENDER_DOMAIN_IN_DATA} IS NULL "
    f"WHERE e.created_at >= ?1 AND e.created_at < ?2 AND e.type IN {q.TALLIED_SQL} "
    "GROUP BY 1, 2, 3, 4 "
    # A message's queued event counts its recipients per domain.
    "UNION ALL SELECT 'queued', lower(COALESCE(json_extract(e.data, '$.sender_domain'), '')), lower(d.key), '',"
    " SUM(d.value) FROM events e, json_each(e.data, '$.domains') d "
    "WHERE e.created_at >= ?1 AND e.created_at < ?2 AND e.type = 'queued' GROUP BY 1, 2, 3, 4")


class SqliteEventsMixin:
    """Webhook, statistics and alert methods of :class:`relay.store.sqlite.SqliteStore`."""

    if TYPE_CHECKING:
        async def _write(self, fn: Callable[[sqlite3.Connection], T], *, transactional: bool = True) -> T: ...
        async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    # -- outbox ------------------------------------------------------------------------------------------
    async def record_events(self, events: Sequence[Event]) -> None:
        values = [lists.event_values(event) for event in events]
        if values:
            await self._write(lambda conn: conn.executemany(_INSERT_EVENT, values))

    async def get_event(self, event_id: str) -> Event | None:
        row = await self._read(lambda conn: conn.execute(
            f"SELECT {lists.EVENT_SELECT} FROM events WHERE id = ?", (event_id,)).fetchone())
        return None if row is None else lists.event(row)

    async def purge_events(self, created_before: float) -> int:
        removed = 0
        while True:
            count = await self._write(lambda conn: conn.execute(_PURGE_EVENTS, (created_before,)).rowcount)
            removed += int(count)
            if count < q.PURGE_CHUNK:
                return removed

    # -- webhooks ------------------------------------------------------------------------------------------
    # The webhook loop polls every second or so; a look through a reader first keeps those polls off the
    # single writer thread (and its write lock) whenever there is nothing to take.
    async def dispatch_events(self, targets: Sequence[WebhookTarget], now: float, limit: int) -> int:
        if not await self._read(lambda conn: conn.execute(_ANY_UNDISPATCHED, (now,)).fetchone()):
            return 0
        return await self._write(lambda conn: _dispatch(conn, targets, now, limit))

    async def claim_webhook_deliveries(self, endpoint: str, now: float, limit: int, owner: str,
                                       lease_seconds: float) -> list[WebhookDelivery]:
        if limit <= 0 or not await self._read(lambda conn: conn.execute(_ANY_DUE, (endpoint, now)).fetchone()):
            return []
        return await self._write(lambda conn: _claim(conn, endpoint, now, limit, owner, now + lease_seconds))

    async def record_webhook_results(self, results: Sequence[WebhookResult], owner: str, now: float) -> None:
        values = [(int(r.delivered), now, int(r.dead), r.next_attempt_at, r.error, r.endpoint, r.event_id, owner)
                  for r in results]
        if values:
            await self._write(lambda conn: conn.executemany(_RECORD_DELIVERY, values))

    async def list_webhook_deliveries(self, *, endpoint: str | None = None, dead: bool = True,
                                      since: float | None = None, limit: int = 1000) -> list[WebhookDelivery]:
        statement = _LIST_DEAD if dead else _LIST_WAITING
        found = await self._read(lambda conn: conn.execute(statement, (endpoint, since or 0.0, limit)).fetchall())
        return [q.webhook_delivery(row) for row in found]

    async def replay_webhook_deliveries(self, targets: Sequence[WebhookTarget], now: float, *,
                                        event_ids: Sequence[str] = (), since: float | None = None,
                                        dead_only: bool = True) -> int:
        return await self._write(lambda conn: _replay(conn, targets, now, event_ids, since, dead_only))

    async def record_endpoint_outcome(self, endpoint: str, *, successes: int, failures: int, now: float,
                                      pause_after: int, pause_for: float, error: str | None = None
                                      ) -> EndpointHealth:
        def apply(conn: sqlite3.Connection) -> EndpointHealth:
            conn.execute(_ENSURE_HEALTH, (endpoint, now))
            row = conn.execute(f"SELECT {q.HEALTH_COLUMNS} FROM webhook_endpoints WHERE endpoint = ?",
                               (endpoint,)).fetchone()
            health = q.next_health(q.endpoint_health(row), successes=successes, failures=failures, now=now,
                                   pause_after=pause_after, pause_for=pause_for, error=error)
            conn.execute(_UPDATE_HEALTH, (endpoint, health.consecutive_failures, health.paused_until,
                                          health.last_error, now))
            return health

        return await self._write(apply)

    async def endpoint_health(self) -> list[EndpointHealth]:
        found = await self._read(lambda conn: conn.execute(
            f"SELECT {q.HEALTH_COLUMNS} FROM webhook_endpoints ORDER BY endpoint").fetchall())
        return [q.endpoint_health(row) for row in found]

    # -- statistics and alerts -------------------------------------------------------------------------
    async def tally_events(self, start: float, end: float) -> list[EventTally]:
        found = await self._read(lambda conn: conn.execute(_TALLY, (start, end)).fetchall())
        return [q.event_tally(row) for row in found]

    async def replace_hourly_stats(self, hour: float, rows: Sequence[HourlyStats], now: float) -> None:
        values = [q.stats_values(stats, now) for stats in rows]

        def replace(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM stats_hourly WHERE hour = ?", (hour,))
            conn.executemany(_STATS_INSERT, values)

        await self._write(replace)

    async def purge_hourly_stats(self, hours_before: float) -> int:
        removed = await self._write(lambda conn: conn.execute(
            "DELETE FROM stats_hourly WHERE hour < ?", (hours_before,)).rowcount)
        return int(removed)

    async def read_hourly_stats(self, dimension: str, since: float, until: float,
                                domain: str | None = None) -> list[HourlyStats]:
        found = await self._read(lambda conn: conn.execute(
            _STATS_SELECT, (dimension, since, until, domain)).fetchall())
        return [q.hourly_stats(row) for row in found]

    async def claim_alert(self, kind: str, scope: str, level: str, now: float, period: float) -> bool:
        row = await self._write(lambda conn: conn.execute(
            _CLAIM_ALERT, (kind, scope, level, now, now - period)).fetchone())
        return row is not None


def _dispatch(conn: sqlite3.Connection, targets: Sequence[WebhookTarget], now: float, limit: int) -> int:
    picked = conn.execute(_PICK_UNDISPATCHED, (now, limit)).fetchall()
    if not picked:
        return 0
    conn.executemany(_INSERT_DELIVERY, [(target.name, row[0], now, row[2]) for row in picked for target in targets
                                        if target.wants(row[1])])
    conn.execute("UPDATE events SET delivered_at = ? WHERE id IN (SELECT value FROM json_each(?))",
                 (now, json.dumps([row[0] for row in picked])))
    return len(picked)


def _claim(conn: sqlite3.Connection, endpoint: str, now: float, limit: int, owner: str,
           lease_until: float) -> list[WebhookDelivery]:
    ids = [row[0] for row in conn.execute(_CLAIM_DELIVERIES, (endpoint, now, limit, owner, lease_until))]
    if not ids:
        return []
    found = conn.execute(_DELIVERIES_BY_ID, (endpoint, json.dumps(ids))).fetchall()
    return [q.webhook_delivery(row) for row in found]


def _replay(conn: sqlite3.Connection, targets: Sequence[WebhookTarget], now: float, event_ids: Sequence[str],
            since: float | None, dead_only: bool) -> int:
    queued = 0
    ids = json.dumps(list(event_ids)) if event_ids else None
    for target in targets:
        types = q.types_json(target.types)
        if dead_only and not event_ids:
            params: tuple[Any, ...] = (now, target.name, since or 0.0, types)
            queued += conn.execute(_REPLAY_DEAD, params).rowcount
        else:
            queued += conn.execute(_REPLAY_QUEUE, (now, target.name, types, ids, since)).rowcount
    return queued

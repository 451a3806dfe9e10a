"""The shared store's side of webhooks, statistics and alerts (mixed into :class:`PostgresStore`).

Fan-out and claims take rows with ``FOR UPDATE SKIP LOCKED``: several relay nodes running the webhook loop
on one database skip each other's rows instead of waiting, so an event is fanned out once and a delivery is
held by one node at a time (its lease ends it for everyone else until it runs out or is recorded). An
endpoint's health row is read ``FOR UPDATE`` and rewritten in one transaction.
"""

# S608: SQL here is assembled only from constants of this package; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

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

_INSERT_EVENT = q.sql(q.INSERT_EVENT, "$").replace("$6,", "$6::jsonb,")
_INSERT_DELIVERY = q.sql(q.INSERT_DELIVERY, "$")
_RECORD_DELIVERY = (q.sql(q.RECORD_DELIVERY, "$").replace("COALESCE($4,", "COALESCE($4::double precision,")
                    .replace("WHEN $1 THEN $2", "WHEN $1::boolean THEN $2::double precision")
                    .replace("WHEN $3 THEN $2", "WHEN $3::boolean THEN $2::double precision"))
# Nodes recomputing one hour at once take turns (else both could insert the hour's rows): one advisory
# lock per hour, held until the transaction ends. The key is "stat" in the high half, the hour below.
_STATS_LOCK_BASE = 0x73746174 << 32
_ENSURE_HEALTH = q.sql(q.ENSURE_HEALTH, "$")
_UPDATE_HEALTH = q.sql(q.UPDATE_HEALTH, "$")
_STATS_INSERT = q.sql(q.STATS_INSERT, "$")
_STATS_SELECT = q.sql(q.STATS_SELECT, "$") + "AND ($4::text IS NULL OR domain = $4) ORDER BY hour, domain"
_CLAIM_ALERT = q.sql(q.CLAIM_ALERT, "$")
# data::text: the JSON as text, decoded like SQLite's (asyncpg has no jsonb codec unless one is installed).
_DELIVERY_SELECT = q.DELIVERY_SELECT.replace("e.data", "e.data::text AS data")

_DISPATCH = """
WITH picked AS MATERIALIZED (
    SELECT id FROM events WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= $1
    ORDER BY next_attempt_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE events e SET delivered_at = $1 FROM picked WHERE e.id = picked.id
RETURNING e.id, e.type, e.next_attempt_at
"""
_CLAIM_DELIVERIES = f"""
WITH picked AS MATERIALIZED (
    SELECT endpoint, event_id FROM webhook_deliveries
    WHERE endpoint = $1 AND delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= $2
      AND (lease_until IS NULL OR lease_until < $2)
    ORDER BY next_attempt_at LIMIT $3
    FOR UPDATE SKIP LOCKED
), d AS (
    UPDATE webhook_deliveries w SET lease_owner = $4, lease_until = $5
    FROM picked WHERE w.endpoint = picked.endpoint AND w.event_id = picked.event_id
    RETURNING w.*
)
SELECT {_DELIVERY_SELECT} FROM d JOIN events e ON e.id = d.event_id ORDER BY d.next_attempt_at, d.event_id
"""
_LIST_DEAD = (f"SELECT {_DELIVERY_SELECT} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id "
              "WHERE d.dead_at IS NOT NULL AND ($1::text IS NULL OR d.endpoint = $1) AND e.created_at >= $2 "
              "ORDER BY d.dead_at DESC, d.event_id LIMIT $3")
_LIST_WAITING = (f"SELECT {_DELIVERY_SELECT} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id "
                 "WHERE d.delivered_at IS NULL AND d.dead_at IS NULL AND ($1::text IS NULL OR d.endpoint = $1) "
                 "AND e.created_at >= $2 ORDER BY d.next_attempt_at, d.event_id LIMIT $3")
_REPLAY_SET = q.REPLAY_SET.format(now="$1")
# $2 endpoint, $3 its types (NULL: all), $4 event ids (NULL: any), $5 since (NULL: any time).
_REPLAY_QUEUE = (
    "INSERT INTO webhook_deliveries (endpoint, event_id, created_at, next_attempt_at) "
    "SELECT $2, id, $1, $1 FROM events WHERE ($3::text[] IS NULL OR type = ANY($3::text[])) "
    "AND ($4::text[] IS NULL OR id = ANY($4::text[])) AND ($5::double precision IS NULL OR created_at >= $5) "
    f"ON CONFLICT (endpoint, event_id) DO UPDATE SET {_REPLAY_SET} "
    "WHERE webhook_deliveries.lease_until IS NULL OR webhook_deliveries.lease_until < $1")
_REPLAY_DEAD = (
    f"UPDATE webhook_deliveries SET {_REPLAY_SET} WHERE endpoint = $2 AND dead_at IS NOT NULL "
    "AND event_id IN (SELECT id FROM events WHERE created_at >= $3 "
    "AND ($4::text[] IS NULL OR type = ANY($4::text[])))")
_PURGE_EVENTS = f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < $1 LIMIT {q.PURGE_CHUNK})"

_SENDER_DOMAIN_IN_DATA = "(e.data->>'sender_domain')"
_TALLY = (
    f"SELECT e.type AS type, lower(COALESCE({_SENDER_DOMAIN_IN_DATA}, substring(m.sender from '[^@]*$'), '')) "
    "AS sender_domain, lower(COALESCE(e.data->>'domain', substring(e.recipient from '[^@]*$'), '')) AS domain,"
    " COALESCE(e.data->>'bounce_type', '') AS bounce_type, COUNT(*) AS n "
    # The message is looked up only for events that do not carry their sender domain (tracking's).
    f"FROM events e LEFT JOIN messages m ON m.id = e.message_id AND {_SENDER_DOMAIN_IN_DATA} IS NULL "
    f"WHERE e.created_at >= $1 AND e.created_at < $2 AND e.type IN {q.TALLIED_SQL} "
    "GROUP BY 1, 2, 3, 4 "
    # A message's queued event counts its recipients per domain.
    "UNION ALL SELECT 'queued', lower(COALESCE(e.data->>'sender_domain', '')), lower(d.key), '',"
    " SUM(d.value::bigint) FROM events e CROSS JOIN LATERAL jsonb_each_text(e.data->'domains') AS d(key, value) "
    "WHERE e.created_at >= $1 AND e.created_at < $2 AND e.type = 'queued' GROUP BY 1, 2, 3, 4")


class PostgresEventsMixin:
    """Webhook, statistics and alert methods of :class:`relay.store.postgres.PostgresStore`."""

    if TYPE_CHECKING:
        def _connection(self) -> AbstractAsyncContextManager[Any]: ...

    # -- outbox ------------------------------------------------------------------------------------------
    async def record_events(self, events: Sequence[Event]) -> None:
        values = [lists.event_values(event) for event in events]
        if values:
            async with self._connection() as conn, conn.transaction():
                await conn.executemany(_INSERT_EVENT, values)

    async def get_event(self, event_id: str) -> Event | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, type, created_at, message_id, recipient, data::text AS data FROM events WHERE id = $1",
                event_id)
        return None if row is None else lists.event(row)

    async def purge_events(self, created_before: float) -> int:
        removed = 0
        while True:
            async with self._connection() as conn:
                status: str = await conn.execute(_PURGE_EVENTS, created_before)
            count = int(status.split()[-1])
            removed += count
            if count < q.PURGE_CHUNK:
                return removed

    # -- webhooks ------------------------------------------------------------------------------------------
    async def dispatch_events(self, targets: Sequence[WebhookTarget], now: float, limit: int) -> int:
        async with self._connection() as conn, conn.transaction():
            picked = await conn.fetch(_DISPATCH, now, limit)
            deliveries = [(target.name, row["id"], now, row["next_attempt_at"]) for row in picked for target in targets
                          if target.wants(row["type"])]
            if deliveries:
                await conn.executemany(_INSERT_DELIVERY, deliveries)
        return len(picked)

    async def claim_webhook_deliveries(self, endpoint: str, now: float, limit: int, owner: str,
                                       lease_seconds: float) -> list[WebhookDelivery]:
        if limit <= 0:
            return []
        async with self._connection() as conn:
            found = await conn.fetch(_CLAIM_DELIVERIES, endpoint, now, limit, owner, now + lease_seconds)
        return [q.webhook_delivery(row) for row in found]

    async def record_webhook_results(self, results: Sequence[WebhookResult], owner: str, now: float) -> None:
        values = [(r.delivered, now, r.dead, r.next_attempt_at, r.error, r.endpoint, r.event_id, owner)
                  for r in results]
        if values:
            async with self._connection() as conn, conn.transaction():
                await conn.executemany(_RECORD_DELIVERY, values)

    async def list_webhook_deliveries(self, *, endpoint: str | None = None, dead: bool = True,
                                      since: float | None = None, limit: int = 1000) -> list[WebhookDelivery]:
        async with self._connection() as conn:
            found = await conn.fetch(_LIST_DEAD if dead else _LIST_WAITING, endpoint, since or 0.0, limit)
        return [q.webhook_delivery(row) for row in found]

    async def replay_webhook_deliveries(self, targets: Sequence[WebhookTarget], now: float, *,
                                        event_ids: Sequence[str] = (), since: float | None = None,
                                        dead_only: bool = True) -> int:
        queued = 0
        ids = list(event_ids) if event_ids else None
        async with self._connection() as conn, conn.transaction():
            for target in targets:
                types = None if target.types is None else sorted(target.types)
                if dead_only and not event_ids:
                    status = await conn.execute(_REPLAY_DEAD, now, target.name, since or 0.0, types)
                else:
                    status = await conn.execute(_REPLAY_QUEUE, now, target.name, types, ids, since)
                queued += int(status.split()[-1])
        return queued

    async def record_endpoint_outcome(self, endpoint: str, *, successes: int, failures: int, now: float,
                                      pause_after: int, pause_for: float, error: str | None = None
                                      ) -> EndpointHealth:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_ENSURE_HEALTH, endpoint, now)
            row = await conn.fetchrow(
                f"SELECT {q.HEALTH_COLUMNS} FROM webhook_endpoints WHERE endpoint = $1 FOR UPDATE", endpoint)
            health = q.next_health(q.endpoint_health(row), successes=successes, failures=failures, now=now,
                                   pause_after=pause_after, pause_for=pause_for, error=error)
            await conn.execute(_UPDATE_HEALTH, endpoint, health.consecutive_failures, health.paused_until,
                               health.last_error, now)
        return health

    async def endpoint_health(self) -> list[EndpointHealth]:
        async with self._connection() as conn:
            found = await conn.fetch(f"SELECT {q.HEALTH_COLUMNS} FROM webhook_endpoints ORDER BY endpoint")
        return [q.endpoint_health(row) for row in found]

    # -- statistics and alerts -------------------------------------------------------------------------
    async def tally_events(self, start: float, end: float) -> list[EventTally]:
        async with self._connection() as conn:
            found = await conn.fetch(_TALLY, start, end)
        return [q.event_tally(row) for row in found]

    async def replace_hourly_stats(self, hour: float, rows: Sequence[HourlyStats], now: float) -> None:
        values = [q.stats_values(stats, now) for stats in rows]
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _STATS_LOCK_BASE | int(hour // 3600))
            await conn.execute("DELETE FROM stats_hourly WHERE hour = $1", hour)
            if values:
                await conn.executemany(_STATS_INSERT, values)

    async def purge_hourly_stats(self, hours_before: float) -> int:
        async with self._connection() as conn:
            status: str = await conn.execute("DELETE FROM stats_hourly WHERE hour < $1", hours_before)
        return int(status.split()[-1])

    async def read_hourly_stats(self, dimension: str, since: float, until: float,
                                domain: str | None = None) -> list[HourlyStats]:
        async with self._connection() as conn:
            found = await conn.fetch(_STATS_SELECT, dimension, since, until, domain)
        return [q.hourly_stats(row) for row in found]

    async def claim_alert(self, kind: str, scope: str, level: str, now: float, period: float) -> bool:
        async with self._connection() as conn:
            row = await conn.fetchrow(_CLAIM_ALERT, kind, scope, level, now, now - period)
        return row is not None

"""Rows and SQL shared by both stores for the event outbox's consumers: webhooks, statistics, alerts.

The statements that read the same in both dialects are written once with ``{p1}``-style placeholders
(formatted by :func:`relay.store.suppressions.sql`); those that differ (JSON access, locking, arrays) live
next to their store in :mod:`relay.store.sqlite_events` and :mod:`relay.store.postgres_events`.

Invariants:
- A message's ``queued`` event — one per message, naming its recipients: measured, one row per recipient
  halved the acceptance rate of 10-recipient messages on SQLite — is written by ``enqueue`` in the
  transaction that stores the message (and by ``record_results`` for the bounce messages it queues), so an
  accepted message always has it and a refused one never does.
- A webhook delivery row is changed only by the holder of its lease (or, for replays, when no lease is
  running), so two nodes never send one event to one endpoint at once.
- The health of an endpoint changes in one transaction that reads and writes its row
  (:func:`next_health` decides), so concurrent batches cannot lose a failure or pause it twice.
"""

# S608: SQL here is assembled only from constants of this module; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from relay.policies.addresses import address_domain
from relay.store import suppressions as lists
from relay.store.base import EndpointHealth, EventTally, HourlyStats, NewMessage, WebhookDelivery
from relay.store.rows import Row

#: Event types the statistics count (the rest — suppressed, unsubscribed, alert, dropped — are not volumes).
TALLIED_TYPES = ("queued", "delivered", "deferred", "bounced", "expired", "complained", "opened", "clicked")
#: The per-recipient ones (``queued`` is per message: its recipients are counted from its ``domains``).
_PER_RECIPIENT = [name for name in TALLIED_TYPES if name != "queued"]
TALLIED_SQL = "(" + ", ".join(f"'{name}'" for name in _PER_RECIPIENT) + ")"
#: Deliveries a replay or purge touches per statement.
PURGE_CHUNK = 5000

INSERT_EVENT = (f"INSERT INTO events ({', '.join(lists.EVENT_COLUMNS)}) "
                "VALUES ({p1}, {p2}, {p3}, {p4}, {p5}, {p6}, {p7}) ON CONFLICT (id) DO NOTHING")

# Due when the event was (its created_at), so that each endpoint gets the oldest events first.
INSERT_DELIVERY = ("INSERT INTO webhook_deliveries (endpoint, event_id, created_at, next_attempt_at) "
                   "VALUES ({p1}, {p2}, {p3}, {p4}) ON CONFLICT (endpoint, event_id) DO NOTHING")

# Only the lease holder's word counts. A failure keeps the row waiting (next_attempt_at) or kills it.
RECORD_DELIVERY = (
    "UPDATE webhook_deliveries SET attempts = attempts + 1, "
    "delivered_at = CASE WHEN {p1} THEN {p2} ELSE NULL END, dead_at = CASE WHEN {p3} THEN {p2} ELSE NULL END, "
    "next_attempt_at = COALESCE({p4}, next_attempt_at), last_error = {p5}, lease_owner = NULL, lease_until = NULL "
    "WHERE endpoint = {p6} AND event_id = {p7} AND lease_owner = {p8}")

# What a replay resets: due now, a fresh retry window, nothing delivered, dead or leased.
REPLAY_SET = ("created_at = {now}, next_attempt_at = {now}, attempts = 0, delivered_at = NULL, dead_at = NULL, "
              "last_error = NULL, lease_owner = NULL, lease_until = NULL")

DELIVERY_SELECT = ("d.endpoint, d.event_id, d.created_at AS queued_at, d.attempts, d.next_attempt_at, "
                   "d.lease_until, d.delivered_at, d.dead_at, d.last_error, "
                   "e.type, e.created_at, e.message_id, e.recipient, e.data")

HEALTH_COLUMNS = "endpoint, consecutive_failures, paused_until, last_error, updated_at"
ENSURE_HEALTH = ("INSERT INTO webhook_endpoints (endpoint, consecutive_failures, updated_at) "
                 "VALUES ({p1}, 0, {p2}) ON CONFLICT (endpoint) DO NOTHING")
UPDATE_HEALTH = ("UPDATE webhook_endpoints SET consecutive_failures = {p2}, paused_until = {p3}, last_error = {p4}, "
                 "updated_at = {p5} WHERE endpoint = {p1}")

STATS_INSERT = ("INSERT INTO stats_hourly (dimension, hour, domain, sent, delivered, bounced_hard, bounced_soft, "
                "deferred, complained, opened, clicked, computed_at) "
                "VALUES ({p1}, {p2}, {p3}, {p4}, {p5}, {p6}, {p7}, {p8}, {p9}, {p10}, {p11}, {p12})")
STATS_SELECT = ("SELECT dimension, hour, domain, sent, delivered, bounced_hard, bounced_soft, deferred, complained, "
                "opened, clicked FROM stats_hourly WHERE dimension = {p1} AND hour >= {p2} AND hour < {p3} ")

# Raised unless the last raise of this (kind, scope) is younger than the period (p5 = now - period) and
# at least as severe. The conditional upsert is one statement: concurrent nodes cannot both win.
CLAIM_ALERT = (
    "INSERT INTO alerts_raised (kind, scope, level, raised_at) VALUES ({p1}, {p2}, {p3}, {p4}) "
    "ON CONFLICT (kind, scope) DO UPDATE SET level = excluded.level, raised_at = excluded.raised_at "
    "WHERE alerts_raised.raised_at <= {p5} OR (alerts_raised.level = 'warning' AND excluded.level = 'critical') "
    "RETURNING kind")


def sql(template: str, style: str) -> str:
    """A template with ``{pN}`` (N up to 12) as ``?N`` or ``$N``."""
    return template.format(**{f"p{n}": f"{style}{n}" for n in range(1, 13)})


def queued_event_values(messages: Sequence[NewMessage]) -> list[tuple[Any, ...]]:
    return [queued_event_row(message) for message in messages]


def queued_event_row(message: NewMessage) -> tuple[Any, ...]:
    """The events row of a message's ``queued`` event, in :data:`relay.store.suppressions.EVENT_COLUMNS` order.

    Its id is derived from the queue id (unique), and ``recipient`` is set when the message has one; ``data``
    lists the recipients and counts them per domain (what the statistics count ``sent`` by).
    """
    domains: dict[str, int] = {}
    for rcpt in message.recipients:
        domains[rcpt.domain] = domains.get(rcpt.domain, 0) + 1
    sender_domain = address_domain(message.sender) if message.sender else ""
    data = json.dumps({"auth_user": message.auth_user, "client_ip": message.client_ip, "domains": domains,
                       "recipients": [rcpt.address for rcpt in message.recipients], "sender": message.sender,
                       "sender_domain": sender_domain, "size": message.size},
                      separators=(",", ":"), sort_keys=True)
    only = message.recipients[0].address if len(message.recipients) == 1 else None
    return (f"q-{message.id}", "queued", message.received_at, message.id, only, data, message.received_at)


def webhook_delivery(row: Row) -> WebhookDelivery:
    """A delivery from a row of :data:`DELIVERY_SELECT`."""
    event = lists.event(_EventRow(row))
    return WebhookDelivery(
        endpoint=row["endpoint"], event=event, created_at=float(row["queued_at"]), attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]), lease_until=_float(row["lease_until"]),
        delivered_at=_float(row["delivered_at"]), dead_at=_float(row["dead_at"]), last_error=row["last_error"])


class _EventRow:
    """A delivery row seen as an events row (its event columns under their own names)."""

    def __init__(self, row: Row) -> None:
        self._row = row

    def __getitem__(self, key: str) -> Any:
        return self._row["event_id" if key == "id" else key]


def endpoint_health(row: Row) -> EndpointHealth:
    return EndpointHealth(endpoint=row["endpoint"], consecutive_failures=int(row["consecutive_failures"]),
                          paused_until=_float(row["paused_until"]), last_error=row["last_error"],
                          updated_at=float(row["updated_at"]))


def next_health(old: EndpointHealth, *, successes: int, failures: int, now: float, pause_after: int,
                pause_for: float, error: str | None) -> EndpointHealth:
    """The endpoint's health after a batch: a success resets (and resumes); failures count towards a pause.

    A pause that has run out is not cleared by time alone: the failure count stays at or above
    ``pause_after``, so the first attempt after the pause is a probe — one more failure pauses again at
    once, one success resumes normal sending.
    """
    if successes:
        return EndpointHealth(old.endpoint, 0, None, None, now)
    consecutive = old.consecutive_failures + failures
    paused_until = old.paused_until
    paused_now = False
    if pause_after > 0 and consecutive >= pause_after and not old.paused(now):
        paused_until = now + pause_for
        paused_now = True
    return EndpointHealth(old.endpoint, consecutive, paused_until, error or old.last_error, now, paused_now)


def event_tally(row: Row) -> EventTally:
    return EventTally(type=row["type"], sender_domain=row["sender_domain"] or "", domain=row["domain"] or "",
                      bounce_type=row["bounce_type"] or "", count=int(row["n"]))


def stats_values(stats: HourlyStats, now: float) -> tuple[Any, ...]:
    return (stats.dimension, stats.hour, stats.domain, stats.sent, stats.delivered, stats.bounced_hard,
            stats.bounced_soft, stats.deferred, stats.complained, stats.opened, stats.clicked, now)


def hourly_stats(row: Row) -> HourlyStats:
    return HourlyStats(dimension=row["dimension"], hour=float(row["hour"]), domain=row["domain"],
                       sent=int(row["sent"]), delivered=int(row["delivered"]), bounced_hard=int(row["bounced_hard"]),
                       bounced_soft=int(row["bounced_soft"]), deferred=int(row["deferred"]),
                       complained=int(row["complained"]), opened=int(row["opened"]), clicked=int(row["clicked"]))


def types_json(types: frozenset[str] | None) -> str | None:
    """A target's type filter for SQLite's json_each (None: every type)."""
    return None if types is None else json.dumps(sorted(types))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)

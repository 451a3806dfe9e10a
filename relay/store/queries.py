"""SQL for the operations side of both stores: the queue's shape, admin selections, admin claims.

Written once for SQLite and Postgres: each builder takes the placeholder style (``"?"`` gives ``?1``,
``?2`` … for sqlite3, ``"$"`` gives ``$1`` … for asyncpg) and returns the statement with its values in
order. Only constants of this module and of :mod:`relay.store.rows` are pasted into SQL; every value a
caller gives is bound.

Invariants:
- A shape is one grouped query over the pending recipients joined to their messages (age counts from
  reception); the buckets are a CASE over bound cut-off times, so the database does the counting.
- Selections page by recipient id (``id > after``, ``ORDER BY id``): a long admin operation never holds a
  transaction or a cursor open between pages, and rows changed meanwhile are simply seen as they are.
- Admin claims take only rows in the asked states that nobody leases, exactly like a delivery claim.
"""

# S608: SQL here is assembled only from this module's and rows' constants; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.store import rows
from relay.store.base import QueueEntry, RecipientQuery, RecipientState, ShapeCount, WebhookBacklog
from relay.store.rows import Row


class Params:
    """Collects bound values and hands out their placeholders in the driver's style."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"{self.style}{len(self.values)}"

    def add_all(self, values: Sequence[Any]) -> str:
        return ", ".join(self.add(value) for value in values)


def queue_shape(style: str, now: float, edges: Sequence[float], by_domain: bool,
                states: Sequence[RecipientState]) -> tuple[str, list[Any]]:
    """Counts per (state[, domain], bucket) with the oldest reception time of each cell."""
    params = Params(style)
    cases = " ".join(f"WHEN m.received_at > {params.add(now - edge)} THEN {i}" for i, edge in enumerate(edges))
    bucket = f"CASE {cases} ELSE {len(edges)} END" if edges else "0"
    domain = "r.domain" if by_domain else "''"
    group = "r.state, r.domain, bucket" if by_domain else "r.state, bucket"
    sql = (f"SELECT r.state AS state, {domain} AS domain, {bucket} AS bucket, COUNT(*) AS n, "
           "MIN(m.received_at) AS oldest "
           "FROM recipients r JOIN messages m ON m.id = r.message_id "
           f"WHERE r.state IN ({params.add_all([s.value for s in states])}) GROUP BY {group}")
    return sql, params.values


def shape_count(row: Row) -> ShapeCount:
    return ShapeCount(state=row["state"], domain=row["domain"], bucket=int(row["bucket"]), count=int(row["n"]),
                      oldest=float(row["oldest"]))


def find_recipients(style: str, query: RecipientQuery, now: float, limit: int,
                    after_id: int) -> tuple[str, list[Any]]:
    params = Params(style)
    where = [f"r.id > {params.add(after_id)}"]
    if query.states:
        where.append(f"r.state IN ({params.add_all([s.value for s in query.states])})")
    if query.message_ids:
        where.append(f"r.message_id IN ({params.add_all(list(query.message_ids))})")
    if query.domain:
        where.append(f"r.domain = {params.add(query.domain.lower())}")
    if query.recipient:
        where.append(f"lower(r.address) = {params.add(query.recipient.lower())}")
    if query.sender:
        sender = query.sender.lower()
        if "@" in sender:
            where.append(f"lower(m.sender) = {params.add(sender)}")
        else:
            # Every address at the domain; the domain is matched as the text after the last "@".
            where.append(f"lower(m.sender) LIKE {params.add('%@' + _escape_like(sender))} ESCAPE '\\'")
    if query.received_before is not None:
        where.append(f"m.received_at < {params.add(query.received_before)}")
    leased = f"(r.lease_until IS NOT NULL AND r.lease_until >= {params.add(now)})"
    sql = (f"SELECT {rows.RECIPIENT_SELECT}, m.sender, m.received_at, m.size, {leased} AS leased "
           "FROM recipients r JOIN messages m ON m.id = r.message_id "
           f"WHERE {' AND '.join(where)} ORDER BY r.id LIMIT {params.add(limit)}")
    return sql, params.values


def queue_entry(row: Row) -> QueueEntry:
    return QueueEntry(recipient=rows.recipient_row(row), sender=row["sender"],
                      received_at=float(row["received_at"]), size=int(row["size"]), leased=bool(row["leased"]))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# Lease the given rows if they are in the given states and free. SQLite form: returns the ids leased.
def claim_recipients_sqlite(ids: Sequence[int], owner: str, lease_until: float, now: float,
                            states: Sequence[RecipientState]) -> tuple[str, list[Any]]:
    params = Params("?")
    sql = (f"UPDATE recipients SET lease_owner = {params.add(owner)}, lease_until = {params.add(lease_until)} "
           f"WHERE id IN (SELECT value FROM json_each({params.add(_json_ids(ids))})) "
           f"AND state IN ({params.add_all([s.value for s in states])}) "
           f"AND (lease_until IS NULL OR lease_until < {params.add(now)}) RETURNING id")
    return sql, params.values


# Postgres form: skips rows another transaction is leasing at this very moment, returns whole claims.
CLAIM_RECIPIENTS_POSTGRES = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM recipients
    WHERE id = ANY($3::bigint[]) AND state = ANY($4::text[]) AND (lease_until IS NULL OR lease_until < $5)
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE recipients r SET lease_owner = $1, lease_until = $2
    FROM picked WHERE r.id = picked.id
    RETURNING {rows.RECIPIENT_SELECT}, r.lease_until
)
SELECT r.*, {rows.CLAIM_MESSAGE_SELECT}
FROM claimed r JOIN messages m ON m.id = r.message_id
ORDER BY r.id
"""

# Each walks a partial index (events_pending, webhook_deliveries_due, webhook_deliveries_dead): the
# delivered history, however long, is never read.
WEBHOOK_UNDISPATCHED = "SELECT COUNT(*) AS n FROM events WHERE delivered_at IS NULL AND dead_at IS NULL"
WEBHOOK_PENDING = ("SELECT endpoint, COUNT(*) AS n, MIN(created_at) AS oldest FROM webhook_deliveries "
                   "WHERE delivered_at IS NULL AND dead_at IS NULL GROUP BY endpoint")
WEBHOOK_DEAD = "SELECT endpoint, COUNT(*) AS n FROM webhook_deliveries WHERE dead_at IS NOT NULL GROUP BY endpoint"


def webhook_backlog(undispatched: int, pending: Sequence[Row], dead: Sequence[Row]) -> WebhookBacklog:
    oldest = min((float(row["oldest"]) for row in pending), default=None)
    return WebhookBacklog(undispatched, {row["endpoint"]: int(row["n"]) for row in pending},
                          {row["endpoint"]: int(row["n"]) for row in dead}, oldest)


def _json_ids(ids: Sequence[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"

"""Row shapes and SQL shared by both stores for the suppression list and the event outbox.

Both schemas (``migrations/*/0002_suppression_events.sql``) have the same logical columns; the SQL below is
written once with ``{p1}``-style placeholders that each store formats into its driver's parameter syntax
(``?1`` for SQLite, ``$1`` for asyncpg).

Invariants:
- Every value and scope goes through :mod:`relay.policies.addresses` before it reaches SQL, on the way in
  and on the way to a lookup, so stored rows and lookups always agree on the spelling.
- A lookup is one statement over the primary key ``(value, kind, scope)``: the three candidate values
  (address, domain, IP) are probed through the key's leading column, never by a scan.
"""

# S608: SQL here is assembled only from constants of this module; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from relay.policies.addresses import (
    KINDS,
    address_domain,
    normalize_address,
    normalize_domain,
    normalize_ip,
    normalize_value,
)
from relay.store.base import Event, Suppression
from relay.store.rows import Row

SUPPRESSION_COLUMNS = ("value", "kind", "scope", "reason", "source", "created_at", "expires_at", "note")
_COLUMNS = ", ".join(SUPPRESSION_COLUMNS)

# Re-adding an entry refreshes everything but its key (a bounce after an expiry, a manual note).
UPSERT_SUPPRESSION = (
    f"INSERT INTO suppressions ({_COLUMNS}) VALUES ({{p1}}, {{p2}}, {{p3}}, {{p4}}, {{p5}}, {{p6}}, {{p7}}, {{p8}}) "
    "ON CONFLICT (value, kind, scope) DO UPDATE SET reason = excluded.reason, source = excluded.source, "
    "created_at = excluded.created_at, expires_at = excluded.expires_at, note = excluded.note")

# p1 address, p2 domain, p3 ip ('' for a part not looked up: no stored value is empty), p4 scope, p5 now.
# The IN list walks the primary key; the OR pins each value to its kind (a domain entry "1.2.3.4" must not
# match the IP 1.2.3.4). Address entries win over domain entries over IP entries; scoped over global.
FIND_SUPPRESSION = (
    f"SELECT {_COLUMNS} FROM suppressions "
    "WHERE value IN ({p1}, {p2}, {p3}) "
    "AND ((kind = 'address' AND value = {p1}) OR (kind = 'domain' AND value = {p2}) "
    "OR (kind = 'ip' AND value = {p3})) "
    "AND scope IN ('', {p4}) AND (expires_at IS NULL OR expires_at > {p5}) "
    "ORDER BY CASE kind WHEN 'address' THEN 0 WHEN 'domain' THEN 1 ELSE 2 END, scope DESC LIMIT 1")

DELETE_SUPPRESSION = "DELETE FROM suppressions WHERE value = {p1} AND kind = {p2} AND scope = {p3}"
PURGE_EXPIRED = "DELETE FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= {p1}"

EVENT_COLUMNS = ("id", "type", "created_at", "message_id", "recipient", "data", "next_attempt_at")
EVENT_SELECT = "id, type, created_at, message_id, recipient, data"


def sql(template: str, style: str) -> str:
    """The template with ``{pN}`` as ``?N`` (``style="?"``) or ``$N`` (``style="$"``)."""
    return template.format(**{f"p{n}": f"{style}{n}" for n in range(1, 10)})


@dataclass(frozen=True, slots=True)
class LookupKeys:
    """The normalised values one lookup probes."""

    address: str
    domain: str
    ip: str
    scope: str
    now: float

    def params(self) -> tuple[str, str, str, str, float]:
        return (self.address, self.domain, self.ip, self.scope, self.now)


def lookup_keys(address: str, ip: str | None, scope: str, now: float | None) -> LookupKeys:
    has_address = bool(address.strip())
    return LookupKeys(
        address=normalize_address(address) if has_address else "",
        domain=address_domain(address) if has_address else "",
        ip=normalize_ip(ip) if ip else "",
        scope=normalize_domain(scope) if scope else "",
        now=time.time() if now is None else now,
    )


def normalized(entry: Suppression) -> Suppression:
    """The entry with its value and scope in normal form; ValueError for an empty value or unknown kind."""
    if entry.kind not in KINDS:
        raise ValueError(f"unknown suppression kind {entry.kind!r}")
    value = normalize_value(entry.value, entry.kind)
    if not value:
        raise ValueError("a suppression needs a value")
    scope = normalize_domain(entry.scope) if entry.scope else ""
    if scope and entry.kind == "ip":
        raise ValueError("IP entries apply to every sender; they take no scope")
    return Suppression(value=value, kind=entry.kind, reason=entry.reason, source=entry.source,
                       created_at=entry.created_at or time.time(), expires_at=entry.expires_at, note=entry.note,
                       scope=scope)


def suppression_values(entry: Suppression) -> tuple[Any, ...]:
    """An already :func:`normalized` entry in :data:`SUPPRESSION_COLUMNS` order."""
    return (entry.value, entry.kind, entry.scope, entry.reason, entry.source, entry.created_at, entry.expires_at,
            entry.note)


def key_values(value: str, kind: str, scope: str) -> tuple[str, str, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown suppression kind {kind!r}")
    return (normalize_value(value, kind), kind, normalize_domain(scope) if scope else "")


def suppression(row: Row) -> Suppression:
    expires_at = row["expires_at"]
    return Suppression(
        value=row["value"], kind=row["kind"], reason=row["reason"], source=row["source"],
        created_at=float(row["created_at"]), expires_at=None if expires_at is None else float(expires_at),
        note=row["note"], scope=row["scope"])


def event_values(event: Event) -> tuple[Any, ...]:
    """An events row in :data:`EVENT_COLUMNS` order, ``data`` as JSON text; due for delivery at once."""
    if not event.id:
        raise ValueError("an event needs an id")
    return (event.id, event.type, event.created_at, event.message_id, event.recipient,
            json.dumps(event.data, separators=(",", ":"), sort_keys=True), event.created_at)


def event(row: Row) -> Event:
    data = row["data"]
    decoded = json.loads(data) if isinstance(data, str | bytes) else data
    return Event(id=row["id"], type=row["type"], created_at=float(row["created_at"]),
                 message_id=row["message_id"], recipient=row["recipient"], data=dict(decoded or {}))

"""The outbox events of delivery outcomes: what the delivery loop hands to ``record_results`` with each
recipient's new state, so that the event and the state change commit in one transaction.

One event per recipient and outcome:

========== ======================================================================================
type       when
========== ======================================================================================
delivered  the destination accepted the recipient (``reply``, ``mx``, ``tls``, ``delay``: seconds
           since reception)
deferred   an attempt failed temporarily and will be retried (``category``, ``status``, ``reply``,
           ``next_attempt_at``); deferrals without an attempt (a throttle, a paused destination, a
           plugin postponing it) are not events — they say nothing about the destination
bounced    a permanent failure (``category``, ``status`` — the RFC 3463 code —, ``reply`` — the remote
           reply or our own words when there was none —, ``bounce_type``)
expired    the queue lifetime ran out (``status`` 4.4.7, ``reply``: the last reply seen)
dropped    a plugin took the recipient out before any attempt without a bounce (``reason``)
========== ======================================================================================

Every event's ``data`` also names ``sender``, ``sender_domain`` and ``domain`` (the recipient's), which the
statistics count by, and ``attempt`` (the attempt's number; 0 when none was made).

``bounce_type`` is ``hard`` when the category says the address or its domain cannot receive mail
(:data:`HARD_BOUNCE_CATEGORIES`), else ``soft`` (a full mailbox, a spam or policy block, a message too large:
the address may well work for other mail); expiry counts as soft.
"""

from __future__ import annotations

import uuid
from typing import Any

from relay.policies.addresses import address_domain
from relay.policies.bounce import Classification
from relay.store.base import Event, RecipientRow, RecipientState, StoredMessage

#: Bounce categories that mean "this address (or its domain) does not take mail": hard bounces.
HARD_BOUNCE_CATEGORIES = frozenset({"invalid_recipient", "bad_domain", "inactive_mailbox"})

_TYPE_OF_STATE = {RecipientState.DELIVERED: "delivered", RecipientState.BOUNCED: "bounced",
                  RecipientState.EXPIRED: "expired", RecipientState.QUEUED: "deferred",
                  RecipientState.DELETED: "dropped"}


def bounce_type(category: str) -> str:
    return "hard" if category in HARD_BOUNCE_CATEGORIES else "soft"


def attempt_event(message: StoredMessage, rcpt: RecipientRow, state: RecipientState, verdict: Classification,
                  *, reply: str, mx: str | None, tls: str | None, now: float,
                  next_attempt_at: float | None) -> Event:
    """The event of one recipient's attempt outcome (delivered, deferred, bounced or expired)."""
    kind = _TYPE_OF_STATE[state]
    details: dict[str, Any] = {"reply": reply, "mx": mx, "attempt": rcpt.attempts + 1}
    if kind == "delivered":
        details |= {"tls": tls, "delay": round(max(0.0, now - message.received_at), 3)}
    else:
        details |= {"category": verdict.category, "status": verdict.enhanced}
    if kind == "deferred":
        details["next_attempt_at"] = next_attempt_at
    elif kind == "bounced":
        details["bounce_type"] = bounce_type(verdict.category)
    elif kind == "expired":
        details |= {"category": "message_expired", "status": "4.4.7", "bounce_type": "soft"}
    return _event(kind, message, rcpt, now, details)


def expiry_event(message: StoredMessage, rcpt: RecipientRow, now: float, last_reply: str) -> Event:
    """A recipient expired by the queue lifetime without an attempt now."""
    return _event("expired", message, rcpt, now,
                  {"category": "message_expired", "status": "4.4.7", "reply": last_reply, "bounce_type": "soft",
                   "attempt": rcpt.attempts})


def dropped_event(message: StoredMessage, rcpt: RecipientRow, now: float, reply: str, reason: str) -> Event:
    """A recipient a plugin settled without sending (a suppressed address with ``action = "drop"``)."""
    return _event("dropped", message, rcpt, now, {"reply": reply, "reason": reason, "attempt": rcpt.attempts})


def _event(kind: str, message: StoredMessage, rcpt: RecipientRow, now: float, details: dict[str, Any]) -> Event:
    sender_domain = address_domain(message.sender) if message.sender else ""
    data = {"sender": message.sender, "sender_domain": sender_domain, "domain": rcpt.domain, **details}
    return Event(id=uuid.uuid4().hex, type=kind, created_at=now, message_id=message.id, recipient=rcpt.address,
                 data=data)


__all__ = ["HARD_BOUNCE_CATEGORIES", "attempt_event", "bounce_type", "dropped_event", "expiry_event"]

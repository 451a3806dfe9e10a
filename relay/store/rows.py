"""Row shapes shared by both stores: what a message or recipient row holds and how a row becomes a value.

Both schemas (``migrations/{sqlite,postgres}/``) have the same logical columns, so the tuple layouts used for
inserts and the conversions from a fetched row to the interface's dataclasses live here once. A fetched
row is anything indexable by column name (``sqlite3.Row``, ``asyncpg.Record``).

Invariants:
- A recipient's first attempt is due at ``first_attempt_at`` when the message sets one, else at its
  reception time, so queues drain oldest first.
- The domain column is always the lowercased part after the last ``@`` of the address.
- A message without recipients is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relay.store.base import (
    AttemptRecord,
    Claim,
    NewMessage,
    RecipientRow,
    RecipientState,
    StoredMessage,
    StoreError,
    User,
)

# A group-commit batch also closes once it holds this many bytes of message data (always at least one
# message): commit_batch_max counts messages, and 256 messages of 25 MB in one transaction would outlast
# any sane statement timeout.
BATCH_MAX_BYTES = 64 * 1024 * 1024

# Column order of the tuples below; both stores insert with exactly these names.
MESSAGE_COLUMNS = ("id", "sender", "size", "received_at", "client_ip", "client_helo", "auth_user",
                   "listener", "envid", "ret", "smtputf8", "data")
RECIPIENT_COLUMNS = ("message_id", "address", "domain", "state", "attempts", "next_attempt_at", "notify",
                     "orcpt", "updated_at")
ATTEMPT_COLUMNS = ("recipient_id", "message_id", "started_at", "duration", "mx_host", "tls_version",
                   "reply", "category", "outcome")

# What a recipient row, a message row (without its data) and a claim select, in SQL valid for both stores.
RECIPIENT_SELECT = ("r.id, r.message_id, r.address, r.domain, r.state, r.attempts, r.next_attempt_at, "
                    "r.last_reply, r.notify, r.orcpt, r.updated_at")
MESSAGE_SELECT = ("m.id, m.sender, m.size, m.received_at, m.client_ip, m.client_helo, m.auth_user, "
                  "m.listener, m.envid, m.ret, m.smtputf8")
# A claim row: the recipient's columns plus its message's (the message id is r.message_id).
CLAIM_MESSAGE_SELECT = ("m.sender, m.size, m.received_at, m.client_ip, m.client_helo, m.auth_user, "
                        "m.listener, m.envid, m.ret, m.smtputf8")

# States whose recipients still wait for something (queue lifetime applies, purge keeps the message).
PENDING_STATES_SQL = "('queued', 'held')"


@dataclass(frozen=True, slots=True)
class CommitStats:
    """Group-commit counters since a store was opened: enqueue transactions and the messages in them."""

    batches: int
    messages: int


class Row(Protocol):
    """A fetched row addressable by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def check_new_message(message: NewMessage) -> None:
    """Refuse what would break the one-row-per-recipient invariant before anything is written."""
    if not message.id:
        raise StoreError("message has no id")
    if not message.recipients:
        raise StoreError(f"message {message.id} has no recipients")


def first_attempt_at(message: NewMessage) -> float:
    return message.first_attempt_at if message.first_attempt_at > 0 else message.received_at


def message_values(message: NewMessage) -> tuple[Any, ...]:
    """The messages row, in :data:`MESSAGE_COLUMNS` order (``smtputf8`` as a bool)."""
    return (message.id, message.sender, message.size, message.received_at, message.client_ip,
            message.client_helo, message.auth_user, message.listener, message.envid, message.ret,
            message.smtputf8, message.data)


def recipient_values(message: NewMessage, now: float) -> list[tuple[Any, ...]]:
    """One recipients row per recipient, in :data:`RECIPIENT_COLUMNS` order."""
    due = first_attempt_at(message)
    return [(message.id, rcpt.address, rcpt.domain, RecipientState.QUEUED.value, 0, due, rcpt.notify,
             rcpt.orcpt, now)
            for rcpt in message.recipients]


def attempt_values(attempt: AttemptRecord, recipient_id: int, message_id: str) -> tuple[Any, ...]:
    """An attempts row, in :data:`ATTEMPT_COLUMNS` order."""
    return (recipient_id, message_id, attempt.started_at, attempt.duration, attempt.mx_host,
            attempt.tls_version, attempt.reply, attempt.category, attempt.outcome)


def stored_message(row: Row, id_column: str = "id") -> StoredMessage:
    return StoredMessage(
        id=row[id_column], sender=row["sender"], size=int(row["size"]),
        received_at=float(row["received_at"]), client_ip=row["client_ip"], client_helo=row["client_helo"],
        auth_user=row["auth_user"], listener=row["listener"], envid=row["envid"], ret=row["ret"],
        smtputf8=bool(row["smtputf8"]),
    )


def recipient_row(row: Row) -> RecipientRow:
    return RecipientRow(
        id=int(row["id"]), message_id=row["message_id"], address=row["address"], domain=row["domain"],
        state=RecipientState(row["state"]), attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]), last_reply=row["last_reply"], notify=row["notify"],
        orcpt=row["orcpt"], updated_at=float(row["updated_at"]),
    )


def claim(row: Row, lease_until: float) -> Claim:
    """A claim from a row holding the recipient's columns and :data:`CLAIM_MESSAGE_SELECT`."""
    return Claim(recipient=recipient_row(row), message=stored_message(row, id_column="message_id"),
                 lease_until=lease_until)


def attempt_record(row: Row) -> AttemptRecord:
    return AttemptRecord(
        recipient_id=int(row["recipient_id"]), started_at=float(row["started_at"]),
        duration=float(row["duration"]), mx_host=row["mx_host"], tls_version=row["tls_version"],
        reply=row["reply"], category=row["category"], outcome=row["outcome"],
    )


def user(row: Row, allowed_sender_domains: Sequence[str]) -> User:
    """A user from its row; the caller decodes the domain list (JSON text or a text array)."""
    expires_at = row["expires_at"]
    return User(
        username=row["username"], password_hash=row["password_hash"],
        allowed_sender_domains=tuple(allowed_sender_domains),
        expires_at=None if expires_at is None else float(expires_at), disabled=bool(row["disabled"]),
        quota_per_minute=int(row["quota_per_minute"]), quota_per_day=int(row["quota_per_day"]),
        created_at=float(row["created_at"]),
    )


def all_states_counted(counts: dict[str, int]) -> dict[str, int]:
    """Every state present in the answer (0 when no recipient is in it), so callers need no defaults."""
    return {state.value: counts.get(state.value, 0) for state in RecipientState} | counts

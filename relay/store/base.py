"""The queue store: the one interface both stores (embedded SQLite, Postgres) implement.

The SMTP side writes through :meth:`QueueStore.enqueue`; the delivery loop claims through
:meth:`QueueStore.claim_due` and reports through :meth:`QueueStore.record_results`; the CLI manages users
through the ``*_user`` methods. The same database holds the suppression list (``*_suppression*``: checked at
every RCPT and before every attempt) and the event outbox (``record_event``: what webhooks will send).

Invariants every implementation keeps (``tests/test_store_contract.py`` checks them on both):
- ``enqueue`` returns only after the message and all its recipient rows are committed durably (fsync'd);
  if it raises, nothing of the message is visible — never a message without recipients or the reverse.
- One row per recipient. A recipient is in exactly one state; only ``queued`` rows are ever claimed.
- A claim is a lease: a claimed row is invisible to other claimers until its lease ends or it is
  released/recorded, so two workers (processes, hosts) never hold the same recipient at once, and the
  claims of a crashed worker come back by themselves when the lease runs out.
- A live worker keeps its leases with ``renew`` (a heartbeat): only the owner's own leases are
  extended, and a lease another worker took over, or one already ended by a release or a result, never
  comes back. A worker that stops renewing (it crashed) loses its rows when the lease runs out.
- ``record_results`` applies a batch atomically: recipient states, attempt history rows and any
  bounce messages generated for them are committed together or not at all. Within it only the lease
  holder's results count, and each :class:`Bounce` is all or nothing with the results it reports on:
  it is committed only if every one of them is applied (see :meth:`QueueStore.record_results`).
- Times are UNIX epoch seconds (float) in UTC everywhere in this interface.
- Suppression values and scopes are stored in the normal form of :mod:`relay.policies.addresses`; the
  store normalises what it is given (adds, removals and lookups alike), so callers may pass any spelling.
  One entry per (value, kind, scope); an expired entry never matches a lookup.
- Events are append-only and idempotent by id: recording an id already recorded changes nothing.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


class StoreError(Exception):
    """The store could not complete an operation; the caller answers with a temporary failure."""


class StoreOutcomeUnknown(StoreError):
    """The connection to the database was lost while a COMMIT was under way: the write may or may not be
    durable, and nobody can tell until the database is back. The caller still answers with a temporary
    failure (never 250 for what it cannot vouch for), saying that the outcome is unknown."""


class UserExists(StoreError):
    """``add_user`` for a name that is already taken."""


class UnknownUser(StoreError):
    """A user-management call named a user that does not exist."""


class RecipientState(enum.StrEnum):
    QUEUED = "queued"          # waiting for its next attempt (possibly leased by a worker right now)
    HELD = "held"              # kept by an operator; never claimed until released
    DELIVERED = "delivered"    # final: the destination accepted it
    BOUNCED = "bounced"        # final: permanent failure, bounce generated where allowed
    EXPIRED = "expired"        # final: exceeded the queue lifetime, bounce generated where allowed
    DELETED = "deleted"        # final: removed by an operator or suppressed before delivery


FINAL_STATES = frozenset({RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.EXPIRED,
                          RecipientState.DELETED})


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    # ESMTP DSN parameters (RFC 3461), kept verbatim for bounce generation.
    notify: str | None = None
    orcpt: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything accepted in one SMTP transaction, ready to be committed."""

    id: str
    sender: str                      # "" is the null reverse-path (bounces)
    recipients: Sequence[NewRecipient]
    data: bytes                      # the full message as it will be delivered, CRLF line endings
    received_at: float
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str | None = None
    listener: str = ""
    envid: str | None = None         # ESMTP DSN ENVID
    ret: str | None = None           # ESMTP DSN RET (FULL / HDRS)
    smtputf8: bool = False
    # When set, the recipients' first attempt is not before this time (0: at once).
    first_attempt_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    sender: str
    size: int
    received_at: float
    client_ip: str
    client_helo: str
    auth_user: str | None
    listener: str
    envid: str | None
    ret: str | None
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class RecipientRow:
    id: int
    message_id: str
    address: str
    domain: str
    state: RecipientState
    attempts: int
    next_attempt_at: float
    last_reply: str | None
    notify: str | None
    orcpt: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class Claim:
    """A recipient leased to one worker for one delivery attempt."""

    recipient: RecipientRow
    message: StoredMessage
    lease_until: float


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One delivery attempt as history keeps it."""

    recipient_id: int
    started_at: float
    duration: float
    mx_host: str | None
    tls_version: str | None
    reply: str | None
    category: str | None
    outcome: str                     # "delivered" | "temporary" | "permanent"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the delivery loop decided for one claimed recipient."""

    recipient_id: int
    state: RecipientState            # QUEUED (retry later) or a final state
    next_attempt_at: float | None    # for QUEUED: when to try again
    last_reply: str | None
    attempt: AttemptRecord | None    # None when no attempt was made (for example a throttle deferral)
    count_attempt: bool = True       # False for deferrals that are not failed attempts
    # Outbox events of this state change (delivered, deferred, bounced, expired, dropped): written in the
    # same transaction as the state, and only when the result is applied (the lease was still held).
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class Bounce:
    """A DSN and the recipients whose results it reports on (each with a result in the same
    :meth:`QueueStore.record_results` call): the DSN is committed only together with all of them."""

    message: NewMessage
    recipient_ids: tuple[int, ...]


def check_bounces(results: Sequence[RecipientResult], bounces: Sequence[Bounce]) -> None:
    """``ValueError`` unless every bounce names at least one recipient and only recipients with a result."""
    recorded = {result.recipient_id for result in results}
    for bounce in bounces:
        if not bounce.recipient_ids or not recorded.issuperset(bounce.recipient_ids):
            raise ValueError(f"bounce {bounce.message.id} must report on recipients recorded with it")


def bounces_to_commit(bounces: Sequence[Bounce], held: set[int]) -> tuple[list[Bounce], set[int]]:
    """The all-or-nothing rule of :meth:`QueueStore.record_results`, given the recipients whose lease the
    owner still ``held``: returns the bounces to commit and the held recipients whose results must be
    left out with a bounce that cannot be committed whole.

    Leaving a result out can make another bounce reporting on that recipient incomplete in turn, so the
    rule is applied until nothing changes.
    """
    applied = set(held)
    dropped: set[int] = set()  # indexes into bounces
    changed = True
    while changed:
        changed = False
        for index, bounce in enumerate(bounces):
            if index not in dropped and not applied.issuperset(bounce.recipient_ids):
                dropped.add(index)
                applied.difference_update(bounce.recipient_ids)
                changed = True
    kept = [bounce for index, bounce in enumerate(bounces) if index not in dropped]
    return kept, held - applied


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    allowed_sender_domains: tuple[str, ...] = ()
    expires_at: float | None = None
    disabled: bool = False
    quota_per_minute: int = 0        # 0: no quota
    quota_per_day: int = 0
    created_at: float = 0.0

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Suppression:
    """One suppression-list entry: an address, a domain or an IP (re-exported by :mod:`relay.plugin`)."""

    value: str
    kind: Literal["address", "domain", "ip"]
    reason: str                      # hard_bounce, complaint, unsubscribe, manual, spam_trap, other
    source: str                      # who added it: delivery, fbl, tracking, cli, import, …
    created_at: float
    expires_at: float | None = None  # None: never expires
    note: str = ""
    # Scope: "" for every sender, else the sender domain the entry applies to (one-click unsubscribe).
    scope: str = ""

    def is_active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class Event:
    """One event for the outbox (webhooks, stats): opened, clicked, unsubscribed, complained, suppressed…

    Re-exported by :mod:`relay.plugin`. ``data`` must be JSON-serialisable.
    """

    id: str                          # unique; the webhook idempotency key
    type: str
    created_at: float
    message_id: str | None = None
    recipient: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


# -- webhooks, statistics, alerts ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """What the store needs to know of a webhook endpoint to queue events for it."""

    name: str
    types: frozenset[str] | None = None   # event types it wants; None: every type

    def wants(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event queued for one endpoint, with its delivery state."""

    endpoint: str
    event: Event
    created_at: float                # queued for this endpoint (or replayed) at: the retry window starts
    attempts: int
    next_attempt_at: float
    lease_until: float | None = None
    delivered_at: float | None = None
    dead_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What became of one claimed delivery: delivered, to be retried at ``next_attempt_at``, or dead."""

    endpoint: str
    event_id: str
    delivered: bool
    next_attempt_at: float | None = None
    dead: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """An endpoint's health as every relay node sees it. ``paused_now`` is only set in the answer of
    :meth:`QueueStore.record_endpoint_outcome`: that very call paused the endpoint."""

    endpoint: str
    consecutive_failures: int
    paused_until: float | None
    last_error: str | None
    updated_at: float
    paused_now: bool = False

    def paused(self, now: float) -> bool:
        return self.paused_until is not None and self.paused_until > now


@dataclass(frozen=True, slots=True)
class EventTally:
    """Events of one type counted per sender domain, destination domain and bounce type ("hard"/"soft"/"")."""

    type: str
    sender_domain: str
    domain: str
    bounce_type: str
    count: int


STATS_COUNTERS = ("sent", "delivered", "bounced_hard", "bounced_soft", "deferred", "complained", "opened",
                  "clicked")


@dataclass(frozen=True, slots=True)
class HourlyStats:
    """One materialised hour of one domain, seen as a sender domain or as a destination domain."""

    dimension: Literal["sender", "destination"]
    hour: float                      # start of the hour (epoch seconds, a multiple of 3600)
    domain: str
    sent: int = 0
    delivered: int = 0
    bounced_hard: int = 0
    bounced_soft: int = 0
    deferred: int = 0
    complained: int = 0
    opened: int = 0
    clicked: int = 0


@dataclass(frozen=True, slots=True)
class QueueCounts:
    by_state: dict[str, int] = field(default_factory=dict)


#: States whose recipients still wait for something: what the admin commands look at by default.
PENDING_STATES = (RecipientState.QUEUED, RecipientState.HELD)


@dataclass(frozen=True, slots=True)
class ShapeCount:
    """One cell of the queue's shape: recipients in ``state`` (of ``domain``) in one age bucket.

    ``bucket`` indexes the age edges given to :meth:`QueueStore.queue_shape`: ``i`` means younger than
    ``edges[i]`` and at least ``edges[i - 1]``; ``len(edges)`` means at least the last edge old. Age is
    counted from the message's reception. ``oldest`` is the earliest reception time in the cell.
    """

    state: str
    domain: str                      # "" unless grouped by domain
    bucket: int
    count: int
    oldest: float


@dataclass(frozen=True, slots=True)
class RecipientQuery:
    """Which recipients an admin command means; every field given narrows the selection (AND)."""

    states: tuple[RecipientState, ...] = PENDING_STATES
    message_ids: tuple[str, ...] = ()
    domain: str | None = None        # the recipient domain, compared case-insensitively
    # An address (compared case-insensitively), or a domain: every sender address at that domain.
    sender: str | None = None
    recipient: str | None = None     # one address, compared case-insensitively
    received_before: float | None = None


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A recipient row with what a queue listing shows of its message."""

    recipient: RecipientRow
    sender: str
    received_at: float
    size: int
    leased: bool                     # a delivery worker holds it right now (an attempt is under way)


@dataclass(frozen=True, slots=True)
class WebhookBacklog:
    """The webhook side of the outbox: events not yet fanned out to the endpoints (``undispatched``), and
    per endpoint the deliveries still to make (``pending``) and given up on (``dead``)."""

    undispatched: int = 0
    pending: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    oldest_pending_at: float | None = None   # queued-for-endpoint time of the oldest pending delivery


class QueueStore(abc.ABC):
    """Durable storage for messages, recipients, attempts and users."""

    kind: str = "abstract"

    # -- lifecycle ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and make sure the schema is current (applying migrations is idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending commits, then release connections and threads."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers a trivial query."""

    # -- reception ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, message: NewMessage) -> None:
        """Commit the message and its recipients durably; raise :class:`StoreError` on any failure."""

    # -- delivery ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float) -> list[Claim]:
        """Lease up to ``limit`` queued recipients whose next attempt is due, oldest due first."""

    @abc.abstractmethod
    async def release(self, recipient_ids: Sequence[int], owner: str) -> None:
        """Give leases back unchanged (for example on shutdown)."""

    @abc.abstractmethod
    async def renew(self, recipient_ids: Sequence[int], owner: str, lease_seconds: float) -> set[int]:
        """Extend to at least now + ``lease_seconds`` the leases ``owner`` still holds among
        ``recipient_ids``; return the ids renewed (the others are lost: never attempt them again).

        A row is held while its ``lease_owner`` is ``owner``: a lease that ran out but nobody claimed
        yet is still held (no one else can have started on it) and is renewed; a row claimed by another
        owner, released, or recorded is not, and is left untouched. A lease is never shortened. One
        statement for the whole batch (the delivery loop's heartbeat calls it every lease/3 seconds);
        it never waits for a row another transaction is changing at that moment (a claim taking it over,
        or the owner's own result being committed) but leaves it out, so a caller must not count as
        lost the rows it is recording or releasing itself.
        """

    @abc.abstractmethod
    async def record_results(self, results: Sequence[RecipientResult], owner: str,
                             bounces: Sequence[Bounce] = ()) -> None:
        """Apply results, attempt history and generated bounces in one transaction; end the leases.

        Only the results of recipients whose lease ``owner`` still holds are applied (with their
        history); the others are ignored (logged). A :class:`Bounce` is committed only if the results
        of **all** the recipients it reports on are applied. If any of them was lost, the bounce is
        dropped and the results of its other recipients are left out too: they stay leased until the
        lease ends and are attempted again, so their failure is reported once, by whoever records it
        then — never twice (the lost recipient's new holder reports it) and never not at all (which
        dropping only the bounce would do). ``ValueError`` if a bounce names a recipient without a
        result in ``results``.
        """

    @abc.abstractmethod
    async def claim_expired(self, received_before: float, limit: int, owner: str,
                            lease_seconds: float) -> list[Claim]:
        """Lease queued or held recipients of messages received before the cutoff, due or not.

        The queue lifetime applies to every recipient in every non-final state; the delivery loop
        calls this at least once a minute and records them as EXPIRED.
        """

    @abc.abstractmethod
    async def wait_for_new_mail(self, timeout: float) -> bool:  # noqa: ASYNC109 - part of the contract: callers poll with a bound
        """Wait until a message is enqueued (by any process on this store) or ``timeout`` passes.

        Returns True when woken by new mail. The embedded store signals in process; Postgres uses
        LISTEN/NOTIFY so every relay node on the database wakes up.
        """

    @abc.abstractmethod
    async def purge(self, finished_before: float, history_before: float) -> int:
        """Delete messages whose recipients are all final since ``finished_before``, attempt history
        older than ``history_before`` and expired suppressions; return how many messages were removed."""

    @abc.abstractmethod
    async def message_data(self, message_id: str) -> bytes:
        """The stored bytes of a message; raise :class:`StoreError` if it is gone."""

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """The earliest ``next_attempt_at`` of a queued recipient, or None when nothing is queued."""

    # -- inspection ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_message(self, message_id: str) -> StoredMessage | None: ...

    @abc.abstractmethod
    async def recipients_of(self, message_id: str) -> list[RecipientRow]: ...

    @abc.abstractmethod
    async def attempts_of(self, recipient_id: int) -> list[AttemptRecord]: ...

    @abc.abstractmethod
    async def count_by_state(self) -> dict[str, int]: ...

    # -- operations (metrics, admin CLI) ----------------------------------------------------------------
    @abc.abstractmethod
    async def queue_shape(self, now: float, edges: Sequence[float], *, by_domain: bool = False,
                          states: Sequence[RecipientState] = PENDING_STATES) -> list[ShapeCount]:
        """Recipients in ``states`` counted by state (and recipient domain) and age bucket — one grouped
        query. ``edges`` are ascending ages in seconds; see :class:`ShapeCount` for the buckets."""

    @abc.abstractmethod
    async def find_recipients(self, query: RecipientQuery, *, now: float, limit: int = 1000,
                              after_id: int = 0) -> list[QueueEntry]:
        """Recipients matching ``query`` with an id above ``after_id``, in id (arrival) order, at most
        ``limit``: pages through any selection without holding anything. ``now`` decides ``leased``."""

    @abc.abstractmethod
    async def claim_recipients(self, recipient_ids: Sequence[int], owner: str, lease_seconds: float, *,
                               now: float, states: Sequence[RecipientState] = PENDING_STATES) -> list[Claim]:
        """Lease the given recipients that are in ``states`` and not leased by anyone (as a claim does),
        due or not. An admin command settles them through :meth:`record_results` like a delivery
        worker, so an operator never changes a recipient a worker is attempting at that moment."""

    @abc.abstractmethod
    async def notify_new_mail(self) -> None:
        """Wake the delivery loops waiting in :meth:`wait_for_new_mail` (recipients became due).

        Postgres: NOTIFY, every node. SQLite: the waiters of this process at once; a relay in another
        process notices any commit to the file within a few seconds (its wait polls for them)."""

    @abc.abstractmethod
    async def message_events(self, message_id: str) -> list[Event]:
        """Every event recorded for a message, oldest first."""

    @abc.abstractmethod
    async def webhook_backlog(self) -> WebhookBacklog:
        """Events waiting to be fanned out, and per endpoint the deliveries waiting and dead-lettered —
        three queries over partial indexes (never a scan of the delivered history)."""

    # -- users ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_user(self, user: User) -> None:
        """Create a user; raise :class:`UserExists` if the name is taken."""

    @abc.abstractmethod
    async def get_user(self, username: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self) -> list[User]: ...

    @abc.abstractmethod
    async def update_user(self, user: User) -> None:
        """Replace every field of an existing user; raise :class:`UnknownUser` if absent."""

    @abc.abstractmethod
    async def delete_user(self, username: str) -> None:
        """Remove a user; raise :class:`UnknownUser` if absent."""

    # -- suppression list ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_suppression(self, entry: Suppression) -> None:
        """Add an entry, or replace reason, source, created_at, expiry and note of the one with the same
        (value, kind, scope). ``ValueError`` for an empty value or an unknown kind."""

    @abc.abstractmethod
    async def add_suppressions(self, entries: Sequence[Suppression]) -> None:
        """:meth:`add_suppression` for many entries in few transactions (imports)."""

    @abc.abstractmethod
    async def remove_suppression(self, value: str, kind: str, scope: str = "") -> bool:
        """Remove one entry; False when there was none."""

    @abc.abstractmethod
    async def find_suppression(self, address: str, ip: str | None = None, scope: str = "",
                               now: float | None = None) -> Suppression | None:
        """The active entry that suppresses mail to ``address`` (or from ``ip``), if any — one query.

        Matches the address itself, its exact domain (``example.com`` does not cover
        ``mail.example.com``: each is its own mail domain) and, when given, the IP. Entries of scope
        ``""`` apply to every sender; scoped entries only when ``scope`` (the sender's domain) equals
        theirs. An address entry wins over a domain entry over an IP entry. ``address`` may be ``""``
        for an IP-only lookup.
        """

    @abc.abstractmethod
    async def list_suppressions(self, limit: int = 1000, offset: int = 0, reason: str | None = None
                                ) -> list[Suppression]:
        """Entries (expired ones included, until purged) ordered by value, kind and scope."""

    @abc.abstractmethod
    async def count_suppressions(self, reason: str | None = None) -> int: ...

    @abc.abstractmethod
    async def purge_expired_suppressions(self, now: float | None = None) -> int:
        """Delete entries expired at ``now``; return how many."""

    # -- event outbox ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def record_event(self, event: Event) -> None:
        """Append an event durably (due for webhook delivery at once); a known id is ignored."""

    @abc.abstractmethod
    async def list_events(self, type: str | None = None, since: float | None = None,
                          limit: int = 1000) -> list[Event]:
        """Events of one type (or all) created at or after ``since``, oldest first."""

    @abc.abstractmethod
    async def record_events(self, events: Sequence[Event]) -> None:
        """:meth:`record_event` for several events in one transaction (all or none)."""

    @abc.abstractmethod
    async def get_event(self, event_id: str) -> Event | None: ...

    @abc.abstractmethod
    async def purge_events(self, created_before: float) -> int:
        """Delete events (and their webhook deliveries) created before the cutoff; return how many."""

    # -- webhooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def dispatch_events(self, targets: Sequence[WebhookTarget], now: float, limit: int) -> int:
        """Fan out up to ``limit`` undispatched events due at ``now``: in one transaction, one delivery row
        per target that wants the event's type, and the event marked dispatched (also when no target wants
        it). Concurrent callers (other nodes) never take the same event. Returns how many were taken."""

    @abc.abstractmethod
    async def claim_webhook_deliveries(self, endpoint: str, now: float, limit: int, owner: str,
                                       lease_seconds: float) -> list[WebhookDelivery]:
        """Lease up to ``limit`` due, undelivered, live deliveries of one endpoint, oldest due first. As
        with recipients, a leased row is invisible to other claimers until its lease ends or is recorded."""

    @abc.abstractmethod
    async def record_webhook_results(self, results: Sequence[WebhookResult], owner: str, now: float) -> None:
        """Apply results of claimed deliveries (only the lease holder's count) and end their leases."""

    @abc.abstractmethod
    async def list_webhook_deliveries(self, *, endpoint: str | None = None, dead: bool = True,
                                      since: float | None = None, limit: int = 1000) -> list[WebhookDelivery]:
        """Dead letters (``dead=True``, newest death first) or deliveries still waiting (``dead=False``,
        due order), of one endpoint or all, whose event was created at or after ``since``."""

    @abc.abstractmethod
    async def replay_webhook_deliveries(self, targets: Sequence[WebhookTarget], now: float, *,
                                        event_ids: Sequence[str] = (), since: float | None = None,
                                        dead_only: bool = True) -> int:
        """Queue events again for the targets (due at ``now``, attempts and retry window reset).

        ``event_ids``: those events, to every target that wants their type, whatever became of them before.
        ``since`` with ``dead_only``: the dead letters of the targets whose event was created since then;
        without ``dead_only``: every event created since then that a target wants (delivered or not, or
        never queued for it). Returns how many deliveries were queued."""

    @abc.abstractmethod
    async def record_endpoint_outcome(self, endpoint: str, *, successes: int, failures: int, now: float,
                                      pause_after: int, pause_for: float, error: str | None = None
                                      ) -> EndpointHealth:
        """Count a batch's outcomes atomically: a success resets the consecutive failures (and ends a
        pause); failures add to them, and reaching ``pause_after`` (0: never) pauses the endpoint for
        ``pause_for`` seconds unless it is paused already (the answer's ``paused_now`` says so)."""

    @abc.abstractmethod
    async def endpoint_health(self) -> list[EndpointHealth]:
        """Every endpoint's health row, by name."""

    # -- statistics and alerts --------------------------------------------------------------------------
    @abc.abstractmethod
    async def tally_events(self, start: float, end: float) -> list[EventTally]:
        """Events created in ``[start, end)`` counted by type, sender domain, destination domain and bounce
        type — one grouped query over the events' time index. The sender domain comes from the event's
        ``data.sender_domain``, else from its message (while the queue keeps it); the destination domain
        from ``data.domain``, else from the recipient address."""

    @abc.abstractmethod
    async def replace_hourly_stats(self, hour: float, rows: Sequence[HourlyStats], now: float) -> None:
        """Replace every materialised row of one hour with ``rows`` in one transaction."""

    @abc.abstractmethod
    async def purge_hourly_stats(self, hours_before: float) -> int:
        """Delete materialised hours older than the cutoff; return how many rows."""

    @abc.abstractmethod
    async def read_hourly_stats(self, dimension: str, since: float, until: float,
                                domain: str | None = None) -> list[HourlyStats]:
        """Materialised rows of hours in ``[since, until)``, by hour then domain."""

    @abc.abstractmethod
    async def claim_alert(self, kind: str, scope: str, level: str, now: float, period: float) -> bool:
        """Record that an alert is raised, unless one of the same (kind, scope) was raised less than
        ``period`` seconds ago at the same or a higher level; True when this call may raise it. Atomic
        across relay nodes: of concurrent callers at most one gets True."""

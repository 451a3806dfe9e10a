"""The suppression list as a chain step: never send to an address (or domain) that must not get mail.

Entries live in the queue database (``relay suppress …`` manages them; see :mod:`relay.suppress`) and
are looked up with one indexed query per recipient. They come from operators (``manual``), from this
plugin when a delivery fails for good in a configured category (``hard_bounce``), and from other parts of
the relay through :meth:`BlacklistPlugin.suppress` — feedback-loop complaints (``complaint``) and one-click
unsubscribes (``unsubscribe``, scoped to the sender domain). Every entry this plugin adds records a
``suppressed`` event in the outbox (``host.events``), so webhooks can tell the sending application.

Where it acts:

- ``connect`` (``check_ip = true``, the default): a client whose IP address is on the list is refused
  with ``554 5.7.1 Access denied`` and disconnected. IP entries apply to every sender (no scope).
- ``rcpt_to``: a suppressed recipient — its address, or its exact domain (``example.com`` does not cover
  ``mail.example.com``), globally or for the envelope sender's domain — is, with ``action = "reject"``
  (default), refused with ``550 5.7.1 Recipient address rejected``: the same generic text whatever the
  reason, which goes to the log only (a client must not learn that someone complained). With
  ``action = "drop"`` it is accepted like any other recipient and dropped before its first attempt —
  for senders that treat every RCPT rejection as an error of their own.
- ``before_attempt``: every recipient is checked again before every attempt, so an entry added after
  the message was queued (a hard bounce of an earlier message, a complaint arriving during retries)
  still stops it. Suppressed recipients are taken out of the attempt alone (``AttemptContext.skip``);
  the others are sent. With ``reject`` the recipient fails as if refused at RCPT (bounced, a DSN to the
  sender, reply ``550 5.7.1 Recipient address rejected``); with ``drop`` it is dropped without a DSN.
- ``bounced``: a permanent failure in one of ``bounce_categories`` (default ``invalid_recipient`` and
  ``bad_domain``; never spam blocks, policy refusals or full mailboxes, which say nothing about the
  address) adds a ``hard_bounce`` entry for the recipient address with source ``delivery``, unless an
  active global entry already covers it (an automatic entry must never weaken a stronger one, such as a
  complaint without expiry).

Lifetimes of the entries this plugin adds, per reason (seconds; 0 never expires): ``hard_bounce_ttl``
30 days — a dead mailbox rarely comes back, yet a bounce misclassified or caused by a provider's bad
day must heal by itself; ``complaint_ttl`` and ``unsubscribe_ttl`` 0 — a person said no, and only that
person (or an operator) can take it back. Operators' entries carry the lifetime they are given.

Invariants:
- The plugin imports nothing from relay but :mod:`relay.plugin` and the pure :mod:`relay.policies`.
- A lookup failure (the database down) fails the hook, which the chain turns into ``451 4.3.0`` at RCPT
  or a deferral before an attempt: an unknown answer never lets mail through to a suppressed address.
- Starting without a suppression list (``host.suppressions`` is None) is refused.
"""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from relay.policies.addresses import Kind, address_domain, normalize_domain, normalize_value

from relay.plugin import (
    CONTINUE,
    Action,
    AttemptContext,
    ConnectContext,
    DeliveryEvent,
    Event,
    Plugin,
    PluginConfig,
    PluginError,
    PluginHost,
    RcptContext,
    Suppression,
    SuppressionList,
    Verdict,
)

__all__ = ["DEFAULT_BOUNCE_CATEGORIES", "PLUGIN", "BlacklistConfig", "BlacklistPlugin"]

DAY = 86400.0
DEFAULT_BOUNCE_CATEGORIES = ("invalid_recipient", "bad_domain")
#: Where the plugin makes itself known to other plugins (``host.extra``), for :meth:`BlacklistPlugin.suppress`.
HOST_EXTRA_KEY = "blacklist"
EVENT_TYPE = "suppressed"

# What a client is told; the reason stays in the log.
RCPT_REJECT_TEXT = "Recipient address rejected"
CONNECT_REJECT_TEXT = "Access denied"


class BlacklistConfig(PluginConfig):
    """``[plugins.blacklist]``; every key with its default in relay.toml.example."""

    # "reject": 550 5.7.1 at RCPT (and a bounce if suppressed after queueing); "drop": accept, never send.
    action: Literal["reject", "drop"] = "reject"
    # Refuse clients whose IP address is on the list, at connect (554 5.7.1).
    check_ip: bool = True
    # Lifetime of the entries this plugin adds, per reason, in seconds; 0: never expires.
    hard_bounce_ttl: float = Field(default=30 * DAY, ge=0)
    complaint_ttl: float = Field(default=0.0, ge=0)
    unsubscribe_ttl: float = Field(default=0.0, ge=0)
    # Bounce categories (policies/bounce_rules.toml, or your own rules) whose permanent failures add a
    # hard_bounce entry for the recipient.
    bounce_categories: list[str] = Field(default_factory=lambda: list(DEFAULT_BOUNCE_CATEGORIES))

    @field_validator("bounce_categories")
    @classmethod
    def _named_categories(cls, value: list[str]) -> list[str]:
        if any(not category.strip() for category in value):
            raise ValueError("empty category name")
        return [category.strip() for category in value]


class BlacklistPlugin(Plugin[BlacklistConfig]):
    """See the module docstring."""

    name: ClassVar[str] = "blacklist"
    Config = BlacklistConfig

    def __init__(self, config: BlacklistConfig, host: PluginHost) -> None:
        super().__init__(config, host)
        self._categories = frozenset(config.bounce_categories)

    async def start(self) -> None:
        if self.host.suppressions is None:
            raise PluginError("the suppression list of the queue store is not available to plugins")
        self.host.extra[HOST_EXTRA_KEY] = self

    @property
    def suppressions(self) -> SuppressionList:
        if self.host.suppressions is None:
            raise PluginError("the suppression list of the queue store is not available to plugins")
        return self.host.suppressions

    # -- decisions -----------------------------------------------------------------------------------
    async def connect(self, ctx: ConnectContext) -> Verdict:
        if not self.config.check_ip:
            return CONTINUE
        entry = await self.suppressions.find_suppression("", ip=ctx.session.client_ip)
        if entry is None:
            return CONTINUE
        return Verdict.reject(CONNECT_REJECT_TEXT, code=554, enhanced="5.7.1", reason=_why(entry),
                              disconnect=True)

    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        entry = await self.suppressions.find_suppression(ctx.recipient, scope=sender_scope(ctx.sender))
        if entry is None:
            return CONTINUE
        if self.config.action == "drop":
            # Accepted like any recipient; before_attempt drops it (it is looked up again there).
            self.log.info("recipient_suppressed_accepted", recipient=ctx.recipient, sender=ctx.sender,
                          reason=_why(entry))
            return CONTINUE
        return _rejected(entry)

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        scope = sender_scope(ctx.message.sender)
        for recipient in ctx.recipients:
            entry = await self.suppressions.find_suppression(recipient.address, scope=scope)
            if entry is None:
                continue
            ctx.skip[recipient.id] = _dropped(entry) if self.config.action == "drop" else _rejected(entry)
            self.log.info("recipient_suppressed_before_attempt", queue_id=ctx.message.id,
                          recipient=recipient.address, action=self.config.action, reason=_why(entry))
        return CONTINUE

    # -- observers -----------------------------------------------------------------------------------
    async def bounced(self, event: DeliveryEvent) -> None:
        found = event.classification
        if found is None or not found.is_permanent or found.category not in self._categories:
            return
        address = event.recipient.address
        if await self.suppressions.find_suppression(address) is not None:
            return  # already suppressed for every sender; never replace a stronger entry with a bounce
        await self.suppress(address, "hard_bounce", source="delivery", message_id=event.message.id,
                            note=f"{found.category} {found.enhanced}")

    # -- for other parts of the relay ----------------------------------------------------------------
    async def suppress(self, value: str, reason: str, *, source: str, kind: Kind = "address", scope: str = "",
                       message_id: str | None = None, note: str = "", now: float | None = None) -> Suppression:
        """Add (or refresh) an entry with this plugin's lifetime for ``reason`` and record a ``suppressed``
        event. For the feedback-loop parser (``reason="complaint"``) and one-click unsubscribes
        (``reason="unsubscribe"``, ``scope`` the sender domain). Reaches other plugins through
        ``host.extra["blacklist"]``. Store errors propagate (re-adding is harmless, so a caller may retry).
        """
        created = time.time() if now is None else now
        ttl = self.ttl_for(reason)
        entry = Suppression(value=normalize_value(value, kind), kind=kind, reason=reason, source=source,
                            created_at=created, expires_at=created + ttl if ttl else None, note=note,
                            scope=normalize_domain(scope) if scope else "")
        await self.suppressions.add_suppression(entry)
        self.log.info("suppression_added", value=entry.value, kind=kind, reason=reason, source=source,
                      scope=entry.scope, expires_at=entry.expires_at, queue_id=message_id)
        if self.host.events is not None:
            await self.host.events.record_event(suppressed_event(entry, message_id))
        return entry

    def ttl_for(self, reason: str) -> float:
        """Seconds an entry added for ``reason`` lives; 0 for never."""
        return {"hard_bounce": self.config.hard_bounce_ttl, "complaint": self.config.complaint_ttl,
                "unsubscribe": self.config.unsubscribe_ttl}.get(reason, 0.0)


def sender_scope(sender: str) -> str:
    """The scope an envelope sender's mail is checked under: its domain ("" for the null sender)."""
    return address_domain(sender) if sender else ""


def suppressed_event(entry: Suppression, message_id: str | None) -> Event:
    return Event(id=uuid.uuid4().hex, type=EVENT_TYPE, created_at=entry.created_at, message_id=message_id,
                 recipient=entry.value if entry.kind == "address" else None,
                 data={"value": entry.value, "kind": entry.kind, "reason": entry.reason, "source": entry.source,
                       "scope": entry.scope, "expires_at": entry.expires_at})


def _why(entry: Suppression) -> str:
    scope = f" for {entry.scope}" if entry.scope else ""
    return f"suppressed {entry.kind} {entry.value}{scope}: {entry.reason} ({entry.source})"


def _rejected(entry: Suppression) -> Verdict:
    return Verdict.reject(RCPT_REJECT_TEXT, code=550, enhanced="5.7.1", reason=_why(entry))


def _dropped(entry: Suppression) -> Verdict:
    return Verdict(Action.ACCEPT, 250, "2.0.0", "Recipient suppressed, not sent", reason=_why(entry))


PLUGIN = BlacklistPlugin

"""Feedback-loop complaints (plugin "complaints"): ARF reports sent to the FBL address become ``complained``
events and suppression entries.

Mailbox providers (Yahoo, Microsoft, …) send a report (RFC 5965, see :mod:`relay.plugins.complaints_arf`)
each time one of their users marks a message as spam, to the address registered with their feedback loop
— ``[plugins.complaints] address``, whose MX points at this relay. The plugin:

- ``accepts_mail_for``: the relay accepts RCPT to that address from any client, without relay
  permission (it is received here, never relayed). The address must be alone in its transaction: mixed
  with other recipients, the later ones get ``452 4.5.3`` (send them in another transaction).
- ``data``: when every recipient is the FBL address, parses the report and, for a complaint
  (``feedback_types``) about mail this relay sent (its own ``Received:`` header with a queue id is in the
  reported copy, unless ``require_queue_id = false``), records **durably, before answering**: a
  ``complained`` event (id derived from the report, so a report sent twice counts once) and a suppression
  entry for the recipient (reason ``complaint``, source ``fbl``; through the blacklist plugin when it is in
  the chain — its ``complaint_ttl``, its ``suppressed`` event — else directly, never expiring). Then it
  answers ``250 2.0.0`` and the report itself is not queued (the session honours
  :attr:`~relay.plugin.DataContext.consumed`). A store failure answers ``451 4.3.0``: the provider retries.
  A message that is no ARF report is refused (``550 5.6.0``); a report of another type (``not-spam``) or
  about mail we did not send is accepted and logged, with nothing recorded.

Put it first in ``[chain] plugins``: a plugin before it that ends the DATA stage (ACCEPT) would let the
report be queued like any other message.

The ``complained`` event: ``message_id`` our queue id, ``recipient`` the address (None when the report
does not say — then nothing is suppressed), and ``data``: ``feedback_type``, ``reporter`` (the reporting
domain), ``user_agent``, ``source_ip``, ``arrival_date``, ``original_mail_from``, ``sender_domain``,
``domain`` (the recipient's), ``recipient_source`` (``received_for``, ``original_rcpt_to``, ``to_header``),
``report_id``, ``incidents``.

Invariants: the plugin imports nothing from relay but :mod:`relay.plugin` and the pure policies (the ARF
reader is its own module); what it answers 250 to is committed first.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from relay.plugins.complaints_arf import (
    FeedbackReport,
    NotAReport,
    complained_recipient,
    original_sender_domain,
    our_copy,
    parse_report,
)
from relay.policies.addresses import address_domain, check_value, normalize_address

from relay.plugin import (
    CONTINUE,
    Action,
    DataContext,
    Event,
    Plugin,
    PluginConfig,
    PluginError,
    PluginHost,
    RcptContext,
    Suppression,
    Verdict,
)

__all__ = ["PLUGIN", "ComplaintsConfig", "ComplaintsPlugin"]

EVENT_TYPE = "complained"
RECEIVED_REPLY = "Ok: feedback report received"


class ComplaintsConfig(PluginConfig):
    """``[plugins.complaints]``; every key with its default in relay.toml.example."""

    # The feedback-loop address registered with the mailbox providers (required).
    address: str
    # Feedback-Type values that are complaints (others, such as not-spam, are accepted and only logged).
    feedback_types: list[str] = Field(default_factory=lambda: ["abuse", "fraud", "virus", "other"])
    # "global": the complainer gets no more mail from any sender; "sender_domain": none from the domain
    # whose mail was reported.
    scope: Literal["global", "sender_domain"] = "global"
    # Only reports about mail this relay sent (its Received: header with a queue id in the copy) count.
    require_queue_id: bool = True

    @field_validator("address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        return check_value(value, "address")

    @field_validator("feedback_types")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [item.strip().lower() for item in value if item.strip()]


class ComplaintsPlugin(Plugin[ComplaintsConfig]):
    """See the module docstring."""

    name: ClassVar[str] = "complaints"
    Config = ComplaintsConfig

    def __init__(self, config: ComplaintsConfig, host: PluginHost) -> None:
        super().__init__(config, host)
        self._address = normalize_address(config.address)
        self._types = frozenset(config.feedback_types)

    async def start(self) -> None:
        if self.host.events is None or self.host.suppressions is None:
            raise PluginError("the event outbox and the suppression list of the queue store are not available")

    def accepts_mail_for(self, address: str) -> bool:
        return normalize_address(address) == self._address

    # -- decisions -----------------------------------------------------------------------------------
    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        ours = self.accepts_mail_for(ctx.recipient)
        if any(self.accepts_mail_for(other) != ours for other in ctx.accepted):
            return Verdict.tempfail("Feedback reports go in a transaction of their own", code=452,
                                    enhanced="4.5.3", reason="FBL address mixed with other recipients")
        return CONTINUE

    async def data(self, ctx: DataContext) -> Verdict:
        if not ctx.recipients or not all(self.accepts_mail_for(r) for r in ctx.recipients):
            return CONTINUE
        try:
            report = parse_report(ctx.data)
        except NotAReport as exc:
            self.log.info("feedback_report_refused", queue_id=ctx.queue_id, sender=ctx.sender, reason=str(exc))
            return Verdict.reject("Message is not a feedback report (RFC 5965)", code=550, enhanced="5.6.0",
                                  reason=str(exc))
        await self.record(report, ctx.queue_id)
        ctx.consumed = True
        return Verdict(Action.ACCEPT, 250, "2.0.0", RECEIVED_REPLY)

    # -- recording -----------------------------------------------------------------------------------
    async def record(self, report: FeedbackReport, report_queue_id: str, now: float | None = None) -> Event | None:
        """Record a parsed report (event, then suppression); the event, or None when nothing was recorded."""
        now = time.time() if now is None else now
        if report.feedback_type not in self._types:
            self.log.info("feedback_report_ignored", queue_id=report_queue_id, reason="feedback type",
                          feedback_type=report.feedback_type, reporter=report.reporter)
            return None
        copy = our_copy(report, self.host.hostname)
        if copy is None and self.config.require_queue_id:
            self.log.warning("feedback_report_ignored", queue_id=report_queue_id, reason="not about mail we sent",
                             reporter=report.reporter, report_id=report.report_id)
            return None
        recipient, found_in = complained_recipient(report, copy)
        event = complaint_event(report, copy.queue_id if copy else None, recipient, found_in, now)
        assert self.host.events is not None
        await self.host.events.record_event(event)
        if recipient is not None:
            await self._suppress(recipient, event, report)
        self.log.info("complaint_recorded", queue_id=event.message_id, recipient=recipient, found_in=found_in,
                      feedback_type=report.feedback_type, reporter=report.reporter, event_id=event.id)
        return event

    async def _suppress(self, recipient: str, event: Event, report: FeedbackReport) -> None:
        scope = event.data["sender_domain"] if self.config.scope == "sender_domain" else ""
        note = f"{report.feedback_type} reported by {report.reporter or 'unknown'}"
        blacklist = self.host.extra.get("blacklist")
        suppress = getattr(blacklist, "suppress", None)
        if suppress is not None:
            await suppress(recipient, "complaint", source="fbl", scope=scope, message_id=event.message_id, note=note)
            return
        # Without the blacklist plugin: the entry all the same (never expiring), and its suppressed event.
        assert self.host.suppressions is not None and self.host.events is not None
        entry = Suppression(value=normalize_address(recipient), kind="address", reason="complaint", source="fbl",
                            created_at=event.created_at, note=note, scope=scope)
        await self.host.suppressions.add_suppression(entry)
        await self.host.events.record_event(Event(
            id=uuid.uuid4().hex, type="suppressed", created_at=event.created_at, message_id=event.message_id,
            recipient=entry.value, data={"value": entry.value, "kind": "address", "reason": "complaint",
                                         "source": "fbl", "scope": scope, "expires_at": None}))


def complaint_event(report: FeedbackReport, queue_id: str | None, recipient: str | None, found_in: str,
                    now: float) -> Event:
    """The ``complained`` event; its id is derived from the report, so a report received twice counts once."""
    identity = "\n".join([report.report_id, queue_id or "", recipient or "", report.feedback_type,
                          report.arrival_date, report.source_ip, *report.original("Message-ID")])
    event_id = "fbl-" + hashlib.sha256(identity.encode("utf-8", "replace")).hexdigest()[:32]
    return Event(id=event_id, type=EVENT_TYPE, created_at=now, message_id=queue_id, recipient=recipient,
                 data={"feedback_type": report.feedback_type, "reporter": report.reporter,
                       "user_agent": report.user_agent, "source_ip": report.source_ip,
                       "arrival_date": report.arrival_date, "original_mail_from": report.original_mail_from,
                       "sender_domain": original_sender_domain(report),
                       "domain": address_domain(recipient) if recipient else "",
                       "recipient_source": found_in, "report_id": report.report_id, "incidents": report.incidents})


PLUGIN = ComplaintsPlugin

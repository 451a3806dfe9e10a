"""Reading feedback-loop reports: the Abuse Reporting Format (RFC 5965) and the recipient they are about.

An ARF report is a ``multipart/report; report-type=feedback-report`` message with three parts: a human
readable text, a ``message/feedback-report`` part of ``Name: value`` fields (``Feedback-Type``,
``User-Agent``, ``Version``, ``Original-Mail-From``, ``Original-Rcpt-To``, ``Arrival-Date``,
``Reporting-MTA``, ``Source-IP``, ``Reported-Domain``, ``Incidents``, …) and the reported message —
whole (``message/rfc822``) or its header only (``text/rfc822-headers``). Mailbox providers differ:
some leave ``Original-Rcpt-To`` out, some redact the recipient in the copy's ``To:``.

Which recipient a report is about (:func:`complained_recipient`), in this order:

1. our own ``Received:`` header in the reported copy — ``by <our hostname> (relay) with … id <queue id>
   for <address>``: the envelope recipient we delivered to, which is the address to stop sending to
   (present when the message had one recipient);
2. ``Original-Rcpt-To`` of the report (several only when it names one distinct address);
3. the copy's ``To:`` header when it holds exactly one address.

Values that look redacted (``redacted@…``, ``*``, ``xxxx``) are skipped at every step.

Invariants: parsing is pure (bytes in, values out), never raises anything but :class:`NotAReport`, and
bounds what it reads (header values are cut to 998 characters, at most 100 recipients are kept).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
from dataclasses import dataclass, field

from relay.policies.addresses import address_domain, normalize_address

MAX_FIELD = 998
MAX_RECIPIENTS = 100
_REDACTED = re.compile(r"^(redacted|\*+|x+|removed|hidden|unknown|null)$", re.IGNORECASE)
_OUR_RECEIVED = re.compile(r"\bby\s+(?P<host>[^\s;()]+)\s+\(relay\)\s+with\s+\S+\s+id\s+(?P<id>[A-Za-z0-9._-]+)",
                           re.IGNORECASE)
_FOR = re.compile(r"\bfor\s+<(?P<address>[^<>\s]+)>", re.IGNORECASE)
_ANGLE = re.compile(r"<([^<>]*)>")


class NotAReport(ValueError):
    """The message is not a feedback report (or too broken to read); ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    feedback_type: str                       # lower-cased: abuse, fraud, virus, other, not-spam, …
    user_agent: str = ""
    version: str = ""
    original_mail_from: str = ""
    original_rcpt_to: tuple[str, ...] = ()
    arrival_date: str = ""
    reporting_mta: str = ""
    source_ip: str = ""
    reported_domains: tuple[str, ...] = ()
    incidents: int = 1
    report_id: str = ""                      # the report's own Message-ID
    reporter: str = ""                       # the domain that sent the report (its From:)
    # The reported message's header fields as (name, value), in order; empty when the report has no copy.
    original_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def original(self, name: str) -> list[str]:
        return [value for key, value in self.original_headers if key.lower() == name.lower()]


@dataclass(frozen=True, slots=True)
class OurCopy:
    """What our own Received: header in the reported copy says."""

    queue_id: str
    recipient: str | None


def parse_report(data: bytes) -> FeedbackReport:
    """The feedback report in ``data`` (a whole message); :class:`NotAReport` when it is not one."""
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
    except Exception as exc:  # the parser is meant not to raise; a bug there must not become a crash here
        raise NotAReport(f"unreadable message: {type(exc).__name__}") from None
    if message.get_content_type() != "multipart/report":
        raise NotAReport(f"not multipart/report but {message.get_content_type()}")
    report_type = email.utils.collapse_rfc2231_value(message.get_param("report-type") or "")
    if report_type.strip().lower() != "feedback-report":
        raise NotAReport("multipart/report without report-type=feedback-report")
    fields_part = _first_part(message, "message/feedback-report")
    if fields_part is None:
        raise NotAReport("no message/feedback-report part")
    fields = _report_fields(fields_part)
    feedback_type = _one(fields, "feedback-type").lower()
    if not feedback_type:
        raise NotAReport("the feedback report has no Feedback-Type")
    incidents = _one(fields, "incidents")
    return FeedbackReport(
        feedback_type=feedback_type, user_agent=_one(fields, "user-agent"), version=_one(fields, "version"),
        original_mail_from=_bare(_one(fields, "original-mail-from")),
        original_rcpt_to=tuple(_bare(v) for v in fields.get("original-rcpt-to", [])[:MAX_RECIPIENTS]),
        arrival_date=_one(fields, "arrival-date") or _one(fields, "received-date"),
        reporting_mta=_one(fields, "reporting-mta"), source_ip=_one(fields, "source-ip"),
        reported_domains=tuple(v.lower() for v in fields.get("reported-domain", [])[:MAX_RECIPIENTS]),
        incidents=int(incidents) if incidents.isdigit() else 1,
        report_id=_bare(_clip(message.get("Message-ID", ""))),
        reporter=_reporter(message),
        original_headers=_original_headers(message))


def _first_part(message: email.message.Message, content_type: str) -> email.message.Message | None:
    for part in message.walk():
        if part.get_content_type() == content_type:
            return part
    return None


def _report_fields(part: email.message.Message) -> dict[str, list[str]]:
    """The ``Name: value`` fields of the feedback-report part, by lower-cased name."""
    payload = part.get_payload()
    if isinstance(payload, list):   # some parsers see the block as one embedded header-only message
        text = "".join(f"{k}: {v}\n" for sub in payload if isinstance(sub, email.message.Message)
                       for k, v in sub.items())
    else:
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    parsed = email.message_from_string(text.lstrip("\r\n"), policy=email.policy.compat32)
    found: dict[str, list[str]] = {}
    for name, value in parsed.items():
        found.setdefault(name.lower(), []).append(_clip(" ".join(str(value).split())))
    return found


def _original_headers(message: email.message.Message) -> tuple[tuple[str, str], ...]:
    copy = _first_part(message, "message/rfc822")
    if copy is not None:
        inner = copy.get_payload()
        original = inner[0] if isinstance(inner, list) and inner else None
        if isinstance(original, email.message.Message):
            return tuple((k, _clip(" ".join(str(v).split()))) for k, v in original.items())
    headers = _first_part(message, "text/rfc822-headers")
    if headers is not None:
        raw = headers.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
        parsed = email.message_from_string(text.lstrip("\r\n"), policy=email.policy.compat32)
        return tuple((k, _clip(" ".join(str(v).split()))) for k, v in parsed.items())
    return ()


def _one(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name)
    return values[0].strip() if values else ""


def _clip(value: str) -> str:
    return str(value)[:MAX_FIELD]


def _bare(value: str) -> str:
    """``<a@b>`` or ``Name <a@b>`` or ``rfc822; a@b`` → ``a@b``."""
    value = value.strip()
    if value.lower().startswith("rfc822;"):
        value = value[7:].strip()
    found = _ANGLE.search(value)
    return (found.group(1) if found else value).strip()


def _reporter(message: email.message.Message) -> str:
    _, address = email.utils.parseaddr(_clip(message.get("From", "")))
    return address_domain(address) if "@" in address else ""


def redacted(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return not at or not local or not domain or bool(_REDACTED.match(local.strip('"')))


def our_copy(report: FeedbackReport, hostname: str) -> OurCopy | None:
    """Our Received: header in the reported copy (the last one we added: the copy passed us once)."""
    for value in report.original("Received"):
        found = _OUR_RECEIVED.search(value)
        if found is None or found["host"].lower().rstrip(".") != hostname.lower().rstrip("."):
            continue
        recipient = _FOR.search(value[found.end():])
        address = recipient["address"] if recipient is not None else None
        return OurCopy(found["id"], None if address is None or redacted(address) else address)
    return None


def complained_recipient(report: FeedbackReport, copy: OurCopy | None) -> tuple[str | None, str]:
    """(the address complained about or None, where it was found); see the module docstring."""
    if copy is not None and copy.recipient:
        return copy.recipient, "received_for"
    named = {normalize_address(a): a for a in report.original_rcpt_to if not redacted(a)}
    if len(named) == 1:
        return next(iter(named.values())), "original_rcpt_to"
    addresses = [address for _, address in email.utils.getaddresses(report.original("To"))
                 if address and not redacted(address)]
    if len({normalize_address(a) for a in addresses}) == 1:
        return addresses[0], "to_header"
    return None, "unknown"


def original_sender_domain(report: FeedbackReport) -> str:
    """The reported message's envelope sender domain (what statistics count senders by), else its From:."""
    for candidate in (report.original_mail_from, *(_bare(v) for v in report.original("Return-Path"))):
        if "@" in candidate:
            return address_domain(candidate)
    for _, address in email.utils.getaddresses(report.original("From")):
        if "@" in address:
            return address_domain(address)
    return ""


__all__ = ["FeedbackReport", "NotAReport", "OurCopy", "complained_recipient", "original_sender_domain",
           "our_copy", "parse_report", "redacted"]

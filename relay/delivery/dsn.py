"""Delivery status notifications: the RFC 3464 bounce (``failed``) and delay warning (``delayed``).

:func:`build_bounce` turns the failed (or delayed) recipients of one message into a new
:class:`~relay.store.base.NewMessage` addressed to the original envelope sender, ready to be committed
by ``record_results`` together with the recipient states it reports on.

Shape (RFC 3464 / RFC 6522): ``multipart/report; report-type=delivery-status`` with
1. ``text/plain`` — what happened, per recipient, in words;
2. ``message/delivery-status`` — the machine-readable fields (per message: Reporting-MTA,
   Original-Envelope-Id, Received-From-MTA, Arrival-Date; per recipient: Original-Recipient,
   Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until);
3. the original (left out only when its stored copy is gone): ``message/rfc822`` when RET=FULL or
   unspecified and it fits ``max_return_size``, otherwise ``text/rfc822-headers`` (RET=HDRS, too large,
   and always for delay warnings — the message is still queued, the sender does not need a copy).

Invariants:
- Never bounce a bounce: a message with the null reverse-path yields None; the DSN itself is sent
  from the null reverse-path, so it can never cause another one (RFC 3464 section 2, RFC 5321 4.5.5).
- NOTIFY (RFC 3461) is honoured per recipient: NEVER, or a list without FAILURE (resp. DELAY), leaves
  the recipient out; when nobody is left the result is None. No NOTIFY means "failures and delays".
- Every value that came from the network (remote replies, MTA names, addresses, ENVID, ORCPT) is
  reduced to one line of printable text before it is written: a reply cannot inject a header or a
  MIME boundary. The delivery-status part is 7-bit ASCII (non-ASCII is written as ``\\x{HH}``) unless an
  address needs UTF-8, in which case the RFC 6533 ``message/global-delivery-status`` form is used.
- CRLF line endings throughout, no line longer than 998 octets of our making; the result parses with
  the standard library's ``email`` package.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Literal

from relay.store.base import NewMessage, NewRecipient, StoredMessage

DsnKind = Literal["failed", "delayed"]

# Postfix returns at most 50 kB; modern mailboxes take more. Larger originals come back as headers only.
DEFAULT_MAX_RETURN_SIZE = 256 * 1024
# Longest value we write into one DSN field; keeps every physical line well under 998 octets.
MAX_FIELD_TEXT = 900
FOLD_WIDTH = 78

SUBJECTS: dict[str, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}

_CRLF = "\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_SPACES = re.compile(r"\s+")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$", re.ASCII)
_SMTP_REPLY = re.compile(r"^[2-5]\d\d(?:[ -]|$)", re.ASCII)
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(?:\r?\n[ \t]+)?(<[!-;=?-~]{1,250}>)[ \t]*\r?$",
                         re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient to report on.

    ``orcpt`` and ``notify`` are the RFC 3461 parameters as received (ORCPT still xtext-encoded, as the
    store keeps it); ``status`` is the RFC 3463 code to report; ``diagnostic`` the remote reply (or our
    own description when there was none); ``will_retry_until`` only matters for ``delayed``.
    """

    address: str
    orcpt: str | None
    status: str
    action: DsnKind
    remote_mta: str | None
    diagnostic: str | None
    last_attempt_at: float | None
    notify: str | None = None
    will_retry_until: float | None = None


def build_bounce(*, message: StoredMessage, original: bytes, failures: Sequence[FailedRecipient],
                 reporting_mta: str, kind: DsnKind, new_id: str, now: float,
                 max_return_size: int = DEFAULT_MAX_RETURN_SIZE) -> NewMessage | None:
    """The DSN for ``failures`` of ``message``, or None when none may or need be sent.

    Raises :class:`ValueError` if a recipient's ``action`` is not ``kind`` (one DSN reports one kind).
    """
    for failure in failures:
        if failure.action != kind:
            raise ValueError(f"build_bounce(kind={kind!r}) got a recipient with action {failure.action!r}")
    if _is_null_sender(message.sender):
        return None
    reported = [failure for failure in failures if notify_allows(failure.notify, kind)]
    if not reported:
        return None
    mta = _mta_name(reporting_mta)
    returned = _returned_part(message, original, kind, max_return_size)
    utf8 = _needs_utf8_report(reported)
    parts: list[str | bytes] = [
        _text_part(message, reported, kind, mta, returned.note, now),
        _status_part(message, reported, kind, mta, utf8),
    ]
    if returned.part:
        parts.append(returned.part)
    boundary = _boundary(original)
    data = _assemble(message, original, kind, mta, new_id, now, boundary, parts)
    return NewMessage(
        id=new_id,
        sender="",
        recipients=[NewRecipient(address=message.sender)],
        data=data,
        received_at=now,
        listener="dsn",
        smtputf8=not message.sender.isascii(),
    )


# ------------------------------------------------------------------------------------------------
# Who gets a DSN
# ------------------------------------------------------------------------------------------------

def notify_allows(notify: str | None, kind: DsnKind) -> bool:
    """RFC 3461 NOTIFY: no value (or none we understand) means failures and delays are reported."""
    words = {word.strip().upper() for word in (notify or "").split(",") if word.strip()}
    known = words & {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
    if not known:
        return True
    if "NEVER" in known:
        return False
    return ("FAILURE" if kind == "failed" else "DELAY") in known


def _is_null_sender(sender: str) -> bool:
    return sender.strip() in ("", "<>")


# ------------------------------------------------------------------------------------------------
# Making untrusted values safe to write
# ------------------------------------------------------------------------------------------------

def one_line(value: str, limit: int = MAX_FIELD_TEXT) -> str:
    """Control characters (CR, LF, NUL, C1 …) become spaces, white space collapses, length is bounded."""
    text = _SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def ascii_escaped(value: str) -> str:
    """Non-ASCII characters as ``\\x{HH}`` (the RFC 6533 convention for 7-bit DSN fields)."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in value)


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext: ``+HH`` stands for the octet HH (ENVID and ORCPT travel this way)."""
    return _XTEXT_HEX.sub(lambda match: chr(int(match.group(1), 16)), value)


def _field_value(value: str, utf8: bool) -> str:
    text = one_line(value)
    return text if utf8 else ascii_escaped(text)


def _mta_name(name: str) -> str:
    # An MTA name is one token; anything else would corrupt the field.
    token = one_line(name).split(" ")[0]
    return ascii_escaped(token) or "localhost"


def _needs_utf8_report(reported: Sequence[FailedRecipient]) -> bool:
    addresses = [failure.address for failure in reported]
    addresses += [xtext_decode(failure.orcpt) for failure in reported if failure.orcpt]
    return not all(address.isascii() for address in addresses)


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded at spaces to about FOLD_WIDTH columns (RFC 5322 2.2.3)."""
    line = f"{name}: {value}"
    if len(line) <= FOLD_WIDTH:
        return line
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        if len(current) + 1 + len(word) > FOLD_WIDTH and current.strip() and not current.endswith(":"):
            lines.append(current)
            current = ""
        current += " " + word
    lines.append(current)
    return _CRLF.join(lines)


def _date(timestamp: float) -> str:
    # RFC 3464 wants numeric time zones: "+0000", never "GMT" or "-0000".
    return format_datetime(dt.datetime.fromtimestamp(timestamp, tz=dt.UTC))


# ------------------------------------------------------------------------------------------------
# Part 1: the human-readable explanation
# ------------------------------------------------------------------------------------------------

# Plain words for the statuses senders meet most (RFC 3463 subject.detail).
_STATUS_WORDS: dict[str, str] = {
    "1.1": "the recipient's mailbox does not exist",
    "1.2": "the recipient's domain does not exist or does not accept mail",
    "1.10": "the recipient's domain does not accept mail",
    "1.3": "the recipient address is not valid",
    "2.1": "the recipient's mailbox is disabled",
    "2.2": "the recipient's mailbox is full",
    "2.3": "the message is too large for the recipient",
    "3.4": "the message is too large for the receiving system",
    "4.1": "the receiving mail server did not answer",
    "4.2": "the connection to the receiving mail server failed",
    "4.3": "a DNS lookup for the recipient's domain failed",
    "4.4": "no mail server for the recipient's domain could be reached",
    "4.7": "the message could not be delivered in time",
    "5.3": "the message has too many recipients",
    "7.1": "the receiving system refused the message by its policy",
}


def _status_words(status: str, kind: DsnKind) -> str:
    _, _, rest = status.partition(".")
    fallback = "delivery failed" if kind == "failed" else "delivery has not succeeded yet"
    return _STATUS_WORDS.get(rest, fallback)


def _text_part(message: StoredMessage, reported: Sequence[FailedRecipient], kind: DsnKind, mta: str,
               returned_note: str, now: float) -> str:
    if kind == "failed":
        intro = ("Your message could not be delivered to the recipient(s) listed below. The receiving "
                 "system refused it permanently, or it could not be delivered in the time allowed. "
                 "No further delivery attempts will be made.")
    else:
        intro = ("Your message has not been delivered yet to the recipient(s) listed below. Delivery is "
                 "being retried automatically; you do not need to send it again. You will get another "
                 "notice if it finally fails.")
    lines = [f"This is the mail system at {mta}.", "", *textwrap.wrap(intro, 76), ""]
    for failure in reported:
        lines += _recipient_paragraph(failure, kind)
    arrival = _date(message.received_at)
    lines += [f"The message was received on {arrival} (queue id {ascii_escaped(one_line(message.id, 64))}).",
              *textwrap.wrap(returned_note, 76), ""]
    body = _CRLF.join(lines) + _CRLF
    return _part_headers("text/plain; charset=utf-8", body, "Notification") + body


def _recipient_paragraph(failure: FailedRecipient, kind: DsnKind) -> list[str]:
    status = _valid_status(failure.status, kind)
    lines = [f"<{one_line(failure.address, 320)}>: {_status_words(status, kind)} ({status})."]
    if failure.diagnostic:
        said = one_line(failure.diagnostic)
        where = f"{_mta_name(failure.remote_mta)} said" if failure.remote_mta else "Reason"
        lines += textwrap.wrap(f"{where}: {said}", 76, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    if kind == "delayed" and failure.will_retry_until is not None:
        lines.append(f"    Delivery will be retried until {_date(failure.will_retry_until)}.")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------
# Part 2: message/delivery-status
# ------------------------------------------------------------------------------------------------

def _valid_status(status: str, kind: DsnKind) -> str:
    status = status.strip()
    if _STATUS.match(status):
        return ".".join(str(int(part)) for part in status.split("."))
    return "5.0.0" if kind == "failed" else "4.0.0"


def _status_part(message: StoredMessage, reported: Sequence[FailedRecipient], kind: DsnKind, mta: str,
                 utf8: bool) -> str:
    groups = [_per_message_fields(message, mta, utf8)]
    groups += [_per_recipient_fields(failure, kind, utf8) for failure in reported]
    body = (_CRLF + _CRLF).join(_CRLF.join(group) for group in groups) + _CRLF
    content_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    return _part_headers(content_type, body, "Delivery report") + body


def _per_message_fields(message: StoredMessage, mta: str, utf8: bool) -> list[str]:
    fields: list[str] = []
    if message.envid:
        fields.append(_fold("Original-Envelope-Id", _field_value(xtext_decode(message.envid), utf8)))
    fields.append(f"Reporting-MTA: dns; {mta}")
    if message.client_helo:
        helo = _mta_name(message.client_helo)
        client = f" ({ascii_escaped(one_line(message.client_ip, 64))})" if message.client_ip else ""
        fields.append(f"Received-From-MTA: dns; {helo}{client}")
    fields.append(f"Arrival-Date: {_date(message.received_at)}")
    # An extension field (RFC 3464 2.4) so operators can find the message in the queue and the logs.
    fields.append(f"X-Relay-Queue-ID: {ascii_escaped(one_line(message.id, 64))}")
    return fields


def _per_recipient_fields(failure: FailedRecipient, kind: DsnKind, utf8: bool) -> list[str]:
    address_type = "utf-8" if utf8 else "rfc822"
    fields: list[str] = []
    if failure.orcpt:
        orcpt_type, separator, orcpt_address = xtext_decode(failure.orcpt).partition(";")
        if not separator:
            orcpt_type, orcpt_address = "rfc822", orcpt_type
        orcpt_type = one_line(orcpt_type, 32).replace(" ", "") or "rfc822"
        fields.append(_fold("Original-Recipient",
                            f"{ascii_escaped(orcpt_type)}; {_field_value(orcpt_address, utf8)}"))
    fields.append(_fold("Final-Recipient", f"{address_type}; {_field_value(failure.address, utf8)}"))
    fields.append(f"Action: {kind}")
    fields.append(f"Status: {_valid_status(failure.status, kind)}")
    if failure.remote_mta:
        fields.append(f"Remote-MTA: dns; {_mta_name(failure.remote_mta)}")
    if failure.diagnostic:
        fields.append(_fold("Diagnostic-Code", _diagnostic(failure.diagnostic, utf8)))
    if failure.last_attempt_at is not None:
        fields.append(f"Last-Attempt-Date: {_date(failure.last_attempt_at)}")
    if kind == "delayed" and failure.will_retry_until is not None:
        fields.append(f"Will-Retry-Until: {_date(failure.will_retry_until)}")
    return fields


def _diagnostic(diagnostic: str, utf8: bool) -> str:
    text = _field_value(diagnostic, utf8)
    # "smtp" is for a reply code from an SMTP server; our own descriptions get an X- type.
    return f"smtp; {text}" if _SMTP_REPLY.match(text) else f"X-Relay; {text}"


# ------------------------------------------------------------------------------------------------
# Part 3: the original message (or its headers)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Returned:
    part: bytes
    note: str


def _returned_part(message: StoredMessage, original: bytes, kind: DsnKind,
                   max_return_size: int) -> _Returned:
    if not original.strip():
        # The stored copy is gone (RFC 3464 allows leaving the third part out); say so instead.
        return _Returned(b"", "The original message is no longer available, so no copy is attached.")
    utf8_headers = message.smtputf8
    if kind == "failed" and (message.ret or "").upper() != "HDRS" and len(original) <= max_return_size:
        content_type = "message/global" if utf8_headers else "message/rfc822"
        body = _with_final_crlf(original)
        return _Returned(_part_headers_bytes(content_type, body, "Undelivered message") + body,
                         "A copy of your message is attached.")
    if kind == "delayed":
        note = "The headers of your message are attached."
    elif (message.ret or "").upper() == "HDRS":
        note = "The headers of your message are attached, as you asked."
    else:
        note = (f"Your message was larger than {max_return_size} bytes, so only its headers are "
                "attached.")
    content_type = "message/global-headers" if utf8_headers else "text/rfc822-headers"
    headers = _with_final_crlf(header_block(original, max_return_size))
    return _Returned(_part_headers_bytes(content_type, headers, "Message headers") + headers, note)


def header_block(original: bytes, limit: int = DEFAULT_MAX_RETURN_SIZE) -> bytes:
    """The header section of ``original`` (without the blank line), cut at a line end within ``limit``."""
    end = _HEADER_END.search(original)
    headers = original[: end.start()] if end else original
    if len(headers) > limit:
        cut = headers.rfind(b"\n", 0, limit)
        headers = headers[: cut if cut > 0 else limit]
    return headers.rstrip(b"\r\n")


def _with_final_crlf(data: bytes) -> bytes:
    normalised = re.sub(rb"\r?\n", b"\r\n", data)
    return normalised if normalised.endswith(b"\r\n") else normalised + b"\r\n"


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------

def _part_headers(content_type: str, body: str, description: str) -> str:
    encoding = "7bit" if body.isascii() else "8bit"
    return (f"Content-Type: {content_type}{_CRLF}Content-Description: {description}{_CRLF}"
            f"Content-Transfer-Encoding: {encoding}{_CRLF}{_CRLF}")


def _part_headers_bytes(content_type: str, body: bytes, description: str) -> bytes:
    encoding = "7bit" if body.isascii() else "8bit"
    return (f"Content-Type: {content_type}{_CRLF}Content-Description: {description}{_CRLF}"
            f"Content-Transfer-Encoding: {encoding}{_CRLF}{_CRLF}").encode("ascii")


def _boundary(original: bytes) -> str:
    while True:
        boundary = f"=_relay-dsn-{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in original:
            return boundary


def _assemble(message: StoredMessage, original: bytes, kind: DsnKind, mta: str, new_id: str, now: float,
              boundary: str, parts: Sequence[str | bytes]) -> bytes:
    sender = one_line(message.sender, 512)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        f"Subject: {SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{ascii_escaped(one_line(new_id, 128)).replace(' ', '')}@{mta}>",
    ]
    original_id = _original_message_id(original)
    if original_id:
        headers += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    headers += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {_multipart_encoding(parts)}",
    ]
    out = bytearray((_CRLF.join(headers) + _CRLF + _CRLF).encode("utf-8"))
    out += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        out += f"\r\n--{boundary}\r\n".encode("ascii")
        out += part if isinstance(part, bytes) else part.encode("utf-8")
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return bytes(out)


def _multipart_encoding(parts: Sequence[str | bytes]) -> str:
    # A multipart is 8bit as soon as one of its parts is (RFC 2045 6.4).
    return "7bit" if all(part.isascii() for part in parts) else "8bit"


def _original_message_id(original: bytes) -> str | None:
    match = _MESSAGE_ID.search(header_block(original))
    return match.group(1).decode("ascii") if match else None


__all__ = [
    "DEFAULT_MAX_RETURN_SIZE",
    "SUBJECTS",
    "DsnKind",
    "FailedRecipient",
    "ascii_escaped",
    "build_bounce",
    "header_block",
    "notify_allows",
    "one_line",
    "xtext_decode",
]

"""The RFC 3464 bounce builder, checked by parsing what it produces with the standard email package."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message

import pytest

from relay.delivery.dsn import (
    FailedRecipient,
    build_bounce,
    header_block,
    notify_allows,
    xtext_decode,
)
from relay.store.base import NewMessage, StoredMessage

RECEIVED = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = RECEIVED + 3600

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.net\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached in spirit.\r\n"
)


def stored(**changes: object) -> StoredMessage:
    values: dict[str, object] = {
        "id": "Q0001", "sender": "alice@example.org", "size": len(ORIGINAL), "received_at": RECEIVED,
        "client_ip": "192.0.2.10", "client_helo": "client.example.org", "auth_user": "alice",
        "listener": "submission", "envid": None, "ret": None, "smtputf8": False,
    }
    values.update(changes)
    return StoredMessage(**values)  # type: ignore[arg-type]  # test helper: values typed per field above


def failed(address: str = "bob@example.com", **changes: object) -> FailedRecipient:
    values: dict[str, object] = {
        "address": address, "orcpt": None, "status": "5.1.1", "action": "failed",
        "remote_mta": "mx1.example.com", "diagnostic": "550 5.1.1 <bob@example.com>: user unknown",
        "last_attempt_at": NOW - 60,
    }
    values.update(changes)
    return FailedRecipient(**values)  # type: ignore[arg-type]  # test helper


def bounce(message: StoredMessage | None = None, failures: list[FailedRecipient] | None = None,
           kind: str = "failed", original: bytes = ORIGINAL, **kwargs: object) -> NewMessage | None:
    return build_bounce(message=message or stored(), original=original,
                        failures=failures if failures is not None else [failed()],
                        reporting_mta="relay.example.net", kind=kind,  # type: ignore[arg-type]  # str on purpose
                        new_id="B0001", now=NOW, **kwargs)  # type: ignore[arg-type]  # optional limits only


def parse(new: NewMessage | None) -> EmailMessage:
    assert new is not None
    parsed = email.message_from_bytes(new.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects, parsed.defects
    return parsed


def parts_of(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def status_groups(msg: EmailMessage) -> list[Message]:
    """The per-message block followed by one block per recipient."""
    groups = parts_of(msg)[1].get_payload()
    assert isinstance(groups, list)
    return groups


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------

def test_bounce_envelope_and_top_level_headers() -> None:
    new = bounce()
    assert new is not None
    assert new.id == "B0001"
    assert new.sender == ""  # the null reverse-path: a bounce never bounces
    assert [r.address for r in new.recipients] == ["alice@example.org"]
    assert new.received_at == NOW
    msg = parse(new)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert b"\r\nTo: <alice@example.org>\r\n" in new.data
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<B0001@relay.example.net>"
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["Date"] == "Tue, 14 Nov 2023 23:13:20 +0000"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"


def test_three_parts_in_order() -> None:
    msg = parse(bounce())
    assert [p.get_content_type() for p in parts_of(msg)] == \
        ["text/plain", "message/delivery-status", "message/rfc822"]


def test_crlf_line_endings_and_line_lengths() -> None:
    new = bounce(failures=[failed(diagnostic="550 5.7.1 " + "word " * 400)])
    assert new is not None
    assert b"\n" not in new.data.replace(b"\r\n", b"")
    assert b"\r" not in new.data.replace(b"\r\n", b"")
    assert max(len(line) for line in new.data.split(b"\r\n")) <= 998


def test_human_readable_part_explains_each_recipient() -> None:
    msg = parse(bounce(failures=[failed(), failed("carol@example.net", status="5.2.2",
                                                  diagnostic="552 5.2.2 mailbox full")]))
    text = parts_of(msg)[0].get_content()
    assert "could not be delivered" in text
    assert "<bob@example.com>: the recipient's mailbox does not exist (5.1.1)" in text
    assert "mx1.example.com said: 550 5.1.1" in text
    assert "<carol@example.net>: the recipient's mailbox is full (5.2.2)" in text
    assert "A copy of your message is attached." in text


# ------------------------------------------------------------------------------------------------
# message/delivery-status fields
# ------------------------------------------------------------------------------------------------

def test_per_message_fields() -> None:
    msg = parse(bounce(stored(envid="batch+2B42")))
    per_message = status_groups(msg)[0]
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert per_message["Original-Envelope-Id"] == "batch+42"  # xtext decoded
    assert per_message["Received-From-MTA"] == "dns; client.example.org (192.0.2.10)"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_message["X-Relay-Queue-ID"] == "Q0001"


def test_no_envelope_id_field_without_envid() -> None:
    assert status_groups(parse(bounce()))[0]["Original-Envelope-Id"] is None


def test_per_recipient_fields() -> None:
    msg = parse(bounce(failures=[
        failed(orcpt="rfc822;Bob+2Balias@example.com"),
        failed("carol@example.net", status="4.4.7", remote_mta=None,
               diagnostic="delivery time expired after 5 days", last_attempt_at=None),
    ]))
    groups = status_groups(msg)
    assert len(groups) == 3
    bob, carol = groups[1], groups[2]
    assert bob["Original-Recipient"] == "rfc822; Bob+alias@example.com"
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: user unknown"
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 23:12:20 +0000"
    assert bob["Will-Retry-Until"] is None  # MUST NOT appear in a failure DSN
    assert carol["Original-Recipient"] is None
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-Relay; delivery time expired after 5 days"
    assert carol["Last-Attempt-Date"] is None


def test_invalid_status_is_replaced_by_the_generic_one() -> None:
    groups = status_groups(parse(bounce(failures=[failed(status="5.1.1 (junk)")])))
    assert groups[1]["Status"] == "5.0.0"
    groups = status_groups(parse(bounce(failures=[failed(status="5.01.001")])))
    assert groups[1]["Status"] == "5.1.1"


def test_long_diagnostic_is_folded_and_unfolds_to_the_original() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
    groups = status_groups(parse(bounce(failures=[failed(diagnostic=reply)])))
    assert groups[1]["Diagnostic-Code"] == f"smtp; {reply}"


def test_delay_warning() -> None:
    delayed = failed(status="4.4.1", action="delayed", diagnostic="connect to mx1.example.com: timed out",
                     will_retry_until=RECEIVED + 5 * 86400)
    new = bounce(failures=[delayed], kind="delayed")
    msg = parse(new)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert [p.get_content_type() for p in parts_of(msg)] == \
        ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    group = status_groups(msg)[1]
    assert group["Action"] == "delayed"
    assert group["Status"] == "4.4.1"
    assert group["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    text = parts_of(msg)[0].get_content()
    assert "not been delivered yet" in text and "do not need to send it again" in text


def test_action_must_match_kind() -> None:
    with pytest.raises(ValueError, match="action 'delayed'"):
        bounce(failures=[failed(action="delayed")], kind="failed")


# ------------------------------------------------------------------------------------------------
# Returning the original: RET=FULL / HDRS / too large
# ------------------------------------------------------------------------------------------------

def test_ret_full_returns_the_whole_message() -> None:
    for ret in (None, "FULL", "full"):
        msg = parse(bounce(stored(ret=ret)))
        returned = parts_of(msg)[2]
        assert returned.get_content_type() == "message/rfc822"
        inner = returned.get_payload()[0]
        assert inner["Subject"] == "Quarterly numbers"
        assert "the numbers are attached in spirit." in inner.get_content()


def test_ret_hdrs_returns_headers_only() -> None:
    new = bounce(stored(ret="HDRS"))
    msg = parse(new)
    returned = parts_of(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_content()
    assert "Subject: Quarterly numbers" in headers
    assert "Hello Bob" not in headers
    assert new is not None and b"Hello Bob" not in new.data
    assert "headers of your message are attached, as you asked" in parts_of(msg)[0].get_content()


def test_large_original_returns_headers_only() -> None:
    big = ORIGINAL + b"x" * 200 + b"\r\n"
    msg = parse(bounce(original=big, max_return_size=len(big) - 1))
    assert parts_of(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "larger than" in parts_of(msg)[0].get_content()
    msg = parse(bounce(original=big, max_return_size=len(big)))
    assert parts_of(msg)[2].get_content_type() == "message/rfc822"


def test_header_block_cut_at_limit_on_a_line_end() -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 50) for i in range(100))
    cut = header_block(headers + b"\r\nbody\r\n", limit=1000)
    assert len(cut) <= 1000
    assert cut.endswith(b"y" * 50)
    assert header_block(b"Subject: no body") == b"Subject: no body"


def test_missing_original_leaves_the_third_part_out() -> None:
    msg = parse(bounce(original=b""))
    assert [p.get_content_type() for p in parts_of(msg)] == ["text/plain", "message/delivery-status"]
    assert "no longer available" in parts_of(msg)[0].get_content()


def test_eight_bit_original_is_declared_8bit() -> None:
    original = ORIGINAL.replace(b"Hello Bob", "Grüße Bob".encode())
    new = bounce(original=original)
    msg = parse(new)
    assert parts_of(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_smtputf8_original_uses_message_global() -> None:
    msg = parse(bounce(stored(smtputf8=True)))
    assert parts_of(msg)[2].get_content_type() == "message/global"


# ------------------------------------------------------------------------------------------------
# When no DSN is sent
# ------------------------------------------------------------------------------------------------

def test_null_sender_never_gets_a_bounce() -> None:
    assert bounce(stored(sender="")) is None
    assert bounce(stored(sender="<>")) is None


@pytest.mark.parametrize(("notify", "kind", "sent"), [
    (None, "failed", True),
    (None, "delayed", True),
    ("NEVER", "failed", False),
    ("never", "delayed", False),
    ("SUCCESS", "failed", False),
    ("SUCCESS,DELAY", "failed", False),
    ("SUCCESS,DELAY", "delayed", True),
    ("FAILURE", "failed", True),
    ("FAILURE", "delayed", False),
    ("SUCCESS, FAILURE", "failed", True),
])
def test_notify(notify: str | None, kind: str, sent: bool) -> None:
    recipient = failed(notify=notify, action=kind, status="5.1.1" if kind == "failed" else "4.4.1")
    assert (bounce(failures=[recipient], kind=kind) is not None) is sent


def test_notify_filters_recipients_individually() -> None:
    msg = parse(bounce(failures=[failed(notify="NEVER"), failed("carol@example.net", notify="FAILURE")]))
    groups = status_groups(msg)
    assert [g["Final-Recipient"] for g in groups[1:]] == ["rfc822; carol@example.net"]
    text = parts_of(msg)[0].get_content()
    assert "<carol@example.net>: the recipient's mailbox does not exist" in text
    assert "<bob@example.com>: the recipient" not in text


def test_no_failures_no_bounce() -> None:
    assert bounce(failures=[]) is None


def test_notify_allows_helper() -> None:
    assert notify_allows("garbage", "failed")  # unreadable NOTIFY: fall back to the default
    assert not notify_allows("NEVER,FAILURE", "failed")


# ------------------------------------------------------------------------------------------------
# Hostile input
# ------------------------------------------------------------------------------------------------

def test_header_injection_in_reply_is_neutralised() -> None:
    evil = ("550 5.1.1 nope\r\nBcc: victim@example.com\r\n\r\n--fake-boundary\r\n"
            "Content-Type: text/html\r\n\r\n<script>")
    new = bounce(failures=[failed(diagnostic=evil, remote_mta="mx.example.com\r\nX-Injected: 1")])
    msg = parse(new)
    assert msg["Bcc"] is None
    assert len(parts_of(msg)) == 3
    group = status_groups(msg)[1]
    assert group["Bcc"] is None and group["X-Injected"] is None
    assert group["Diagnostic-Code"].startswith("smtp; 550 5.1.1 nope Bcc: victim@example.com")
    assert group["Remote-MTA"] == "dns; mx.example.com"
    assert len(status_groups(msg)) == 2  # no forged recipient group
    assert new is not None and b"\r\nBcc:" not in new.data


def test_eight_bit_reply_stays_seven_bit_in_the_report() -> None:
    new = bounce(failures=[failed(diagnostic="550 5.1.1 Benutzer unbekannt – Postfach gelöscht\x00")])
    assert new is not None
    msg = parse(new)
    status_part = parts_of(msg)[1]
    assert status_part["Content-Transfer-Encoding"] == "7bit"
    diagnostic = status_groups(msg)[1]["Diagnostic-Code"]
    assert diagnostic.isascii()
    assert r"gel\x{F6}scht" in diagnostic and r"\x{2013}" in diagnostic
    # The human part may show it as written (it is declared UTF-8).
    assert "gelöscht" in parts_of(msg)[0].get_content()


def test_hostile_envid_and_orcpt() -> None:
    new = bounce(stored(envid="id+0D+0ABcc:+20x@example.com"),
                 failures=[failed(orcpt="rfc822;a+0D+0AX-Evil:+201@example.com")])
    msg = parse(new)
    groups = status_groups(msg)
    assert groups[0]["Bcc"] is None and groups[1]["X-Evil"] is None
    assert groups[0]["Original-Envelope-Id"] == "id Bcc: x@example.com"
    assert groups[1]["Original-Recipient"] == "rfc822; a X-Evil: 1@example.com"


def test_utf8_addresses_use_global_delivery_status_and_smtputf8() -> None:
    new = bounce(stored(sender="jörg@example.de", smtputf8=True),
                 failures=[failed("björn@exämple.com")])
    assert new is not None
    assert new.smtputf8 is True
    assert new.recipients[0].address == "jörg@example.de"
    assert "jörg@example.de".encode() in new.data
    parsed = email.message_from_bytes(new.data, policy=email.policy.default)
    status_part = parts_of(parsed)[1]  # type: ignore[arg-type]  # parsed is an EmailMessage
    assert status_part.get_content_type() == "message/global-delivery-status"
    assert "Final-Recipient: utf-8; björn@exämple.com".encode() in new.data


def test_boundary_never_occurs_in_the_original() -> None:
    new = bounce()
    assert new is not None
    boundary = re.search(rb'boundary="([^"]+)"', new.data)
    assert boundary is not None
    assert boundary.group(1) not in ORIGINAL


def test_xtext_decode() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("lower+2bcase") == "lower+2bcase"  # xtext hex is upper case only

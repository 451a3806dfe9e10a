"""Feedback-loop complaints: ARF reports (RFC 5965) in the styles of the big mailbox providers, parsed, and
end to end over SMTP into complained events and suppression entries on both stores.

The samples are written here for the test (modelled on the published format, not copied from a provider).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from relay.plugins.complaints import ComplaintsConfig, complaint_event
from relay.plugins.complaints_arf import (
    NotAReport,
    complained_recipient,
    original_sender_domain,
    our_copy,
    parse_report,
)

from relay.store.base import RecipientState
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

FBL = "fbl@relay.test"
HOST = "relay.test"


def original(queue_id: str = "Q0RIGINAL01", *, rcpt_for: str | None = "reader@yahoo.example",
             to: str = "Reader <reader@yahoo.example>", sender: str = "bounces@news.example") -> str:
    """A message as it left this relay: our Received: header first, then what the application wrote."""
    for_clause = f"\r\n\tfor <{rcpt_for}>" if rcpt_for else ""
    return ("Received: from mta-out.relay.test (mta-out.relay.test [192.0.2.25])\r\n"
            "\tby mta7.mail.provider.example with ESMTPS; Mon, 23 Nov 2026 09:14:07 +0000\r\n"
            f"Received: from app01.news.example ([10.1.2.3])\r\n\tby {HOST} (relay) with ESMTPA id {queue_id}"
            f"{for_clause};\r\n\tMon, 23 Nov 2026 09:14:05 +0000\r\n"
            f"Return-Path: <{sender}>\r\n"
            "From: News <news@news.example>\r\n"
            f"To: {to}\r\n"
            "Subject: This week's offers\r\n"
            "Message-ID: <offer-7781@news.example>\r\n"
            "Date: Mon, 23 Nov 2026 09:14:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            "Big savings inside.\r\n")


def yahoo_report(copy: str, *, feedback_type: str = "abuse", rcpt_to: str | None = "reader@yahoo.example",
                 report_id: str = "<fbl.4711@feedback.yahoo.example>") -> bytes:
    """Yahoo-style: the whole message as message/rfc822, Original-Rcpt-To given."""
    rcpt_line = f"Original-Rcpt-To: {rcpt_to}\r\n" if rcpt_to else ""
    return ("From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.example>\r\n"
            f"To: {FBL}\r\n"
            "Subject: FW: This week's offers\r\n"
            f"Message-ID: {report_id}\r\n"
            "Date: Mon, 23 Nov 2026 10:02:41 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="----=_Part_1_99"\r\n'
            "\r\n"
            "------=_Part_1_99\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
            "This is an email abuse report for an email message received from IP 192.0.2.25 on\r\n"
            "Mon, 23 Nov 2026 09:14:07 +0000. For more information about this format please see\r\n"
            "the Abuse Reporting Format (RFC 5965).\r\n"
            "\r\n"
            "------=_Part_1_99\r\n"
            "Content-Type: message/feedback-report\r\n"
            "\r\n"
            f"Feedback-Type: {feedback_type}\r\n"
            "User-Agent: Yahoo!-Mail-Feedback/2.0\r\n"
            "Version: 1\r\n"
            "Original-Mail-From: <bounces@news.example>\r\n"
            f"{rcpt_line}"
            "Arrival-Date: Mon, 23 Nov 2026 09:14:07 +0000\r\n"
            "Source-IP: 192.0.2.25\r\n"
            "Reported-Domain: news.example\r\n"
            "Authentication-Results: mta7.mail.provider.example; dkim=pass header.d=news.example\r\n"
            "\r\n"
            "------=_Part_1_99\r\n"
            "Content-Type: message/rfc822\r\n"
            "Content-Disposition: inline\r\n"
            "\r\n"
            f"{copy}"
            "\r\n"
            "------=_Part_1_99--\r\n").encode()


def microsoft_report(copy: str) -> bytes:
    """Microsoft-style (JMRP): no Original-Rcpt-To, the copy's To: names the recipient, base64 text part."""
    return ("From: staff@hotmail.example\r\n"
            f"To: {FBL}\r\n"
            "Subject: complaint about message from 192.0.2.25\r\n"
            "Message-ID: <jmrp-2f1c9e@jmrp.outlook.example>\r\n"
            "Date: Mon, 23 Nov 2026 11:30:00 -0800\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type="feedback-report"; boundary="jmrp_boundary_01"\r\n'
            "\r\n"
            "--jmrp_boundary_01\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "\r\n"
            "VGhpcyBpcyBhbiBlbWFpbCBhYnVzZSByZXBvcnQu\r\n"
            "\r\n"
            "--jmrp_boundary_01\r\n"
            "Content-Type: message/feedback-report\r\n"
            "\r\n"
            "Feedback-Type: abuse\r\n"
            "User-Agent: Microsoft Junk Mail Reporting Program\r\n"
            "Version: 1.0\r\n"
            "Source-IP: 192.0.2.25\r\n"
            "Arrival-Date: Mon, 23 Nov 2026 11:14:07 -0800\r\n"
            "\r\n"
            "--jmrp_boundary_01\r\n"
            "Content-Type: message/rfc822\r\n"
            "\r\n"
            f"{copy}"
            "\r\n"
            "--jmrp_boundary_01--\r\n").encode()


def headers_only_report(copy: str) -> bytes:
    """AOL-style: only the reported header as text/rfc822-headers, the recipient redacted everywhere."""
    head = copy.split("\r\n\r\n", 1)[0] + "\r\n"
    return ("From: scomp@aol.example\r\n"
            f"To: {FBL}\r\n"
            "Message-ID: <scomp-881@aol.example>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=feedback-report; boundary=b1\r\n"
            "\r\n"
            "--b1\r\n"
            "Content-Type: text/plain\r\n"
            "\r\n"
            "An AOL member reported this message as spam.\r\n"
            "--b1\r\n"
            "Content-Type: message/feedback-report\r\n"
            "\r\n"
            "Feedback-Type: abuse\r\n"
            "User-Agent: AOL SComp\r\n"
            "Version: 1\r\n"
            "Original-Rcpt-To: redacted@aol.example\r\n"
            "\r\n"
            "--b1\r\n"
            "Content-Type: text/rfc822-headers\r\n"
            "\r\n"
            f"{head}"
            "--b1--\r\n").encode()


# -- parsing -----------------------------------------------------------------------------------------------


def test_yahoo_style_report() -> None:
    report = parse_report(yahoo_report(original()))
    assert (report.feedback_type, report.user_agent, report.version) == ("abuse", "Yahoo!-Mail-Feedback/2.0", "1")
    assert (report.original_mail_from, report.original_rcpt_to) == ("bounces@news.example", ("reader@yahoo.example",))
    assert (report.source_ip, report.reported_domains, report.reporter) == (
        "192.0.2.25", ("news.example",), "arf.mail.yahoo.example")
    assert report.report_id == "fbl.4711@feedback.yahoo.example"
    copy = our_copy(report, HOST)
    assert copy is not None and (copy.queue_id, copy.recipient) == ("Q0RIGINAL01", "reader@yahoo.example")
    assert complained_recipient(report, copy) == ("reader@yahoo.example", "received_for")
    assert original_sender_domain(report) == "news.example"


def test_our_envelope_recipient_wins_over_what_the_provider_names() -> None:
    # Forwarded mail: the provider's user is not the address we sent to; ours is the one to suppress.
    report = parse_report(yahoo_report(original(rcpt_for="alias@forwarder.example"), rcpt_to="final@yahoo.example"))
    assert complained_recipient(report, our_copy(report, HOST)) == ("alias@forwarder.example", "received_for")


def test_microsoft_style_report_without_original_rcpt_to() -> None:
    copy_text = original(rcpt_for=None, to="reader@outlook.example")  # several recipients: no "for" clause
    report = parse_report(microsoft_report(copy_text))
    assert report.user_agent == "Microsoft Junk Mail Reporting Program" and report.original_rcpt_to == ()
    copy = our_copy(report, HOST)
    assert copy is not None and copy.recipient is None
    assert complained_recipient(report, copy) == ("reader@outlook.example", "to_header")
    assert original_sender_domain(report) == "news.example"  # from the copy's Return-Path


def test_headers_only_report_with_the_recipient_redacted() -> None:
    report = parse_report(headers_only_report(original(rcpt_for=None, to="redacted@aol.example")))
    copy = our_copy(report, HOST)
    assert copy is not None and copy.queue_id == "Q0RIGINAL01"
    assert complained_recipient(report, copy) == (None, "unknown")


def test_other_hosts_received_headers_are_not_ours() -> None:
    report = parse_report(yahoo_report(original()))
    assert our_copy(report, "other.relay.example") is None


@pytest.mark.parametrize("data, why", [
    (b"From: a@b.example\r\nSubject: hi\r\n\r\nplease unsubscribe me\r\n", "not multipart/report"),
    (b'Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n', "report-type"),
    (b'Content-Type: multipart/report; report-type=feedback-report; boundary=x\r\n\r\n--x\r\n'
     b'Content-Type: text/plain\r\n\r\nhi\r\n--x--\r\n', "no message/feedback-report"),
    (b"\xff\xfe garbage \x00\r\n\r\n", "not multipart/report"),
])
def test_what_is_not_a_report(data: bytes, why: str) -> None:
    with pytest.raises(NotAReport, match=why):
        parse_report(data)


def test_the_event_id_is_the_same_for_the_same_report() -> None:
    report = parse_report(yahoo_report(original()))
    one = complaint_event(report, "Q0RIGINAL01", "reader@yahoo.example", "received_for", 1.0)
    two = complaint_event(parse_report(yahoo_report(original())), "Q0RIGINAL01", "reader@yahoo.example",
                          "received_for", 2.0)
    other = complaint_event(parse_report(yahoo_report(original(), report_id="<other@x>")), "Q0RIGINAL01",
                            "reader@yahoo.example", "received_for", 1.0)
    assert one.id == two.id != other.id
    assert one.data["sender_domain"] == "news.example" and one.data["domain"] == "yahoo.example"


def test_the_address_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="address"):
        ComplaintsConfig(address="not an address")


# -- end to end over SMTP ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def start(relays: RelayFactory, store_url: str, **complaints: Any) -> RunningRelay:
    """A relay whose port-25 listener trusts nobody (as an MX facing the internet does)."""
    return await relays.start(
        store_url=store_url,
        listeners=[{"name": "mx", "address": "127.0.0.1:0", "kind": "relay", "auth": "optional",
                    "trusted_networks": []},
                   {"name": "apps", "address": "127.0.0.2:0", "kind": "relay", "auth": "optional",
                    "trusted_networks": ["127.0.0.0/8"]}],
        chain={"plugins": ["complaints", "blacklist"]},
        plugins={"complaints": {"address": FBL, **complaints}, "blacklist": {}})


async def client_on(running: RunningRelay, listener: str, host: str) -> RawClient:
    client = await RawClient.connect(running.ports[listener], host=host)
    assert (await client.greeting()).code == 220
    await client.ehlo()
    return client


async def send_from_app(running: RunningRelay, recipient: str) -> str:
    client = await client_on(running, "apps", "127.0.0.2")
    reply = await client.mail("bounces@news.example", [recipient],
                              b"From: News <news@news.example>\r\nTo: " + recipient.encode()
                              + b"\r\nSubject: This week's offers\r\nMessage-ID: <offer-1@news.example>\r\n\r\nHi\r\n")
    await client.close()
    assert reply.code == 250, reply
    return reply.text.rsplit(" ", 1)[1]


async def report(running: RunningRelay, data: bytes, sender: str = "feedback@arf.mail.yahoo.example") -> Any:
    client = await client_on(running, "mx", "127.0.0.1")
    reply = await client.mail(sender, [FBL], data)
    await client.close()
    return reply


async def test_a_report_becomes_a_complaint_and_a_suppression(relays: RelayFactory, store_url: str) -> None:
    running = await start(relays, store_url)
    store = running.store
    queue_id = await send_from_app(running, "reader@yahoo.example")
    sent = (await store.message_data(queue_id)).decode()   # what went out, our Received: header included
    before = await store.count_by_state()

    reply = await report(running, yahoo_report(sent))

    assert (reply.code, reply.text) == (250, "2.0.0 Ok: feedback report received")
    assert await store.count_by_state() == before          # the report itself is not queued
    [complaint] = await store.list_events(type="complained")
    assert (complaint.message_id, complaint.recipient) == (queue_id, "reader@yahoo.example")
    assert (complaint.data["feedback_type"], complaint.data["reporter"], complaint.data["sender_domain"],
            complaint.data["recipient_source"]) == ("abuse", "arf.mail.yahoo.example", "news.example",
                                                    "received_for")
    entry = await store.find_suppression("reader@yahoo.example")
    assert entry is not None and (entry.reason, entry.source, entry.expires_at) == ("complaint", "fbl", None)
    [suppressed] = await store.list_events(type="suppressed")
    assert suppressed.data["reason"] == "complaint" and suppressed.message_id == queue_id

    # The complainer gets no more mail; the same report sent again counts once.
    client = await client_on(running, "apps", "127.0.0.2")
    await client.cmd("MAIL FROM:<bounces@news.example>")
    assert (await client.cmd("RCPT TO:<reader@yahoo.example>")).code == 550
    await client.close()
    assert (await report(running, yahoo_report(sent))).code == 250
    assert len(await store.list_events(type="complained")) == 1


async def test_the_fbl_address_takes_mail_from_anyone_but_relays_nothing(relays: RelayFactory,
                                                                         store_url: str) -> None:
    running = await start(relays, store_url)
    client = await client_on(running, "mx", "127.0.0.1")
    assert (await client.cmd("MAIL FROM:<feedback@arf.mail.yahoo.example>")).code == 250
    assert (await client.cmd("RCPT TO:<someone@elsewhere.example>")).code == 550   # still no open relay
    assert (await client.cmd("RCPT TO:<FBL@Relay.Test>")).code == 250
    await client.cmd("RSET")
    # Mixed with another recipient (from a client that may relay): the FBL address is refused for now.
    apps = await client_on(running, "apps", "127.0.0.2")
    await apps.cmd("MAIL FROM:<x@news.example>")
    assert (await apps.cmd("RCPT TO:<someone@elsewhere.example>")).code == 250
    mixed = await apps.cmd(f"RCPT TO:<{FBL}>")
    assert (mixed.code, mixed.text.split()[0]) == (452, "4.5.3")
    await apps.close()
    await client.close()
    refused = await report(running, b"From: someone@x.example\r\nSubject: hello\r\n\r\nnot a report\r\n")
    assert (refused.code, refused.text.split()[0]) == (550, "5.6.0")
    assert sum((await running.store.count_by_state()).values()) == 0
    assert await running.store.list_events(type="complained") == []


async def test_microsoft_style_report_of_a_message_to_several_recipients(relays: RelayFactory,
                                                                         store_url: str) -> None:
    running = await start(relays, store_url)
    client = await client_on(running, "apps", "127.0.0.2")
    reply = await client.mail("bounces@news.example", ["reader@outlook.example", "other@outlook.example"],
                              b"From: news@news.example\r\nTo: reader@outlook.example\r\nSubject: x\r\n\r\nHi\r\n")
    await client.close()
    queue_id = reply.text.rsplit(" ", 1)[1]
    sent = (await running.store.message_data(queue_id)).decode()
    assert "\r\n\tfor <" not in sent.split("\r\n\r\n")[0]   # two recipients: our header names none

    assert (await report(running, microsoft_report(sent), sender="staff@hotmail.example")).code == 250

    [complaint] = await running.store.list_events(type="complained")
    assert (complaint.message_id, complaint.recipient, complaint.data["recipient_source"]) == (
        queue_id, "reader@outlook.example", "to_header")
    assert await running.store.find_suppression("reader@outlook.example") is not None
    assert await running.store.find_suppression("other@outlook.example") is None
    states = {r.address: r.state for r in await running.store.recipients_of(queue_id)}
    assert set(states.values()) == {RecipientState.QUEUED}


async def test_reports_that_are_not_complaints_about_our_mail_record_nothing(relays: RelayFactory,
                                                                             store_url: str) -> None:
    running = await start(relays, store_url, scope="sender_domain")
    foreign = original().replace(f"by {HOST} (relay)", "by mx.someone-else.example (relay)")
    assert (await report(running, yahoo_report(foreign))).code == 250
    assert (await report(running, yahoo_report(original(), feedback_type="not-spam"))).code == 250
    redacted = headers_only_report(original(rcpt_for=None, to="redacted@aol.example"))
    assert (await report(running, redacted, sender="scomp@aol.example")).code == 250

    # Only the redacted one is a complaint about our mail: recorded, but nobody to suppress.
    [complaint] = await running.store.list_events(type="complained")
    assert complaint.recipient is None and complaint.message_id == "Q0RIGINAL01"
    assert await running.store.count_suppressions() == 0
    assert sum((await running.store.count_by_state()).values()) == 0

    # A scoped complaint suppresses the complainer for the reported sender domain only.
    assert (await report(running, yahoo_report(original(queue_id="Q0RIGINAL02"), report_id="<r2@y>"))).code == 250
    entry = await running.store.find_suppression("reader@yahoo.example", scope="news.example")
    assert entry is not None and entry.scope == "news.example"
    assert await running.store.find_suppression("reader@yahoo.example") is None
    assert time.time() >= entry.created_at


def test_the_example_documents_every_key_with_its_default() -> None:
    import re
    import tomllib
    text = (Path(__file__).parent.parent / "relay.toml.example").read_text()
    block = text[text.index("# [plugins.complaints]"):]
    block = block[:block.index("\n\n")]
    code = [line[2:] for line in block.splitlines() if re.match(r"# (\[plugins\.complaints\]|[a-z_]+ = )", line)]
    table = tomllib.loads("\n".join(code))["plugins"]["complaints"]
    assert set(table) == set(ComplaintsConfig.model_fields)
    assert ComplaintsConfig.model_validate(table) == ComplaintsConfig(address=table["address"])

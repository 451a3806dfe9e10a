"""Bounce classification: reply parsing, the shipped rules over real-world replies, overrides, validation."""

from __future__ import annotations

from typing import get_args

import pytest
from relay.policies.bounce import (
    BounceClassifier,
    Classification,
    FailureKind,
    Reply,
    outcome_of,
    reported_status,
    shipped_rules,
)

CLASSIFIER = BounceClassifier.default()


# ------------------------------------------------------------------------------------------------
# Reply.parse
# ------------------------------------------------------------------------------------------------

def test_parse_multiline_reply_with_enhanced_code_on_every_line() -> None:
    reply = Reply.parse("550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                        "550 5.1.1 Please try double-checking the recipient's address.")
    assert reply.code == 550
    assert reply.enhanced == "5.1.1"
    assert reply.text == ("The email account that you tried to reach does not exist. "
                          "Please try double-checking the recipient's address.")


def test_parse_list_of_lines_and_bytes() -> None:
    assert Reply.parse(["452-4.2.2 over", "452 4.2.2 quota"]) == Reply(452, "4.2.2", "over quota")
    assert Reply.parse(b"250 2.0.0 OK queued as 12345") == Reply(250, "2.0.0", "OK queued as 12345")


def test_parse_reply_without_enhanced_code_or_text() -> None:
    assert Reply.parse("554 Transaction failed") == Reply(554, None, "Transaction failed")
    assert Reply.parse("421") == Reply(421, None, "")


def test_parse_normalises_leading_zeros_and_hash_prefix() -> None:
    assert Reply.parse("550 5.01.001 nope").enhanced == "5.1.1"
    assert Reply.parse("550 #5.1.0 Address rejected").enhanced == "5.1.0"


def test_parse_does_not_take_a_version_number_for_an_enhanced_code() -> None:
    reply = Reply.parse("550 5.1.1.2 weird")
    assert reply.enhanced is None
    assert reply.text == "5.1.1.2 weird"


@pytest.mark.parametrize("raw", [
    "", "   ", "garbage", "HTTP/1.1 400 Bad Request", "99 too short", "6xx nope", "999 what",
    "\x00\x01\x02", "abc-def", "５５０ full-width digits", "5５0 mixed digits",
])
def test_garbage_parses_to_code_zero_and_classifies_as_temporary_protocol_failure(raw: str) -> None:
    reply = Reply.parse(raw)
    assert reply.code == 0
    assert reply.enhanced is None
    assert "\x00" not in reply.text
    result = CLASSIFIER.classify(reply)
    assert result == Classification("temporary", "other", "4.5.0")


def test_parse_strips_control_characters_and_bounds_length() -> None:
    reply = Reply.parse(["550 5.7.1 bad\x00thing\x1b[31m", "550 " + "x" * 10_000])
    assert "\x00" not in reply.text and "\x1b" not in reply.text
    assert len(reply.text) <= 4096


def test_str_renders_one_line() -> None:
    assert str(Reply.parse("550-5.1.1 a\r\n550 5.1.1 b")) == "550 5.1.1 a b"
    assert str(Reply(0, None, "junk")) == "000 junk"


def test_intermediate_codes_are_not_final_replies() -> None:
    assert CLASSIFIER.classify(Reply.parse("354 End data with <CR><LF>.<CR><LF>")) == \
        Classification("temporary", "other", "4.5.0")


# ------------------------------------------------------------------------------------------------
# Outcome and status
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "outcome", "status"), [
    ("250 2.0.0 OK", "delivered", "2.0.0"),
    ("250 OK id=1qA2", "delivered", "2.0.0"),
    ("251 2.1.5 User not local; will forward", "delivered", "2.1.5"),
    ("450 4.2.0 busy", "temporary", "4.2.0"),
    ("550 5.0.0 no", "permanent", "5.0.0"),
    ("451 Temporary local problem", "temporary", "4.0.0"),
    ("554 Transaction failed", "permanent", "5.0.0"),
    # Code and enhanced code disagree between 4 and 5: the enhanced code wins.
    ("550 4.2.2 mailbox full, try later", "temporary", "4.2.2"),
    ("450 5.1.1 user unknown", "permanent", "5.1.1"),
    ("421 5.7.1 go away", "permanent", "5.7.1"),
    # A 2xx is delivered whatever its enhanced code says; a 2.x.x on a failure code does not count.
    ("250 5.0.0 accepted anyway", "delivered", "2.0.0"),
    ("550 2.1.5 contradictory", "permanent", "5.1.5"),
])
def test_outcome_follows_code_and_enhanced_class(raw: str, outcome: str, status: str) -> None:
    result = CLASSIFIER.classify(Reply.parse(raw))
    assert (result.outcome, result.enhanced) == (outcome, status)


def test_delivered_category() -> None:
    assert CLASSIFIER.classify(Reply.parse("250 2.0.0 OK")).category == "delivered"


def test_outcome_of_and_reported_status_helpers() -> None:
    assert outcome_of(Reply(0, None, "")) is None
    assert outcome_of(Reply(354, None, "")) is None
    assert reported_status(None, "permanent") == "5.0.0"
    assert reported_status("4.7.1", "permanent") == "5.7.1"


# ------------------------------------------------------------------------------------------------
# The shipped rules over replies as the big providers send them
# ------------------------------------------------------------------------------------------------

REAL_WORLD = [
    # --- Gmail
    ("550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
     "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
     "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser x1si",
     "permanent", "invalid_recipient", "5.1.1"),
    ("552-5.2.2 The email account that you tried to reach is over quota.\r\n552 5.2.2 Please direct",
     "permanent", "mailbox_full", "5.2.2"),
    ("452-4.2.2 The email account that you tried to reach is over quota.",
     "temporary", "mailbox_full", "4.2.2"),
    ("550-5.2.1 The email account that you tried to reach is disabled. x1si",
     "permanent", "inactive_mailbox", "5.2.1"),
    ("450-4.2.1 The user you are trying to contact is receiving mail at a rate that\r\n"
     "450 4.2.1 prevents additional messages from being delivered.",
     "temporary", "rate_limited", "4.2.1"),
    ("421-4.7.0 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail\r\n"
     "421 4.7.0 originating from your IP address.",
     "temporary", "rate_limited", "4.7.0"),
    ("550-5.7.1 [192.0.2.1] Our system has detected that this message is likely\r\n"
     "550-5.7.1 unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
     "550 5.7.1 this message has been blocked.",
     "permanent", "spam_content", "5.7.1"),
    ("550-5.7.1 This message does not have authentication information or fails to\r\n"
     "550 5.7.1 pass authentication checks (SPF or DKIM).",
     "permanent", "policy", "5.7.1"),
    ("550-5.7.26 This mail has been blocked because the sender is unauthenticated.",
     "permanent", "policy", "5.7.26"),
    ("550-5.7.25 [192.0.2.1] The IP address sending this message does not have a PTR record setup",
     "permanent", "policy", "5.7.25"),
    ("550-5.7.1 [192.0.2.1] The IP you're using to send mail is not authorized to\r\n"
     "550 5.7.1 send email directly to our servers.",
     "permanent", "policy", "5.7.1"),
    ("552-5.3.4 Your message exceeded Google's message size limits.",
     "permanent", "message_too_large", "5.3.4"),
    ("452 4.5.3 Your message has too many recipients.", "temporary", "too_many_recipients", "4.5.3"),
    ("421-4.7.0 TLS required for RCPT domain, closing connection.", "temporary", "tls_failure", "4.7.0"),
    ("530-5.7.0 Must issue a STARTTLS command first.", "permanent", "tls_failure", "5.7.0"),
    ("530-5.7.0 Authentication Required. Learn more at", "permanent", "auth_required", "5.7.0"),
    ("535-5.7.8 Username and Password not accepted.", "permanent", "auth_required", "5.7.8"),
    ("550-5.4.5 Daily user sending limit exceeded.", "permanent", "rate_limited", "5.4.5"),
    ("552-5.7.0 This message was blocked because its content presents a potential\r\n"
     "552 5.7.0 security issue.",
     "permanent", "spam_content", "5.7.0"),
    # --- Microsoft (Outlook.com / Exchange Online)
    ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302).",
     "permanent", "invalid_recipient", "5.5.0"),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     "permanent", "invalid_recipient", "5.1.10"),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
     "permanent", "invalid_recipient", "5.4.1"),
    ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet "
     "service provider since part of their network is on our block list (S3150).",
     "permanent", "spam_block", "5.7.1"),
    ("550 5.7.606 Access denied, banned sending IP [192.0.2.1].", "permanent", "spam_block", "5.7.606"),
    ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)",
     "temporary", "rate_limited", "4.7.500"),
    ("451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
     "temporary", "rate_limited", "4.7.650"),
    ("421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing "
     "transmission channel", "temporary", "rate_limited", "4.3.2"),
    ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException",
     "permanent", "mailbox_full", "5.2.2"),
    ("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", "permanent", "invalid_recipient", "5.1.1"),
    ("530 5.7.57 Client not authenticated to send mail.", "permanent", "auth_required", "5.7.57"),
    ("550 5.4.310 DNS domain example.invalid does not exist", "permanent", "bad_domain", "5.4.310"),
    # --- Yahoo / AOL
    ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
     "complaints", "temporary", "rate_limited", "4.7.0"),
    ("553 5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT "
     "succeed.", "permanent", "spam_block", "5.7.2"),
    ("554 5.7.9 Message not accepted for policy reasons. See https://postmaster.yahooinc.com/",
     "permanent", "policy", "5.7.9"),
    ("552 1 Requested mail action aborted, mailbox not found", "permanent", "invalid_recipient", "5.0.0"),
    ("554 delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.com) [0]",
     "permanent", "invalid_recipient", "5.0.0"),
    ("553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in "
     "Spamhaus's list", "permanent", "spam_block", "5.7.1"),
    # --- Apple iCloud
    ("550 5.1.1 <bob@icloud.com>: user does not exist", "permanent", "invalid_recipient", "5.1.1"),
    ("554 5.7.1 [CS01] Message rejected due to local policy.", "permanent", "policy", "5.7.1"),
    ("550 5.7.0 Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip=192.0.2.1",
     "permanent", "spam_block", "5.7.0"),
    # --- Yandex / Mail.ru / GMX / Comcast
    ("550 5.7.1 No such user!", "permanent", "invalid_recipient", "5.7.1"),
    ("451 4.7.1 Sorry, the service is currently unavailable. Please come back later.",
     "temporary", "rate_limited", "4.7.1"),
    ("550 Message was not accepted -- invalid mailbox. Local mailbox bob@mail.ru is unavailable: user "
     "not found", "permanent", "invalid_recipient", "5.0.0"),
    ("554-Transaction failed\r\n554-Reject due to policy restrictions.", "permanent", "policy", "5.0.0"),
    ("554 resimta-x.comcast.net comcast 192.0.2.1 Comcast block for spam. Please see "
     "http://postmaster.comcast.net/smtp-error-codes.php#BL000000", "permanent", "spam_block", "5.0.0"),
    # --- Postfix / Exim / Sendmail style servers
    ("550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
     "permanent", "invalid_recipient", "5.1.1"),
    ("450 4.1.1 <bob@example.com>: Recipient address rejected: unverified address: host mx said: 550",
     "temporary", "invalid_recipient", "4.1.1"),
    ("450 4.1.2 <bob@nowhere.example>: Recipient address rejected: Domain not found",
     "temporary", "bad_domain", "4.1.2"),
    ("550 5.1.10 <bob@nullmx.example>: Recipient address rejected: Domain nullmx.example does not "
     "accept mail (nullMX)", "permanent", "bad_domain", "5.1.10"),
    ("452 4.2.2 <bob@example.com>: Recipient address rejected: Mailbox full",
     "temporary", "mailbox_full", "4.2.2"),
    ("552 Recipient address rejected: Mailbox full", "permanent", "mailbox_full", "5.0.0"),
    ("554 5.7.1 <bob@example.com>: Relay access denied", "permanent", "policy", "5.7.1"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "permanent", "spam_block", "5.7.1"),
    ("450 4.7.1 Client host rejected: cannot find your hostname, [192.0.2.1]",
     "temporary", "policy", "4.7.1"),
    ("450 4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, see http://postgrey/",
     "temporary", "greylisted", "4.2.0"),
    ("452 4.3.1 Insufficient system storage", "temporary", "mailbox_full", "4.3.1"),
    ("552 5.3.4 Message size exceeds fixed limit", "permanent", "message_too_large", "5.3.4"),
    ("550 Unrouteable address", "permanent", "bad_domain", "5.0.0"),
    ("550 Administrative prohibition", "permanent", "policy", "5.0.0"),
    ("451 Temporary local problem - please try later", "temporary", "rate_limited", "4.0.0"),
    ("550 5.7.1 Message rejected as spam by Content Filtering.", "permanent", "spam_content", "5.7.1"),
    ("554 5.7.1 Virus found in attachment", "permanent", "spam_content", "5.7.1"),
    ("550 Recipient not listed in public Name & Address Book", "permanent", "invalid_recipient", "5.0.0"),
    ("552 5.2.3 Message length exceeds administrative limit", "permanent", "message_too_large", "5.2.3"),
    ("452 Too many recipients received this hour", "temporary", "too_many_recipients", "4.0.0"),
    ("550 5.2.1 Mailbox disabled, not accepting messages", "permanent", "inactive_mailbox", "5.2.1"),
    ("550 account is inactive", "permanent", "inactive_mailbox", "5.0.0"),
    ("550 5.1.6 Recipient no longer on server", "permanent", "inactive_mailbox", "5.1.6"),
    ("421 4.4.2 mx.example.com Error: timeout exceeded", "temporary", "connection_failure", "4.4.2"),
    ("451 4.4.0 connection timed out talking to next hop", "temporary", "connection_failure", "4.4.0"),
    ("554 5.4.7 Delivery expired (message too old)", "permanent", "message_expired", "5.4.7"),
    ("451 4.4.3 Temporary lookup failure", "temporary", "dns_failure", "4.4.3"),
    ("550 5.7.27 Sender address has null MX", "permanent", "policy", "5.7.27"),
    ("550 5.6.0 Message exceeded 50 hops, this may indicate a mail loop", "permanent", "other", "5.6.0"),
    ("421 Service not available, closing transmission channel", "temporary", "rate_limited", "4.0.0"),
    ("553 sorry, that domain isn't in my list of allowed rcpthosts", "permanent", "invalid_recipient",
     "5.0.0"),
    ("554 Transaction failed", "permanent", "other", "5.0.0"),
    ("451 Requested action aborted: local error in processing", "temporary", "other", "4.0.0"),
]


@pytest.mark.parametrize(("raw", "outcome", "category", "status"), REAL_WORLD)
def test_real_world_replies(raw: str, outcome: str, category: str, status: str) -> None:
    result = CLASSIFIER.classify(Reply.parse(raw))
    assert (result.outcome, result.category, result.enhanced) == (outcome, category, status), result.rule


def test_starting_text_rules_without_codes() -> None:
    cases = {
        "user unknown": "invalid_recipient",
        "mailbox not found": "invalid_recipient",
        "no such user here": "invalid_recipient",
        "invalid recipient": "invalid_recipient",
        "address rejected": "invalid_recipient",
        "recipient unknown": "invalid_recipient",
        "that address does not exist": "invalid_recipient",
        "mailbox full": "mailbox_full",
        "user is over quota": "mailbox_full",
        "quota exceeded": "mailbox_full",
        "insufficient storage": "mailbox_full",
        "please try again later": "rate_limited",
        "temporarily unavailable": "rate_limited",
        "rate limit reached": "rate_limited",
        "too many connections from your IP": "rate_limited",
        "you are being throttled": "rate_limited",
        "connection timeout": "connection_failure",
        "listed by an RBL": "spam_block",
        "blocked": "spam_block",
        "IP is listed at bl.example": "spam_block",
        "looks like spam": "spam_content",
        "content rejected": "spam_content",
        "message too large": "message_too_large",
        "exceeds size limit": "message_too_large",
    }
    for text, category in cases.items():
        assert CLASSIFIER.classify(Reply(550, None, text)).category == category, text


@pytest.mark.parametrize(("enhanced", "category"), [
    ("5.1.1", "invalid_recipient"), ("5.1.2", "bad_domain"), ("5.1.10", "bad_domain"),
    ("5.2.1", "inactive_mailbox"), ("5.2.2", "mailbox_full"), ("5.3.4", "message_too_large"),
    ("5.2.3", "message_too_large"), ("4.4.1", "connection_failure"), ("4.4.7", "message_expired"),
    ("5.5.3", "too_many_recipients"), ("5.7.1", "policy"), ("5.7.8", "auth_required"),
    ("5.7.13", "inactive_mailbox"), ("4.4.5", "rate_limited"), ("5.7.23", "policy"),
    ("5.1.7", "policy"), ("5.1.0", "invalid_recipient"), ("5.0.0", "other"),
])
def test_enhanced_code_rules_without_telling_text(enhanced: str, category: str) -> None:
    code = 450 if enhanced.startswith("4") else 550
    assert CLASSIFIER.classify(Reply(code, enhanced, "see your administrator")).category == category


def test_enhanced_prefix_matches_by_sub_field() -> None:
    # x.1.1 must not match 5.1.10 (null MX), nor 5.1.1 match x.1.10.
    assert CLASSIFIER.classify(Reply(550, "5.1.10", "nope")).category == "bad_domain"
    assert CLASSIFIER.classify(Reply(550, "5.1.1", "nope")).category == "invalid_recipient"


def test_rate_signal() -> None:
    assert CLASSIFIER.classify(Reply.parse("421 4.7.0 bye")).rate_signal is True
    assert CLASSIFIER.classify(Reply.parse("421 4.7.0 TLS required for RCPT domain")).rate_signal is True
    assert CLASSIFIER.classify(Reply.parse("451 4.7.1 rate limited")).rate_signal is True
    assert CLASSIFIER.classify(Reply.parse("550 5.1.1 user unknown")).rate_signal is False
    # Greylisting is temporary but says nothing about our pace.
    assert CLASSIFIER.classify(Reply.parse("421 4.7.0 greylisted, try again")).rate_signal is False
    assert CLASSIFIER.classify(Reply.parse("250 ok")).rate_signal is False


def test_classification_names_the_rule_but_equality_ignores_it() -> None:
    result = CLASSIFIER.classify(Reply.parse("550 5.1.1 user unknown"))
    assert result.rule == "rfc3463_bad_mailbox"
    assert result == Classification("permanent", "invalid_recipient", "5.1.1")
    assert result.is_permanent and not result.is_temporary


# ------------------------------------------------------------------------------------------------
# Failures without a reply
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "permanent", "expected"), [
    ("dns", False, Classification("temporary", "dns_failure", "4.4.3")),
    ("dns", True, Classification("permanent", "bad_domain", "5.1.2")),
    ("connect", False, Classification("temporary", "connection_failure", "4.4.1")),
    ("connect", True, Classification("permanent", "connection_failure", "5.4.4")),
    ("tls", False, Classification("temporary", "tls_failure", "4.7.5")),
    ("timeout", False, Classification("temporary", "connection_failure", "4.4.2")),
    ("protocol", False, Classification("temporary", "other", "4.5.0")),
    ("protocol", True, Classification("permanent", "other", "5.5.0")),
])
def test_classify_failure(kind: FailureKind, permanent: bool, expected: Classification) -> None:
    assert CLASSIFIER.classify_failure(kind, "detail for the log", permanent=permanent) == expected


def test_classify_failure_covers_every_kind() -> None:
    for kind in get_args(FailureKind):
        assert CLASSIFIER.classify_failure(kind, "x").outcome == "temporary"


def test_classify_failure_uses_a_given_enhanced_code_with_the_right_class() -> None:
    result = CLASSIFIER.classify_failure("dns", "null MX", permanent=True, enhanced="5.1.10")
    assert result == Classification("permanent", "bad_domain", "5.1.10")
    # Class follows `permanent`, not the code passed in.
    assert CLASSIFIER.classify_failure("dns", "SERVFAIL", enhanced="5.4.3").enhanced == "4.4.3"
    assert CLASSIFIER.classify_failure("dns", "x", enhanced="junk").enhanced == "4.4.3"
    assert CLASSIFIER.classify_failure("dns", "x", True, enhanced="5.01.10 null MX").enhanced == "5.1.10"


# ------------------------------------------------------------------------------------------------
# Admin rules
# ------------------------------------------------------------------------------------------------

def test_extra_rules_come_first_and_can_override_outcome() -> None:
    classifier = BounceClassifier.with_rules([
        {"name": "full_is_final", "category": "mailbox_full", "enhanced": "x.2.2", "outcome": "permanent"},
        {"category": "custom_block", "code": ["5xx"], "text": r"acme\s+filter"},
        {"category": "not_spam_really", "text": "spamhaus", "rate_signal": True},
    ])
    full = classifier.classify(Reply.parse("452 4.2.2 over quota"))
    assert full == Classification("permanent", "mailbox_full", "5.2.2")
    assert full.rule == "full_is_final"
    assert classifier.classify(Reply.parse("554 5.7.1 Blocked by ACME  filter")).category == "custom_block"
    # A code pattern that does not match leaves the shipped rules in charge.
    assert classifier.classify(Reply.parse("451 acme filter busy, try later")).category == "rate_limited"
    overridden = classifier.classify(Reply.parse("554 5.7.1 listed at Spamhaus"))
    assert (overridden.category, overridden.rate_signal) == ("not_spam_really", True)
    # The default classifier is untouched by another one's extra rules.
    assert CLASSIFIER.classify(Reply.parse("554 5.7.1 listed at Spamhaus")).category == "spam_block"


def test_override_to_temporary_rewrites_the_reported_class() -> None:
    classifier = BounceClassifier.with_rules([{"category": "policy", "code": 554, "outcome": "temporary"}])
    assert classifier.classify(Reply.parse("554 5.7.1 no")) == Classification("temporary", "policy", "4.7.1")


def test_rules_never_apply_to_deliveries() -> None:
    classifier = BounceClassifier.with_rules([{"category": "weird", "text": "ok", "outcome": "permanent"}])
    assert classifier.classify(Reply.parse("250 2.0.0 ok")).outcome == "delivered"


def test_code_list_and_ints() -> None:
    classifier = BounceClassifier.with_rules([{"category": "c", "code": [521, "55x"]}])
    assert classifier.classify(Reply.parse("521 nope")).category == "c"
    assert classifier.classify(Reply.parse("556 nope")).category == "c"
    assert classifier.classify(Reply.parse("541 nope")).category != "c"


@pytest.mark.parametrize(("rule", "message"), [
    ({"category": "x"}, "needs at least one of"),
    ({"text": "foo"}, "'category' is required"),
    ({"category": "Bad Name", "text": "foo"}, "'category' is required"),
    ({"category": "x", "text": "(unclosed"}, "not a valid regular expression"),
    ({"category": "x", "text": ""}, "'text' must be"),
    ({"category": "x", "text": ["a", 3]}, "'text' must be"),
    ({"category": "x", "code": 650}, "'code' entries"),
    ({"category": "x", "code": "5x"}, "'code' entries"),
    ({"category": "x", "code": True}, "'code' entries"),
    ({"category": "x", "code": []}, "'code' must not be an empty list"),
    ({"category": "x", "enhanced": "6.1.1"}, "'enhanced' entries"),
    ({"category": "x", "enhanced": "5.1.1.1"}, "'enhanced' entries"),
    ({"category": "x", "text": "a", "outcome": "delivered"}, "'outcome' must be"),
    ({"category": "x", "text": "a", "rate_signal": "yes"}, "'rate_signal' must be"),
    ({"category": "x", "txt": "a"}, "unknown key(s) 'txt'"),
    ("not a table", "a rule must be a table"),
])
def test_rule_validation_names_the_bad_rule(rule: object, message: str) -> None:
    good = {"category": "fine", "text": "fine"}
    with pytest.raises(ValueError, match=r"delivery\.bounce_rules\[1\]") as info:
        BounceClassifier.with_rules([good, rule], source="delivery.bounce_rules")  # type: ignore[list-item]  # a wrong type on purpose
    assert message in str(info.value)


def test_rule_label_uses_name_then_category() -> None:
    with pytest.raises(ValueError, match=r"bounce_rules\[0\] \('mine'\)"):
        BounceClassifier.with_rules([{"name": "mine", "category": "x"}])
    with pytest.raises(ValueError, match=r"bounce_rules\[0\] \('cat'\)"):
        BounceClassifier.with_rules([{"category": "cat", "code": "9"}])


def test_extra_rules_must_be_a_list() -> None:
    with pytest.raises(ValueError, match="must be a list"):
        BounceClassifier.with_rules({"category": "x"})  # type: ignore[arg-type]  # a wrong type on purpose


def test_shipped_rules_cover_the_required_categories() -> None:
    categories = {rule.category for rule in shipped_rules()}
    required = {"invalid_recipient", "bad_domain", "mailbox_full", "inactive_mailbox", "rate_limited",
                "spam_block", "spam_content", "policy", "auth_required", "dns_failure", "tls_failure",
                "connection_failure", "message_too_large", "message_expired", "too_many_recipients"}
    assert required <= categories
    names = [rule.name for rule in shipped_rules()]
    assert len(names) == len(set(names)), "rule names must be unique to be useful in logs"


@pytest.mark.parametrize(("enhanced", "category"), [("5.1.2", "bad_domain"), ("5.1.10", "bad_domain"),
                                                    ("5.4.4", "dns_failure")])
def test_permanent_dns_failures_of_the_domain_are_bad_domain(enhanced: str, category: str) -> None:
    result = BounceClassifier.default().classify_failure("dns", "x", permanent=True, enhanced=enhanced)
    assert (result.outcome, result.category, result.enhanced) == ("permanent", category, enhanced)
    temporary = BounceClassifier.default().classify_failure("dns", "x", enhanced="4.4.3")
    assert temporary.category == "dns_failure"

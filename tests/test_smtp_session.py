"""The inbound spine over real SMTP sessions on loopback: protocol, relay control, limits, durability."""

from __future__ import annotations

import asyncio
import base64
import email
import smtplib
import ssl

import bcrypt
import pytest

from relay.smtp import auth
from relay.store.base import RecipientState, StoreOutcomeUnknown
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

BODY = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\n\r\nHello.\r\n"


async def connect(running: RunningRelay, listener: str = "relay", **kw: object) -> RawClient:
    host = "127.0.0.2" if listener == "submission" else "127.0.0.1"
    client = await RawClient.connect(running.ports[listener], host, **kw)  # type: ignore[arg-type]
    greeting = await client.greeting()
    assert greeting.code == 220
    return client


async def total_recipients(running: RunningRelay) -> int:
    return sum((await running.store.count_by_state()).values())


async def queued_id(reply_text: str) -> str:
    assert "queued as " in reply_text, reply_text
    return reply_text.rsplit(" ", 1)[1]


# -- greeting and EHLO -----------------------------------------------------------------------------
async def test_ehlo_advertises_extensions(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    reply = await client.ehlo()
    assert reply.code == 250
    for ext in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS", "SMTPUTF8", "DSN"):
        assert ext in reply.lines
    assert f"SIZE {running.settings.smtp.max_message_size}" in reply.lines
    # AUTH is not offered in clear text.
    assert not any(line.startswith("AUTH") for line in reply.lines)
    assert (await client.starttls(relays.client_tls())).code == 220
    reply = await client.ehlo()
    assert "AUTH PLAIN LOGIN" in reply.lines
    assert "STARTTLS" not in reply.lines
    await client.close()


async def test_smtputf8_not_advertised_when_disabled(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"smtputf8": False})
    client = await connect(running)
    assert "SMTPUTF8" not in (await client.ehlo()).lines
    await client.close()


# -- acceptance and durability --------------------------------------------------------------------
async def test_trusted_client_relays_and_message_is_stored(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    reply = await client.mail("a@example.com", ["b@example.org", "C@Example.NET"], BODY)
    assert reply.code == 250 and reply.enhanced == "2.0.0"
    queue_id = await queued_id(reply.text)
    message = await running.store.get_message(queue_id)
    assert message is not None and message.sender == "a@example.com" and message.client_ip == "127.0.0.1"
    rows = await running.store.recipients_of(queue_id)
    assert sorted(r.address for r in rows) == ["C@Example.NET", "b@example.org"]
    assert {r.domain for r in rows} == {"example.net", "example.org"}
    assert all(r.state is RecipientState.QUEUED for r in rows)
    stored = await running.store.message_data(queue_id)
    parsed = email.message_from_bytes(stored)
    assert parsed["Subject"] == "test"
    received = parsed.get_all("Received")
    assert received and f"id {queue_id}" in received[0] and "relay.test" in received[0]
    assert stored.endswith(BODY)
    await client.close()


async def test_restart_keeps_the_queue(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    queue_id = await queued_id((await client.mail("a@example.com", ["b@example.org"], BODY)).text)
    await client.close()
    await relays.stop_all()
    again = await relays.start()
    assert await again.store.get_message(queue_id) is not None
    assert [r.address for r in await again.store.recipients_of(queue_id)] == ["b@example.org"]


async def test_queue_write_failure_answers_451_and_stores_nothing(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    await running.store.close()          # the store is gone: every commit fails
    reply = await client.mail("a@example.com", ["b@example.org"], BODY)
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    await client.close()


async def test_a_commit_of_unknown_outcome_answers_451_saying_so(relays: RelayFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The Postgres store raises StoreOutcomeUnknown when the connection dies during COMMIT (exercised for
    # real by tests/reliability/test_faults.py's Postgres restart): never 250, and the reply says why.
    running = await relays.start()

    async def lost_during_commit(message: object) -> None:
        raise StoreOutcomeUnknown("connection lost during COMMIT (test)")

    monkeypatch.setattr(running.store, "enqueue", lost_during_commit)
    client = await connect(running)
    await client.ehlo()
    reply = await client.mail("a@example.com", ["b@example.org"], BODY)
    assert (reply.code, reply.text) == (451, "4.3.0 Queue write interrupted, outcome unknown; try again later")
    assert (await client.cmd("NOOP")).code == 250          # the session goes on
    await client.close()


async def test_dsn_parameters_accepted_and_kept(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    assert (await client.cmd("MAIL FROM:<a@example.com> RET=HDRS ENVID=abc+2B1 SIZE=100 BODY=8BITMIME")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+40example.org")).code == 250
    assert (await client.cmd("DATA")).code == 354
    queue_id = await queued_id((await client.cmd(BODY + b".")).text)
    message = await running.store.get_message(queue_id)
    assert message is not None and message.ret == "HDRS" and message.envid == "abc+2B1"
    [row] = await running.store.recipients_of(queue_id)
    assert row.notify == "DELAY,FAILURE" and row.orcpt == "rfc822;b@example.org"
    assert (await client.cmd("MAIL FROM:<a@example.com> FOO=BAR")).code == 555
    await client.close()


async def test_smtplib_client_pipelined_session(relays: RelayFactory) -> None:
    running = await relays.start()

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", running.ports["relay"], timeout=10) as smtp:
            return smtp.sendmail("a@example.com", ["x@example.org", "y@example.org"], BODY)

    assert await asyncio.to_thread(send) == {}
    assert (await running.store.count_by_state()).get("queued") == 2


async def test_pipelined_commands_after_data_are_answered(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert [(await client.reply()).code for _ in range(3)] == [250, 250, 354]
    await client.send(BODY + b".\r\nMAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\nNOOP\r\n")
    assert [(await client.reply()).code for _ in range(4)] == [250, 250, 250, 250]
    await client.close()


# -- no open relay ---------------------------------------------------------------------------------
async def test_untrusted_client_cannot_relay(relays: RelayFactory) -> None:
    listeners = [{"name": "relay", "address": "127.0.0.1:0", "trusted_networks": ["127.0.0.1/32"]}]
    running = await relays.start(listeners=listeners)
    client = await RawClient.connect(running.ports["relay"], local_addr=("127.0.0.9", 0))
    await client.greeting()
    await client.ehlo()
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    for probe in ["b@example.org", "user%other.example@relay.test", '"user@other"@example.org',
                  "other.example!user@relay.test"]:
        reply = await client.cmd(f"RCPT TO:<{probe}>")
        assert reply.code == 550 and reply.enhanced == "5.7.1", probe
    reply = await client.cmd("RCPT TO:<@hop.example:user@example.org>")
    assert reply.code == 553
    assert (await client.cmd("DATA")).code == 503
    await client.close()
    assert await total_recipients(running) == 0


async def test_submission_requires_auth(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running, "submission")
    await client.ehlo()
    reply = await client.cmd("MAIL FROM:<a@example.com>")
    assert reply.code == 530 and reply.enhanced == "5.7.0"
    await client.close()


# -- AUTH ----------------------------------------------------------------------------------------------
async def authenticated_client(relays: RelayFactory, running: RunningRelay) -> RawClient:
    client = await connect(running, "submission")
    await client.ehlo()
    assert (await client.starttls(relays.client_tls())).code == 220
    await client.ehlo()
    return client


async def test_auth_before_starttls_is_refused(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse")
    client = await connect(running, "submission")
    await client.ehlo()
    reply = await client.auth_plain("alice", "correct horse")
    assert reply.code == 538 and reply.enhanced == "5.7.11"
    await client.close()


async def test_auth_in_clear_allowed_on_loopback_only_when_configured(relays: RelayFactory) -> None:
    listeners = [{"name": "relay", "address": "127.0.0.1:0", "auth": "optional",
                  "allow_plain_auth_on_loopback": True}]
    running = await relays.start(listeners=listeners)
    await running.add_user("alice", "correct horse")
    client = await connect(running)
    assert "AUTH PLAIN LOGIN" in (await client.ehlo()).lines
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    await client.close()


async def test_auth_plain_and_login_over_tls_then_relay(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse")
    client = await authenticated_client(relays, running)
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    reply = await client.mail("alice@example.com", ["b@example.org"], BODY)
    assert reply.code == 250
    message = await running.store.get_message(await queued_id(reply.text))
    assert message is not None and message.auth_user == "alice"
    data = await running.store.message_data(message.id)
    assert b"with ESMTPSA" in data
    await client.close()

    client = await authenticated_client(relays, running)
    assert (await client.cmd("AUTH LOGIN")).text == "VXNlcm5hbWU6"
    assert (await client.cmd(base64.b64encode(b"alice"))).text == "UGFzc3dvcmQ6"
    assert (await client.cmd(base64.b64encode(b"correct horse"))).code == 235
    await client.close()


async def test_aiosmtplib_submission_with_starttls_and_auth(relays: RelayFactory) -> None:
    import aiosmtplib
    running = await relays.start()
    await running.add_user("bob", "s3cret-pass")
    errors, response = await aiosmtplib.send(
        BODY, sender="bob@example.com", recipients=["x@example.org"], hostname="127.0.0.2",
        port=running.ports["submission"], start_tls=True, tls_context=relays.client_tls(),
        username="bob", password="s3cret-pass", timeout=10)
    assert errors == {} and "queued as" in response


@pytest.mark.parametrize("case", ["unknown", "wrong", "disabled", "expired"])
async def test_failed_auth_is_indistinguishable(relays: RelayFactory, case: str) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse")
    await running.add_user("dis", "correct horse", disabled=True)
    await running.add_user("old", "correct horse", expires_at=1.0)
    username, password = {"unknown": ("nobody", "correct horse"), "wrong": ("alice", "bad"),
                          "disabled": ("dis", "correct horse"), "expired": ("old", "correct horse")}[case]
    client = await authenticated_client(relays, running)
    reply = await client.auth_plain(username, password)
    assert (reply.code, reply.text) == (535, "5.7.8 Authentication credentials invalid")
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 530
    await client.close()


async def test_an_unknown_user_costs_the_same_bcrypt_work_as_a_known_one() -> None:
    # The stand-in hash is a real bcrypt hash of the same cost as users' hashes, and matches nothing.
    assert auth._DUMMY_HASH.startswith(f"$2b${auth.BCRYPT_ROUNDS:02d}$".encode())
    assert bcrypt.checkpw(b"x", auth._DUMMY_HASH) is False
    assert auth.hash_password("pw-of-a-user").startswith(f"$2b${auth.BCRYPT_ROUNDS:02d}$")
    assert await auth.check_password("anything", None) is False


async def test_lockout_after_repeated_failures(relays: RelayFactory) -> None:
    running = await relays.start(limits={"auth_failures_per_user": {"count": 3, "period": 600}})
    await running.add_user("alice", "correct horse")
    for _ in range(3):
        client = await authenticated_client(relays, running)
        assert (await client.auth_plain("alice", "guess")).code == 535
        await client.close()
    client = await authenticated_client(relays, running)
    reply = await client.auth_plain("alice", "correct horse")
    assert reply.code == 454 and reply.enhanced == "4.7.0"
    await client.close()


async def test_auth_garbage_is_answered_cleanly(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await authenticated_client(relays, running)
    assert (await client.cmd("AUTH PLAIN !!!notbase64")).code == 501
    assert (await client.cmd("AUTH CRAM-MD5")).code == 504
    assert (await client.cmd("AUTH PLAIN " + base64.b64encode(b"only-one-part").decode())).code == 501
    assert (await client.cmd("AUTH LOGIN")).code == 334
    assert (await client.cmd("*")).code == 501
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_sender_domain_restriction(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse", allowed_sender_domains=("example.com",))
    client = await authenticated_client(relays, running)
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    reply = await client.cmd("MAIL FROM:<alice@evil.example>")
    assert reply.code == 553 and reply.enhanced == "5.7.1"
    assert (await client.cmd("MAIL FROM:<alice@mail.example.com>")).code == 250
    await client.close()


async def test_user_quota_per_minute(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse", quota_per_minute=2)
    client = await authenticated_client(relays, running)
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    for _ in range(2):
        assert (await client.mail("alice@example.com", ["b@example.org"], BODY)).code == 250
    reply = await client.cmd("MAIL FROM:<alice@example.com>")
    assert reply.code == 450 and reply.enhanced == "4.7.1"
    await client.close()
    assert (await running.store.count_by_state())["queued"] == 2
    assert await total_recipients(running) == 2


# -- protocol hygiene ------------------------------------------------------------------------------
async def test_size_declared_and_actual(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"max_message_size": 2048})
    client = await connect(running)
    await client.ehlo()
    reply = await client.cmd("MAIL FROM:<a@example.com> SIZE=4096")
    assert reply.code == 552 and reply.enhanced == "5.3.4"
    reply = await client.mail("a@example.com", ["b@example.org"], BODY + b"x" * 3000 + b"\r\n")
    assert reply.code == 552 and reply.enhanced == "5.3.4"
    # The session is still in sync and usable.
    assert (await client.mail("a@example.com", ["b@example.org"], BODY)).code == 250
    await client.close()


async def test_max_recipients(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"max_recipients": 2})
    client = await connect(running)
    await client.ehlo()
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<1@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<2@example.org>")).code == 250
    reply = await client.cmd("RCPT TO:<3@example.org>")
    assert reply.code == 452 and reply.enhanced == "4.5.3"
    await client.close()


async def test_command_line_too_long(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"max_line_length": 600})
    client = await connect(running)
    reply = await client.cmd(b"NOOP " + b"x" * 5000)
    assert reply.code == 500 and reply.enhanced == "5.5.2"
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


@pytest.mark.parametrize("payload", [b"a\nb\r\n", b"a\rb\r\n", b"x\r\n\n.\nQUIT\r\n"])
async def test_bare_lf_or_cr_in_data_is_refused(relays: RelayFactory, payload: bytes) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.org>")
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: x\r\n\r\n" + payload + b"\r\n.\r\n")
    reply = await client.reply()
    assert reply.code == 550 and reply.enhanced == "5.6.0"
    assert await client.closed()
    assert await total_recipients(running) == 0


async def test_smuggled_end_of_data_is_not_obeyed(relays: RelayFactory) -> None:
    """A '\\n.\\n' followed by a second transaction must never produce two messages."""
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.org>")
    await client.cmd("DATA")
    smuggled = b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.org>\nDATA\n"
    await client.send(smuggled + b"Subject: two\r\n\r\n.\r\n")
    reply = await client.reply()
    assert reply.code == 550
    assert await total_recipients(running) == 0


async def test_nul_and_invalid_utf8_and_unknown_commands(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    for bad in (b"NO\x00OP", b"EHLO \xff\xfe", b"FROB", b"MAIL FROM:<a@example.com>"):
        reply = await client.cmd(bad)
        assert 500 <= reply.code < 600 and reply.enhanced.startswith("5."), (bad, reply)
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_too_many_bad_commands_disconnects(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"max_bad_commands": 3})
    client = await connect(running)
    await client.cmd("FROB")
    await client.cmd("FROB")
    reply = await client.cmd("FROB")
    assert reply.code == 421
    assert await client.closed()


async def test_sequence_errors(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 503     # no EHLO
    await client.ehlo()
    assert (await client.cmd("RCPT TO:<b@example.org>")).code == 503       # no MAIL
    assert (await client.cmd("DATA")).code == 503                          # no RCPT
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 503     # nested MAIL
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd("VRFY someone")).code == 252
    assert (await client.cmd("QUIT")).code == 221
    assert await client.closed()


async def test_non_ascii_address_needs_smtputf8(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    reply = await client.cmd("MAIL FROM:<jöran@example.com>")
    assert reply.code == 553 and reply.enhanced == "5.6.7"
    assert (await client.cmd("MAIL FROM:<jöran@example.com> SMTPUTF8")).code == 250
    assert (await client.cmd("RCPT TO:<benutzer@bücher.example>")).code == 250
    reply = await client.cmd("DATA")
    assert reply.code == 354
    queue_id = await queued_id((await client.cmd(BODY + b".")).text)
    message = await running.store.get_message(queue_id)
    assert message is not None and message.smtputf8
    await client.close()


async def test_command_timeout_sends_421(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"command_timeout": 0.3})
    client = await connect(running)
    reply = await client.reply(timeout=5)
    assert reply.code == 421 and reply.enhanced == "4.4.2"
    assert await client.closed()


async def test_starttls_discards_pipelined_plaintext(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    await client.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    assert (await client.reply()).code == 220
    await client.writer.start_tls(relays.client_tls(), server_hostname="localhost")
    # The injected MAIL was dropped: the server wants EHLO again and answers nothing extra.
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 503
    await client.close()


async def test_implicit_tls_listener(relays: RelayFactory) -> None:
    listeners = [{"name": "smtps", "address": "127.0.0.1:0", "kind": "smtps", "auth": "required"}]
    running = await relays.start(listeners=listeners)
    await running.add_user("alice", "correct horse")
    client = await RawClient.connect(running.ports["smtps"], tls=relays.client_tls())
    assert (await client.greeting()).code == 220
    lines = (await client.ehlo()).lines
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    await client.close()


async def test_max_connections_answers_421(relays: RelayFactory) -> None:
    listeners = [{"name": "relay", "address": "127.0.0.1:0", "max_connections": 2,
                  "trusted_networks": ["127.0.0.0/8"]}]
    running = await relays.start(listeners=listeners)
    first = await connect(running)
    second = await connect(running)
    third = await RawClient.connect(running.ports["relay"])
    reply = await third.reply()
    assert reply.code == 421 and reply.enhanced == "4.7.0"
    assert await third.closed()
    await first.close()
    await second.close()
    await asyncio.sleep(0.1)
    again = await connect(running)
    await again.close()


async def test_connections_per_ip(relays: RelayFactory) -> None:
    running = await relays.start(limits={"connections_per_ip": 1})
    first = await connect(running)
    second = await RawClient.connect(running.ports["relay"])
    reply = await second.reply()
    assert reply.code == 421
    await first.close()


async def test_tls_handshake_failure_does_not_crash_the_server(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await connect(running)
    await client.ehlo()
    assert (await client.cmd("STARTTLS")).code == 220
    await client.send(b"this is not a TLS client hello\r\n" * 10)
    await client.close()
    healthy = await connect(running)
    assert (await healthy.ehlo()).code == 250
    await healthy.close()


def test_client_tls_context_verifies(relays: RelayFactory) -> None:
    # The tests above use a verifying context: a wrong CA would fail them, not pass silently.
    assert relays.client_tls().verify_mode == ssl.CERT_REQUIRED


async def test_from_header_must_match_the_users_sender_domains(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", "correct horse", allowed_sender_domains=("example.com",))
    client = await authenticated_client(relays, running)
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    forged = b"From: CEO <ceo@other.example>\r\nSubject: pay\r\n\r\nx\r\n"
    reply = await client.mail("alice@example.com", ["b@example.org"], forged)
    assert reply.code == 550 and reply.enhanced == "5.7.1"
    two = b"From: alice@example.com, ceo@other.example\r\nSubject: x\r\n\r\nx\r\n"
    assert (await client.mail("alice@example.com", ["b@example.org"], two)).code == 550
    ok = b"From: Alice <alice@mail.example.com>\r\nSubject: hi\r\n\r\nx\r\n"
    assert (await client.mail("alice@example.com", ["b@example.org"], ok)).code == 250
    await client.close()


async def test_a_plain_blob_sent_as_a_login_username_never_reaches_the_log(
        relays: RelayFactory, capsys: pytest.CaptureFixture[str]) -> None:
    running = await relays.start()
    client = await authenticated_client(relays, running)
    assert (await client.cmd("AUTH LOGIN")).code == 334
    await client.cmd(base64.b64encode(b"\x00someone\x00Blob-Pass-4471"))
    reply = await client.cmd(base64.b64encode(b"whatever"))
    assert reply.code == 535
    await client.close()
    captured = capsys.readouterr()
    assert "Blob-Pass-4471" not in captured.err + captured.out
    assert "[not a valid username]" in captured.err + captured.out

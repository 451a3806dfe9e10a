"""The outbound SMTP client against a real SMTP sink on loopback: sessions, TLS policies, extensions,
per-recipient replies, connection reuse, and every kind of misbehaving peer contained as a failure."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from relay.policies.bounce import Reply
from relay.policies.routing import TlsMode

from relay.delivery.client import (
    MAX_REPLY_BYTES,
    ClientOptions,
    DeliveryConnection,
    Failure,
    SendResult,
    Target,
    TlsContexts,
    TlsFallbackMemory,
    _dot_stuffed,
)
from relay.delivery.config import TimeoutSettings
from relay.sink import SinkConfig, SinkServer
from relay.store.base import NewMessage, NewRecipient
from tests.support.relayfx import RelayFactory, RunningRelay

# Generous enough never to fire on a loaded machine; the timeout tests pass their own short values.
TIMEOUTS = TimeoutSettings(connect=10, greeting=10, ehlo=10, mail=10, rcpt=10, data_init=10, data_block=10,
                           data_end=10)
SHORT = 0.3

MESSAGE_BODY = (b"From: Alice <alice@sender.example>\r\nTo: bob@dest.example\r\nSubject: hello\r\n"
                b"Message-ID: <m1@sender.example>\r\n\r\nfirst line\r\n.leading dot\r\n..two dots\r\n"
                b"last line\r\n")


def message(*rcpts: str, data: bytes = MESSAGE_BODY, sender: str = "alice@sender.example",
            smtputf8: bool = False, msg_id: str = "q1") -> NewMessage:
    return NewMessage(id=msg_id, sender=sender, recipients=[NewRecipient(r) for r in rcpts], data=data,
                      received_at=0.0, smtputf8=smtputf8)


@asynccontextmanager
async def sink_server(**config: Any) -> AsyncIterator[SinkServer]:
    config.setdefault("starttls", "off")
    async with SinkServer(SinkConfig(**config)) as sink:
        yield sink
        await sessions_ended(sink)


async def sessions_ended(sink: SinkServer) -> None:
    """Give the sink's sessions a moment to see our side close (bounded).

    Works around a sink issue: SinkServer.stop() hangs when a session is still inside a failed TLS
    handshake at that moment (reproducible with plain aiosmtplib too).
    """
    for _ in range(100):
        if sink.connections_active == 0:
            return
        await asyncio.sleep(0.01)


def connection(sink: SinkServer, *, tls: TlsMode = "opportunistic", memory: TlsFallbackMemory | None = None,
               name: str = "mx.dest.example", contexts: TlsContexts | None = None,
               **options: Any) -> DeliveryConnection:
    opts = ClientOptions(ehlo_hostname="relay.test", timeouts=options.pop("timeouts", TIMEOUTS), tls=tls,
                         contexts=contexts, **options)
    return DeliveryConnection(Target(name, "127.0.0.1", sink.port), opts,
                              memory or TlsFallbackMemory(3600))


def codes(results: list[SendResult]) -> list[int | str]:
    return [r.code if isinstance(r, Reply) else f"{r.kind}@{r.stage}" for r in results]


def timeouts(**short: float) -> TimeoutSettings:
    return TIMEOUTS.model_copy(update=short)


# --- plain sessions and the message ---------------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False])
async def test_plain_delivery_keeps_the_message_intact(pipelining: bool) -> None:
    async with sink_server(pipelining=pipelining) as sink:
        conn = connection(sink, tls="none")
        results = await conn.send(message("bob@dest.example", "carol@dest.example"), MESSAGE_BODY,
                                  message("bob@dest.example", "carol@dest.example").recipients)
        await conn.close()
    assert codes(results) == [250, 250]
    [received] = sink.received
    assert received.mail_from == "alice@sender.example"
    assert received.rcpt_tos == ["bob@dest.example", "carol@dest.example"]
    assert received.data == MESSAGE_BODY  # dot-stuffing undone by the server: byte for byte the same
    assert received.tls is False
    assert conn.tls_version is None


async def test_bare_line_feeds_go_out_as_crlf_and_a_missing_final_newline_is_added() -> None:
    async with sink_server() as sink:
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", data=b"Subject: x\n\nline one\nline two")
        assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
        await conn.close()
    assert sink.received[0].data == b"Subject: x\r\n\r\nline one\r\nline two\r\n"


async def test_opportunistic_tls_uses_starttls_when_offered() -> None:
    async with sink_server(starttls="on") as sink:
        conn = connection(sink)
        msg = message("bob@dest.example")
        assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
        await conn.close()
    assert sink.received[0].tls is True
    assert conn.tls_version is not None and conn.tls_version.startswith("TLS")


async def test_opportunistic_tls_goes_plaintext_when_starttls_is_not_offered() -> None:
    async with sink_server(starttls="off") as sink:
        conn = connection(sink)
        msg = message("bob@dest.example")
        assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
        await conn.close()
    assert sink.received[0].tls is False


@pytest.mark.parametrize("mode", ["broken", "broken-close"])
async def test_broken_handshake_falls_back_to_plaintext_and_is_remembered(mode: str) -> None:
    memory = TlsFallbackMemory(3600)
    async with sink_server(starttls=mode) as sink:
        first = connection(sink, memory=memory)
        msg = message("bob@dest.example")
        assert codes(await first.send(msg, msg.data, msg.recipients)) == [250]
        await first.close()
        assert first.fell_back_to_plaintext
        assert sink.stats.connections_opened == 2  # the failed handshake, then the plaintext retry
        assert memory.plaintext(first.target)

        second = connection(sink, memory=memory)
        assert codes(await second.send(msg, msg.data, msg.recipients)) == [250]
        await second.close()
        assert not second.fell_back_to_plaintext
        assert sink.stats.connections_opened == 3  # straight to plaintext: no handshake tried again
    assert [m.tls for m in sink.received] == [False, False]


async def test_fallback_memory_ends_after_its_duration() -> None:
    now = [1000.0]
    memory = TlsFallbackMemory(60, clock=lambda: now[0])
    target = Target("mx", "127.0.0.1", 25)
    memory.remember(target)
    assert memory.plaintext(target)
    now[0] += 61
    assert not memory.plaintext(target)


@pytest.mark.parametrize(("starttls", "detail"), [("off", "not offered"), ("broken", "handshake"),
                                                  ("broken-close", "handshake")])
async def test_required_tls_fails_temporarily_without_a_working_starttls(starttls: str, detail: str) -> None:
    async with sink_server(starttls=starttls) as sink:
        conn = connection(sink, tls="required")
        msg = message("bob@dest.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
    assert codes(results) == ["tls@starttls", "tls@starttls"]
    assert isinstance(results[0], Failure) and detail in results[0].detail
    assert results[0].session_level
    assert sink.stats.messages == 0


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@asynccontextmanager
async def verified_sink(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[SinkServer]:
    cert = ca.issue_cert("mx.dest.example")
    cert_file, key_file = tmp_path / "sink-cert.pem", tmp_path / "sink-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    async with sink_server(starttls="on", cert_file=cert_file, key_file=key_file) as sink:
        yield sink


async def test_verified_tls_checks_the_chain_and_the_mx_name(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    contexts = TlsContexts(ca_file)
    msg = message("bob@dest.example")
    async with verified_sink(ca, tmp_path) as sink:
        good = connection(sink, tls="verified", contexts=contexts, name="mx.dest.example")
        assert codes(await good.send(msg, msg.data, msg.recipients)) == [250]
        await good.close()

        wrong_name = connection(sink, tls="verified", contexts=contexts, name="other.example")
        results = await wrong_name.send(msg, msg.data, msg.recipients)
        assert codes(results) == ["tls@starttls"]

        untrusted = connection(sink, tls="verified", contexts=TlsContexts(), name="mx.dest.example")
        assert codes(await untrusted.send(msg, msg.data, msg.recipients)) == ["tls@starttls"]
    assert len(sink.received) == 1 and sink.received[0].tls


async def test_a_failed_verified_handshake_never_falls_back(ca: trustme.CA, tmp_path: Path) -> None:
    memory = TlsFallbackMemory(3600)
    async with verified_sink(ca, tmp_path) as sink:
        conn = connection(sink, tls="verified", memory=memory, contexts=TlsContexts())
        msg = message("bob@dest.example")
        await conn.send(msg, msg.data, msg.recipients)
    assert not memory.plaintext(conn.target)
    assert sink.stats.connections_opened == 1 and sink.stats.messages == 0


# --- extensions -------------------------------------------------------------------------------------------

async def test_a_message_above_the_advertised_size_fails_permanently_without_being_sent() -> None:
    async with sink_server(size_limit=2000) as sink:
        conn = connection(sink, tls="none")
        big = message("bob@dest.example", "carol@dest.example", data=b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n")
        results = await conn.send(big, big.data, big.recipients)
        assert all(isinstance(r, Failure) and r.verdict is not None and r.verdict.outcome == "permanent"
                   and r.verdict.category == "message_too_large" and r.verdict.enhanced == "5.3.4"
                   for r in results)
        # The session is untouched and carries the next message.
        small = message("bob@dest.example")
        assert codes(await conn.send(small, small.data, small.recipients)) == [250]
        await conn.close()
    assert sink.stats.messages == 1 and sink.messages_per_connection == [1]
    assert sink.stats.messages_rejected == 0


async def test_smtputf8_message_to_a_host_without_it_fails_permanently_with_a_clear_reason() -> None:
    async with sink_server(smtputf8=False) as sink:
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", smtputf8=True)
        [result] = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(result, Failure) and result.verdict is not None
    assert result.verdict.outcome == "permanent" and result.verdict.enhanced == "5.6.9"
    assert "SMTPUTF8" in result.detail
    assert sink.stats.messages == 0


async def test_non_ascii_mailbox_is_refused_alone_and_a_non_ascii_domain_goes_as_its_a_label() -> None:
    async with sink_server(smtputf8=False) as sink:
        conn = connection(sink, tls="none")
        msg = message("jörg@dest.example", "bob@bücher.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(results[0], Failure) and results[0].verdict is not None
    assert results[0].verdict.enhanced == "5.6.7" and results[0].verdict.outcome == "permanent"
    assert codes(results)[1:] == [250, 250]
    assert sink.received[0].rcpt_tos == ["bob@xn--bcher-kva.example", "carol@dest.example"]


async def test_smtputf8_is_used_when_offered() -> None:
    async with sink_server(smtputf8=True) as sink:
        conn = connection(sink, tls="none")
        msg = message("jörg@dest.example", sender="zoë@sender.example", smtputf8=True)
        assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
        await conn.close()
    assert sink.received[0].rcpt_tos == ["jörg@dest.example"]
    assert sink.received[0].mail_from == "zoë@sender.example"


# --- replies per recipient, reuse ----------------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False])
async def test_each_recipient_gets_its_own_reply(pipelining: bool) -> None:
    async with sink_server(pipelining=pipelining) as sink:
        sink.set_rule("bad@dest.example", "550 5.1.1 no such user")
        sink.set_rule("later@dest.example", "451 4.2.0 try again in 5 minutes")
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", "bad@dest.example", "later@dest.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert codes(results) == [250, 550, 451, 250]
    assert results[1] == Reply(550, "5.1.1", "no such user")
    assert sink.received[0].rcpt_tos == ["bob@dest.example", "carol@dest.example"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_sender_refused_settles_every_recipient_and_the_next_message_still_goes(pipelining: bool) -> None:
    async with sink_server(pipelining=pipelining) as sink:
        sink.set_rule("spammer@sender.example", "550 5.7.1 go away", stage="mail")
        conn = connection(sink, tls="none")
        refused = message("bob@dest.example", "carol@dest.example", sender="spammer@sender.example")
        assert codes(await conn.send(refused, refused.data, refused.recipients)) == [550, 550]
        ok = message("bob@dest.example")
        assert codes(await conn.send(ok, ok.data, ok.recipients)) == [250]
        await conn.close()
    assert sink.stats.connections_opened == 1 and len(sink.received) == 1


async def test_all_recipients_refused_then_the_connection_is_reset_and_reused() -> None:
    async with sink_server() as sink:
        sink.set_rule("bad@dest.example", "550 5.1.1 no such user")
        conn = connection(sink, tls="none")
        refused = message("bad@dest.example")
        assert codes(await conn.send(refused, refused.data, refused.recipients)) == [550]
        ok = message("bob@dest.example")
        assert codes(await conn.send(ok, ok.data, ok.recipients)) == [250]
        await conn.close()
    assert sink.messages_per_connection == [1]


async def test_a_data_rejection_applies_to_the_accepted_recipients() -> None:
    async with sink_server() as sink:
        sink.set_rule("bob@dest.example", "554 5.7.1 content rejected", stage="data")
        sink.set_rule("bad@dest.example", "550 5.1.1 no such user")
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", "bad@dest.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert codes(results) == [554, 550, 554]
    assert sink.stats.messages == 0


async def test_one_connection_carries_many_messages_up_to_the_limit() -> None:
    async with sink_server() as sink:
        conn = connection(sink, tls="none", max_messages=3)
        for number in range(3):
            assert conn.usable
            msg = message("bob@dest.example", msg_id=f"q{number}")
            assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
        assert not conn.usable  # the limit is reached: the caller opens a new one
        await conn.close()
    assert sink.messages_per_connection == [3]
    assert conn.messages_sent == 3


# --- misbehaving peers ---------------------------------------------------------------------------------

async def test_refused_connection_is_a_temporary_connect_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn = DeliveryConnection(Target("mx", "127.0.0.1", port), ClientOptions("relay.test", TIMEOUTS),
                              TlsFallbackMemory(60))
    failure = await conn.open()
    assert failure is not None and failure.kind == "connect" and failure.stage == "connect"
    assert failure.session_level


@pytest.mark.parametrize(("greeting", "code"), [("421 4.3.2 busy", 421), ("554 5.3.2 no service here", 554)])
async def test_a_refusing_greeting_is_reported_with_its_reply(greeting: str, code: int) -> None:
    async with sink_server() as sink:
        sink.set_rule("*", greeting, stage="connect")
        failure = await connection(sink).open()
    assert failure is not None and failure.stage == "greeting"
    assert failure.reply is not None and failure.reply.code == code


async def test_greeting_timeout() -> None:
    async with sink_server(greeting_delay=5) as sink:
        failure = await connection(sink, timeouts=timeouts(greeting=SHORT)).open()
    assert failure is not None and (failure.kind, failure.stage) == ("timeout", "greeting")


async def test_ehlo_refused_and_helo_refused_too() -> None:
    async with sink_server() as sink:
        sink.set_rule("*", "550 5.7.1 not you", stage="ehlo")
        failure = await connection(sink).open()
    assert failure is not None and failure.stage == "ehlo"
    assert failure.reply is not None and failure.reply.code == 550


@pytest.mark.parametrize("stage", ["ehlo", "mail", "rcpt"])
async def test_garbage_replies_are_contained(stage: str) -> None:
    async with sink_server() as sink:
        sink.set_rule("*", "garbage", stage=stage)
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        assert all(isinstance(r, Failure) and r.kind == "protocol" for r in results)
        assert not conn.usable
        await conn.close()
    assert sink.stats.messages == 0


@pytest.mark.parametrize("stage", ["ehlo", "mail", "rcpt", "data"])
async def test_endless_replies_are_cut_off(stage: str) -> None:
    async with sink_server() as sink:
        sink.set_rule("*", "endless", stage=stage)
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example")
        [result] = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(result, Failure) and result.kind == "protocol", result
    if stage != "ehlo":  # EHLO is read by aiosmtplib, which has its own (smaller) cap
        assert str(MAX_REPLY_BYTES) in result.detail


@pytest.mark.parametrize(("stage", "short"), [("rcpt", {"rcpt": SHORT}), ("mail", {"mail": SHORT}),
                                              ("data", {"data_end": SHORT}), ("ehlo", {"ehlo": SHORT})])
async def test_a_stalled_peer_times_out_at_each_stage(stage: str, short: dict[str, float]) -> None:
    async with sink_server() as sink:
        sink.set_rule("*", "stall", stage=stage)
        conn = connection(sink, tls="none", timeouts=timeouts(**short))
        msg = message("bob@dest.example")
        [result] = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(result, Failure) and result.kind == "timeout", result
    assert sink.stats.messages == 0


async def test_a_peer_stalling_mid_body_times_out() -> None:
    async with sink_server() as sink:
        sink.set_rule("*", "stall:10", stage="body")
        conn = connection(sink, tls="none", timeouts=timeouts(data_end=SHORT, data_block=SHORT))
        msg = message("bob@dest.example")
        [result] = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(result, Failure) and result.kind == "timeout" and result.stage == "data_end"


@pytest.mark.parametrize(("stage", "rule"), [("mail", "disconnect"), ("rcpt", "disconnect"),
                                             ("data", "disconnect"), ("body", "disconnect:10")])
async def test_disconnects_at_any_stage_are_temporary_failures(stage: str, rule: str) -> None:
    async with sink_server() as sink:
        sink.set_rule("*", rule, stage=stage)  # type: ignore[arg-type]  # the sink's Stage literal
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example")
        [result] = await conn.send(msg, msg.data, msg.recipients)
        assert isinstance(result, Failure) and result.kind == "connect", result
        assert not conn.usable
        await conn.close()


async def test_421_mid_transaction_settles_the_rest_and_ends_the_session() -> None:
    async with sink_server() as sink:
        sink.set_rule("busy@dest.example", "421 4.7.0 too many connections, try again in 2 minutes")
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example", "busy@dest.example", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        assert not conn.usable
        await conn.close()
    assert codes(results) == [421, 421, 421]
    assert sink.stats.messages == 0


async def test_unsafe_addresses_never_reach_the_wire() -> None:
    async with sink_server() as sink:
        conn = connection(sink, tls="none")
        msg = message("bob@dest.example\r\nRSET", "carol@dest.example")
        results = await conn.send(msg, msg.data, msg.recipients)
        await conn.close()
    assert isinstance(results[0], Failure) and results[0].verdict is not None
    assert results[0].verdict.outcome == "permanent"
    assert codes(results)[1:] == [250]
    assert sink.received[0].rcpt_tos == ["carol@dest.example"]


# --- AUTH ---------------------------------------------------------------------------------------------

async def test_credentials_are_never_sent_without_tls() -> None:
    async with sink_server(starttls="off") as sink:
        conn = connection(sink, tls="opportunistic", username="u", password="p")
        failure = await conn.open()
    assert failure is not None and failure.kind == "tls" and failure.stage == "auth"


async def test_auth_required_but_not_offered_fails_temporarily() -> None:
    async with sink_server(starttls="on") as sink:
        conn = connection(sink, tls="required", username="u", password="p")
        failure = await conn.open()
    assert failure is not None and failure.stage == "auth" and "AUTH" in failure.detail


async def smarthost(relays: RelayFactory) -> tuple[RunningRelay, int]:
    """A real relay (ours) as the smarthost: submission with AUTH over STARTTLS, certificate for relay.test."""
    running = await relays.start(listeners=[
        {"name": "submission", "address": "127.0.0.1:0", "kind": "submission", "auth": "required"}])
    await running.add_user("smart", "s3cret-pass")
    return running, running.ports["submission"]


def smarthost_connection(port: int, ca_file: Path, password: str) -> DeliveryConnection:
    options = ClientOptions("relay.test", TIMEOUTS, tls="verified", contexts=TlsContexts(ca_file),
                            username="smart", password=password)
    return DeliveryConnection(Target("relay.test", "127.0.0.1", port), options, TlsFallbackMemory(60))


async def test_smarthost_auth_over_verified_tls(relays: RelayFactory, tls_ca: trustme.CA,
                                                tmp_path: Path) -> None:
    running, port = await smarthost(relays)
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    conn = smarthost_connection(port, ca_file, "s3cret-pass")
    msg = message("bob@dest.example")
    assert codes(await conn.send(msg, msg.data, msg.recipients)) == [250]
    await conn.close()
    assert conn.tls_version is not None
    assert (await running.store.count_by_state()).get("queued") == 1


async def test_refused_credentials_are_a_temporary_failure(relays: RelayFactory, tls_ca: trustme.CA,
                                                           tmp_path: Path) -> None:
    running, port = await smarthost(relays)
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    conn = smarthost_connection(port, ca_file, "wrong-password")
    msg = message("bob@dest.example")
    [result] = await conn.send(msg, msg.data, msg.recipients)
    assert isinstance(result, Failure) and result.stage == "auth" and result.verdict is None
    assert result.reply is None  # not classified from the 535: our credentials are not the recipient's fault
    assert "535" in result.detail
    assert (await running.store.count_by_state()).get("queued", 0) == 0


# -- dot-stuffing (pure) ------------------------------------------------------------------------------------

def _reference_dot_stuffed(data: bytes) -> bytes:
    """The definition, written the slow and obvious way: normalise every line end to CRLF, double every
    leading dot, end with CRLF . CRLF."""
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    body = re.sub(rb"(?m)^\.", b"..", body)
    return body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n"


@given(st.lists(st.sampled_from([b".", b"..", b"x", b"\r\n", b"\r", b"\n", b"\r\n.", b" ", b"\xff", b"\x00"]),
                max_size=60).map(b"".join))
def test_dot_stuffing_matches_its_definition(data: bytes) -> None:
    stuffed = _dot_stuffed(data)
    assert stuffed == _reference_dot_stuffed(data)
    # What goes on the wire ends DATA exactly once: after the CRLF that ends "354 ...", the first
    # CRLF . CRLF is the terminator.
    assert (b"\r\n" + stuffed).find(b"\r\n.\r\n") == len(stuffed) - 3


@pytest.mark.parametrize(("data", "wire"), [
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\n.b", b"a\r\n..b\r\n.\r\n"),           # a bare LF (generated mail) is normalised first
    (b"", b"\r\n.\r\n"),
])
def test_dot_stuffing_examples(data: bytes, wire: bytes) -> None:
    assert _dot_stuffed(data) == wire

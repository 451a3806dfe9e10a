"""relay sink: the SMTP sink driven by real clients over loopback (aiosmtplib and a raw line client),
real TLS (trustme and the sink's own self-signed certificate), and the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import mailbox
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.cli import build_parser, main
from relay.settings import ConfigError
from relay.sink import (
    GARBAGE_REPLY,
    Behaviour,
    Rule,
    RuleSet,
    SinkConfig,
    SinkServer,
    config_from_args,
)

REPO = Path(__file__).resolve().parent.parent
MESSAGE = b"From: a@client.test\r\nTo: b@good.example\r\nSubject: hello\r\n\r\nHello, sink.\r\n"
IO_TIMEOUT = 10.0  # a safety net so a broken sink fails the test instead of hanging it


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    async with SinkServer() as server:
        yield server


async def started(config: SinkConfig) -> SinkServer:
    server = SinkServer(config)
    await server.start()
    return server


def client(server: SinkServer, **options: object) -> aiosmtplib.SMTP:
    settings: dict[str, object] = {"hostname": "127.0.0.1", "port": server.port, "start_tls": False,
                                   "local_hostname": "client.test", "timeout": IO_TIMEOUT}
    settings.update(options)
    return aiosmtplib.SMTP(**settings)  # type: ignore[arg-type]  # test helper passing options through


class RawClient:
    """SMTP by hand, for the replies a real client library would refuse to show."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def line(self) -> str:
        async with asyncio.timeout(IO_TIMEOUT):
            return (await self.reader.readline()).decode("ascii", "replace").rstrip("\r\n")

    async def reply(self) -> list[str]:
        lines = [await self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(await self.line())
        return lines

    async def command(self, text: str) -> list[str]:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed_by_server(self) -> bool:
        """True once the server has closed (FIN) or aborted (RST) the connection."""
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                return await self.reader.read() == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def raw_session_to_rcpt(port: int, rcpt: str) -> tuple[RawClient, list[str]]:
    raw = await RawClient.connect(port)
    assert (await raw.reply())[0].startswith("220")
    await raw.command("EHLO client.test")
    assert (await raw.command("MAIL FROM:<a@client.test>"))[0].startswith("250")
    return raw, await raw.command(f"RCPT TO:<{rcpt}>")


# --- accepting -----------------------------------------------------------------------------------------


async def test_default_accepts_and_records_the_message(sink: SinkServer) -> None:
    async with client(sink) as smtp:
        errors, _ = await smtp.sendmail("a@client.test", ["b@good.example", "c@good.example"], MESSAGE)

    assert errors == {}
    [message] = sink.received
    assert (message.mail_from, message.rcpt_tos, message.tls) == (
        "a@client.test", ["b@good.example", "c@good.example"], False)
    assert message.data == MESSAGE
    assert sink.stats.messages == 1 and sink.stats.recipients_accepted == 2


async def test_null_sender_is_recorded_as_empty(sink: SinkServer) -> None:
    async with client(sink) as smtp:
        await smtp.sendmail("", ["b@good.example"], MESSAGE)

    assert sink.received[0].mail_from == ""


async def test_ehlo_advertises_pipelining_and_smtputf8_but_no_auth(sink: SinkServer) -> None:
    async with client(sink) as smtp:
        await smtp.ehlo()
        extensions = set(smtp.esmtp_extensions)

    assert {"pipelining", "smtputf8", "8bitmime", "starttls"} <= extensions
    assert "auth" not in extensions and "size" not in extensions


async def test_extensions_can_be_withheld_and_size_enforced() -> None:
    sink = await started(SinkConfig(pipelining=False, smtputf8=False, starttls="off", size_limit=1000))
    try:
        async with client(sink) as smtp:
            await smtp.ehlo()
            extensions = dict(smtp.esmtp_extensions)
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as too_big:  # MAIL ... SIZE=
                await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE + b"x" * 2000 + b"\r\n")
    finally:
        await sink.stop()

    assert extensions["size"] == "1000"
    assert not {"pipelining", "smtputf8", "starttls"} & set(extensions)
    assert too_big.value.code == 552
    assert sink.received == []


async def test_messages_per_connection_show_connection_reuse(sink: SinkServer) -> None:
    async with client(sink) as smtp:
        for _ in range(3):
            await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)
    async with client(sink) as smtp:
        await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)
    await asyncio.sleep(0)  # let the server see the last close

    assert sink.messages_per_connection == [3, 1]
    assert sink.connections_opened == 2
    assert [m.connection for m in sink.received] == [0, 0, 0, 1]


async def test_wait_for_messages_returns_once_enough_arrived(sink: SinkServer) -> None:
    async def send() -> None:
        async with client(sink) as smtp:
            await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)

    sender = asyncio.create_task(send())
    received = await sink.wait_for_messages(1)
    await sender

    assert len(received) == 1


async def test_accepted_messages_go_to_the_maildir(tmp_path: Path) -> None:
    sink = await started(SinkConfig(maildir=tmp_path / "mail"))
    try:
        async with client(sink) as smtp:
            await smtp.sendmail("a@client.test", ["b@good.example", "c@good.example"], MESSAGE)
    finally:
        await sink.stop()

    stored = [bytes(msg.as_bytes()) for msg in mailbox.Maildir(tmp_path / "mail", create=False)]
    assert len(stored) == 1
    assert b"Return-Path: <a@client.test>" in stored[0]
    assert b"Delivered-To: b@good.example" in stored[0] and b"Delivered-To: c@good.example" in stored[0]
    assert b"Hello, sink." in stored[0]


# --- scripted replies ----------------------------------------------------------------------------------


async def test_per_domain_and_per_address_replies_at_rcpt(sink: SinkServer) -> None:
    sink.set_rule("bad.example", "550 5.1.1 no such user")
    sink.set_rule("busy.example", "452 4.2.2 mailbox full")
    sink.set_rule("vip@bad.example", "accept")  # the address beats its domain

    async with client(sink) as smtp:
        errors, _ = await smtp.sendmail(
            "a@client.test", ["ok@good.example", "x@bad.example", "y@busy.example", "vip@bad.example"],
            MESSAGE)

    assert {rcpt: (reply.code, reply.message) for rcpt, reply in errors.items()} == {
        "x@bad.example": (550, "5.1.1 no such user"),
        "y@busy.example": (452, "4.2.2 mailbox full"),
    }
    assert sink.received[0].rcpt_tos == ["ok@good.example", "vip@bad.example"]
    assert sink.stats.recipients_rejected == 2


async def test_default_rule_applies_to_everyone_else(sink: SinkServer) -> None:
    sink.set_rule("*", "550 5.7.1 nobody home")
    sink.set_rule("good.example", "250 2.1.5 you are welcome")

    async with client(sink) as smtp:
        errors, _ = await smtp.sendmail("a@client.test", ["a@good.example", "b@other.example"], MESSAGE)

    assert errors["b@other.example"].code == 550
    assert sink.received[0].rcpt_tos == ["a@good.example"]


async def test_reply_at_end_of_data(sink: SinkServer) -> None:
    sink.set_rule("spam.example", "554 5.7.1 message rejected", stage="data")

    async with client(sink) as smtp:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp.sendmail("a@client.test", ["b@spam.example"], MESSAGE)
        await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)  # the session goes on

    assert (refused.value.code, refused.value.message) == (554, "5.7.1 message rejected")
    assert [m.rcpt_tos for m in sink.received] == [["b@good.example"]]
    assert sink.stats.messages_rejected == 1


async def test_sender_rule_at_mail(sink: SinkServer) -> None:
    sink.set_rule("spammer.example", "553 5.7.1 sender refused", stage="mail")

    async with client(sink) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.sendmail("x@spammer.example", ["b@good.example"], MESSAGE)

    assert refused.value.code == 553


async def test_421_at_rcpt_replies_then_closes(sink: SinkServer) -> None:
    sink.set_rule("slow.example", "421 4.7.0 try again later")

    raw, reply = await raw_session_to_rcpt(sink.port, "x@slow.example")
    try:
        assert reply == ["421 4.7.0 try again later"]
        assert await raw.closed_by_server()
    finally:
        await raw.close()


async def test_disconnect_at_rcpt_closes_without_reply(sink: SinkServer) -> None:
    sink.set_rule("gone.example", "disconnect")

    raw, reply = await raw_session_to_rcpt(sink.port, "x@gone.example")
    await raw.close()

    assert reply == [""]  # EOF instead of a reply


async def test_garbage_reply(sink: SinkServer) -> None:
    sink.set_rule("weird.example", "garbage")

    raw, reply = await raw_session_to_rcpt(sink.port, "x@weird.example")
    await raw.close()

    assert reply == [GARBAGE_REPLY]


async def test_endless_multiline_reply(sink: SinkServer) -> None:
    sink.set_rule("*", "endless", stage="ehlo")
    raw = await RawClient.connect(sink.port)
    try:
        await raw.reply()
        raw.writer.write(b"EHLO client.test\r\n")
        lines = [await raw.line() for _ in range(2000)]
    finally:
        await raw.close()

    assert all(line.startswith("250-") for line in lines)


async def test_endless_reply_defeats_a_client_library(sink: SinkServer) -> None:
    sink.set_rule("*", "endless", stage="ehlo")

    async with client(sink) as smtp:
        with pytest.raises(aiosmtplib.SMTPException):
            await smtp.ehlo()


# --- greeting ------------------------------------------------------------------------------------------


async def test_greeting_delay_holds_back_the_banner() -> None:
    sink = await started(SinkConfig(greeting_delay=1.0))
    try:
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await client(sink, timeout=0.2).connect()  # the banner cannot come before 1 s
        async with client(sink) as smtp:
            await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)
    finally:
        await sink.stop()

    assert sink.stats.messages == 1


async def test_greeting_421_refuses_the_connection(sink: SinkServer) -> None:
    sink.set_rule("*", "421 4.3.2 too busy", stage="connect")

    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await client(sink).connect()

    assert refused.value.code == 421


async def test_greeting_554_refuses_everything_but_quit(sink: SinkServer) -> None:
    sink.set_rule("*", "554 5.3.2 no service", stage="connect")
    raw = await RawClient.connect(sink.port)
    try:
        assert await raw.reply() == ["554 5.3.2 no service"]
        assert (await raw.command("EHLO client.test"))[0].startswith("503")
        assert (await raw.command("QUIT"))[0].startswith("221")
        assert await raw.closed_by_server()
    finally:
        await raw.close()


# --- mid-DATA failures ---------------------------------------------------------------------------------


async def test_disconnect_mid_data_is_seen_by_the_client(sink: SinkServer) -> None:
    sink.set_rule("cut.example", "disconnect:100", stage="body")
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 50  # well past 100 bytes

    async with client(sink) as smtp:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail("a@client.test", ["b@cut.example"], big)

    assert sink.received == []


async def test_stall_mid_data_leaves_the_client_waiting(sink: SinkServer) -> None:
    sink.set_rule("tarpit.example", "stall", stage="body")

    smtp = client(sink, timeout=0.5)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await smtp.sendmail("a@client.test", ["b@tarpit.example"], MESSAGE)
    smtp.close()

    assert sink.received == []


# --- STARTTLS ------------------------------------------------------------------------------------------


async def test_starttls_with_a_given_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "sink.pem"))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    sink = await started(SinkConfig(cert_file=tmp_path / "sink.pem", key_file=tmp_path / "sink.pem"))
    try:
        async with client(sink, start_tls=True, tls_context=trusted) as smtp:
            await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)
    finally:
        await sink.stop()

    assert sink.received[0].tls is True
    assert sink.stats.tls_sessions == 1


async def test_starttls_with_the_generated_certificate(sink: SinkServer) -> None:
    assert sink.certificate_pem is not None
    trusted = ssl.create_default_context(cadata=sink.certificate_pem.decode())

    async with client(sink, start_tls=True, tls_context=trusted) as smtp:
        await smtp.ehlo()
        assert "starttls" not in smtp.esmtp_extensions  # not offered twice
        await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)

    assert sink.received[0].tls is True


async def test_untrusted_certificate_fails_verification(sink: SinkServer) -> None:
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
        await client(sink, start_tls=True).connect()  # the system trust store knows no sink


@pytest.mark.parametrize("mode", ["broken", "broken-close"])
async def test_broken_starttls_fails_the_handshake(mode: str) -> None:
    sink = await started(SinkConfig(starttls=mode))  # type: ignore[arg-type]  # parametrized literal
    try:
        smtp = client(sink)
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError)):
            await smtp.starttls(tls_context=context)
        smtp.close()
    finally:
        await sink.stop()

    assert sink.stats.tls_sessions == 0


async def test_starttls_off_is_not_offered() -> None:
    sink = await started(SinkConfig(starttls="off"))
    try:
        async with client(sink) as smtp:
            await smtp.ehlo()
            offered = smtp.supports_extension("starttls")
    finally:
        await sink.stop()

    assert offered is False and sink.certificate_pem is None


async def test_stop_aborts_stalled_sessions() -> None:
    sink = await started(SinkConfig())
    sink.set_rule("*", "stall", stage="ehlo")
    raw = await RawClient.connect(sink.port)
    await raw.reply()
    raw.writer.write(b"EHLO client.test\r\n")
    await raw.writer.drain()

    await sink.stop()

    assert await raw.closed_by_server()
    assert sink.connections_active == 0
    await raw.close()


# --- rules ---------------------------------------------------------------------------------------------


def test_rule_syntax() -> None:
    assert Rule.parse("bad.example=550 5.1.1 no such user") == Rule(
        "bad.example", Behaviour("reply", 550, "5.1.1 no such user"), "rcpt")
    assert Rule.parse("data:User@Spam.Example=554") == Rule(
        "user@spam.example", Behaviour("reply", 554, "5.0.0 rejected (sink rule)"), "data")
    assert Rule.parse("body:*=disconnect:4096").behaviour == Behaviour("disconnect", after_bytes=4096)
    assert Rule.parse("connect:*=endless:220").behaviour == Behaviour("endless", code=220)
    assert Rule.parse("mail:<>=451 4.7.1 later").match == "<>"
    assert Rule.parse("user@[IPv6:2001:db8::1]=accept").match == "user@[ipv6:2001:db8::1]"
    for bad in ("no-equals-sign", "x=hello", "x=600 too big", "connect:x.example=421", "body:*=550 no",
                "x=stall:100", "bad:*=accept", "=550 x", "x=disconnect:abc"):
        with pytest.raises(ValueError):
            Rule.parse(bad)


def test_rule_lookup_order() -> None:
    rules = RuleSet([Rule.parse("*=550 default"), Rule.parse("example.org=451 domain"),
                     Rule.parse("vip@example.org=accept")])
    assert rules.lookup("rcpt", "VIP@example.org") == Behaviour("accept")
    assert rules.lookup("rcpt", "other@example.org") == Behaviour("reply", 451, "domain")
    assert rules.lookup("rcpt", "x@elsewhere.example") == Behaviour("reply", 550, "default")
    assert rules.lookup("data", "x@elsewhere.example") is None
    assert rules.first("rcpt", ["a@x.example", "b@example.org"]) == Behaviour("reply", 451, "domain")


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_flags_override_the_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "sink.toml"
    rules.write_text('listen = "127.0.0.1:2999"\nstarttls = "off"\nsize_limit = 5000\n'
                     '[replies]\n"bad.example" = "550 5.1.1 no such user"\n'
                     '"data:spam.example" = "554 5.7.1 no"\n')
    args = build_parser().parse_args(["sink", "--rules", str(rules), "--listen", "127.0.0.1:0",
                                      "--reply", "slow.example=421 4.7.0 later",
                                      "--greeting", "554 5.3.2 closed", "--count"])

    config = config_from_args(args)

    assert (config.host, config.port, config.starttls, config.size_limit) == ("127.0.0.1", 0, "off", 5000)
    assert {(rule.stage, rule.match) for rule in config.rules} == {
        ("rcpt", "bad.example"), ("data", "spam.example"), ("rcpt", "slow.example"), ("connect", "*")}
    assert config.print_summary is False and config.keep_messages is False


def test_cli_rejects_bad_rules_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sink", "--reply", "bad.example=five hundred"]) == 2
    assert "not a reply or behaviour" in capsys.readouterr().err
    (tmp_path / "r.json").write_text('{"replies": {}, "colour": "blue"}')
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_args(build_parser().parse_args(["sink", "--rules", str(tmp_path / "r.json")]))


async def test_cli_accepts_mail_and_exits_on_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "sink", "--listen", "127.0.0.1:0", "--print",
        "--maildir", str(tmp_path / "mail"), "--reply", "bad.example=550 5.1.1 no such user",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        async with asyncio.timeout(30):
            banner = (await proc.stderr.readline()).decode()
        assert "listening on 127.0.0.1:" in banner, banner
        port = int(banner.split("listening on 127.0.0.1:")[1].split()[0])

        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=IO_TIMEOUT)
        async with smtp:
            errors, _ = await smtp.sendmail("a@client.test", ["b@good.example", "c@bad.example"], MESSAGE)
        assert errors["c@bad.example"].code == 550

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "from=<a@client.test> to=<b@good.example> size=" in text
    assert "totals connections=1" in text and "messages=1 " in text and "rejected_recipients=1" in text
    assert len(list(mailbox.Maildir(tmp_path / "mail", create=False))) == 1


async def test_cli_counts_reports_periodically_and_stops_on_sigint(tmp_path: Path) -> None:
    rules = tmp_path / "sink.json"
    rules.write_text('{"listen": "127.0.0.1:0", "starttls": "off", "replies": {"*": "451 4.3.0 later"}}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "sink", "--rules", str(rules), "--count", "--report-every", "0.1",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        async with asyncio.timeout(30):
            banner = (await proc.stderr.readline()).decode()
            port = int(banner.split("listening on 127.0.0.1:")[1].split()[0])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=IO_TIMEOUT)
            async with smtp:
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                    await smtp.sendmail("a@client.test", ["b@good.example"], MESSAGE)
            report = ""
            while "rejected_recipients=1" not in report:  # the periodic report catches up
                report = (await proc.stdout.readline()).decode()
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, err.decode()
    assert report.startswith("relay sink: connections=1 ")
    assert "relay sink: totals connections=1 tls=0 messages=0" in out.decode()

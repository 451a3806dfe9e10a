"""``relay sink``: a scriptable SMTP sink for staging, load tests and the relay's own tests.

It accepts mail like a receiving MTA and does with it what it is told: store it in a Maildir, print one
line per message, or only count; and per recipient (address or domain), per sender, or by default, answer
with any reply or misbehave on purpose at a chosen stage of the session. The same server is a CLI tool
(:func:`register` adds ``relay sink``) and a Python API for tests (:class:`SinkServer`).

Scripting, by rules ``[STAGE:]MATCH=BEHAVIOUR`` (CLI ``--reply``, the ``[replies]`` table of a rules
file, or :meth:`SinkServer.set_rule`):

- STAGE — ``connect`` (instead of the greeting), ``ehlo`` (EHLO/HELO), ``mail`` (MATCH is the sender),
  ``rcpt`` (the default; MATCH is the recipient), ``data`` (the reply after the final dot; the first
  recipient of the message with a rule decides), ``body`` (while the message is being received).
- MATCH — an address (``user@example.org``), a domain (``example.org``) or ``*``; the most specific
  rule wins. ``<>`` matches the null sender at the ``mail`` stage. ``connect`` and ``ehlo`` take ``*``.
- BEHAVIOUR — a reply ``CODE [TEXT]`` (``550 5.1.1 no such user``; a 2xx reply accepts with that text;
  any 421 reply closes the connection after it is sent, as RFC 5321 3.8 says a server does); or
  ``accept``; ``disconnect`` (close without a reply); ``stall`` (stop answering and reading);
  ``garbage`` (a line that is not an SMTP reply); ``endless[:CODE]`` (a multi-line reply that never
  ends). At ``body`` only ``disconnect[:N]`` and ``stall[:N]``: after N bytes of message data.
  A ``554`` at ``connect`` refuses service and answers 503 to everything but QUIT (RFC 5321 3.1).

Invariants:
- The sink runs on the caller's event loop (``loop.create_server`` with aiosmtpd's protocol class, not
  aiosmtpd's threaded Controller), so tests and the relay under test share one loop.
- A message counts as received only once it is accepted with a 2xx after DATA; rejected ones are
  counted apart and never stored.
- Nothing a client does is unbounded: ``stall`` and ``endless`` end at the session timeout, ``endless``
  also after :data:`ENDLESS_REPLY_LINES` lines, and :meth:`SinkServer.stop` aborts every connection.
- It serves whatever it is given, so bind it to loopback or a staging network, never the internet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import mailbox
import re
import signal
import ssl
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr, Literal, TextIO, cast, get_args

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.log import get_logger
from relay.settings import ConfigError
from relay.transports import stream_transport

log = get_logger(__name__)

Stage = Literal["connect", "ehlo", "mail", "rcpt", "data", "body"]
Action = Literal["reply", "accept", "disconnect", "stall", "garbage", "endless"]
StartTls = Literal["on", "off", "broken", "broken-close"]
STAGES: tuple[str, ...] = get_args(Stage)
STARTTLS_MODES: tuple[str, ...] = get_args(StartTls)

DEFAULT_LISTEN = "127.0.0.1:2526"
#: What ``garbage`` sends: plausible text from the wrong kind of server, not an SMTP reply.
GARBAGE_REPLY = "HTTP/1.1 400 Bad Request -- this is not an SMTP server"
#: ``endless`` stops (and closes) after this many lines, whatever the client does.
ENDLESS_REPLY_LINES = 100_000
_REPLY = re.compile(r"^([2-5][0-9][0-9])(?: (.*))?$")
_DEFAULT_TEXT = {2: "2.0.0 OK", 4: "4.0.0 temporary failure (sink rule)", 5: "5.0.0 rejected (sink rule)"}


# --- rules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What to do at a stage: a reply (``code`` + ``text``) or one of the scripted misbehaviours."""

    action: Action
    code: int = 0
    text: str = ""
    after_bytes: int = 0

    @classmethod
    def parse(cls, spec: str) -> Behaviour:
        """``"550 5.1.1 no such user"``, ``"accept"``, ``"disconnect:1000"``, ``"endless:220"``, …"""
        spec = spec.strip()
        if "\r" in spec or "\n" in spec:
            raise ValueError("a behaviour is one line")
        word, colon, argument = spec.partition(":")
        if word in ("disconnect", "stall"):
            return cls(cast(Action, word), after_bytes=_count(argument) if colon else 0)
        if word == "endless":
            code = _count(argument) if colon else 0
            if colon and not 200 <= code <= 599:
                raise ValueError(f"bad reply code in {spec!r}")
            return cls("endless", code=code)
        if spec in ("accept", "garbage"):
            return cls(cast(Action, spec))
        match = _REPLY.match(spec)
        if match is None:
            raise ValueError(f"not a reply or behaviour: {spec!r} (expected e.g. '550 5.1.1 text', "
                             "'accept', 'disconnect', 'stall', 'garbage', 'endless')")
        code = int(match.group(1))
        return cls("reply", code=code, text=match.group(2) or _DEFAULT_TEXT[code // 100])

    @property
    def accepts(self) -> bool:
        return self.action == "accept" or (self.action == "reply" and 200 <= self.code < 300)

    @property
    def line(self) -> str:
        return f"{self.code} {self.text}"


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"expected a number, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class Rule:
    """``behaviour`` for ``match`` (address, domain or ``*``) at ``stage``."""

    match: str
    behaviour: Behaviour
    stage: Stage = "rcpt"

    @classmethod
    def parse(cls, spec: str) -> Rule:
        """``"[STAGE:]MATCH=BEHAVIOUR"``, as given to ``--reply``."""
        target, sep, behaviour = spec.partition("=")
        if not sep:
            raise ValueError(f"expected [STAGE:]MATCH=BEHAVIOUR, got {spec!r}")
        return cls.build(target, behaviour)

    @classmethod
    def build(cls, target: str, behaviour: str | Behaviour, stage: str | None = None) -> Rule:
        """A checked rule; ``target`` may carry a ``STAGE:`` prefix when ``stage`` is not given."""
        head, colon, rest = target.partition(":")
        if stage is None:
            stage, target = (head, rest) if colon and head in STAGES else ("rcpt", target)
            if colon and head not in STAGES and "[" not in head:  # only IPv6 literals hold a colon
                raise ValueError(f"unknown stage {head!r}; stages: {', '.join(STAGES)}")
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        parsed = behaviour if isinstance(behaviour, Behaviour) else Behaviour.parse(behaviour)
        match = target.strip().lower()
        if not match:
            raise ValueError("empty MATCH (use * for every address)")
        if stage in ("connect", "ehlo") and match != "*":
            raise ValueError(f"the {stage} stage takes * as MATCH")
        if stage == "body" and parsed.action not in ("disconnect", "stall"):
            raise ValueError("the body stage takes disconnect[:N] or stall[:N]")
        if stage != "body" and parsed.after_bytes:
            raise ValueError("a byte count only applies at the body stage")
        return cls(match, parsed, cast(Stage, stage))


class RuleSet:
    """Rules by (stage, match); lookups try the address, then its domain, then ``*``."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: dict[tuple[str, str], Behaviour] = {}
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule) -> None:
        self._rules[(rule.stage, rule.match)] = rule.behaviour

    def clear(self) -> None:
        self._rules.clear()

    def lookup(self, stage: Stage, address: str = "*") -> Behaviour | None:
        """The rule for the address, else for its domain, else the ``*`` rule, else None."""
        return self._specific(stage, address) or self._rules.get((stage, "*"))

    def first(self, stage: Stage, addresses: Iterable[str]) -> Behaviour | None:
        """The rule of the first address (or its domain) that has one, else the ``*`` rule."""
        for address in addresses:
            found = self._specific(stage, address)
            if found is not None:
                return found
        return self._rules.get((stage, "*"))

    def _specific(self, stage: Stage, address: str) -> Behaviour | None:
        address = address.lower()
        candidates = ["<>"] if address in ("", "<>") else [address, address.rpartition("@")[2]]
        for candidate in candidates:
            found = self._rules.get((stage, candidate))
            if found is not None:
                return found
        return None


# --- configuration and results -------------------------------------------------------------------------


@dataclass
class SinkConfig:
    """How the sink listens and behaves. ``port=0`` picks a free port (see ``SinkServer.port``)."""

    host: str = "127.0.0.1"
    port: int = 0
    hostname: str = "sink.localhost"
    greeting_delay: float = 0.0
    starttls: StartTls = "on"
    # With starttls "on" and no certificate, a self-signed one is generated for `hostname`.
    cert_file: Path | None = None
    key_file: Path | None = None
    pipelining: bool = True
    smtputf8: bool = True
    # Advertised SIZE and enforced limit in bytes; 0: none.
    size_limit: int = 0
    # Idle seconds before the sink closes a session (also ends stall/endless).
    timeout: float = 300.0
    rules: list[Rule] = field(default_factory=list)
    maildir: Path | None = None
    print_summary: bool = False
    # Keep accepted messages in SinkServer.received (tests); the CLI only counts, to bound memory.
    keep_messages: bool = True


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message; ``mail_from`` is ``""`` for the null sender; ``connection`` its index."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    connection: int = 0


@dataclass
class SinkStats:
    connections_opened: int = 0
    connections_closed: int = 0
    tls_sessions: int = 0
    messages: int = 0
    messages_rejected: int = 0
    recipients_accepted: int = 0
    recipients_rejected: int = 0
    bytes_received: int = 0

    def summary(self) -> str:
        return (f"connections={self.connections_opened} tls={self.tls_sessions} messages={self.messages} "
                f"rejected_messages={self.messages_rejected} recipients={self.recipients_accepted} "
                f"rejected_recipients={self.recipients_rejected} bytes={self.bytes_received}")


# --- the server ----------------------------------------------------------------------------------------


class SinkServer:
    """The sink on the running event loop: ``async with SinkServer(SinkConfig(...)) as sink: …``."""

    def __init__(self, config: SinkConfig | None = None, *, output: TextIO | None = None) -> None:
        self.config = config or SinkConfig()
        self.rules = RuleSet(self.config.rules)
        self.stats = SinkStats()
        self.received: list[ReceivedMessage] = []
        # messages_per_connection[i]: messages accepted on the i-th connection (connection reuse).
        self.messages_per_connection: list[int] = []
        self.host = self.config.host
        self.port = self.config.port
        self.certificate_pem: bytes | None = None
        self.tls_context: ssl.SSLContext | None = None
        self._output = output
        self._server: asyncio.Server | None = None
        self._sessions: set[_SinkSession] = set()
        self._maildir: mailbox.Maildir | None = None
        # mailbox.Maildir names files with a class-wide counter that threads could race on.
        self._maildir_lock = asyncio.Lock()
        self._arrivals: asyncio.Condition | None = None
        self._hooks = _Hooks(self)

    @property
    def connections_opened(self) -> int:
        return self.stats.connections_opened

    @property
    def connections_active(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        if self.config.size_limit < 0 or self.config.timeout <= 0:
            raise ValueError("size_limit must be >= 0 and timeout > 0")
        self.tls_context, self.certificate_pem = _tls_setup(self.config)
        if self.config.maildir is not None:
            self._maildir = mailbox.Maildir(self.config.maildir, create=True)
        self._arrivals = asyncio.Condition()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.config.host, self.config.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and abort every open session (a stalled client must not keep us waiting)."""
        if self._server is None:
            return
        self._server.close()
        tasks = [task for session in list(self._sessions) if (task := session.abort()) is not None]
        if tasks:
            # Bounded: a session stuck inside a failed TLS handshake must not hold the stop forever.
            await asyncio.wait(tasks, timeout=5.0)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> SinkServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def set_rule(self, match: str, behaviour: str | Behaviour, stage: Stage = "rcpt") -> None:
        """Script ``match`` (address, domain or ``*``) at ``stage``; replaces an earlier rule for it."""
        self.rules.add(Rule.build(match, behaviour, stage))

    def clear_rules(self) -> None:
        self.rules.clear()

    # A plain number suits the tests that call this better than an asyncio.timeout block around it.
    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:  # noqa: ASYNC109
        """Wait until ``count`` messages have been accepted in all; TimeoutError after ``timeout``."""
        assert self._arrivals is not None, "start() the sink first"
        async with asyncio.timeout(timeout), self._arrivals:
            await self._arrivals.wait_for(lambda: self.stats.messages >= count)
        return list(self.received)

    # -- used by the sessions ---------------------------------------------------------------------

    def _new_session(self) -> _SinkSession:
        session = _SinkSession(self, connection=len(self.messages_per_connection))
        self.messages_per_connection.append(0)
        return session

    def _opened(self, session: _SinkSession) -> None:
        self._sessions.add(session)
        self.stats.connections_opened += 1

    def _closed(self, session: _SinkSession) -> None:
        self._sessions.discard(session)
        self.stats.connections_closed += 1

    async def _accept(self, message: ReceivedMessage) -> str | None:
        """Store, print and count an accepted message; an error reply if it could not be stored."""
        if self._maildir is not None:
            try:
                async with self._maildir_lock:
                    await asyncio.to_thread(self._maildir.add, _with_envelope_headers(message))
            except (OSError, mailbox.Error) as exc:
                log.error("sink_maildir_write_failed", error=str(exc))
                return "451 4.3.0 cannot store the message now"
        self.stats.messages += 1
        self.stats.bytes_received += len(message.data)
        self.messages_per_connection[message.connection] += 1
        if self.config.keep_messages:
            self.received.append(message)
        if self.config.print_summary:
            print(_summary_line(message), file=self._output or sys.stdout, flush=True)
        if self._arrivals is not None:
            async with self._arrivals:
                self._arrivals.notify_all()
        return None

    def _ehlo_keywords(self, responses: list[str]) -> list[str]:
        """aiosmtpd's EHLO lines without AUTH (the sink has no users), with PIPELINING if enabled."""
        keywords = [line[4:] for line in responses[1:] if not line[4:].upper().startswith("AUTH")]
        if self.config.pipelining:
            keywords.insert(0, "PIPELINING")
        keywords = [k for k in keywords if k.upper() != "HELP"]
        lines = [responses[0][4:], *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


class _SinkSession(SMTP):
    """One SMTP connection: aiosmtpd's protocol with the stages the rules can script."""

    def __init__(self, sink: SinkServer, connection: int) -> None:
        self.sink = sink
        self.connection = connection
        self.lost = asyncio.Event()
        self._counted = False
        config = sink.config
        super().__init__(
            sink._hooks, hostname=config.hostname, ident="relay sink",
            data_size_limit=config.size_limit or None, enable_SMTPUTF8=config.smtputf8,
            decode_data=False, tls_context=sink.tls_context, timeout=config.timeout,
            loop=asyncio.get_running_loop(),
        )

    # -- connection life cycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starting_tls = self._original_transport is not None
        super().connection_made(transport)
        if starting_tls:
            self.sink.stats.tls_sessions += 1  # called again by the TLS layer once the handshake is done
        else:
            self._counted = True
            self.sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.lost.set()
        if self._counted:  # aiosmtpd may call this twice after a failed TLS handshake
            self._counted = False
            self.sink._closed(self)
        super().connection_lost(error)

    def abort(self) -> asyncio.Task[None] | None:
        """Drop the connection at once (server stop); the handler task to wait for."""
        for transport in (self.transport, self._original_transport):
            stream = stream_transport(transport)   # not isinstance: uvloop's transports fail it
            if stream is not None:
                stream.abort()
            elif transport is not None:
                transport.close()
        return self._handler_coroutine

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def closing(self) -> bool:
        return self.transport is None or bool(self.transport.is_closing())

    async def push(self, status: AnyStr) -> None:
        if not status or self.closing():
            return  # the connection was dropped on purpose: nothing more to say
        await super().push(status)
        head = status[:4] if isinstance(status, str) else status[:4].decode("ascii", "replace")
        if head in ("421", "421 "):  # the last (or only) line of a 421 reply
            self.drop()  # RFC 5321 3.8: after 421 the server closes the channel

    # -- scripted behaviours --------------------------------------------------------------------

    async def act(self, behaviour: Behaviour, positive_code: int = 250) -> str:
        """Carry out a behaviour that is not an acceptance; the line to send ('' for none)."""
        if behaviour.action == "reply":
            return behaviour.line
        if behaviour.action == "garbage":
            return GARBAGE_REPLY
        if behaviour.action == "disconnect":
            self.drop()
        elif behaviour.action == "stall":
            await self.lost.wait()  # ends when the client or the session timeout closes it
        elif behaviour.action == "endless":
            await self._endless(behaviour.code or positive_code)
        return ""

    async def _endless(self, code: int) -> None:
        filler = " this reply goes on and on" * 2
        with contextlib.suppress(ConnectionError):
            for number in range(ENDLESS_REPLY_LINES):
                if self.closing():
                    return
                await super().push(f"{code}-{number}{filler}")
        self.drop()

    async def _handle_client(self) -> None:
        if self.sink.config.greeting_delay > 0:
            await asyncio.sleep(self.sink.config.greeting_delay)
        behaviour = self.sink.rules.lookup("connect")
        if behaviour is None or behaviour.accepts:
            await super()._handle_client()
            return
        if behaviour.action == "reply" and behaviour.code == 554:
            await self.push(behaviour.line)
            await self._refuse_until_quit()
            return
        line = await self.act(behaviour, positive_code=220)
        await self.push(line)
        self.drop()

    async def _refuse_until_quit(self) -> None:
        """RFC 5321 3.1: after a 554 greeting, wait for QUIT and refuse every other command."""
        while not self.closing():
            line = await self._reader.readline()
            if not line:
                return
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 bye")
                self.drop()
                return
            await self.push("503 5.5.1 no SMTP service here")

    async def smtp_STARTTLS(self, arg: str) -> None:
        mode = self.sink.config.starttls
        if arg or mode not in ("broken", "broken-close"):
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        stream = stream_transport(self.transport)
        if mode == "broken" and stream is not None:
            stream.write(b"this is not a TLS handshake\r\n")
        self.drop()

    async def smtp_DATA(self, arg: str) -> None:
        behaviour = self._body_behaviour()
        if behaviour is None or arg or self.session is None or not self.session.host_name:
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._read_body(behaviour.after_bytes)
        if behaviour.action == "stall":
            await self.lost.wait()
        else:
            self.drop()

    def _body_behaviour(self) -> Behaviour | None:
        if self.envelope is None or not self.envelope.rcpt_tos:
            return None
        return self.sink.rules.first("body", self.envelope.rcpt_tos)

    async def _read_body(self, limit: int) -> None:
        """Read up to ``limit`` bytes of message data (less if the message ends first)."""
        received, tail = 0, b""
        while received < limit:
            chunk = await self._reader.read(min(65536, limit - received))
            if not chunk:
                return
            received += len(chunk)
            tail = (tail + chunk)[-5:]
            if tail == b"\r\n.\r\n":
                return


class _Hooks:
    """aiosmtpd's handler hooks: each applies the rules for its stage to the session that calls it."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: _SinkSession, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        behaviour = self.sink.rules.lookup("ehlo")
        if behaviour is not None and not behaviour.accepts:
            line = await server.act(behaviour)
            return [line] if line else []
        session.host_name = hostname
        return self.sink._ehlo_keywords(responses)

    async def handle_HELO(self, server: _SinkSession, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        behaviour = self.sink.rules.lookup("ehlo")
        if behaviour is not None and not behaviour.accepts:
            return await server.act(behaviour)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: _SinkSession, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        behaviour = self.sink.rules.lookup("mail", address)
        if behaviour is not None and not behaviour.accepts:
            return await server.act(behaviour)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return _accepted(behaviour, "250 2.1.0 sender OK")

    async def handle_RCPT(self, server: _SinkSession, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        behaviour = self.sink.rules.lookup("rcpt", address)
        if behaviour is not None and not behaviour.accepts:
            self.sink.stats.recipients_rejected += 1
            return await server.act(behaviour)
        self.sink.stats.recipients_accepted += 1
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return _accepted(behaviour, "250 2.1.5 recipient OK")

    async def handle_DATA(self, server: _SinkSession, session: Session, envelope: Envelope) -> str:
        behaviour = self.sink.rules.first("data", envelope.rcpt_tos)
        if behaviour is not None and not behaviour.accepts:
            self.sink.stats.messages_rejected += 1
            return await server.act(behaviour)
        sender = envelope.mail_from or ""
        message = ReceivedMessage(
            mail_from="" if sender == "<>" else sender, rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""), tls=session.ssl is not None,
            connection=server.connection,
        )
        failure = await self.sink._accept(message)
        return failure or _accepted(behaviour, "250 2.0.0 message accepted")


def _accepted(behaviour: Behaviour | None, default: str) -> str:
    return behaviour.line if behaviour is not None and behaviour.action == "reply" else default


def _with_envelope_headers(message: ReceivedMessage) -> bytes:
    """The message as an LDA stores it: Return-Path and one Delivered-To per recipient on top."""
    head = f"Return-Path: <{message.mail_from}>\r\n"
    head += "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in message.rcpt_tos)
    return head.encode("utf-8", "surrogateescape") + message.data


def _summary_line(message: ReceivedMessage) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rcpts = ",".join(f"<{rcpt}>" for rcpt in message.rcpt_tos)
    return (f"{when} conn={message.connection} from=<{message.mail_from}> to={rcpts} "
            f"size={len(message.data)} tls={'yes' if message.tls else 'no'}")


# --- TLS -----------------------------------------------------------------------------------------------


def self_signed_certificate(hostname: str) -> tuple[bytes, bytes]:
    """A throwaway EC certificate for ``hostname``, localhost and the loopback addresses (PEM cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(hostname), x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _tls_setup(config: SinkConfig) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The context STARTTLS uses (None: not offered) and the certificate served, for clients to trust."""
    if config.starttls == "off":
        return None, None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.starttls != "on":
        return context, None  # only advertised: the broken modes never reach a handshake
    if config.cert_file is not None:
        context.load_cert_chain(config.cert_file, config.key_file)
        return context, config.cert_file.read_bytes()
    cert_pem, key_pem = self_signed_certificate(config.hostname)
    # ssl loads chains from files only; they live just long enough to be read.
    with tempfile.TemporaryDirectory(prefix="relay-sink-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context, cert_pem


# --- CLI -----------------------------------------------------------------------------------------------

_EPILOG = """\
rules: [STAGE:]MATCH=BEHAVIOUR (repeat --reply; the most specific MATCH wins)
  STAGE      connect | ehlo | mail | rcpt (default) | data (reply after the final dot) | body
  MATCH      user@example.org | example.org | * ; <> is the null sender (mail stage);
             connect and ehlo take *
  BEHAVIOUR  CODE [TEXT]      reply, e.g. '550 5.1.1 no such user'; 2xx accepts;
                              any 421 closes the connection after the reply
             accept           accept as usual
             disconnect[:N]   close without a reply (body: after N bytes of message data)
             stall[:N]        stop reading and answering (body: after N bytes)
             garbage          answer with a line that is not SMTP
             endless[:CODE]   a multi-line reply that never ends
  A 554 at connect refuses service and answers 503 to all but QUIT.

examples:
  relay sink --reply 'bad.example=550 5.1.1 no such user' --reply 'slow.example=421 4.7.0 try later'
  relay sink --reply 'data:spam.example=554 5.7.1 rejected' --reply 'body:cut.example=disconnect:4096'
  relay sink --greeting '421 4.3.2 busy'      or  --greeting '554 5.3.2 no service'
  relay sink --greeting-delay 30 --starttls broken --no-pipelining --size-limit 1000000
  relay sink --maildir ./mail            store each accepted message (Return-Path, Delivered-To added)
  relay sink --count --report-every 10   only count; totals every 10 s and on exit

rules file (--rules FILE, TOML or JSON by extension; command-line flags override it):
  listen = "127.0.0.1:2526"        hostname = "sink.localhost"   timeout = 300
  greeting = "554 5.3.2 closed"    greeting_delay = 0.5          size_limit = 0
  starttls = "on"                  tls_cert = "cert.pem"         tls_key = "key.pem"
  pipelining = true                smtputf8 = true
  [replies]
  "bad.example" = "550 5.1.1 no such user"
  "data:spam.example" = "554 5.7.1 rejected"

Stops cleanly on SIGINT/SIGTERM and prints the totals. Bind it to loopback or a staging network only.
"""

_FILE_KEYS = {"listen", "hostname", "greeting", "greeting_delay", "starttls", "tls_cert", "tls_key",
              "pipelining", "smtputf8", "size_limit", "timeout", "replies"}


def register(subparsers: Any) -> None:
    """Add ``relay sink`` to the ``relay`` command."""
    parser = subparsers.add_parser(
        "sink", help="run a scriptable SMTP sink (staging, load tests)",
        description="A scriptable SMTP sink: accepts mail and stores, prints or counts it, answering "
                    "per recipient, sender or domain with scripted replies and failures.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"where to listen (default {DEFAULT_LISTEN})")
    parser.add_argument("--rules", metavar="FILE", help="TOML or JSON file of settings and replies")
    parser.add_argument("--reply", action="append", default=[], metavar="[STAGE:]MATCH=BEHAVIOUR",
                        help="script a reply or misbehaviour (repeatable; see below)")
    parser.add_argument("--greeting", metavar="BEHAVIOUR",
                        help="instead of the 220 greeting, e.g. '421 4.3.2 busy', '554 5.3.2 closed'")
    parser.add_argument("--greeting-delay", type=float, metavar="SECONDS", help="wait before greeting")
    parser.add_argument("--starttls", choices=STARTTLS_MODES,
                        help="on: real TLS (default); off: not offered; broken: 220 then garbage; "
                             "broken-close: 220 then close")
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate chain (default: self-signed)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    parser.add_argument("--hostname", help="name in the greeting and EHLO (default sink.localhost)")
    parser.add_argument("--no-pipelining", action="store_true", help="do not advertise PIPELINING")
    parser.add_argument("--no-smtputf8", action="store_true", help="do not offer SMTPUTF8")
    parser.add_argument("--size-limit", type=int, metavar="BYTES", help="advertise and enforce SIZE")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="idle session timeout (300)")
    parser.add_argument("--maildir", metavar="DIR", help="store accepted messages in this Maildir")
    parser.add_argument("--print", dest="print_summary", action="store_true",
                        help="print one line per accepted message (the default without other outputs)")
    parser.add_argument("--count", action="store_true", help="only count; print totals on exit")
    parser.add_argument("--report-every", type=float, metavar="SECONDS", help="print totals periodically")
    parser.set_defaults(func=run_sink_command)


def config_from_args(args: argparse.Namespace) -> SinkConfig:
    """The sink's configuration from ``--rules`` and the flags (flags win); ConfigError if invalid."""
    file: dict[str, Any] = _read_rules_file(Path(args.rules)) if args.rules else {}
    try:
        return _build_config(file, args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"sink: {exc}") from None


def _build_config(file: dict[str, Any], args: argparse.Namespace) -> SinkConfig:
    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else file.get(key, default)

    host, port = _parse_listen(str(pick(args.listen, "listen", DEFAULT_LISTEN)))
    rules = [Rule.build(str(target), str(spec)) for target, spec in dict(file.get("replies", {})).items()]
    rules += [Rule.parse(spec) for spec in args.reply]
    greeting = pick(args.greeting, "greeting", None)
    if greeting is not None:
        rules.append(Rule.build("*", str(greeting), "connect"))
    starttls = str(pick(args.starttls, "starttls", "on"))
    if starttls not in STARTTLS_MODES:
        raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}")
    cert, key = pick(args.tls_cert, "tls_cert", None), pick(args.tls_key, "tls_key", None)
    if (cert is None) != (key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    print_summary = bool(args.print_summary or not (args.maildir or args.count))
    return SinkConfig(
        host=host, port=port, hostname=str(pick(args.hostname, "hostname", "sink.localhost")),
        greeting_delay=float(pick(args.greeting_delay, "greeting_delay", 0.0)),
        starttls=cast(StartTls, starttls), cert_file=Path(cert) if cert else None,
        key_file=Path(key) if key else None,
        pipelining=not args.no_pipelining and bool(file.get("pipelining", True)),
        smtputf8=not args.no_smtputf8 and bool(file.get("smtputf8", True)),
        size_limit=int(pick(args.size_limit, "size_limit", 0)),
        timeout=float(pick(args.timeout, "timeout", 300.0)), rules=rules,
        maildir=Path(args.maildir) if args.maildir else None, print_summary=print_summary,
        keep_messages=False,
    )


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _read_rules_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML decode errors are ValueErrors
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_FILE_KEYS))}")
    if not isinstance(data.get("replies", {}), dict):
        raise ConfigError(f"{path}: replies must be a table of \"[STAGE:]MATCH\" = \"BEHAVIOUR\"")
    return data


def run_sink_command(args: argparse.Namespace) -> int:
    """``relay sink``: serve until SIGINT/SIGTERM; 0 on a clean stop, 1 if it cannot listen."""
    config = config_from_args(args)
    # --count needs nothing more here: counting is always on, and --count turns the default --print off.
    return asyncio.run(_serve(config, report_every=args.report_every))


async def _serve(config: SinkConfig, *, report_every: float | None) -> int:
    sink = SinkServer(config)
    try:
        await sink.start()
    except (OSError, ssl.SSLError) as exc:
        print(f"relay sink: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"relay sink: listening on {sink.host}:{sink.port} (STARTTLS {config.starttls})",
          file=sys.stderr, flush=True)
    reporter = loop.create_task(_report(sink, report_every)) if report_every else None
    try:
        await stop.wait()
    finally:
        if reporter is not None:
            reporter.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await sink.stop()
    print(f"relay sink: totals {sink.stats.summary()}", flush=True)
    return 0


async def _report(sink: SinkServer, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        print(f"relay sink: {sink.stats.summary()}", flush=True)

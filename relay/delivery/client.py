"""The outbound SMTP client: one :class:`DeliveryConnection` per remote host, carrying many messages.

aiosmtplib opens the session — TCP connect (our own socket, so the connect and greeting stages have
their own timeouts), greeting, EHLO with HELO fall-back, STARTTLS with the MX name for SNI and
verification, AUTH. The mail transactions then run over :class:`ReplyReader`, installed as the
transport's protocol: it keeps *every* reply in order, which is what PIPELINING (RFC 2920) needs —
aiosmtplib reads exactly one reply per command and drops bytes that arrive while it is not waiting,
so MAIL + RCPTs + DATA cannot be written in one go through it. Without PIPELINING the same reader runs
the commands one at a time.

TLS per route: ``none``; ``opportunistic`` (STARTTLS when offered, no verification; when the handshake
fails the host is reconnected in plaintext and remembered in :class:`TlsFallbackMemory`, so the next
connections go plaintext directly); ``required`` (no STARTTLS or a failed handshake is a temporary
``tls`` failure); ``verified`` (certificate chain and host name checked). AUTH only ever runs over TLS.

Invariants:
- :meth:`DeliveryConnection.open` and :meth:`DeliveryConnection.send` never raise (cancellation aside):
  resets, timeouts, garbage or endless replies (capped at :data:`MAX_REPLY_BYTES`), TLS errors and
  anything unexpected become a :class:`Failure`, which is temporary unless the client itself decided
  otherwise (SIZE, SMTPUTF8).
- ``send`` returns one result per recipient, in order: the :class:`Reply` that settled it (its RCPT
  refusal, or the reply to MAIL / DATA / the final dot) or a :class:`Failure` when no reply did.
- Every stage has its own timeout (RFC 5321 4.5.3.2); a hung peer costs at most that stage's timeout.
- After any failure that leaves the protocol state unknown the connection is closed and never reused.
- Passwords never reach a log line; replies are logged only as cleaned :class:`Reply` text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import aiosmtplib
import idna

from relay.delivery.config import TimeoutSettings
from relay.delivery.replies import MAX_REPLY_BYTES, ProtocolViolation, ReplyReader
from relay.log import get_logger
from relay.policies.bounce import Classification, FailureKind, Reply
from relay.policies.routing import TlsMode
from relay.transports import stream_transport

log = get_logger(__name__)

#: The message body is written in pieces of this size so that flow control can be honoured.
_WRITE_CHUNK = 256 * 1024
#: QUIT is a courtesy: never wait long for its reply.
_QUIT_TIMEOUT = 5.0

Stage = Literal["connect", "greeting", "ehlo", "starttls", "auth", "rset", "mail", "rcpt", "data",
                "data_end"]
#: Stages before a mail transaction: a failure there says nothing about any recipient, so the delivery
#: loop may try another host (and counts it towards the destination's circuit breaker).
SESSION_STAGES: frozenset[str] = frozenset({"connect", "greeting", "ehlo", "starttls", "auth", "rset"})

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_SIZE_PARAM = re.compile(r"^\d+$")
# A mailbox must not smuggle a command separator or control character onto the wire.
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    """One host to connect to: ``name`` for TLS SNI/verification and logs, ``address`` to dial."""

    name: str
    address: str
    port: int = 25

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Failure:
    """A recipient without a settling reply: why, at which stage.

    ``reply`` is the peer's reply when the failure was one at session level (a 421 greeting, a refused
    EHLO); ``verdict`` is set when the client decided the outcome itself (a message above the advertised
    SIZE, SMTPUTF8 needed but not offered) and the classifier must not be asked.
    """

    kind: FailureKind
    stage: str
    detail: str
    reply: Reply | None = None
    verdict: Classification | None = None

    @property
    def session_level(self) -> bool:
        return self.stage in SESSION_STAGES

    def __str__(self) -> str:
        return str(self.reply) if self.reply is not None else f"{self.kind} failure at {self.stage}: " \
                                                                f"{self.detail}"


SendResult = Reply | Failure


class EnvelopeMessage(Protocol):
    """What ``send`` needs of a message (``StoredMessage`` and ``NewMessage`` both fit)."""

    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def smtputf8(self) -> bool: ...
    @property
    def envid(self) -> str | None: ...
    @property
    def ret(self) -> str | None: ...


class EnvelopeRecipient(Protocol):
    """What ``send`` needs of a recipient (``RecipientRow`` and ``NewRecipient`` both fit)."""

    @property
    def address(self) -> str: ...
    @property
    def notify(self) -> str | None: ...
    @property
    def orcpt(self) -> str | None: ...


class _SessionError(Exception):
    """Internal: ends a session set-up or a transaction; carries the failure to report."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


class _FallBackToPlaintext(Exception):
    """Internal: an opportunistic STARTTLS handshake failed; reconnect without it."""


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------

class TlsFallbackMemory:
    """Hosts whose STARTTLS handshake failed recently: opportunistic routes go plaintext to them directly.

    Keyed by address and port (what failed is that server's TLS, whatever name it was reached by).
    Bounded: expired entries are dropped whenever a new one is added.
    """

    def __init__(self, duration: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.duration = duration
        self._clock = clock
        self._until: dict[tuple[str, int], float] = {}

    def remember(self, target: Target) -> None:
        now = self._clock()
        self._until = {key: until for key, until in self._until.items() if until > now}
        self._until[(target.address, target.port)] = now + self.duration

    def plaintext(self, target: Target) -> bool:
        until = self._until.get((target.address, target.port))
        return until is not None and until > self._clock()


class TlsContexts:
    """Client TLS contexts, built once (loading the system CA store is expensive)."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self.ca_file = ca_file

    @functools.cached_property
    def unverified(self) -> ssl.SSLContext:
        """Encryption without authentication: what opportunistic and ``required`` routes use (RFC 7435)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    @functools.cached_property
    def verified(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.ca_file is not None:
            context.load_verify_locations(cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How to talk to one destination: our name, the route's TLS and credentials, the limits."""

    ehlo_hostname: str
    timeouts: TimeoutSettings
    tls: TlsMode = "opportunistic"
    contexts: TlsContexts | None = None
    username: str | None = None
    password: str | None = None
    max_messages: int = 100
    # False sends one command at a time even when the server offers PIPELINING (benchmarks, debugging).
    pipelining: bool = True

    def __repr__(self) -> str:  # never show the password
        return (f"ClientOptions(ehlo_hostname={self.ehlo_hostname!r}, tls={self.tls!r}, "
                f"username={self.username!r}, max_messages={self.max_messages})")


# ------------------------------------------------------------------------------------------------
# The connection
# ------------------------------------------------------------------------------------------------

class DeliveryConnection:
    """A session with one remote host; :meth:`send` may be called for many messages in turn.

    Not safe for concurrent use: one transaction at a time (the delivery loop gives each connection to
    one worker).
    """

    def __init__(self, target: Target, options: ClientOptions, tls_memory: TlsFallbackMemory) -> None:
        self.target = target
        self.options = options
        self._tls_memory = tls_memory
        self._contexts = options.contexts or TlsContexts()
        self._smtp: aiosmtplib.SMTP | None = None
        self._reader: ReplyReader | None = None
        self._extensions: dict[str, str] = {}
        self._broken = False
        self._needs_rset = False
        self.messages_sent = 0
        self.transactions = 0
        self.tls_version: str | None = None
        self.fell_back_to_plaintext = False

    # -- state --------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return (self._reader is not None and not self._broken and self._reader.closed is None
                and self._reader.violation is None)

    @property
    def usable(self) -> bool:
        """Healthy (or not opened yet) and below the per-connection message limit: fit for a message."""
        fresh = self._reader is None and not self._broken
        return (fresh or self.is_open) and self.transactions < self.options.max_messages

    def supports(self, extension: str) -> bool:
        return extension.lower() in self._extensions

    def extension(self, extension: str) -> str | None:
        return self._extensions.get(extension.lower())

    # -- session set-up -----------------------------------------------------------------------------
    async def open(self) -> Failure | None:
        """Connect and set the session up; None when ready, else why not (never raises)."""
        if self._reader is not None or self._broken:
            return None if self.is_open else Failure("connect", "connect", "connection already used up")
        plaintext = self.options.tls == "none" or (
            self.options.tls == "opportunistic" and self._tls_memory.plaintext(self.target))
        try:
            try:
                await self._open_session(starttls=not plaintext)
            except _FallBackToPlaintext as exc:
                self._tls_memory.remember(self.target)
                self.fell_back_to_plaintext = True
                log.warning("tls_fallback_plaintext", mx=str(self.target), cause=str(exc),
                            remember_seconds=self._tls_memory.duration)
                await self._open_session(starttls=False)
        except _SessionError as exc:
            self._abort()
            return exc.failure
        except Exception as exc:  # contained: an unforeseen error is a temporary failure, logged
            log.exception("delivery_session_crashed", mx=str(self.target))
            self._abort()
            return Failure("protocol", "connect", f"unexpected {type(exc).__name__}: {exc}")
        return None

    async def _open_session(self, *, starttls: bool) -> None:
        smtp = await self._connect()
        self._smtp = smtp
        await self._greet(smtp)
        if starttls:
            await self._negotiate_tls(smtp)
        elif self.options.tls in ("required", "verified"):
            raise _SessionError(Failure("tls", "starttls", "TLS required but not attempted"))
        if self.options.username is not None:
            await self._authenticate(smtp)
        self._install_reader(smtp)

    async def _connect(self) -> aiosmtplib.SMTP:
        timeouts = self.options.timeouts
        sock = await self._dial(timeouts.connect)
        smtp = aiosmtplib.SMTP(local_hostname=self.options.ehlo_hostname, start_tls=False,
                               timeout=timeouts.ehlo)
        try:
            await smtp.connect(sock=sock, timeout=timeouts.greeting, start_tls=False)
        except aiosmtplib.SMTPConnectResponseError as exc:
            # code <= 0: aiosmtplib's own verdict on bytes that were no reply (garbage, too long), not a code
            raise _SessionError(Failure("protocol", "greeting", f"greeting refused: {exc.message[:200]}",
                                        reply=_reply(exc.code, exc.message) if exc.code > 0 else None)) from None
        except aiosmtplib.SMTPTimeoutError:
            raise _SessionError(Failure("timeout", "greeting", "no greeting in time")) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _SessionError(Failure("protocol", "greeting", f"bad greeting: {exc.message[:200]}")) \
                from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _SessionError(Failure("connect", "greeting", f"lost before the greeting: {exc}")) \
                from None
        return smtp

    async def _dial(self, limit: float) -> socket.socket:
        """Our own TCP connect, so that it has its own timeout (aiosmtplib's covers the greeting too)."""
        family = socket.AF_INET6 if ":" in self.target.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(limit):
                await asyncio.get_running_loop().sock_connect(sock, (self.target.address, self.target.port))
        except TimeoutError:
            sock.close()
            raise _SessionError(Failure("timeout", "connect", f"connect timed out after {limit:g}s")) \
                from None
        except OSError as exc:
            sock.close()
            raise _SessionError(Failure("connect", "connect", f"connect failed: {exc.strerror or exc}")) \
                from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _greet(self, smtp: aiosmtplib.SMTP) -> None:
        """EHLO, falling back to HELO when EHLO is refused with a 5xx (RFC 5321 3.2)."""
        timeout = self.options.timeouts.ehlo
        try:
            try:
                await smtp.ehlo(timeout=timeout)
            except aiosmtplib.SMTPHeloError as exc:
                if not (500 <= exc.code < 600 and smtp.is_connected):
                    raise
                await smtp.helo(timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            failure_kind: FailureKind = "protocol"
            # code <= 0: aiosmtplib's own verdict (an endless or garbled reply), not a code the server sent
            raise _SessionError(Failure(failure_kind, "ehlo", f"EHLO/HELO refused: {exc.message[:200]}",
                                        reply=_reply(exc.code, exc.message) if exc.code > 0 else None)) from None
        except aiosmtplib.SMTPTimeoutError:
            raise _SessionError(Failure("timeout", "ehlo", "no reply to EHLO in time")) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _SessionError(Failure("connect", "ehlo", f"lost during EHLO: {exc}")) from None
        self._extensions = dict(smtp.esmtp_extensions)

    async def _negotiate_tls(self, smtp: aiosmtplib.SMTP) -> None:
        mode = self.options.tls
        if mode == "none":
            return
        if not smtp.supports_extension("starttls"):
            if mode == "opportunistic":
                return
            raise _SessionError(Failure("tls", "starttls", "STARTTLS required but not offered"))
        context = self._contexts.verified if mode == "verified" else self._contexts.unverified
        try:
            await smtp.starttls(server_hostname=self.target.name, tls_context=context,
                                timeout=self.options.timeouts.ehlo)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 400 and smtp.is_connected and mode == "opportunistic":
                # A refused STARTTLS leaves the session as it was (RFC 3207 4): carry on in plaintext.
                log.info("starttls_refused", mx=str(self.target), reply=str(_reply(exc.code, exc.message)))
                return
            raise _SessionError(Failure("tls", "starttls", "STARTTLS refused",
                                        reply=_reply(exc.code, exc.message) if exc.code > 0 else None)) \
                from None
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            detail = f"TLS handshake failed: {type(exc).__name__}: {exc}"
            if mode == "opportunistic":
                raise _FallBackToPlaintext(detail) from None
            raise _SessionError(Failure("tls", "starttls", detail)) from None
        self.tls_version = _tls_version(smtp)
        await self._greet(smtp)  # RFC 3207 4.2: forget what was learnt before TLS, ask again

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> None:
        if self.tls_version is None:
            # Routing refuses credentials without required/verified TLS; this is the last line of defence.
            raise _SessionError(Failure("tls", "auth", "refusing to send credentials without TLS"))
        if not smtp.supports_extension("auth"):
            raise _SessionError(Failure("protocol", "auth", "server does not offer AUTH"))
        try:
            await smtp.login(self.options.username or "", self.options.password or "",
                             timeout=self.options.timeouts.ehlo)
        except aiosmtplib.SMTPResponseException as exc:
            # Our credentials being refused is our configuration problem, never the recipient's: the
            # reply goes into the detail and the failure stays temporary.
            raise _SessionError(Failure("protocol", "auth",
                                        f"authentication refused: {_reply(exc.code, exc.message)}")) \
                from None
        except aiosmtplib.SMTPTimeoutError:
            raise _SessionError(Failure("timeout", "auth", "no reply to AUTH in time")) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _SessionError(Failure("protocol", "auth", f"AUTH failed: {exc}")) from None

    def _install_reader(self, smtp: aiosmtplib.SMTP) -> None:
        transport = stream_transport(smtp.transport)   # not isinstance: uvloop's transports fail it
        if transport is None or transport.is_closing():
            raise _SessionError(Failure("connect", "ehlo", "connection lost after EHLO"))
        reader = ReplyReader(transport.get_protocol(), transport)
        transport.set_protocol(reader)
        self._reader = reader

    # -- sending ------------------------------------------------------------------------------------
    async def send(self, message: EnvelopeMessage, data: bytes,
                   recipients: Sequence[EnvelopeRecipient]) -> list[SendResult]:
        """Deliver ``data`` to ``recipients`` in one transaction; one result per recipient, in order."""
        if not recipients:
            return []
        failure = await self.open() if self._reader is None else None
        if failure is None and not self.is_open:
            failure = Failure("connect", "rset", "connection no longer usable")
        if failure is not None:
            return [failure] * len(recipients)
        results: list[SendResult | None] = [None] * len(recipients)
        self._refuse_locally(message, data, recipients, results)
        wanted = [i for i, result in enumerate(results) if result is None]
        if not wanted:
            return [r for r in results if r is not None]
        self.transactions += 1
        stage = "rset"
        try:
            stage = await self._transaction(message, data, recipients, wanted, results)
        except _SessionError as exc:
            self._fill(results, exc.failure)
            self._abort()
        except Exception as exc:  # contained: an unforeseen error fails the attempt, temporarily
            log.exception("delivery_transaction_crashed", mx=str(self.target), queue_id=message.id)
            self._fill(results, Failure("protocol", stage, f"unexpected {type(exc).__name__}: {exc}"))
            self._abort()
        return [r if r is not None else Failure("protocol", stage, "no result") for r in results]

    @staticmethod
    def _fill(results: list[SendResult | None], failure: Failure) -> None:
        for index, result in enumerate(results):
            if result is None:
                results[index] = failure

    def _refuse_locally(self, message: EnvelopeMessage, data: bytes,
                        recipients: Sequence[EnvelopeRecipient], results: list[SendResult | None]) -> None:
        """Decide without sending what the server's advertised extensions already decide."""
        size_limit = self._size_limit()
        if size_limit and len(data) > size_limit:
            self._fill(results, _local_failure(
                "mail", f"message of {len(data)} bytes exceeds the SIZE {size_limit} of {self.target}",
                552, "5.3.4", "message too large for the destination server", "message_too_large"))
            return
        unsafe = _unsafe_address(message.sender)
        if unsafe:
            self._fill(results, _local_failure("mail", unsafe, 553, "5.1.7", "bad sender address",
                                               "invalid_sender"))
            return
        has_utf8 = self.supports("smtputf8")
        if not has_utf8 and (message.smtputf8 or not _ascii_ok(message.sender)):
            self._fill(results, _smtputf8_refusal(self.target, "5.6.9", "message"))
            return
        for index, rcpt in enumerate(recipients):
            unsafe = _unsafe_address(rcpt.address)
            if unsafe:
                results[index] = _local_failure("rcpt", unsafe, 553, "5.1.3", "bad recipient address",
                                                "invalid_recipient")
            elif not has_utf8 and not _ascii_ok(rcpt.address):
                results[index] = _smtputf8_refusal(self.target, "5.6.7", "recipient address")

    def _size_limit(self) -> int:
        value = self.extension("size")
        return int(value) if value is not None and _SIZE_PARAM.match(value.strip()) else 0

    async def _transaction(self, message: EnvelopeMessage, data: bytes,
                           recipients: Sequence[EnvelopeRecipient], wanted: list[int],
                           results: list[SendResult | None]) -> str:
        """One mail transaction; fills ``results``; returns the stage reached (for crash reports)."""
        reader = self._reader
        assert reader is not None  # send() opened the session
        if reader.pending:
            raise _SessionError(Failure("protocol", "rset", "server sent replies out of turn"))
        if self._needs_rset:
            await self._rset(reader)
        utf8 = self.supports("smtputf8") and (message.smtputf8 or not all(
            _ascii_ok(a) for a in [message.sender, *(recipients[i].address for i in wanted)]))
        mail = self._mail_command(message, data, utf8)
        rcpts = [self._rcpt_command(recipients[i], utf8) for i in wanted]
        self._needs_rset = True  # until the transaction completes cleanly
        if self.options.pipelining and self.supports("pipelining"):
            accepted = await self._envelope_pipelined(reader, mail, rcpts, wanted, results)
        else:
            accepted = await self._envelope_stepwise(reader, mail, rcpts, wanted, results)
        if not accepted:
            return "rcpt"
        final = await self._body(reader, data)
        for index in accepted:
            results[index] = final
        if final.code // 100 == 2:
            self.messages_sent += 1
            self._needs_rset = False
        return "data_end"

    async def _envelope_pipelined(self, reader: ReplyReader, mail: bytes, rcpts: list[bytes],
                                  wanted: list[int], results: list[SendResult | None]) -> list[int]:
        """RFC 2920: MAIL, every RCPT and DATA in one write; then the replies in order."""
        self._write(reader, mail + b"".join(rcpts) + b"DATA\r\n", "mail")
        timeouts = self.options.timeouts
        mail_reply = await self._reply(reader, "mail", timeouts.mail)
        self._closing_reply(mail_reply, wanted, results)
        accepted: list[int] = []
        for index in wanted:
            reply = await self._reply(reader, "rcpt", timeouts.rcpt)
            if mail_reply.code // 100 != 2:
                results[index] = mail_reply
            elif reply.code // 100 == 2:
                accepted.append(index)
            else:
                results[index] = reply
                self._closing_reply(reply, wanted, results)
        data_reply = await self._reply(reader, "data", timeouts.data_init)
        self._closing_reply(data_reply, accepted, results)
        if data_reply.code == 354 and not accepted:
            # The server opened DATA with nobody to deliver to; ending it would send an empty message.
            raise _SessionError(Failure("protocol", "data", "354 to DATA without an accepted recipient"))
        if accepted and data_reply.code != 354:
            for index in accepted:
                results[index] = data_reply
            return []
        return accepted

    async def _envelope_stepwise(self, reader: ReplyReader, mail: bytes, rcpts: list[bytes],
                                 wanted: list[int], results: list[SendResult | None]) -> list[int]:
        timeouts = self.options.timeouts
        self._write(reader, mail, "mail")
        mail_reply = await self._reply(reader, "mail", timeouts.mail)
        if mail_reply.code // 100 != 2:
            for index in wanted:
                results[index] = mail_reply
            return []
        accepted: list[int] = []
        for index, command in zip(wanted, rcpts, strict=True):
            self._write(reader, command, "rcpt")
            reply = await self._reply(reader, "rcpt", timeouts.rcpt)
            if reply.code // 100 == 2:
                accepted.append(index)
            else:
                results[index] = reply
        if not accepted:
            return []
        self._write(reader, b"DATA\r\n", "data")
        data_reply = await self._reply(reader, "data", timeouts.data_init)
        if data_reply.code != 354:
            for index in accepted:
                results[index] = data_reply
            return []
        return accepted

    async def _body(self, reader: ReplyReader, data: bytes) -> Reply:
        """Write the dot-stuffed message and the final dot; return the reply to it."""
        payload = _dot_stuffed(data)
        timeouts = self.options.timeouts
        try:
            for start in range(0, len(payload), _WRITE_CHUNK):
                reader.write(payload[start:start + _WRITE_CHUNK])
                async with asyncio.timeout(timeouts.data_block):
                    await reader.drain()
        except TimeoutError:
            raise _SessionError(Failure("timeout", "data_end",
                                        f"no progress writing the message for {timeouts.data_block:g}s")) \
                from None
        except ConnectionError as exc:
            raise _SessionError(Failure("connect", "data_end", f"lost while writing the message: {exc}")) \
                from None
        return await self._reply(reader, "data_end", timeouts.data_end)

    async def _rset(self, reader: ReplyReader) -> None:
        self._write(reader, b"RSET\r\n", "rset")
        reply = await self._reply(reader, "rset", self.options.timeouts.ehlo)
        if reply.code // 100 != 2:
            raise _SessionError(Failure("protocol", "rset", f"RSET refused: {reply}"))
        self._needs_rset = False

    @staticmethod
    def _write(reader: ReplyReader, data: bytes, stage: str) -> None:
        try:
            reader.write(data)
        except ConnectionError as exc:
            raise _SessionError(Failure("connect", stage, f"cannot send: {exc}")) from None

    @staticmethod
    def _closing_reply(reply: Reply, pending: list[int], results: list[SendResult | None]) -> None:
        """A 421 ends the session (RFC 5321 3.8): it settles every recipient still waiting for a reply."""
        if reply.code != 421:
            return
        for index in pending:
            if results[index] is None:
                results[index] = reply
        raise _SessionError(Failure("protocol", "mail", f"server closing: {reply}", reply=reply))

    async def _reply(self, reader: ReplyReader, stage: Stage, limit: float) -> Reply:
        """The next reply within the stage's timeout; anything else ends the session."""
        try:
            async with asyncio.timeout(limit):
                reply = await reader.read_reply()
        except TimeoutError:
            raise _SessionError(Failure("timeout", stage, f"no reply in {limit:g}s")) from None
        except ProtocolViolation as exc:
            raise _SessionError(Failure("protocol", stage, str(exc))) from None
        except ConnectionError as exc:
            raise _SessionError(Failure("connect", stage, str(exc))) from None
        expected = (2, 3, 4, 5) if stage == "data" else (2, 4, 5)
        if reply.code // 100 not in expected:
            raise _SessionError(Failure("protocol", stage, f"unexpected reply {reply}"))
        if reply.code == 421:
            self._broken = True  # the server is closing the session; never reuse it
        return reply

    def _mail_command(self, message: EnvelopeMessage, data: bytes, utf8: bool) -> bytes:
        params = []
        if self.supports("size"):
            params.append(f"SIZE={len(data)}")
        if self.supports("8bitmime") and not data.isascii():
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        if self.supports("dsn"):
            if message.ret:
                params.append(f"RET={message.ret}")
            if message.envid:
                params.append(f"ENVID={message.envid}")
        return _command("MAIL FROM:", _wire_address(message.sender, utf8), params, utf8)

    def _rcpt_command(self, rcpt: EnvelopeRecipient, utf8: bool) -> bytes:
        params = []
        if self.supports("dsn"):
            if rcpt.notify:
                params.append(f"NOTIFY={rcpt.notify}")
            if rcpt.orcpt:
                params.append(f"ORCPT={rcpt.orcpt}")
        return _command("RCPT TO:", _wire_address(rcpt.address, utf8), params, utf8)

    # -- closing ------------------------------------------------------------------------------------
    async def close(self) -> None:
        """QUIT politely when the session is healthy, then close the socket (never raises)."""
        reader = self._reader
        if reader is not None and self.is_open:
            try:
                reader.write(b"QUIT\r\n")
                async with asyncio.timeout(min(_QUIT_TIMEOUT, self.options.timeouts.ehlo)):
                    await reader.read_reply()
            except (TimeoutError, ConnectionError, ProtocolViolation):
                pass  # QUIT is a courtesy; the socket closes below either way
        self._abort()

    def close_nowait(self) -> None:
        """Close the socket at once, without QUIT (shutdown, cancellation, stale idle connections)."""
        self._abort()

    def _abort(self) -> None:
        """Close the socket without ceremony; the connection is never used again."""
        self._broken = True
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            with contextlib.suppress(Exception):  # closing an already-dead transport must not raise
                smtp.close()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _reply(code: int, message: str) -> Reply:
    """aiosmtplib keeps a reply as (code, lines joined by LF without their codes): rebuild a Reply."""
    if code <= 0:
        return Reply(0, None, message[:200])
    return Reply.parse([f"{code} {line}" for line in (message.split("\n") or [""])])


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    transport = smtp.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None


def _local_failure(stage: str, detail: str, code: int, enhanced: str, text: str,
                   category: str) -> Failure:
    return Failure("protocol", stage, detail, reply=Reply(code, enhanced, text),
                   verdict=Classification("permanent", category, enhanced, rule="local"))


def _smtputf8_refusal(target: Target, enhanced: str, what: str) -> Failure:
    return _local_failure(
        "mail", f"the {what} needs SMTPUTF8, which {target} does not offer", 553 if what != "message" else 554,
        enhanced, f"the {what} needs SMTPUTF8, which the destination server does not support",
        "smtputf8_unsupported")


def _unsafe_address(address: str) -> str | None:
    if len(address) > 320 or _UNSAFE_ADDRESS.search(address):
        return f"address {address[:80]!r} cannot be sent safely"
    return None


def _ascii_ok(address: str) -> bool:
    """Whether the address can go without SMTPUTF8 (a non-ASCII domain is sent as its A-label)."""
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return False
    return domain.isascii() or _a_label(domain) is not None


def _a_label(domain: str) -> str | None:
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def _wire_address(address: str, utf8: bool) -> str:
    if utf8 or address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{_a_label(domain) or domain}"


def _command(verb: str, address: str, params: list[str], utf8: bool) -> bytes:
    line = f"{verb}<{address}>" + "".join(f" {p}" for p in params) + "\r\n"
    return line.encode("utf-8" if utf8 else "ascii", errors="strict")


def _dot_stuffed(data: bytes) -> bytes:
    """CRLF line endings throughout, leading dots doubled (RFC 5321 4.5.2), then the final dot.

    Queued mail is CRLF already (the accept path refuses bare CR/LF), so the regex rewrite of line ends —
    ~50 µs for 10 KB, a quarter of a delivery's Python time — runs only when a bare CR or LF is there.
    With CRLF throughout, every line start but the first follows a CRLF: the dots are doubled with
    ``bytes.replace``."""
    crlf = data.count(b"\r\n")
    body = data if data.count(b"\r") == crlf == data.count(b"\n") else _LINE_ENDINGS.sub(b"\r\n", data)
    body = body.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


__all__ = [
    "MAX_REPLY_BYTES",
    "SESSION_STAGES",
    "ClientOptions",
    "DeliveryConnection",
    "EnvelopeMessage",
    "EnvelopeRecipient",
    "Failure",
    "SendResult",
    "Target",
    "TlsContexts",
    "TlsFallbackMemory",
]

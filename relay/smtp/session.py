"""One inbound SMTP session: aiosmtpd's protocol machinery with relay's command loop and policies.

We keep from aiosmtpd what is hard to get right — the asyncio protocol, the STARTTLS transport swap and
the idle timer — and replace the command loop and the mail commands, because relay needs what the
library's defaults do not give: enhanced status codes on every reply, a budget of bad commands, clean
answers to NUL bytes and invalid UTF-8, a chunked DATA reader that refuses bare CR/LF, AUTH that never
runs bcrypt on the loop, relay permission, rate limits and a durable commit before ``250``.

Invariants:
- ``250 … queued as <id>`` is sent only after :meth:`QueueStore.enqueue` returned; any failure on the
  accept path answers ``451 4.3.0`` and the transaction is forgotten (nothing half-stored).
- A client that is neither authenticated nor in the listener's trusted networks gets ``550 5.7.1`` at
  RCPT for every recipient: there is no open relay.
- AUTH is offered and accepted only over TLS, unless the listener allows it in clear for loopback
  clients. AUTH payloads and passwords are never logged.
- Bytes a client sent before STARTTLS completed are discarded (RFC 3207 section 4.2; the STARTTLS
  command-injection class of bugs).
- A session reads one configuration (``self.cfg``: settings, TLS context, plugin chain) and takes a newer
  one after a reload only between transactions — at its start, EHLO, HELO, RSET and MAIL — so a mail
  transaction runs from MAIL to the reply after DATA on the configuration it began with (relay.reload).
- Nothing a client sends produces a traceback on the wire: unexpected errors become ``451 4.3.0`` with
  the detail only in the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.parser
import email.policy
import email.utils
import functools
import ipaddress
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from aiosmtpd.smtp import SMTP, Session

from relay import metrics
from relay.ids import new_queue_id
from relay.limits import limit_key
from relay.log import bind_context, get_logger
from relay.plugin import (
    ConnectContext,
    DataContext,
    HeloContext,
    MailContext,
    QueuedEvent,
    RcptContext,
    SessionInfo,
    Stage,
    Verdict,
)
from relay.smtp.address import AddressError, Path, decode_xtext, parse_path
from relay.smtp.auth import AuthStatus
from relay.smtp.data import DataOutcome, DataReader
from relay.store.base import NewMessage, NewRecipient, StoreError, StoreOutcomeUnknown
from relay.transports import stream_transport

if TYPE_CHECKING:
    from relay.smtp.server import ListenerConfig, ListenerRuntime

log = get_logger(__name__)

# A rate rule before its key is built: (key parts, count, period); count 0 means the rule is off.
_RuleSpec = tuple[tuple[str, ...], int, float]

MAX_HOPS = 50
_READ_SIZE = 65536
_TOO_LONG = object()
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


@dataclass(slots=True)
class Transaction:
    """The envelope being built between MAIL and the end of DATA."""

    sender: str
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    recipients: list[NewRecipient] = field(default_factory=list)


class _NoHooks:
    """aiosmtpd wants a handler object; relay's logic lives in the session itself."""


_NO_HOOKS = _NoHooks()


class RelaySession(SMTP):
    # aiosmtpd sizes its StreamReader with this; a small value makes asyncio pause the socket every
    # 2 KB, which would cut DATA into tiny reads. Command lines are limited by our own reader.
    line_length_limit = _READ_SIZE

    def __init__(self, runtime: ListenerRuntime) -> None:
        # aiosmtpd's own __init__ introspects every member of the instance and its handler to build
        # dispatch tables that our command loop does not use; measured, that was ~30 % of the CPU a
        # connection costs. We set up the same protocol state directly. The attributes below are the
        # ones the aiosmtpd code we still run (connection_made/lost, STARTTLS, the idle timer) reads;
        # the version range is pinned in pyproject.toml and the whole SMTP suite exercises them.
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=self.line_length_limit, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.rt = runtime
        self.loop = loop
        self.event_handler = _NO_HOOKS
        self._decode_data = False
        self.require_starttls = False
        self._timeout_handle = None
        # The configuration this session reads (see _adopt); held from the start of _handle_client.
        self.cfg: ListenerConfig = runtime.current
        self._holding = False
        self._configure_protocol()
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._auth_required = False
        self._proxy_timeout = None
        self._handle_hooks = {}
        self._enforce_call_limit = False
        self._inbuf = bytearray()
        self._bad_commands = 0
        self._tx: Transaction | None = None
        self._auth_user: str | None = None
        self._allowed_domains: tuple[str, ...] = ()
        self._quota: tuple[int, int] = (0, 0)      # the user's own messages per minute / per day
        self._helo = ""
        self._client_ip = ""
        self._conn_id = ""
        # What the next reply answers, for the rejection metrics: a command verb, "connect" or "unknown".
        self._stage = "connect"

    # -- configuration generations (relay.reload) -------------------------------------------------
    def _configure_protocol(self) -> None:
        """The aiosmtpd attributes that come from the configuration."""
        smtp = self.cfg.settings.smtp
        self.__ident__ = smtp.greeting
        self.hostname = self.cfg.settings.server.hostname
        self.data_size_limit = smtp.max_message_size
        self.enable_SMTPUTF8 = smtp.smtputf8
        self.tls_context = self.cfg.tls_context if self.cfg.listener.starttls else None
        self._timeout_duration = smtp.command_timeout

    def _adopt_current(self) -> None:
        """Take the listener's newest configuration. Only between transactions: everything from MAIL
        to the reply to the end of DATA runs on one configuration and one plugin chain."""
        if self._tx is not None or (self._holding and self.cfg is self.rt.current):
            return
        generations = self.rt.shared.generations
        previous, self.cfg = (self.cfg if self._holding else None), self.rt.current
        generations.hold(self.cfg.generation)
        self._holding = True
        if previous is not None:
            generations.release(previous.generation)
        self._configure_protocol()

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            self.rt.shared.generations.release(self.cfg.generation)

    # -- connection lifecycle -------------------------------------------------------------------
    def sess(self) -> Session:
        """aiosmtpd's per-connection session, which exists from connection_made on."""
        assert self.session is not None
        return self.session

    @property
    def is_tls(self) -> bool:
        return self._tls_protocol is not None or self.rt.implicit_tls

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the command loop at EOF, which drops commands the client sent before
        # half-closing (and, if the loop had not started yet, leaves the socket open for good). We
        # only mark the end of the stream: the loop answers what is buffered, reads EOF and closes.
        keep_open = asyncio.StreamReaderProtocol.eof_received(self)
        # TLS cannot stay half-open: asyncio closes it whatever we say, and warns ("returning true from
        # eof_received() has no effect when using ssl") when a STARTTLS session is told to keep it open.
        return False if self.is_tls else keep_open

    def _timeout_cb(self) -> None:
        self._write_and_close(b"421 4.4.2 " + self.hostname.encode() + b" Timeout, closing connection")
        log.info("session_timeout")

    def _write_and_close(self, reply: bytes) -> None:
        """Last words outside the command loop (timer, shutdown): write without waiting, then close."""
        transport = stream_transport(self.transport)   # not isinstance: uvloop's transports fail it
        if transport is not None and not transport.is_closing():
            transport.write(reply + b"\r\n")
            transport.close()

    async def _handle_client(self) -> None:
        peer = self.sess().peer
        self._client_ip = _normalise_ip(peer[0] if isinstance(peer, tuple) else "")
        self._conn_id = new_queue_id()[-10:]
        bind_context(conn_id=self._conn_id, client_ip=self._client_ip, listener=self.rt.name)
        admitted = False
        self._adopt_current()
        try:
            admitted = await self._admit_connection()
            if admitted:
                await self._serve()
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            log.info("connection_lost")
        except Exception:
            log.exception("session_crashed")
            await self._safe_close("421 4.3.0 Internal error, closing connection")
        finally:
            # However the session ended (QUIT, EOF, cancellation, error) the socket is closed here.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            # Counted as gone now: a TLS close may wait for the peer's close_notify much longer.
            self.rt.sessions.discard(self)
            if admitted:
                self.rt.release_client(self._client_ip)
            self._let_go()
            log.debug("connection_closed")

    async def _admit_connection(self) -> bool:
        refusal = await self.rt.admit_client(self._client_ip)
        if refusal:
            log.warning("connection_refused", reply=refusal)
            await self._safe_close(refusal)
            return False
        log.info("connection_opened", tls=self.rt.implicit_tls)
        verdict = await self.cfg.chain.connect(ConnectContext(self._session_info()))
        if verdict.is_reject:
            self.rt.release_client(self._client_ip)
            log.warning("connection_rejected", reason=verdict.reason)
            metrics.connection_refused(self.rt.listener.name, "chain")
            await self._safe_close(verdict.reply())
            return False
        metrics.connection_opened(self.rt.listener.name)
        return True

    @property
    def in_transaction(self) -> bool:
        """Between an accepted MAIL and the reply to the end of DATA."""
        return self._tx is not None

    def shut_down(self, *, abort: bool = False) -> None:
        """Relay shutdown: tell the client and close, whatever the session was doing."""
        self._write_and_close(b"421 4.3.2 " + self.hostname.encode() + b" Service shutting down")
        transport = stream_transport(self.transport)
        if abort and transport is not None:
            transport.abort()
        # A TLS close waits for the peer's close_notify; the command loop must not wait with it.
        if self._handler_coroutine is not None and self._handler_coroutine is not asyncio.current_task():
            self._handler_coroutine.cancel()

    async def _safe_close(self, reply: str) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ConnectionError):
            await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = status if isinstance(status, bytes) else status.encode("utf-8", "replace")
        if data[:1] in (b"4", b"5"):
            metrics.smtp_rejection(self._stage, data)
        self._writer.write(data + b"\r\n")
        await self._writer.drain()

    # -- the command loop ---------------------------------------------------------------------------
    async def _serve(self) -> None:
        await self.push(f"220 {self.hostname} {self.__ident__}")
        while self.transport is not None and not self.transport.is_closing():
            if self.rt.draining and not self.in_transaction:
                self.shut_down()
                return
            line = await self._read_line()
            if line is None:
                return
            self._reset_timeout()
            if line is _TOO_LONG:
                await self._bad("500 5.5.2 Line too long")
                continue
            assert isinstance(line, bytes)
            await self._dispatch(line)

    async def _read_line(self) -> bytes | object | None:
        """The next command line without its line ending; None at end of stream."""
        limit = self.cfg.settings.smtp.max_line_length
        skipping = False
        while True:
            end = self._inbuf.find(b"\n")
            if end >= 0:
                line = bytes(self._inbuf[:end + 1])
                del self._inbuf[:end + 1]
                if skipping or len(line) > limit:
                    return _TOO_LONG
                return line.rstrip(b"\r\n")
            if len(self._inbuf) > limit:
                skipping = True
                self._inbuf.clear()
            chunk = await self._reader.read(_READ_SIZE)
            if not chunk:
                return None
            self._inbuf += chunk

    async def _dispatch(self, raw: bytes) -> None:
        self._stage = "unknown"
        if b"\x00" in raw:
            await self._bad("500 5.5.2 NUL character in command")
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            await self._bad("500 5.5.2 Invalid UTF-8 in command")
            return
        verb, _, arg = line.partition(" ")
        handler = self._COMMANDS.get(verb.upper())
        if handler is not None:
            self._stage = verb.lower()
        if handler is None:
            await self._bad("500 5.5.2 Command not recognised")
            return
        try:
            await handler(self, arg.strip())
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("command_failed", verb=verb.upper())
            self._tx = None
            await self.push("451 4.3.0 Temporary failure, try again later")

    async def _bad(self, reply: str) -> None:
        """A reply to a bad command; too many of them end the session."""
        self._bad_commands += 1
        if self._bad_commands >= self.cfg.settings.smtp.max_bad_commands:
            log.warning("too_many_bad_commands", count=self._bad_commands)
            await self._safe_close("421 4.7.0 Too many errors, closing connection")
            return
        await self.push(reply)

    # -- greeting commands --------------------------------------------------------------------------
    async def cmd_ehlo(self, arg: str) -> None:
        self._adopt_current()
        if not _valid_helo(arg):
            await self._bad("501 5.5.4 Syntax: EHLO hostname")
            return
        if not await self._helo_allowed(arg):
            return
        self._greeted(arg, extended=True)
        lines = [self.hostname, "PIPELINING", f"SIZE {self.cfg.settings.smtp.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"]
        if self.cfg.settings.smtp.smtputf8:
            lines.append("SMTPUTF8")
        if self.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        reply = "\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.push(reply)

    async def cmd_helo(self, arg: str) -> None:
        self._adopt_current()
        if not _valid_helo(arg):
            await self._bad("501 5.5.4 Syntax: HELO hostname")
            return
        if not await self._helo_allowed(arg):
            return
        self._greeted(arg, extended=False)
        await self.push(f"250 {self.hostname}")

    async def _helo_allowed(self, helo: str) -> bool:
        if not self.cfg.chain.runs_at(Stage.HELO):
            return True
        verdict = await self.cfg.chain.helo(HeloContext(self._session_info(), helo))
        if verdict.is_reject:
            await self._reply_verdict(verdict)
            return False
        return True

    def _greeted(self, helo: str, *, extended: bool) -> None:
        self._helo = helo
        self.sess().host_name = helo
        self.sess().extended_smtp = extended
        self._tx = None
        self._adopt_current()   # the greeting ended any transaction: a boundary (RFC 5321 4.1.4)

    def _auth_offered(self) -> bool:
        if self.cfg.listener.auth == "off":
            return False
        return self.is_tls or (self.cfg.listener.allow_plain_auth_on_loopback and self.rt.is_loopback(
            self._client_ip))

    async def cmd_starttls(self, arg: str) -> None:
        if arg:
            await self._bad("501 5.5.4 Syntax: STARTTLS")
            return
        if self.is_tls:
            await self._bad("503 5.5.1 TLS already active")
            return
        if self.tls_context is None:
            await self._bad("502 5.5.1 STARTTLS not available")
            return
        # Anything pipelined after STARTTLS arrived in clear text and must not be obeyed after the
        # handshake (RFC 3207 section 4.2).
        self._inbuf.clear()
        try:
            await self.smtp_STARTTLS("")
        except Exception as exc:  # the handshake failed: nothing more can be said on this connection
            log.info("tls_handshake_failed", error=str(exc.__cause__ or exc))
            if self.transport is not None:
                self.transport.close()
            return
        self._inbuf.clear()
        # RFC 3207 4.2: forget everything learnt before the handshake, the client must EHLO again.
        self._helo = ""
        self._tx = None
        self._auth_user = None
        if self.sess().ssl is not None:
            log.info("tls_started", version=self._tls_version())

    def _tls_version(self) -> str | None:
        obj: Any = self.transport.get_extra_info("ssl_object") if self.transport else None
        return obj.version() if isinstance(obj, ssl.SSLObject) else None

    # -- AUTH -----------------------------------------------------------------------------------
    async def cmd_auth(self, arg: str) -> None:
        refusal = self._auth_refusal()
        if refusal:
            await self._bad(refusal)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            credentials = await self._auth_plain(initial.strip())
        elif mechanism == "LOGIN":
            credentials = await self._auth_login(initial.strip())
        else:
            await self._bad("504 5.5.4 Unrecognised authentication mechanism")
            return
        if credentials is None:
            return
        await self._finish_auth(*credentials)

    def _auth_refusal(self) -> str | None:
        if not self._helo or not self.sess().extended_smtp:
            return "503 5.5.1 Send EHLO first"
        if self.cfg.listener.auth == "off":
            return "502 5.5.1 AUTH not available"
        if not self._auth_offered():
            return "538 5.7.11 Encryption required for requested authentication mechanism"
        if self._auth_user is not None:
            return "503 5.5.1 Already authenticated"
        if self._tx is not None:
            return "503 5.5.1 AUTH not allowed during a mail transaction"
        return None

    async def _auth_plain(self, initial: str) -> tuple[str, str] | None:
        response = initial if initial else await self._challenge("")
        if response is None:
            return None
        decoded = await self._decode_auth(response)
        if decoded is None:
            return None
        parts = decoded.split("\x00")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await self._bad("501 5.5.2 Malformed AUTH PLAIN response")
            return None
        return parts[1], parts[2]

    async def _auth_login(self, initial: str) -> tuple[str, str] | None:
        user_b64 = initial if initial else await self._challenge("VXNlcm5hbWU6")
        if user_b64 is None:
            return None
        username = await self._decode_auth(user_b64)
        if username is None:
            return None
        pass_b64 = await self._challenge("UGFzc3dvcmQ6")
        if pass_b64 is None:
            return None
        password = await self._decode_auth(pass_b64)
        if password is None:
            return None
        return username, password

    async def _challenge(self, prompt: str) -> str | None:
        await self.push(f"334 {prompt}".rstrip() if prompt else "334 ")
        line = await self._read_line()
        if line is None:
            return None
        if line is _TOO_LONG or not isinstance(line, bytes):
            await self._bad("500 5.5.2 Line too long")
            return None
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            await self.push("501 5.7.0 Authentication cancelled")
            return None
        return text

    async def _decode_auth(self, data: str) -> str | None:
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            await self._bad("501 5.5.2 Cannot decode AUTH response")
            return None

    async def _finish_auth(self, username: str, password: str) -> None:
        outcome = await self.cfg.authenticator.authenticate(username, password, self._client_ip)
        if outcome.status is AuthStatus.OK and outcome.user is not None:
            self._auth_user = outcome.user.username
            self._allowed_domains = tuple(d.lower() for d in outcome.user.allowed_sender_domains)
            self._quota = (outcome.user.quota_per_minute, outcome.user.quota_per_day)
            self.sess().authenticated = True
            bind_context(auth_user=self._auth_user)
            await self.push("235 2.7.0 Authentication successful")
        elif outcome.status is AuthStatus.LOCKED:
            await self.push("454 4.7.0 Too many authentication failures, try again later")
        elif outcome.status is AuthStatus.UNAVAILABLE:
            await self.push("454 4.7.0 Temporary authentication failure")
        else:
            await self._bad("535 5.7.8 Authentication credentials invalid")

    # -- the mail transaction -----------------------------------------------------------------------
    async def cmd_mail(self, arg: str) -> None:
        self._adopt_current()
        if not self._helo:
            await self._bad("503 5.5.1 Send HELO or EHLO first")
            return
        if self._tx is not None:
            await self._bad("503 5.5.1 Sender already specified")
            return
        if self.cfg.listener.auth == "required" and self._auth_user is None:
            await self.push("530 5.7.0 Authentication required")
            return
        rest = _strip_keyword(arg, "FROM:")
        if rest is None:
            await self._bad("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path = parse_path(rest, allow_null=True, utf8_allowed=self._utf8_param(rest))
            tx = self._transaction_from(path)
        except AddressError as exc:
            await self._bad(exc.reply)
            return
        refusal = self._sender_refusal(path) or await self._message_rate_refusal(peek=True)
        if refusal:
            log.info("sender_refused", sender=path.address, reply=refusal)
            await self.push(refusal)
            return
        verdict = await self.cfg.chain.mail_from(MailContext(self._session_info(), path.address))
        if verdict.is_reject:
            await self._reply_verdict(verdict)
            return
        self._tx = tx
        await self.push("250 2.1.0 Ok")

    def _utf8_param(self, rest: str) -> bool:
        return self.cfg.settings.smtp.smtputf8 and "SMTPUTF8" in rest.upper().split()

    def _transaction_from(self, path: Path) -> Transaction:
        params = dict(path.params)
        size = params.pop("SIZE", None)
        if size is not None and (not size.isdigit() or int(size) > self.cfg.settings.smtp.max_message_size):
            raise AddressError("552 5.3.4 Message size exceeds fixed maximum message size")
        body = params.pop("BODY", None)
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            raise AddressError("555 5.5.4 Unsupported BODY type")
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and (params.pop("SMTPUTF8") is not None or not self.cfg.settings.smtp.smtputf8):
            raise AddressError("555 5.5.4 SMTPUTF8 not available or takes no value")
        ret = params.pop("RET", None)
        if ret is not None and ret.upper() not in ("FULL", "HDRS"):
            raise AddressError("501 5.5.4 RET must be FULL or HDRS")
        envid = params.pop("ENVID", None)
        if envid is not None and (len(envid) > 100 or not decode_xtext(envid)):
            raise AddressError("501 5.5.4 Bad ENVID")
        params.pop("AUTH", None)   # RFC 4954 MAIL AUTH=: accepted and not trusted
        if params:
            raise AddressError(f"555 5.5.4 Unsupported parameter {next(iter(params))}")
        return Transaction(path.address, smtputf8, ret.upper() if ret else None, envid)

    def _sender_refusal(self, path: Path) -> str | None:
        if self._auth_user is None or not self._allowed_domains:
            return None
        if path.address and self._domain_allowed(path.domain):
            return None
        return "553 5.7.1 Sender address not allowed for this user"

    def _domain_allowed(self, domain: str) -> bool:
        return any(domain == d or domain.endswith("." + d) for d in self._allowed_domains)

    def _from_header_refusal(self, body: bytes) -> str | None:
        """A user limited to some sender domains may not put another domain in From: either — the
        address recipients see, and the one DKIM signs and DMARC aligns with."""
        if self._auth_user is None or not self._allowed_domains:
            return None
        domains = _from_header_domains(body)
        if all(self._domain_allowed(d) for d in domains):   # no From: nothing to spoof
            return None
        log.warning("from_header_refused", from_domains=sorted(domains))
        return "550 5.7.1 From: header address not allowed for this user"

    async def cmd_rcpt(self, arg: str) -> None:
        tx = self._tx
        if tx is None:
            await self._bad("503 5.5.1 Need MAIL before RCPT")
            return
        rest = _strip_keyword(arg, "TO:")
        if rest is None:
            await self._bad("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path = parse_path(rest, allow_null=False, utf8_allowed=tx.smtputf8)
            recipient = _recipient_from(path)
        except AddressError as exc:
            await self._bad(exc.reply)
            return
        refusal = (self._relay_refusal(path.address) or self._count_refusal(tx)
                   or await self._recipient_rate_refusal())
        if refusal:
            log.info("recipient_refused", recipient=path.address, reply=refusal)
            await self.push(refusal)
            return
        verdict = await self.cfg.chain.rcpt_to(RcptContext(self._session_info(), tx.sender, path.address,
                                                          [r.address for r in tx.recipients]))
        if verdict.is_reject:
            await self._reply_verdict(verdict)
            return
        tx.recipients.append(recipient)
        await self.push("250 2.1.5 Ok")

    def _relay_refusal(self, address: str) -> str | None:
        if self._auth_user is not None or self.cfg.is_trusted(self._client_ip):
            return None
        if self.cfg.chain.accepts_locally(address):  # received by a plugin (a feedback-loop address), not relayed
            return None
        return "550 5.7.1 Relaying denied: authentication required"

    def _count_refusal(self, tx: Transaction) -> str | None:
        if len(tx.recipients) >= self.cfg.settings.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        return None

    async def cmd_data(self, arg: str) -> None:
        tx = self._tx
        if tx is None or not tx.recipients:
            await self._bad("503 5.5.1 Need RCPT before DATA")
            return
        if arg:
            await self._bad("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            await self._data_and_reply(tx)
        finally:
            # Only now is the transaction over: a shutdown (drain) waits for its reply, never cutting
            # off a commit under way (which would store a message whose client was told 421).
            self._tx = None

    async def _data_and_reply(self, tx: Transaction) -> None:
        reader = DataReader(self.cfg.settings.smtp.max_message_size)
        outcome = await self._read_data(reader)
        if outcome is None:
            return
        if outcome is DataOutcome.BARE_NEWLINE:
            log.warning("data_refused", reason="bare CR or LF")
            await self._safe_close("550 5.6.0 Message contains a bare CR or LF (RFC 5321 2.3.8); closing")
            return
        self._inbuf[:0] = reader.leftover
        if outcome is DataOutcome.TOO_BIG:
            log.info("data_refused", reason="too big", received=reader.received)
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        if outcome is DataOutcome.LINE_TOO_LONG:
            await self.push("550 5.6.0 Message has a line that is too long")
            return
        await self._accept(tx, reader.message)

    async def _read_data(self, reader: DataReader) -> DataOutcome | None:
        """Feed the reader until it decides; None when the client went away."""
        data_timeout = self.cfg.settings.smtp.data_timeout
        pending, self._inbuf = bytes(self._inbuf), bytearray()
        outcome = reader.feed(pending) if pending else DataOutcome.PENDING
        while outcome is DataOutcome.PENDING:
            self._reset_timeout(data_timeout)
            chunk = await self._reader.read(_READ_SIZE)
            if not chunk:
                log.info("data_incomplete", received=reader.received)
                return None
            outcome = reader.feed(chunk)
        self._reset_timeout()
        return outcome

    async def _accept(self, tx: Transaction, body: bytes) -> None:
        """The end of DATA: checks, chain, durable commit, then and only then 250."""
        queue_id = new_queue_id()
        if _hop_count(body) > MAX_HOPS:
            log.warning("mail_loop", queue_id=queue_id)
            await self.push("554 5.4.6 Too many hops, possible mail loop")
            return
        refusal = self._from_header_refusal(body) or await self._message_rate_refusal(peek=False)
        if refusal:
            await self.push(refusal)
            return
        data = self._received_header(queue_id, tx) + body
        context = DataContext(self._session_info(), queue_id, tx.sender, [r.address for r in tx.recipients], data)
        verdict = await self.cfg.chain.data(context)
        if verdict.is_reject:
            await self._reply_verdict(verdict)
            return
        if context.consumed and await self._consumed(tx, queue_id, verdict, len(context.data)):
            return
        data = context.data       # changes made at DATA are kept
        message = NewMessage(
            id=queue_id, sender=tx.sender, recipients=tuple(tx.recipients), data=data,
            received_at=time.time(), client_ip=self._client_ip, client_helo=self._helo,
            auth_user=self._auth_user, listener=self.cfg.listener.name, envid=tx.envid, ret=tx.ret,
            smtputf8=tx.smtputf8,
        )
        commit_started = time.monotonic()
        try:
            await self.rt.store.enqueue(message)
        except StoreOutcomeUnknown as exc:
            # Never 250 for what we cannot vouch for; say so, the client's retry may make a duplicate.
            log.error("queue_write_outcome_unknown", queue_id=queue_id, error=str(exc))
            await self.push("451 4.3.0 Queue write interrupted, outcome unknown; try again later")
            return
        except StoreError as exc:
            log.error("queue_write_failed", queue_id=queue_id, error=str(exc))
            await self.push("451 4.3.0 Temporary failure writing the queue, try again later")
            return
        log.info("queued", queue_id=queue_id, sender=tx.sender, rcpts=len(tx.recipients), size=len(data))
        self.rt.accepted_messages += 1
        metrics.message_accepted(self.rt.listener.name, len(tx.recipients), len(data),
                                 time.monotonic() - commit_started)
        await self.push(f"250 2.0.0 Ok: queued as {queue_id}")
        if self.cfg.chain.runs_at(Stage.QUEUED):
            await self.cfg.chain.queued(QueuedEvent(queue_id, tx.sender, [r.address for r in tx.recipients],
                                                   len(data), self._auth_user))

    async def _consumed(self, tx: Transaction, queue_id: str, verdict: Verdict, size: int) -> bool:
        """A plugin took the message in itself: answer its 2xx and queue nothing — only when every recipient
        is one the chain receives mail for; anything else is queued as usual (never silently dropped)."""
        if not all(self.cfg.chain.accepts_locally(r.address) for r in tx.recipients) or verdict.code // 100 != 2:
            log.error("consume_refused", queue_id=queue_id, reason="not every recipient is received locally")
            return False
        log.info("consumed", queue_id=queue_id, sender=tx.sender, rcpts=len(tx.recipients), size=size)
        await self.push(verdict.reply())
        return True

    def _received_header(self, queue_id: str, tx: Transaction) -> bytes:
        helo = _printable(self._helo)[:100]
        protocol = ("UTF8" if tx.smtputf8 else "") + ("ESMTP" if self.sess().extended_smtp else "SMTP")
        protocol += ("S" if self.is_tls else "") + ("A" if self._auth_user else "")
        tls = f"\r\n\t(using {self._tls_version()})" if self.is_tls and self._tls_version() else ""
        recipient = f"\r\n\tfor <{tx.recipients[0].address}>" if len(tx.recipients) == 1 else ""
        date = email.utils.formatdate(localtime=False)
        header = (f"Received: from {helo} ([{self._client_ip}])\r\n\tby {self.hostname} (relay) with "
                  f"{protocol} id {queue_id}{tls}{recipient};\r\n\t{date}\r\n")
        return header.encode("utf-8", "replace")

    # -- limits ---------------------------------------------------------------------------------
    async def _message_rate_refusal(self, *, peek: bool) -> str | None:
        """Message limits per IP and per user (including the user's own quotas)."""
        limits = self.cfg.settings.limits
        wanted: list[_RuleSpec] = [
            (("msg", "ip", self._client_ip), limits.messages_per_ip.count, limits.messages_per_ip.period)]
        if self._auth_user is not None:
            user = self._auth_user
            wanted.append((("msg", "user", user), limits.messages_per_user.count, limits.messages_per_user.period))
            wanted.append((("quota", "minute", user), self._quota[0], 60.0))
            wanted.append((("quota", "day", user), self._quota[1], 86400.0))
        return await self._limit_refusal(wanted, peek=peek)

    async def _recipient_rate_refusal(self) -> str | None:
        limits = self.cfg.settings.limits
        wanted: list[_RuleSpec] = [
            (("rcpt", "ip", self._client_ip), limits.recipients_per_ip.count, limits.recipients_per_ip.period)]
        if self._auth_user is not None:
            wanted.append((("rcpt", "user", self._auth_user), limits.recipients_per_user.count,
                           limits.recipients_per_user.period))
        return await self._limit_refusal(wanted, peek=False)

    async def _limit_refusal(self, wanted: list[_RuleSpec], *, peek: bool) -> str | None:
        """Apply the rules that are on (count > 0); their keys are built, and the limiter asked, only then."""
        rules = [(limit_key(*parts), count, period) for parts, count, period in wanted if count > 0]
        return await self.rt.check_limits(rules, peek=peek) if rules else None

    # -- chain ----------------------------------------------------------------------------------
    def _session_info(self) -> SessionInfo:
        return SessionInfo(self._client_ip, self.cfg.listener.name, self._helo, self._auth_user, self.is_tls)

    async def _reply_verdict(self, verdict: Verdict) -> None:
        log.info("chain_rejected", reply=verdict.reply(), reason=verdict.reason)
        if verdict.disconnect:
            await self._safe_close(verdict.reply())
        else:
            await self.push(verdict.reply())

    # -- small commands -------------------------------------------------------------------------
    async def cmd_rset(self, arg: str) -> None:
        self._tx = None
        self._adopt_current()
        await self.push("250 2.0.0 Ok")

    async def cmd_noop(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def cmd_quit(self, arg: str) -> None:
        await self._safe_close("221 2.0.0 Bye")

    async def cmd_vrfy(self, arg: str) -> None:
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def cmd_expn(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN not supported")

    async def cmd_help(self, arg: str) -> None:
        await self.push("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY QUIT")

    _COMMANDS: ClassVar[dict[str, Any]] = {
        "EHLO": cmd_ehlo, "HELO": cmd_helo, "STARTTLS": cmd_starttls, "AUTH": cmd_auth,
        "MAIL": cmd_mail, "RCPT": cmd_rcpt, "DATA": cmd_data, "RSET": cmd_rset, "NOOP": cmd_noop,
        "QUIT": cmd_quit, "VRFY": cmd_vrfy, "EXPN": cmd_expn, "HELP": cmd_help,
    }


@functools.lru_cache(maxsize=4096)
def _normalise_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _strip_keyword(arg: str, keyword: str) -> str | None:
    if arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _recipient_from(path: Path) -> NewRecipient:
    params = dict(path.params)
    notify = params.pop("NOTIFY", None)
    if notify is not None:
        words = {w.upper() for w in notify.split(",")}
        if not (words == {"NEVER"} or words <= _NOTIFY_WORDS):
            raise AddressError("501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        notify = ",".join(sorted(words))
    orcpt = params.pop("ORCPT", None)
    if orcpt is not None:
        addr_type, sep, value = orcpt.partition(";")
        if not sep or not addr_type or not value:
            raise AddressError("501 5.5.4 ORCPT must be addr-type;address")
        orcpt = f"{addr_type};{decode_xtext(value)}"
    if params:
        raise AddressError(f"555 5.5.4 Unsupported parameter {next(iter(params))}")
    return NewRecipient(path.address, notify=notify, orcpt=orcpt)


def _valid_helo(arg: str) -> bool:
    return bool(arg) and " " not in arg.strip() and len(arg) <= 255


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)


def _from_header_domains(body: bytes) -> set[str]:
    """Domains of the addresses in the message's From: header(s); empty when there is none."""
    end = body.find(b"\r\n\r\n")
    header_block = body[:end + 2] if end >= 0 else body
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_block)
    values = [str(v) for v in headers.get_all("From", [])]
    return {addr.rpartition("@")[2].lower().rstrip(">") for _, addr in email.utils.getaddresses(values)
            if "@" in addr}


def _hop_count(body: bytes) -> int:
    end = body.find(b"\r\n\r\n")
    headers = body[:end] if end >= 0 else body
    return headers.count(b"\nReceived:") + headers.startswith(b"Received:") + 1

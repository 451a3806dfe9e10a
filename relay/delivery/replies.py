"""Reading SMTP replies off a transport, in order, every one of them — what PIPELINING needs.

:class:`ReplyReader` replaces aiosmtplib's protocol on a session's transport once the session is set up
(see :mod:`relay.delivery.client`). aiosmtplib reads exactly one reply per command and drops bytes that
arrive while it is not waiting, so several commands cannot be written in one go through it; this reader
keeps every complete reply in a queue instead.

Invariants:
- Replies are untrusted input: a line longer than :data:`MAX_REPLY_LINE`, a reply longer than
  :data:`MAX_REPLY_BYTES` (all its lines), a line without a three-digit code or a multi-line reply with
  mixed codes is a protocol violation, which is sticky: the connection is finished.
- Connection loss and flow-control events are forwarded to the protocol the reader replaced, so the
  aiosmtplib ``SMTP`` object still notices a closed connection.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from relay.policies.bounce import Reply

#: The most a single reply may take (all lines); a peer streaming more is broken or hostile.
MAX_REPLY_BYTES = 64 * 1024
#: The longest reply line we wait for (RFC 5321 allows 512; extensions and chatty servers go further).
MAX_REPLY_LINE = 8 * 1024

_REPLY_LINE = re.compile(rb"^(\d{3})([ -]|\r?$)")



class ReplyReader(asyncio.Protocol):
    """Collects every complete SMTP reply arriving on a transport, in order.

    Installed with ``transport.set_protocol`` once the session is set up; it forwards connection loss
    and flow-control events to the protocol it replaces (aiosmtplib's), so the ``SMTP`` object still
    notices a closed connection. A protocol violation (a line without a code, mixed codes, a line or
    reply over the caps) is sticky: the connection is finished.
    """

    def __init__(self, inner: asyncio.BaseProtocol, transport: asyncio.WriteTransport) -> None:
        self._inner = inner
        self._transport = transport
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._reply_bytes = 0
        self._replies: deque[Reply] = deque()
        self.violation: str | None = None
        self.closed: str | None = None
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.violation is not None:
            return
        self._buffer += data
        while self.violation is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._violate(f"reply line longer than {MAX_REPLY_LINE} bytes")
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._take_line(line)
        self._arrived.set()

    def eof_received(self) -> bool:
        self.closed = self.closed or "connection closed by the server"
        self._arrived.set()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closed or (f"connection lost: {exc}" if exc else "connection closed")
        self._arrived.set()
        self._writable.set()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writable.clear()
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._writable.set()
        self._inner.resume_writing()

    # -- parsing ------------------------------------------------------------------------------------
    def _take_line(self, line: bytes) -> None:
        if len(line) > MAX_REPLY_LINE:
            self._violate(f"reply line longer than {MAX_REPLY_LINE} bytes")
            return
        match = _REPLY_LINE.match(line)
        if match is None:
            self._violate(f"malformed reply line {_printable(line)!r}")
            return
        if self._lines and not self._lines[0].startswith(match.group(1)):
            self._violate("reply lines with different codes")
            return
        self._reply_bytes += len(line)
        if self._reply_bytes > MAX_REPLY_BYTES:
            self._violate(f"reply longer than {MAX_REPLY_BYTES} bytes")
            return
        self._lines.append(line)
        if match.group(2) != b"-":
            self._replies.append(Reply.parse(b"".join(self._lines)))
            self._lines = []
            self._reply_bytes = 0

    def _violate(self, what: str) -> None:
        self.violation = what
        self._buffer.clear()
        self._lines = []

    # -- use ----------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Replies received and not yet read (non-zero between transactions means the peer talks out
        of turn, and the pairing of replies with commands can no longer be trusted)."""
        return len(self._replies)

    def write(self, data: bytes) -> None:
        if self.closed is not None or self._transport.is_closing():
            raise ConnectionError(self.closed or "connection closing")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self._writable.wait()
        if self.closed is not None:
            raise ConnectionError(self.closed)

    async def read_reply(self) -> Reply:
        """The next reply; raises ConnectionError / ProtocolViolation (the caller bounds the time)."""
        while not self._replies:
            if self.violation is not None:
                raise ProtocolViolation(self.violation)
            if self.closed is not None:
                raise ConnectionError(self.closed)
            self._arrived.clear()
            await self._arrived.wait()
        return self._replies.popleft()


class ProtocolViolation(Exception):
    """Internal: the peer broke the reply syntax."""


def _printable(line: bytes) -> str:
    return line[:80].decode("ascii", errors="replace").rstrip("\r\n")


__all__ = ["MAX_REPLY_BYTES", "MAX_REPLY_LINE", "ProtocolViolation", "ReplyReader"]

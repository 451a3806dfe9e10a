"""The DATA reader: turns the raw byte stream after ``354`` into the message, in chunks.

aiosmtpd reads DATA line by line (~140 awaits for a 10 KB message); we read whatever the socket has and
scan the buffer with C-speed ``bytes`` methods instead. This module is pure (no I/O): the session feeds
it chunks and asks what happened.

Rules, each with its reason:
- DATA ends only at ``CRLF . CRLF`` (RFC 5321 4.1.1.4). ``LF . LF``, ``CR . CR``, ``LF . CRLF`` and every
  other variant do not end it — this is the SMTP smuggling defence (CVE-2023-51764 and friends).
- A bare LF or bare CR anywhere in the message refuses it (:attr:`DataOutcome.BARE_NEWLINE`) as soon as
  it is seen, because a downstream server might read it as a line end and see a message boundary that
  we did not. The session then answers and closes: we cannot know where such a client thinks DATA ends.
- Dot-unstuffing (RFC 5321 4.5.2): a leading ``.`` is removed from every line that starts with one.
- Size: once the stuffed input passes the limit (plus the worst-case stuffing allowance) the reader
  keeps only a small tail to find the terminator and discards the rest, so an oversized message costs
  no memory; the exact check is on the unstuffed size. The answer (552) comes after the terminator,
  as RFC 5321 4.2.5 implies, so the session stays in sync with the client.
- Bytes after the terminator belong to the next pipelined command and are handed back as
  :attr:`DataReader.leftover`.
"""

from __future__ import annotations

import enum

_TERMINATOR = b"\r\n.\r\n"


class DataOutcome(enum.Enum):
    PENDING = "pending"              # need more input
    COMPLETE = "complete"            # message ready in .message
    TOO_BIG = "too_big"              # terminator seen, message exceeded the size limit
    LINE_TOO_LONG = "line_too_long"  # terminator seen, a line exceeded the configured limit
    BARE_NEWLINE = "bare_newline"    # a bare CR or LF was seen; stop reading, answer and close


class DataReader:
    """Incremental parser for one DATA transaction."""

    __slots__ = ("_buf", "_checked", "_discarding", "_limit", "_max_line", "leftover", "message",
                 "outcome", "received")

    def __init__(self, size_limit: int, max_line_length: int = 0) -> None:
        # A virtual CRLF before the first line lets ".\r\n" right after 354 match the terminator and
        # lets a leading "." on the first line be unstuffed like any other.
        self._buf = bytearray(b"\r\n")
        self._checked = 2            # prefix of _buf already checked for bare CR/LF
        self._discarding = False
        self._limit = size_limit
        self._max_line = max_line_length
        self.received = 0            # raw bytes taken in (for logs)
        self.message = b""
        self.leftover = b""
        self.outcome = DataOutcome.PENDING

    def feed(self, chunk: bytes) -> DataOutcome:
        """Take the next bytes from the socket; returns the outcome so far."""
        if self.outcome is not DataOutcome.PENDING:
            raise RuntimeError("DataReader fed after it finished")
        self.received += len(chunk)
        search_from = max(len(self._buf) - 4, 0)
        self._buf += chunk
        end = self._buf.find(_TERMINATOR, search_from)
        limit_end = end + 2 if end >= 0 else len(self._buf)
        if not self._discarding and self._has_bare_newline(limit_end, final=end >= 0):
            self.outcome = DataOutcome.BARE_NEWLINE
            return self.outcome
        if end >= 0:
            return self._finish(end)
        self._bound_memory()
        return self.outcome

    def _has_bare_newline(self, upto: int, *, final: bool) -> bool:
        """Check ``_buf[_checked:upto]`` for a CR not followed by LF or an LF not preceded by CR.

        A CR at the very end of the input may be completed by the next chunk, so it is left for the
        next check; the region checked therefore never starts inside a CRLF pair.
        """
        stop = upto if final or not self._buf.endswith(b"\r") else upto - 1
        if stop <= self._checked:
            return False
        view = bytes(self._buf[self._checked:stop])
        self._checked = stop
        pairs = view.count(b"\r\n")
        return view.count(b"\r") != pairs or view.count(b"\n") != pairs

    def _bound_memory(self) -> None:
        """Past the size limit keep only the tail needed to spot the terminator."""
        allowance = self._limit + self._limit // 100 + 1024
        if len(self._buf) > allowance:
            self._discarding = True
        if self._discarding:
            del self._buf[:-4]
            self._checked = len(self._buf)

    def _finish(self, end: int) -> DataOutcome:
        self.leftover = bytes(self._buf[end + len(_TERMINATOR):])
        if self._discarding:
            self.outcome = DataOutcome.TOO_BIG
            return self.outcome
        # Keep the CRLF that ends the last line; unstuff every line start at once.
        stuffed = bytes(self._buf[:end + 2])
        self.message = stuffed.replace(b"\r\n.", b"\r\n")[2:]
        self._buf = bytearray()
        if len(self.message) > self._limit:
            self.message = b""
            self.outcome = DataOutcome.TOO_BIG
        elif self._max_line and len(self.message) > self._max_line and self._longest_line() > self._max_line:
            self.message = b""
            self.outcome = DataOutcome.LINE_TOO_LONG
        else:
            self.outcome = DataOutcome.COMPLETE
        return self.outcome

    def _longest_line(self) -> int:
        return max(len(line) for line in self.message.split(b"\r\n"))

"""Finds the HTML bodies of a message and rewrites them in place; every other byte stays as it was.

How: the email package (``policy=compat32``) parses each part's *header block* — content type and its
parameters (boundary, charset, RFC 2231 included), transfer encoding, disposition. Where each part's
header block and body begin and end in the raw bytes is found by a small scanner for RFC 2046 §5.1.1
delimiter lines. The new body of a rewritten part is spliced into the original bytes; nothing else is
regenerated. We do not let the email package's generator write the message because it keeps no byte
offsets and re-folds headers, re-emits boundaries, preambles and epilogues, and re-encodes bodies — it
would change parts we never meant to touch (attachments, and with them any signature over them).
compat32 rather than policy.SMTP because we only *read* through it: compat32 hands header values back
as they were written, without RFC 2047 decoding or re-folding, and tolerates defects without raising.

Invariants:
- Only ``text/html`` parts that are not attachments are rewritten; ``multipart/signed`` and
  ``multipart/encrypted`` subtrees and ``message/*`` parts (forwarded mail) are never entered.
- A rewritten part keeps its headers byte for byte: the same charset and the same transfer encoding
  (7bit/8bit/binary as they were, quoted-printable re-encoded as QP, base64 as base64 with the original
  line length). A part whose charset is unknown or whose bytes do not decode in it, or whose transfer
  encoding is unknown, is left untouched — as is one that would end up with a line over 998 octets.
- Line endings stay CRLF; header edits (:func:`remove_header`, :func:`add_headers`) touch only the
  top-level header block.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from .tracking_html import HtmlRewrite, rewrite_html

__all__ = [
    "MAX_LINE", "MessageRewrite", "PartSpan", "add_headers", "header_block", "html_parts", "remove_header",
    "rewrite_message",
]

MAX_LINE = 998                     # RFC 5322 §2.1.1: octets per line, CRLF excluded
MAX_DEPTH = 32                     # deeper nesting is left alone, never parsed without end
RAW_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
SEALED_TYPES = frozenset({"multipart/signed", "multipart/encrypted"})
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True, slots=True)
class PartSpan:
    """One MIME part in the raw message: its header block is raw[start:body_start], its body
    raw[body_start:end]."""

    start: int
    body_start: int
    end: int
    headers: Message


@dataclass(slots=True)
class MessageRewrite:
    data: bytes
    links: list[tuple[str, str]] = field(default_factory=list)   # (original URL, tracking URL)
    pixel: bool = False
    parts_rewritten: int = 0
    parts_left: list[str] = field(default_factory=list)          # why an HTML part was left alone
    links_left_for_length: int = 0


# -- header blocks ---------------------------------------------------------------------------------------
def _lines(raw: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each line in raw[start:end], its line break included."""
    position = start
    while position < end:
        newline = raw.find(b"\n", position, end)
        line_end = end if newline < 0 else newline + 1
        yield position, line_end
        position = line_end


def header_block(raw: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(blank line start, body start) of the header block at ``start``: new header fields go at the
    first offset, the body begins at the second. Without a blank line both are ``end``."""
    end = len(raw) if end is None else end
    for line_start, line_end in _lines(raw, start, end):
        if raw[line_start:line_end] in (b"\r\n", b"\n"):
            return line_start, line_end
    return end, end


def parse_headers(raw: bytes, start: int, body_start: int) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(raw[start:body_start])


def _fields(raw: bytes, end: int) -> Iterator[tuple[int, int, str]]:
    """(start, end, lowercased name) of each top-level header field, continuation lines included."""
    current: list[int | str] | None = None
    for line_start, line_end in _lines(raw, 0, end):
        if raw[line_start:line_start + 1] in (b" ", b"\t") and current is not None:
            current[1] = line_end
            continue
        if current is not None:
            yield int(current[0]), int(current[1]), str(current[2])
        name = raw[line_start:line_end].partition(b":")[0].strip().lower()
        current = [line_start, line_end, name.decode("ascii", "replace")]
    if current is not None:
        yield int(current[0]), int(current[1]), str(current[2])


def remove_header(raw: bytes, name: str) -> bytes:
    """The message without any top-level header field called ``name`` (continuation lines too)."""
    blank, _ = header_block(raw)
    wanted = name.lower()
    spans = [(s, e) for s, e, field_name in _fields(raw, blank) if field_name == wanted]
    for start, end in reversed(spans):
        raw = raw[:start] + raw[end:]
    return raw


def add_headers(raw: bytes, lines: list[str]) -> bytes:
    """The message with ``lines`` (unfolded "Name: value" texts) appended to its top-level header block."""
    blank, _ = header_block(raw)
    prefix = raw[:blank]
    glue = b"" if not prefix or prefix.endswith(b"\n") else b"\r\n"
    added = b"".join(line.encode("utf-8") + b"\r\n" for line in lines)
    return prefix + glue + added + raw[blank:]


# -- the MIME tree ---------------------------------------------------------------------------------------
def _delimiters(raw: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """(line start, line end, closing?) of each delimiter line of ``boundary`` in raw[start:end]."""
    marker = b"--" + boundary
    position = start
    while True:
        found = raw.find(marker, position, end)
        if found < 0:
            return
        position = found + len(marker)
        if found != start and raw[found - 1:found] != b"\n":
            continue                                     # not at the start of a line
        newline = raw.find(b"\n", position, end)
        line_end = end if newline < 0 else newline + 1
        tail = raw[position:line_end].rstrip(b"\r\n")
        closing = tail.startswith(b"--")
        if (tail[2:] if closing else tail).strip(b" \t"):
            continue                                     # "--boundaryX": another boundary
        yield found, line_end, closing
        if closing:
            return


def _line_break_before(raw: bytes, offset: int, floor: int) -> int:
    """Where the line break that ends just before ``offset`` begins (it belongs to the delimiter)."""
    if offset - 2 >= floor and raw[offset - 2:offset] == b"\r\n":
        return offset - 2
    if offset - 1 >= floor and raw[offset - 1:offset] == b"\n":
        return offset - 1
    return offset


def _children(raw: bytes, body_start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    delimiters = list(_delimiters(raw, body_start, end, boundary))
    children = []
    for (_, after, closing), following in zip(delimiters, [*delimiters[1:], None], strict=True):
        if closing:
            break
        child_end = end if following is None else max(after, _line_break_before(raw, following[0], after))
        children.append((after, child_end))
    return children


def _walk(raw: bytes, start: int, end: int, depth: int, default_type: str, found: list[PartSpan],
          left: list[str]) -> None:
    _, body_start = header_block(raw, start, end)
    headers = parse_headers(raw, start, body_start)
    headers.set_default_type(default_type)           # used only when the part has no Content-Type
    content_type = headers.get_content_type()
    if content_type in SEALED_TYPES:
        left.append(content_type)
        return
    if content_type.startswith("multipart/"):
        boundary = headers.get_boundary()
        if depth >= MAX_DEPTH or not boundary or not boundary.isascii():
            left.append("multipart without a usable boundary" if depth < MAX_DEPTH else "nested too deep")
            return
        child_default = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        for child_start, child_end in _children(raw, body_start, end, boundary.encode("ascii")):
            _walk(raw, child_start, child_end, depth + 1, child_default, found, left)
    elif content_type == "text/html" and headers.get_content_disposition() != "attachment":
        found.append(PartSpan(start, body_start, end, headers))


def html_parts(raw: bytes) -> tuple[list[PartSpan], list[str]]:
    """The HTML bodies of the message in document order, and the sealed subtrees left out."""
    found: list[PartSpan] = []
    left: list[str] = []
    _walk(raw, 0, len(raw), 0, "text/plain", found, left)
    return found, left


# -- one HTML part ---------------------------------------------------------------------------------------
class LeftAlone(Exception):
    """This part is not rewritten; ``str()`` says why (for the log)."""


def _codec(part: PartSpan) -> str:
    charset = part.headers.get_content_charset() or "us-ascii"
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise LeftAlone(f"unknown charset {charset[:40]!r}") from None


def _transfer_encoding(part: PartSpan) -> str:
    encoding = str(part.headers.get("content-transfer-encoding") or "7bit").strip().lower()
    if encoding not in RAW_ENCODINGS | {"quoted-printable", "base64"}:
        raise LeftAlone(f"unknown transfer encoding {encoding[:40]!r}")
    return encoding


def _decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return base64.b64decode(body)
        except (binascii.Error, ValueError):
            raise LeftAlone("bad base64") from None
    return body


def _encode_qp(data: bytes, original: bytes) -> bytes:
    encoded = _BARE_LF.sub(b"\r\n", binascii.b2a_qp(data, quotetabs=False, istext=True, header=False))
    encoded = encoded.rstrip(b"\r\n")
    if encoded.endswith(b"="):                           # a soft break left dangling at the very end
        encoded = encoded[:-1]
    return encoded + original[len(original.rstrip(b"\r\n")):]


def _encode_base64(data: bytes, original: bytes) -> bytes:
    lines = original.strip(b"\r\n").split(b"\n")
    first = lines[0].rstrip(b"\r")
    # The sender's line length when it shows one (two lines or more), else the RFC 2045 maximum.
    width = len(first) if len(lines) > 1 and 4 <= len(first) <= 76 and len(first) % 4 == 0 else 76
    text = base64.b64encode(data)
    lines = [text[i:i + width] for i in range(0, len(text), width)]
    return b"\r\n".join(lines) + original[len(original.rstrip(b"\r\n")):]


def _longest_line(data: bytes) -> int:
    return max((len(line.rstrip(b"\r")) for line in data.split(b"\n")), default=0)


def _rewrite_part(raw: bytes, part: PartSpan, rewrite: Callable[[str, int | None, Callable[[str], int]],
                  HtmlRewrite], max_html_bytes: int) -> tuple[bytes, HtmlRewrite]:
    codec, encoding = _codec(part), _transfer_encoding(part)
    body = raw[part.body_start:part.end]
    decoded = _decode_body(body, encoding)
    if len(decoded) > max_html_bytes:
        raise LeftAlone(f"larger than {max_html_bytes} bytes")
    try:
        text = decoded.decode(codec)
    except UnicodeDecodeError:
        raise LeftAlone(f"not valid {codec}") from None
    is_raw = encoding in RAW_ENCODINGS
    result = rewrite(text, MAX_LINE if is_raw else None, lambda line: len(line.encode(codec, "replace")))
    if not result.changed:
        return body, result
    try:
        new = result.text.encode(codec)
    except UnicodeEncodeError:
        raise LeftAlone(f"does not re-encode in {codec}") from None
    if encoding == "quoted-printable":
        new = _encode_qp(new, body)
    elif encoding == "base64":
        new = _encode_base64(new, body)
    elif _longest_line(new) > max(MAX_LINE, _longest_line(body)):
        raise LeftAlone("a line would exceed 998 octets")
    return new, result


def rewrite_message(raw: bytes, *, track: Callable[[str], str | None] | None, pixel_html: str | None,
                    no_track_class: str, max_html_bytes: int) -> MessageRewrite:
    """Rewrite every HTML body's links through ``track``; the pixel goes into the first HTML body only
    (one open, one pixel)."""
    parts, sealed = html_parts(raw)
    outcome = MessageRewrite(raw, parts_left=[f"{kind} not entered" for kind in sealed])
    replacements: list[tuple[PartSpan, bytes]] = []
    for part in parts:
        pixel = None if outcome.pixel else pixel_html

        def rewrite(text: str, max_line: int | None, octets: Callable[[str], int],
                    pixel: str | None = pixel) -> HtmlRewrite:
            return rewrite_html(text, track=track, pixel_html=pixel, no_track_class=no_track_class,
                                max_line=max_line, octets=octets)
        try:
            new_body, result = _rewrite_part(raw, part, rewrite, max_html_bytes)
        except LeftAlone as why:
            outcome.parts_left.append(str(why))
            continue
        if not result.changed:
            continue
        replacements.append((part, new_body))
        outcome.links.extend(result.links)
        outcome.pixel = outcome.pixel or result.pixel
        outcome.links_left_for_length += result.links_left_for_length
        outcome.parts_rewritten += 1
    data = raw
    for part, new_body in reversed(replacements):         # back to front: earlier offsets stay valid
        data = data[:part.body_start] + new_body + data[part.end:]
    outcome.data = data
    return outcome

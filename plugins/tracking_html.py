"""Rewrites the links of one HTML document and adds an open pixel, changing nothing else.

The document is tokenized by the standard library's :class:`html.parser.HTMLParser` — a real HTML
tokenizer, so a link inside a comment, a ``<script>`` or a ``<style>`` is not a link — driven with
position tracking: each ``<a>``/``<area>`` start tag is located in the text by the parser's own position
and raw tag text, its attributes are re-scanned inside that raw tag (the HTML tokenizer's attribute
states, cross-checked against what the parser reported; on any disagreement the tag is left alone),
and only the ``href`` value's characters are replaced. Everything else stays character-identical.

Invariants:
- An ``href`` is decoded exactly once, as a browser does for an attribute value: character references
  are resolved with the attribute rule (``&copy=2`` in a query stays literal), leading/trailing spaces
  and controls are stripped and tabs/newlines removed. The tracking link then redirects to that string.
- Only absolute http(s) URLs with a host are rewritten; ``mailto:``, ``tel:``, ``#anchors``, relative
  and other schemes are not. Neither are links in tags that carry ``data-no-track`` or the no-track
  class, nor links the caller's ``track`` function declines (it returns None).
- With ``max_line`` set (7bit/8bit parts, which go over SMTP as they are), no line that we touch ends
  up longer than ``max_line`` octets: a rewritten attribute moves to a line of its own (whitespace
  between attributes is insignificant) and a link that still cannot fit is left unrewritten.
- The pixel goes right before the last ``</body>``, else before ``</html>``, else at the end.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.entities import html5 as _NAMED_REFERENCES
from html.parser import HTMLParser

__all__ = [
    "HtmlRewrite", "browser_url", "decode_attribute_value", "is_trackable_url", "rewrite_html", "scan_attributes",
]

LINK_TAGS = frozenset({"a", "area"})
# Elements whose content a browser shows as text (or not at all), whatever looks like a tag in it.
TEXT_ONLY_ELEMENTS = frozenset({"title", "textarea", "xmp", "iframe", "noembed", "noframes"})
NO_TRACK_ATTRIBUTE = "data-no-track"
_TAG_SPACE = "\t\n\f\r "
_ASCII_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# A character reference inside an attribute value (an attribute value, not HTML: the tokenizer found it).
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_URL_STRIP = "".join(chr(c) for c in range(0x21))     # C0 controls and space (WHATWG URL parser)


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute as written in a raw start tag; offsets are into that tag's text."""

    name: str                      # lowercased, as the parser reports it
    name_start: int
    value_start: int | None        # the raw value's span, quotes excluded; None without a value
    value_end: int | None
    end: int                       # just after the value (and its closing quote) or the name

    def raw_value(self, tag: str) -> str | None:
        if self.value_start is None or self.value_end is None:
            return None
        return tag[self.value_start:self.value_end]


@dataclass(slots=True)
class HtmlRewrite:
    text: str
    links: list[tuple[str, str]] = field(default_factory=list)   # (original URL, tracking URL)
    pixel: bool = False
    links_left_for_length: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.links) or self.pixel


# -- attribute values and URLs -------------------------------------------------------------------------
def decode_attribute_value(raw: str) -> str:
    """Resolve character references once, with the HTML attribute-value rule for legacy named ones."""
    def resolve(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("#"):
            return html.unescape(match.group(0))
        if ref.endswith(";") and ref in _NAMED_REFERENCES:
            return _NAMED_REFERENCES[ref]
        # A legacy reference without ";" (``&amp``, ``&copy``) counts only when nothing alphanumeric
        # or "=" follows it — in an attribute, ``?a=1&copy=2`` is a query, not a copyright sign.
        letters = ref.rstrip(";")
        for cut in range(len(letters), 1, -1):
            if letters[:cut] in _NAMED_REFERENCES:
                after = letters[cut:cut + 1] or match.string[match.end():match.end() + 1]
                if cut < len(ref) or after == "=" or after in _ASCII_ALNUM:
                    return match.group(0)
                return _NAMED_REFERENCES[letters[:cut]]
        return match.group(0)
    return _CHARREF.sub(resolve, raw)


def browser_url(raw_href: str) -> str:
    """The URL a browser follows for a raw ``href`` value."""
    url = decode_attribute_value(raw_href).strip(_URL_STRIP)
    return url.replace("\t", "").replace("\n", "").replace("\r", "")


def is_trackable_url(url: str) -> bool:
    scheme, sep, rest = url.partition(":")
    return bool(sep) and scheme.lower() in ("http", "https") and rest.startswith("//") and len(rest) > 2 \
        and rest[2] not in "/?#"


# -- the raw start tag -----------------------------------------------------------------------------------
def scan_attributes(tag: str) -> list[Attribute]:
    """The attributes of a raw start tag (``<a href="…" class=x>``), per the HTML tokenizer's states."""
    i, n = 1, len(tag)
    while i < n and tag[i] not in _TAG_SPACE + "/>":
        i += 1                                           # the tag name
    attributes: list[Attribute] = []
    while i < n:
        while i < n and tag[i] in _TAG_SPACE + "/":
            i += 1
        if i >= n or tag[i] == ">":
            break
        name_start = i
        i += 1                                           # a leading "=" belongs to the name
        while i < n and tag[i] not in _TAG_SPACE + "/>=":
            i += 1
        name = tag[name_start:i].lower()
        j = i
        while j < n and tag[j] in _TAG_SPACE:
            j += 1
        if j >= n or tag[j] != "=":
            attributes.append(Attribute(name, name_start, None, None, i))
            continue
        j += 1
        while j < n and tag[j] in _TAG_SPACE:
            j += 1
        if j < n and tag[j] in "\"'":
            close = tag.find(tag[j], j + 1)
            close = n if close < 0 else close
            attributes.append(Attribute(name, name_start, j + 1, close, min(close + 1, n)))
            i = close + 1
        else:
            k = j
            while k < n and tag[k] not in _TAG_SPACE + ">":
                k += 1
            attributes.append(Attribute(name, name_start, j, k, k))
            i = k
    return attributes


def _agrees_with_parser(tag: str, scanned: list[Attribute], parsed: list[tuple[str, str | None]]) -> bool:
    """Our scan of the tag says what the tokenizer said (else we do not touch the tag)."""
    if [a.name for a in scanned] != [name for name, _ in parsed]:
        return False
    for attribute, (_, value) in zip(scanned, parsed, strict=True):
        raw = attribute.raw_value(tag)
        if (raw is None) != (value is None) or (raw is not None and html.unescape(raw) != value):
            return False
    return True


# -- tokenizing ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _LinkTag:
    offset: int
    text: str
    attributes: list[tuple[str, str | None]]


class _Tokenizer(HTMLParser):
    """Records link start tags and the closing body/html tags, with their offsets in the text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self._text = text
        # HTMLParser reports (line, column) with lines split at "\n" only.
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.links: list[_LinkTag] = []
        self.body_end: int | None = None
        self.html_end: int | None = None
        self._text_only: str | None = None            # inside <title>, <textarea>…: no links there

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raw = self.get_starttag_text()
        if self._text_only is None and tag in TEXT_ONLY_ELEMENTS:
            self._text_only = tag
        if tag not in LINK_TAGS or raw is None or self._text_only is not None:
            return
        offset = self._offset()
        if self._text.startswith(raw, offset):           # else our position is off: leave the tag be
            self.links.append(_LinkTag(offset, raw, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._text_only:
            self._text_only = None
        if tag in ("body", "html"):
            offset = self._offset()
            if self._text.startswith("</", offset):
                if tag == "body":
                    self.body_end = offset
                else:
                    self.html_end = offset


# -- edits ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Edit:
    start: int
    end: int
    replacement: str
    original_url: str = ""         # "" for the pixel
    tracked_url: str = ""


def _link_edits(text: str, links: list[_LinkTag], track: Callable[[str], str | None],
                no_track_class: str) -> list[_Edit]:
    edits = []
    for link in links:
        names = {name for name, _ in link.attributes}
        classes = dict(link.attributes).get("class") or ""
        if NO_TRACK_ATTRIBUTE in names or (no_track_class and no_track_class in classes.split()):
            continue
        scanned = scan_attributes(link.text)
        if not _agrees_with_parser(link.text, scanned, link.attributes):
            continue
        href = next((a for a in scanned if a.name == "href"), None)   # the first one counts, as in browsers
        raw = href.raw_value(link.text) if href else None
        if href is None or raw is None:
            continue
        url = browser_url(raw)
        tracked = track(url) if is_trackable_url(url) else None
        if tracked is None:
            continue
        start = link.offset + href.name_start
        replacement = f'{link.text[href.name_start:href.name_start + 4]}="{html.escape(tracked)}"'
        edits.append(_Edit(start, link.offset + href.end, replacement, url, tracked))
    return edits


def _pixel_edit(text: str, tokens: _Tokenizer, pixel_html: str) -> _Edit:
    if tokens.body_end is not None:
        at = tokens.body_end
    elif tokens.html_end is not None:
        at = tokens.html_end
    else:
        at = len(text.rstrip("\r\n"))
    return _Edit(at, at, pixel_html)


def _apply(text: str, edits: list[_Edit], breaks: set[int], dropped: set[int], newline: str
           ) -> tuple[str, dict[int, int]]:
    """The text with the edits made; where each applied edit's replacement starts in it."""
    out: list[str] = []
    where: dict[int, int] = {}
    position = length = 0
    for index, edit in enumerate(edits):
        if index in dropped:
            continue
        out.append(text[position:edit.start])
        length += edit.start - position
        if index in breaks:
            out.append(newline)
            length += len(newline)
        where[index] = length
        out.append(edit.replacement)
        length += len(edit.replacement)
        position = edit.end
    out.append(text[position:])
    return "".join(out), where


def _fit_lines(text: str, edits: list[_Edit], newline: str, max_line: int, octets: Callable[[str], int]
               ) -> tuple[str, set[int]]:
    """Apply the edits so that no line holding one is longer than ``max_line`` octets."""
    breaks: set[int] = set()
    dropped: set[int] = set()
    for _ in range(2 * len(edits) + 1):                  # each round breaks or drops one edit
        out, where = _apply(text, edits, breaks, dropped, newline)
        by_line: dict[int, list[int]] = {}
        for index, start in where.items():
            by_line.setdefault(out.rfind("\n", 0, start) + 1, []).append(index)
        too_long = None
        for line_start, indexes in sorted(by_line.items()):
            line_end = out.find("\n", line_start)
            line = out[line_start:len(out) if line_end < 0 else line_end].rstrip("\r")
            if octets(line) > max_line:
                too_long = (line_start, indexes)
                break
        if too_long is None:
            return out, dropped
        line_start, indexes = too_long
        movable = [i for i in indexes if i not in breaks and where[i] > line_start]
        if movable:
            breaks.add(movable[0])
        else:
            dropped.add(indexes[0])
            breaks.discard(indexes[0])
    out, _ = _apply(text, edits, breaks, set(range(len(edits))), newline)
    return out, set(range(len(edits)))


def _newline_of(text: str) -> str:
    first = text.find("\n")
    return "\n" if first == 0 or (first > 0 and text[first - 1] != "\r") else "\r\n"


def rewrite_html(text: str, *, track: Callable[[str], str | None] | None, pixel_html: str | None,
                 no_track_class: str = "no-track", max_line: int | None = None,
                 octets: Callable[[str], int] = len) -> HtmlRewrite:
    """Rewrite the trackable links through ``track`` and add ``pixel_html``; see the module docstring.

    ``octets`` measures a line as it will be encoded (its charset) when ``max_line`` is set.
    """
    tokens = _Tokenizer(text)
    tokens.feed(text)
    tokens.close()
    edits = _link_edits(text, tokens.links, track, no_track_class) if track is not None else []
    if pixel_html:
        edits.append(_pixel_edit(text, tokens, pixel_html))
        edits.sort(key=lambda e: (e.start, e.end))
    if not edits:
        return HtmlRewrite(text)
    newline = _newline_of(text)
    if max_line is None:
        out, dropped = _apply(text, edits, set(), set(), newline)[0], set[int]()
    else:
        out, dropped = _fit_lines(text, edits, newline, max_line, octets)
    kept = [e for i, e in enumerate(edits) if i not in dropped]
    return HtmlRewrite(
        text=out,
        links=[(e.original_url, e.tracked_url) for e in kept if e.original_url],
        pixel=any(not e.original_url for e in kept),
        links_left_for_length=sum(1 for i, e in enumerate(edits) if i in dropped and e.original_url),
    )

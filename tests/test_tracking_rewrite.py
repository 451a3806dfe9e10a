"""Tracking rewrite over a MIME torture set: what changes, what stays byte for byte, what every link says.

Messages are built here byte by byte (so the test controls every charset, transfer encoding and line
break) and run through the plugin's DATA hook with a PluginHost that has no HTTP server. Every output is
checked for the invariants of relay.plugins.tracking_mime: it parses, each part keeps its charset and
transfer encoding, CRLF only, no line over 998 octets, and each tracking link's token decodes to exactly
the URL a browser would have followed.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import random
import re
from collections.abc import Iterator
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from relay.plugins.tracking import TrackingConfig, TrackingPlugin, location_for
from relay.plugins.tracking_html import browser_url, decode_attribute_value, rewrite_html, scan_attributes
from relay.plugins.tracking_mime import html_parts
from relay.plugins.tracking_tokens import Claims, TokenCodec, TokenError, TokenKind

from relay.limits import make_limiter
from relay.plugin import DataContext, PluginError, PluginHost, SessionInfo, Stage
from relay.settings import RedisSettings

SECRET = b"s3cret-key-for-tests-0123456789abcdef"
BASE = "https://t.example.com"
CLICK = re.compile(re.escape(BASE) + r"/t/c/([A-Za-z0-9_.-]+)")
OPEN = re.compile(re.escape(BASE) + r"/t/o/([A-Za-z0-9_.-]+)\.gif")
CODEC = TokenCodec.from_secrets(SECRET, "k1")


# -- building messages --------------------------------------------------------------------------------
def headers(*lines: str) -> bytes:
    return b"".join(line.encode() + b"\r\n" for line in lines)


def top(content_type: str, *extra: str) -> bytes:
    return headers("Received: from x ([127.0.0.1]) by relay.test; Mon, 23 Nov 2026 12:00:00 +0000",
                   "From: News <news@example.com>", "To: <rcpt@example.org>", "Subject: torture",
                   "Message-ID: <1@example.com>", *extra, "MIME-Version: 1.0", f"Content-Type: {content_type}")


def part(content_type: str, body: bytes, cte: str | None = None, *extra: str) -> bytes:
    lines = [f"Content-Type: {content_type}", *([f"Content-Transfer-Encoding: {cte}"] if cte else []), *extra]
    return headers(*lines) + b"\r\n" + body


def multipart(boundary: str, *parts: bytes, preamble: bytes = b"This is a MIME message.\r\n",
              epilogue: bytes = b"epilogue text\r\n") -> bytes:
    out = preamble
    for p in parts:
        out += f"--{boundary}\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode() + epilogue


def qp(text: str, charset: str = "utf-8") -> bytes:
    return binascii.b2a_qp(text.replace("\n", "\r\n").encode(charset), istext=True).replace(b"\n", b"\r\n") \
        .replace(b"\r\r\n", b"\r\n")


def b64(text: str, charset: str = "utf-8", width: int = 76) -> bytes:
    data = base64.b64encode(text.replace("\n", "\r\n").encode(charset))
    return b"\r\n".join(data[i:i + width] for i in range(0, len(data), width))


def crlf(text: str, charset: str = "utf-8") -> bytes:
    return text.replace("\n", "\r\n").encode(charset)


LINKS_HTML = """<!doctype html>
<html><head><title>News <a href="https://title.example/">not a link</a></title>
<style>a[href="https://css.example/"] { color: red }</style></head>
<body>
<p><a href="https://example.com/p?a=1&amp;b=2&copy=3&amp;c">query</a></p>
<p><a href='https://example.com/doc#section-2'>fragment</a> <A HREF=http://example.net/x>upper</A></p>
<p><a href="https://example.com/ünï?q=ä&amp;r=€">unicode</a> <a href="https://bücher.example/">idn</a></p>
<p><a href="mailto:hello@example.com">mail</a> <a href="tel:+15551234">tel</a> <a href="#top">anchor</a>
<a href="/relative">rel</a> <a href="javascript:void(0)">js</a> <a href="ftp://example.com/f">ftp</a></p>
<p><a data-no-track href="https://private.example/a">keep</a>
<a class="btn no-track" href="https://private.example/b">keep</a></p>
<!-- <a href="https://comment.example/">commented</a> -->
<script>var s = '<a href="https://script.example/">';</script>
<p><a href="  https://example.com/spaced  ">spaced</a> <a href="https://example.com/unsub">unsubscribe</a></p>
<area href="https://example.com/area" alt="">
</body>
</html>
"""
# What a browser follows for each trackable link above, in document order.
LINKS_EXPECTED = [
    "https://example.com/p?a=1&b=2&copy=3&c",
    "https://example.com/doc#section-2",
    "http://example.net/x",
    "https://example.com/ünï?q=ä&r=€",
    "https://bücher.example/",
    "https://example.com/spaced",
    "https://example.com/area",
]
WITH_UNSUB = [*LINKS_EXPECTED[:-1], "https://example.com/unsub", LINKS_EXPECTED[-1]]
UNTRACKED = ["mailto:hello@example.com", "tel:+15551234", "#top", "/relative", "javascript:void(0)",
             "ftp://example.com/f", "https://private.example/a", "https://private.example/b",
             "https://title.example/", "https://comment.example/", "https://script.example/",
             "https://css.example/"]


# -- running the plugin --------------------------------------------------------------------------------
def host(**kw: object) -> PluginHost:
    return PluginHost(hostname="relay.test", secret_key=SECRET, limiter=make_limiter(RedisSettings()),
                      public_url=BASE, **kw)  # type: ignore[arg-type]


async def track(data: bytes, *, recipients: tuple[str, ...] = ("rcpt@example.org",),
                sender: str = "news@example.com", user: str | None = None, **config: object) -> bytes:
    settings_ = {"enabled_for_domains": ("example.com",), **config}
    plugin = TrackingPlugin(TrackingConfig.model_validate(settings_), host())
    await plugin.start()
    try:
        ctx = DataContext(SessionInfo("127.0.0.1", "relay", "client.test", user), "QID1", sender,
                          list(recipients), data)
        verdict = await plugin.data(ctx)
        assert not verdict.is_reject
        return ctx.data
    finally:
        await plugin.stop()


class Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "href" and value is not None:
                self.hrefs.append(value)
            if name == "src" and value is not None:
                self.srcs.append(value)


def html_bodies(data: bytes) -> list[str]:
    """The message's own HTML bodies (not attachments, not inside forwarded messages)."""
    def walk(p: Message) -> Iterator[Message]:
        if p.get_content_maintype() == "multipart":
            for child in p.get_payload():
                assert isinstance(child, Message)
                yield from walk(child)
        else:
            yield p
    message = email.message_from_bytes(data, policy=email.policy.default)
    out = []
    for p in walk(message):
        if p.get_content_type() == "text/html" and p.get_content_disposition() != "attachment":
            assert isinstance(p, EmailMessage)
            out.append(str(p.get_content()))
    return out


def clicks(text: str) -> list[Claims]:
    parser = Hrefs()
    parser.feed(text)
    parser.close()
    return [CODEC.verify(m.group(1), TokenKind.CLICK) for href in parser.hrefs if (m := CLICK.fullmatch(href))]


def opens(text: str) -> list[Claims]:
    parser = Hrefs()
    parser.feed(text)
    parser.close()
    return [CODEC.verify(m.group(1), TokenKind.OPEN) for src in parser.srcs if (m := OPEN.fullmatch(src))]


def leaves(message: Message) -> Iterator[Message]:
    for p in message.walk():
        if not p.is_multipart():
            yield p


def check_well_formed(before: bytes, after: bytes) -> None:
    """The invariants every output keeps, whatever was rewritten."""
    assert b"\n" not in after.replace(b"\r\n", b""), "a bare LF"
    assert all(len(line) <= 998 for line in after.split(b"\r\n"))
    old = email.message_from_bytes(before, policy=email.policy.default)
    new = email.message_from_bytes(after, policy=email.policy.default)
    assert not new.defects
    old_leaves, new_leaves = list(leaves(old)), list(leaves(new))
    assert len(old_leaves) == len(new_leaves)
    for o, n in zip(old_leaves, new_leaves, strict=True):
        assert o.get_content_type() == n.get_content_type()
        assert o.get_content_charset() == n.get_content_charset()
        assert o.get("Content-Transfer-Encoding") == n.get("Content-Transfer-Encoding")
        assert not n.defects, n.defects
        if o.get_content_type() != "text/html" or o.get_content_disposition() == "attachment":
            assert o.get_payload(decode=True) == n.get_payload(decode=True)


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


# -- the torture set -----------------------------------------------------------------------------------
async def test_multipart_alternative_qp_links_pixel_and_exact_urls() -> None:
    text = part("text/plain; charset=utf-8", crlf("Read https://example.com/p?a=1&b=2 now.\n"), "8bit")
    html = part("text/html; charset=utf-8", qp(LINKS_HTML), "quoted-printable")
    data = top('multipart/alternative; boundary="alt-1"', "List-Unsubscribe: <https://example.com/unsub>") \
        + b"\r\n" + multipart("alt-1", text, html)
    out = await track(data)
    check_well_formed(data, out)
    [body] = html_bodies(out)
    got = clicks(body)
    assert [c.value for c in got] == LINKS_EXPECTED
    assert all(c.message_id == "QID1" and c.recipient == "rcpt@example.org" for c in got)
    parser = Hrefs()
    parser.feed(body)
    for untouched in [*UNTRACKED, "https://example.com/unsub"]:
        assert untouched in parser.hrefs or untouched in body
    [pixel] = opens(body)
    assert pixel.recipient == "rcpt@example.org"
    assert body.index("/t/o/") < body.index("</body>")
    # The text part, the preamble, the epilogue and the headers are byte for byte the same.
    assert text in out and out.startswith(data[:data.index(b"\r\n\r\n")])
    assert out.endswith(b"--alt-1--\r\nepilogue text\r\n") and b"This is a MIME message.\r\n" in out


async def test_mixed_with_attachments_keeps_attachments_byte_for_byte() -> None:
    pdf = b"%PDF-1.4\n" + hashlib.sha256(b"x").digest() * 40
    pdf_part = part('application/pdf; name="a.pdf"', b64(pdf.decode("latin-1"), "latin-1"), "base64",
                    'Content-Disposition: attachment; filename="a.pdf"')
    html_attachment = part("text/html; charset=utf-8", crlf('<a href="https://attached.example/">x</a>\n'),
                           "7bit", 'Content-Disposition: attachment; filename="page.html"')
    forwarded = part("message/rfc822", top("text/html; charset=utf-8") + b"\r\n"
                     + crlf('<a href="https://forwarded.example/">x</a>\n'))
    html = part("text/html; charset=utf-8", b64(LINKS_HTML), "base64")
    alternative = part('multipart/alternative; boundary="inner"',
                       multipart("inner", part("text/plain", b"plain\r\n"), html, preamble=b""))
    data = top('multipart/mixed; boundary="outer"') + b"\r\n" + multipart(
        "outer", alternative, pdf_part, html_attachment, forwarded)
    out = await track(data)
    check_well_formed(data, out)
    for kept in (pdf_part, html_attachment, forwarded):
        assert kept in out
    [body] = html_bodies(out)
    # No List-Unsubscribe header here: its URL in the body is an ordinary link.
    assert [c.value for c in clicks(body)] == WITH_UNSUB
    # Still base64, with the original line length.
    encoded = out.split(b"Content-Transfer-Encoding: base64\r\n\r\n")[1].split(b"\r\n--inner")[0]
    assert {len(line) for line in encoded.split(b"\r\n")[:-1]} == {76}


async def test_base64_line_length_is_kept() -> None:
    data = top("text/html; charset=utf-8", "Content-Transfer-Encoding: base64") + b"\r\n" \
        + b64(LINKS_HTML, width=64) + b"\r\n"
    out = await track(data)
    check_well_formed(data, out)
    lines = body_of(out).split(b"\r\n")
    assert lines[-1] == b"" and {len(line) for line in lines[:-2]} == {64}
    assert [c.value for c in clicks(html_bodies(out)[0])] == WITH_UNSUB
    one_line = top("text/html; charset=utf-8", "Content-Transfer-Encoding: base64") + b"\r\n" \
        + b64('<a href="https://example.com/">x</a>') + b"\r\n"
    lines = body_of(await track(one_line)).split(b"\r\n")
    assert len(lines[0]) == 76 and all(len(line) <= 76 for line in lines)


async def test_qp_soft_break_inside_an_href() -> None:
    raw = (b'<html><body><a href=3D"https://example.com/a-very-long-path/that-is-broken/by-a-so=\r\n'
           b'ft-line-break?x=3D1&amp;y=3D2">x</a></body></html>\r\n')
    data = top("text/html; charset=utf-8", "Content-Transfer-Encoding: quoted-printable") + b"\r\n" + raw
    out = await track(data)
    check_well_formed(data, out)
    body = html_bodies(out)[0]
    assert [c.value for c in clicks(body)] == [
        "https://example.com/a-very-long-path/that-is-broken/by-a-soft-line-break?x=1&y=2"]
    assert all(len(line) <= 76 for line in body_of(out).split(b"\r\n"))


@pytest.mark.parametrize(("charset", "cte", "encode"), [
    ("iso-8859-1", "8bit", crlf),
    ("iso-8859-1", "quoted-printable", qp),
    ("windows-1252", "8bit", crlf),
    ("windows-1252", "quoted-printable", qp),
    ("windows-1252", "base64", b64),
])
async def test_legacy_charsets_are_kept(charset: str, cte: str, encode: object) -> None:
    html = ('<html><body><p>Caf\u00e9 cr\u00e8me \u2014 \u20ac5 \u201cquoted\u201d</p>\n'
            '<a href="https://example.com/caf%C3%A9?x=1&amp;y=\u00e9">\u00e9</a>\n</body></html>\n')
    if charset == "iso-8859-1":
        html = html.replace("\u2014", "-").replace("\u20ac", "EUR ").replace("\u201c", '"').replace("\u201d", '"')
    assert callable(encode)
    data = top(f"text/html; charset={charset}", f"Content-Transfer-Encoding: {cte}") + b"\r\n" \
        + encode(html, charset) + b"\r\n"
    out = await track(data)
    check_well_formed(data, out)
    [body] = html_bodies(out)
    assert "Caf\u00e9 cr\u00e8me" in body
    if charset == "windows-1252":
        assert "\u20ac5 \u201cquoted\u201d" in body
    assert [c.value for c in clicks(body)] == ["https://example.com/caf%C3%A9?x=1&y=\u00e9"]
    assert opens(body)


async def test_iso_2022_jp_html_stays_iso_2022_jp_7bit() -> None:
    html = '<html><body><p>\u3053\u3093\u306b\u3061\u306f</p><a href="https://example.jp/?q=1&amp;r=2">\u30ea\u30f3\u30af</a></body></html>\n'
    data = top("text/html; charset=iso-2022-jp", "Content-Transfer-Encoding: 7bit") + b"\r\n" \
        + crlf(html, "iso-2022-jp")
    out = await track(data)
    check_well_formed(data, out)
    assert all(byte < 0x80 for byte in out)
    [body] = html_bodies(out)
    assert "\u3053\u3093\u306b\u3061\u306f" in body and "\u30ea\u30f3\u30af" in body
    assert [c.value for c in clicks(body)] == ["https://example.jp/?q=1&r=2"]


async def test_html_without_body_gets_the_pixel_at_the_end() -> None:
    data = top("text/html; charset=utf-8") + b"\r\n" + crlf('<p>Hi <a href="https://example.com/">there</a></p>\n')
    out = await track(data)
    check_well_formed(data, out)
    body = body_of(out).decode()
    assert re.fullmatch(r'<p>Hi <a href="[^"]+">there</a></p><img src="[^"]+/t/o/[^"]+\.gif"[^>]*/>\r\n', body)
    no_body_but_html = top("text/html; charset=utf-8") + b"\r\n" + crlf("<html><p>x</p></html>\n")
    out = await track(no_body_but_html)
    assert re.search(rb"<p>x</p><img [^>]+/></html>\r\n$", out)


async def test_long_lines_stay_within_998_octets() -> None:
    filler = "\u00e9" * 220                          # 440 octets in UTF-8, 220 characters
    line = f'<p>{filler}<a class="x" href="https://example.com/a?b=1&amp;c=2">x</a>{filler}</p>'
    html = f"<html><body>\n{line}\n{line}\n<p>{'y' * 990}</p>\n</body></html>\n"
    data = top("text/html; charset=utf-8", "Content-Transfer-Encoding: 8bit") + b"\r\n" + crlf(html)
    assert max(len(x) for x in data.split(b"\r\n")) <= 998
    out = await track(data)
    check_well_formed(data, out)
    body = html_bodies(out)[0]
    assert [c.value for c in clicks(body)] == ["https://example.com/a?b=1&c=2"] * 2
    assert opens(body)


async def test_a_link_that_cannot_fit_a_line_is_left_alone() -> None:
    # Incompressible, so that its token cannot be shorter than the line has room for.
    url = "https://example.com/?" + base64.urlsafe_b64encode(random.Random(1).randbytes(720)).decode()
    html = f'<a href="{url}">x</a>\n'
    data = top("text/html; charset=us-ascii", "Content-Transfer-Encoding: 7bit") + b"\r\n" + crlf(html)
    out = await track(data, track_opens=False, max_url_length=3000)
    assert out == data


async def test_multipart_signed_is_never_touched() -> None:
    signed = top('multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="sig"') \
        + b"\r\n" + multipart("sig", part("text/html; charset=utf-8", crlf('<a href="https://example.com/">x</a>\n')),
                              part("application/pkcs7-signature", b"MIAGCSqGSIb3DQEHAqCAMIACAQEx\r\n", "base64"))
    assert await track(signed) == signed
    encrypted = top('multipart/encrypted; protocol="application/pgp-encrypted"; boundary="enc"') + b"\r\n" \
        + multipart("enc", part("application/pgp-encrypted", b"Version: 1\r\n"),
                    part("application/octet-stream", b"-----BEGIN PGP MESSAGE-----\r\n"))
    assert await track(encrypted) == encrypted
    # A signed subtree inside a mixed message stays as it was; the other HTML part is tracked.
    inner = part('multipart/signed; protocol="application/pgp-signature"; boundary="s2"',
                 multipart("s2", part("text/html", crlf('<a href="https://signed.example/">x</a>\n')),
                           part("application/pgp-signature", b"sig\r\n")))
    mixed = top('multipart/mixed; boundary="m"') + b"\r\n" + multipart(
        "m", part("text/html; charset=utf-8", crlf('<a href="https://example.com/">x</a>\n')), inner)
    out = await track(mixed)
    check_well_formed(mixed, out)
    assert inner in out
    assert [c.value for c in clicks(html_bodies(out)[0])] == ["https://example.com/"]


async def test_already_dkim_signed_message_is_left_alone_unless_configured() -> None:
    data = top("text/html; charset=utf-8", "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s; bh=x; b=y") \
        + b"\r\n" + crlf('<a href="https://example.com/">x</a>\n')
    assert await track(data) == data
    out = await track(data, rewrite_signed=True)
    assert [c.value for c in clicks(html_bodies(out)[0])] == ["https://example.com/"]


async def test_undecodable_and_unknown_parts_are_left_untouched() -> None:
    bad_utf8 = part("text/html; charset=utf-8", b'<a href="https://example.com/">\xff\xfe</a>\r\n', "8bit")
    unknown_charset = part("text/html; charset=x-no-such-charset", crlf('<a href="https://example.com/">x</a>\n'))
    unknown_cte = part("text/html; charset=utf-8", crlf('<a href="https://example.com/">x</a>\n'), "x-uuencode")
    bad_base64 = part("text/html; charset=utf-8", b"PGEgaHJlZj0i=x\r\n", "base64")
    data = top('multipart/mixed; boundary="m"') + b"\r\n" + multipart(
        "m", bad_utf8, unknown_charset, unknown_cte, bad_base64)
    assert await track(data) == data


async def test_no_charset_means_us_ascii() -> None:
    data = top("text/html") + b"\r\n" + crlf('<a href="https://example.com/">x</a>\n')
    out = await track(data)
    assert b"charset" not in out and [c.value for c in clicks(body_of(out).decode())] == ["https://example.com/"]
    eight_bit = top("text/html") + b"\r\n" + '<a href="https://example.com/">\u00e9</a>\r\n'.encode()
    assert await track(eight_bit) == eight_bit


async def test_opt_out_header_is_always_removed() -> None:
    html = crlf('<a href="https://example.com/">x</a>\n')
    opted_out = top("text/html; charset=utf-8", "X-Relay-Track: no") + b"\r\n" + html
    assert await track(opted_out) == opted_out.replace(b"X-Relay-Track: no\r\n", b"")
    folded = top("text/html; charset=utf-8", "x-relay-track:\r\n\tOFF") + b"\r\n" + html
    assert await track(folded) == folded.replace(b"x-relay-track:\r\n\tOFF\r\n", b"")
    # Removed even when the sender is not tracked at all.
    assert await track(opted_out, sender="someone@other.example") == opted_out.replace(b"X-Relay-Track: no\r\n", b"")
    other_value = top("text/html; charset=utf-8", "X-Relay-Track: yes") + b"\r\n" + html
    out = await track(other_value)
    assert b"X-Relay-Track" not in out and clicks(body_of(out).decode())


async def test_who_is_tracked() -> None:
    data = top("text/html; charset=utf-8") + b"\r\n" + crlf('<a href="https://example.com/">x</a>\n')
    assert await track(data, sender="a@other.example") == data
    assert await track(data, sender="") == data                                    # bounces never
    assert await track(data, sender="a@EXAMPLE.com") != data                       # domains: any case
    assert await track(data, sender="a@other.example", enabled_for_domains=("*",)) != data
    assert await track(data, sender="a@other.example", user="alice", enabled_for_users=("alice",)) != data
    assert await track(data, sender="a@other.example", user="bob", enabled_for_users=("alice",)) == data
    assert await track(data, sender="a@other.example", user="bob", enabled_for_users=("*",)) != data
    assert await track(data, sender="a@other.example", user=None, enabled_for_users=("*",)) == data


async def test_several_recipients_get_message_level_tokens_or_none() -> None:
    data = top("text/html; charset=utf-8") + b"\r\n" + crlf('<a href="https://example.com/">x</a></body>\n')
    out = await track(data, recipients=("a@example.org", "b@example.org"), one_click_unsubscribe=True)
    [claim] = clicks(body_of(out).decode())
    assert claim.recipient == "" and claim.message_id == "QID1"
    assert b"List-Unsubscribe" not in out
    assert await track(data, recipients=("a@example.org", "b@example.org"), multiple_recipients="skip") == data


async def test_one_click_unsubscribe_headers() -> None:
    data = top("text/plain; charset=utf-8") + b"\r\n" + b"plain text only\r\n"
    out = await track(data, one_click_unsubscribe=True)
    message = email.message_from_bytes(out, policy=email.policy.default)
    url = str(message["List-Unsubscribe"]).strip("<>")
    assert url.startswith(BASE + "/t/u/")
    claims = CODEC.verify(url.rsplit("/", 1)[1], TokenKind.UNSUBSCRIBE)
    assert (claims.recipient, claims.value, claims.message_id) == ("rcpt@example.org", "example.com", "QID1")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert body_of(out) == body_of(data)
    has_one = top("text/plain", "List-Unsubscribe: <mailto:u@example.com>") + b"\r\n" + b"x\r\n"
    assert await track(has_one, one_click_unsubscribe=True) == has_one


async def test_clicks_or_opens_can_be_switched_off() -> None:
    data = top("text/html; charset=utf-8") + b"\r\n" + crlf('<body><a href="https://example.com/">x</a></body>\n')
    only_opens = body_of(await track(data, track_clicks=False)).decode()
    assert not clicks(only_opens) and opens(only_opens)
    only_clicks = body_of(await track(data, track_opens=False)).decode()
    assert clicks(only_clicks) and not opens(only_clicks)


async def test_start_needs_a_secret_and_a_base_url() -> None:
    config = TrackingConfig(enabled_for_domains=("*",))
    no_secret = PluginHost(hostname="h", secret_key=None, limiter=make_limiter(RedisSettings()), public_url=BASE)
    with pytest.raises(PluginError, match="secret_key"):
        await TrackingPlugin(config, no_secret).start()
    no_url = PluginHost(hostname="h", secret_key=SECRET, limiter=make_limiter(RedisSettings()))
    with pytest.raises(PluginError, match="base URL"):
        await TrackingPlugin(config, no_url).start()
    own = TrackingPlugin(TrackingConfig(base_url="https://links.example/x/"), no_url)
    await own.start()
    assert own.base_url == "https://links.example/x"
    await own.stop()


# -- pieces ------------------------------------------------------------------------------------------
def test_tracking_links_are_not_tracked_twice() -> None:
    text = f'<a href="{BASE}/t/c/v1.k1.abc.def">x</a>'
    result = rewrite_html(text, track=lambda url: None if url.startswith(BASE) else "X", pixel_html=None)
    assert result.text == text


@pytest.mark.parametrize(("raw", "url"), [
    ("https://x/?a=1&amp;b=2", "https://x/?a=1&b=2"),
    ("https://x/?a=1&b=2", "https://x/?a=1&b=2"),
    ("https://x/?a=1&copy=2", "https://x/?a=1&copy=2"),          # legacy ref followed by "=": literal
    ("https://x/?a=1&copyx", "https://x/?a=1&copyx"),            # followed by alphanumerics: literal
    ("https://x/?a=&copy", "https://x/?a=\u00a9"),               # at the end: decoded
    ("https://x/?a=&copy;2", "https://x/?a=\u00a92"),
    ("https://x/&#38;&#x26;&#0;", "https://x/&&\ufffd"),
    ("https://x/&notit;", "https://x/&notit;"),
    ("https://x/&amp;amp;", "https://x/&amp;"),                  # decoded once, not twice
    (" \t\nhttps://x/a\tb\nc \r\n", "https://x/abc"),
])
def test_browser_url(raw: str, url: str) -> None:
    assert browser_url(raw) == url


def test_scan_attributes_matches_the_tokenizer() -> None:
    tag = "<a x=1 href = 'h&amp;' data-no-track\n/ class=\"c d\"/>"
    names = [(a.name, a.raw_value(tag)) for a in scan_attributes(tag)]
    assert names == [("x", "1"), ("href", "h&amp;"), ("data-no-track", None), ("class", "c d")]
    assert decode_attribute_value("h&amp;") == "h&"


def test_location_for() -> None:
    assert location_for("https://example.com/a?b=1&c=%20#f") == "https://example.com/a?b=1&c=%20#f"
    assert location_for("https://example.com/\u00fc?q=\u00e4") == "https://example.com/%C3%BC?q=%C3%A4"
    assert location_for("https://b\u00fccher.example:8443/x") == "https://xn--bcher-kva.example:8443/x"
    for bad in ("javascript:alert(1)", "mailto:a@b", "//evil.example/", "https:///path", "data:text/html,x"):
        with pytest.raises(ValueError, match="URL"):
            location_for(bad)


def test_html_parts_finds_nested_bodies_in_order() -> None:
    data = top('multipart/mixed; boundary="o"') + b"\r\n" + multipart(
        "o", part('multipart/alternative; boundary="o-1"', multipart(
            "o-1", part("text/plain", b"p\r\n"), part("text/html", b"<p>1</p>\r\n"))),
        part("text/html", b"<p>2</p>\r\n"))
    found, _ = html_parts(data)
    assert [data[p.body_start:p.end] for p in found] == [b"<p>1</p>\r\n", b"<p>2</p>\r\n"]


# -- tokens --------------------------------------------------------------------------------------------
def test_tokens_round_trip_and_refuse_everything_else() -> None:
    claims = Claims(TokenKind.CLICK, "QID1", "r@example.org", "https://example.com/?a=1&b=2")
    token = CODEC.issue(claims)
    assert token.startswith("v1.k1.") and CODEC.verify(token, TokenKind.CLICK) == claims
    for kind in (TokenKind.OPEN, TokenKind.UNSUBSCRIBE):
        with pytest.raises(TokenError) as wrong:
            CODEC.verify(token, kind)
        assert wrong.value.status == 404
    for i in range(len(token)):                                   # every single-character change
        swapped = "A" if token[i] != "A" else "B"
        with pytest.raises(TokenError):
            CODEC.verify(token[:i] + swapped + token[i + 1:], TokenKind.CLICK)
    for cut in (1, 5, len(token) // 2, len(token) - 1):
        with pytest.raises(TokenError):
            CODEC.verify(token[:cut], TokenKind.CLICK)
    foreign = TokenCodec.from_secrets(b"another secret", "k1").issue(claims)
    with pytest.raises(TokenError):
        CODEC.verify(foreign, TokenKind.CLICK)
    for junk in ("", "....", "v2.k1.a.b", "v1.k9.a.b", "v1.k1.@@.b", "v1.k1." + "a" * 5000 + ".b", "v1.k1.é.b"):
        with pytest.raises(TokenError):
            CODEC.verify(junk, TokenKind.CLICK)


def test_key_rotation_keeps_old_tokens_valid() -> None:
    old_token = CODEC.issue(Claims(TokenKind.OPEN, "Q", "r@x"))
    rotated = TokenCodec.from_secrets(b"new secret", "k2", {"k1": SECRET})
    assert rotated.verify(old_token, TokenKind.OPEN).message_id == "Q"
    assert rotated.issue(Claims(TokenKind.OPEN, "Q", "r@x")).startswith("v1.k2.")
    # The same key id under another secret is not the old key.
    with pytest.raises(TokenError):
        TokenCodec.from_secrets(b"new secret", "k2", {"k1": b"wrong"}).verify(old_token, TokenKind.OPEN)
    with pytest.raises(ValueError, match="both"):
        TokenCodec.from_secrets(SECRET, "k1", {"k1": SECRET})


@settings(max_examples=200, deadline=None)
@given(message_id=st.text(min_size=1, max_size=20), recipient=st.text(max_size=60), url=st.text(max_size=300))
def test_tokens_carry_any_text(message_id: str, recipient: str, url: str) -> None:
    claims = Claims(TokenKind.CLICK, message_id, recipient, url)
    try:
        token = CODEC.issue(claims)
    except ValueError:
        assert any("\x00" in f or any(0xD800 <= ord(c) <= 0xDFFF for c in f) for f in (message_id, recipient, url))
        return
    assert CODEC.verify(token, TokenKind.CLICK) == claims


FRAGMENTS = st.sampled_from([
    "<p>", "</p>", "text ", "&amp;", "&copy", "<!-- c -->", "<script>if(a<b){}</script>", "\r\n", "é",
    '<a href="https://example.com/a?x=1&amp;y=2">', "<a href='http://example.org/#f'>", "<a href=/rel>",
    '<a class="no-track" href="https://n.example/">', "<a data-no-track href=https://n.example/>", "</a>",
    '<a href="mailto:x@example.com">', "<img src=x>", "<br/>", "</body>", "<body>", "<title>", "</title>",
    '<a x="1" HREF = "https://example.com/q" y>', "<a href=https://example.com/u?a=1&b=2>", "<",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=40))
def test_rewrite_changes_only_hrefs(fragments: list[str]) -> None:
    text = "".join(fragments)
    seen: list[str] = []

    def tracker(url: str) -> str:
        seen.append(url)
        return f"https://t.example/{len(seen)}"
    result = rewrite_html(text, track=tracker, pixel_html=None)
    for index, (original, tracked) in enumerate(result.links):
        assert tracked == f"https://t.example/{index + 1}" and original == seen[index]
    assert len(result.links) == len(seen)
    # Everything but the href values tokenizes exactly as before.
    assert _tokens(result.text, hrefs=False) == _tokens(text, hrefs=False)
    for original, _ in result.links:
        assert original.startswith(("https://", "http://")) and "n.example" not in original


def _tokens(text: str, *, hrefs: bool) -> list[object]:
    out: list[object] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            out.append((tag, [(k, v) for k, v in attrs if hrefs or k != "href"]))

        def handle_endtag(self, tag: str) -> None:
            out.append(("/", tag))

        def handle_data(self, data: str) -> None:
            out.append(data)

        def handle_comment(self, data: str) -> None:
            out.append(("!", data))
    parser = Collect(convert_charrefs=False)
    parser.feed(text)
    parser.close()
    return out


# -- configuration -------------------------------------------------------------------------------------
def test_every_key_is_documented_and_the_plugin_runs_at_data_only() -> None:
    example = (Path(__file__).parent.parent / "relay.toml.example").read_text()
    section = example.split("# [plugins.tracking]", 1)[1]
    for name in TrackingConfig.model_fields:
        assert f"# {name} = " in section, name
    # DATA only: before any attempt, so a DKIM step signing before each attempt comes after it in any order.
    assert TrackingPlugin.hooks() == [Stage.DATA]
    with pytest.raises(ValueError, match="key_id"):
        TrackingConfig(key_id="has space")
    with pytest.raises(ValueError, match="base_url"):
        TrackingConfig(base_url="ftp://x.example")

"""Open and click tracking, and optional one-click unsubscribe (RFC 8058).

For the senders that enable it (authenticated users or envelope sender domains, ``"*"`` for all), the
plugin rewrites the http(s) links of every HTML body to signed redirect URLs on the tracking base URL
(``[http].public_url`` or its own ``base_url``) and adds a 1×1 open pixel; it serves those URLs on the
relay's HTTP server: ``GET /t/c/<token>`` (302 to the original URL, "clicked" event), ``GET
/t/o/<token>.gif`` (the pixel, "opened" event) and, when enabled, ``GET``/``POST /t/u/<token>`` (a
confirmation page / the unsubscribe itself: a suppression of the recipient scoped to the sender domain
and an "unsubscribed" event). What a link leaves alone and how a part is rewritten: see
:mod:`relay.plugins.tracking_html` and :mod:`relay.plugins.tracking_mime`; the tokens:
:mod:`relay.plugins.tracking_tokens`.

Where the rewrite happens — at DATA, not before each attempt:
- The change is stored, so what is queued is what is sent on every attempt and what an operator sees
  in the queue, and the DKIM plugin signs the tracked message before each attempt (a changing plugin
  may not run after a sealing one; at DATA we are before any attempt whatever the chain order, and a
  DKIM step placed at DATA must simply come after us, which the chain enforces).
- A click must name a recipient. One stored copy serves every recipient of a message, so a per-recipient
  link is only possible when the message has one recipient: then the tokens carry that recipient. With
  several recipients they carry the message id only (events then have no recipient; the store knows
  the message's recipients), or the message is not tracked at all (``multiple_recipients = "skip"``).
  Rewriting per attempt would not do better: one attempt delivers one body to every recipient of a
  destination at once. Senders who need per-recipient attribution submit one message per recipient.
- One-click unsubscribe needs a recipient, so its header is only added to single-recipient messages.

Invariants:
- The per-message opt-out header (``X-Relay-Track: no``) is removed from every message, tracked or not,
  before anything else happens (so even a failed or timed-out rewrite leaves it out).
- A message carrying a DKIM-Signature or ARC-Message-Signature is not rewritten unless
  ``rewrite_signed`` (its signature would break). Null-sender mail (bounces) is never tracked.
- A token that is not genuine gets 400/404 and never a redirect; only http(s) targets are redirected to.
  Redirecting reads no database.
- Responding never waits for recording: events go to a bounded queue drained by a few workers into
  ``host.events``; a full queue drops the event with a warning, a failing store is logged. HEAD requests
  (link checkers) are answered but not recorded. Unsubscribing never happens on GET (scanners prefetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any, Literal
from urllib.parse import quote

import idna
from aiohttp import web
from pydantic import Field, SecretStr, field_validator

from relay.plugin import (
    CONTINUE,
    DataContext,
    Event,
    EventRecorder,
    Plugin,
    PluginConfig,
    PluginError,
    PluginHost,
    Suppression,
    Verdict,
    get_logger,
)

from .tracking_html import is_trackable_url
from .tracking_mime import (
    MessageRewrite,
    add_headers,
    header_block,
    parse_headers,
    remove_header,
    rewrite_message,
)
from .tracking_tokens import Claims, TokenCodec, TokenError, TokenKind, valid_key_id

__all__ = ["PLUGIN", "TrackingConfig", "TrackingPlugin", "location_for"]

log = get_logger(__name__)

CLICK_PATH = "/t/c/{token}"
OPEN_PATH = "/t/o/{token}.gif"
UNSUBSCRIBE_PATH = "/t/u/{token}"
OPT_OUT_VALUES = frozenset({"no", "off", "false", "0", "none"})
SIGNATURE_HEADERS = ("DKIM-Signature", "ARC-Message-Signature")
PLACEHOLDER_SECRET = "CHANGE-ME"  # noqa: S105 - the marker we refuse, not a secret
# A transparent 1×1 GIF89a: header, screen descriptor with a 2-colour table, a graphic control extension
# marking colour 0 transparent, one image descriptor and its LZW data, trailer.
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
             b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, private", "Pragma": "no-cache"}
_LIST_URL = re.compile(r"<([^>]*)>")
_HEADER_NAME = re.compile(r"[!-9;-~]+")                  # RFC 5322 ftext
_USER_AGENT_MAX = 512


class OldKey(PluginConfig):
    """A retired signing key still accepted for verification: its id and the secret it came from."""

    key_id: str
    secret: SecretStr


class TrackingConfig(PluginConfig):
    # Who gets tracked: authenticated usernames and envelope sender domains; "*" in a list means all of
    # them (any authenticated user / any sender). Empty lists: nobody (the opt-out header is still removed).
    enabled_for_users: tuple[str, ...] = ()
    enabled_for_domains: tuple[str, ...] = ()
    track_clicks: bool = True
    track_opens: bool = True
    # Add List-Unsubscribe + List-Unsubscribe-Post (RFC 8058) to tracked single-recipient messages that
    # have none, and serve /t/u/<token> (needs the suppression list of the queue store).
    one_click_unsubscribe: bool = False
    # Base URL of the tracking links; empty: [http].public_url.
    base_url: str = ""
    # Header a sender sets to "no" to keep one message untracked; removed from every message.
    opt_out_header: str = "X-Relay-Track"
    # Class that keeps a link untracked (the data-no-track attribute always does).
    no_track_class: str = "no-track"
    # Rewrite messages that already carry a DKIM or ARC signature (breaking it).
    rewrite_signed: bool = False
    # Messages with several recipients: "track" with message-level tokens, or "skip" them.
    multiple_recipients: Literal["track", "skip"] = "track"
    # Id of the current signing key (derived from server.secret_key); old keys stay valid for links sent.
    key_id: str = "k1"
    old_keys: tuple[OldKey, ...] = ()
    # Links longer than this are left alone; HTML bodies larger than this (decoded) are left alone.
    max_url_length: int = Field(default=2048, ge=16, le=3000)
    max_html_size: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Events waiting to be recorded (more are dropped with a warning) and the workers recording them.
    event_queue_size: int = Field(default=10_000, ge=1)
    event_workers: int = Field(default=4, ge=1, le=64)

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, value: str) -> str:
        if not valid_key_id(value):
            raise ValueError("must be 1-16 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("opt_out_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError("must be a header field name")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if value and (not value.isascii() or not is_trackable_url(value) or any(c in value for c in " ?#\"'<>")):
            raise ValueError("must be an ASCII http:// or https:// base URL without query or fragment")
        return value.rstrip("/")


# -- redirect targets ------------------------------------------------------------------------------------
def location_for(url: str) -> str:
    """The Location header for ``url``: the URL itself when it is plain ASCII, else its ASCII form
    (IDNA host, UTF-8 percent-encoding elsewhere), as a browser would request it. ValueError when the
    URL is not one we redirect to."""
    if not is_trackable_url(url):
        raise ValueError("not an http(s) URL")
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    # ASCII digits only: str.isdigit() also accepts "¹" and other non-ASCII digits.
    if not colon or not (port.isascii() and port.isdigit()):
        host, colon, port = hostport, "", ""
    try:
        ascii_host = host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        ascii_host = quote(host, safe="")
    safe = "".join(chr(c) for c in range(0x21, 0x7F))
    return (f"{scheme}://{quote(userinfo, safe=safe)}{at}{quote(ascii_host, safe=safe)}{colon}{port}"
            f"{quote(tail, safe=safe)}")


def list_unsubscribe_urls(headers: Message) -> frozenset[str]:
    """The URLs in the message's own List-Unsubscribe fields (whitespace in them ignored, RFC 2369)."""
    found = set()
    for value in headers.get_all("List-Unsubscribe") or []:
        for url in _LIST_URL.findall(str(value)):
            found.add("".join(url.split()))
    return frozenset(found)


# -- events ---------------------------------------------------------------------------------------------
class EventQueue:
    """Fire-and-forget recording: ``post`` never waits; workers append to the outbox behind it."""

    def __init__(self, recorder: EventRecorder | None, size: int, workers: int) -> None:
        self.recorder = recorder
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self._workers_wanted = workers
        self._workers: list[asyncio.Task[None]] = []
        self.dropped = 0

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"tracking-events-{n}")
                         for n in range(self._workers_wanted)]

    def post(self, event: Event) -> None:
        if self.recorder is None:
            log.info("tracking_event_not_recorded", type=event.type, message_id=event.message_id)
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("tracking_event_dropped", type=event.type, message_id=event.message_id,
                        dropped=self.dropped)

    async def drain(self) -> None:
        """Wait until every event posted so far was recorded (or failed)."""
        await self._queue.join()

    async def stop(self, grace: float = 5.0) -> None:
        if self._workers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._queue.join()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if not self._queue.empty():
            log.warning("tracking_events_lost_at_stop", count=self._queue.qsize())

    async def _work(self) -> None:
        assert self.recorder is not None
        while True:
            event = await self._queue.get()
            try:
                await self.recorder.record_event(event)
            except Exception as exc:  # a failed write is logged; the response went out long ago
                log.error("tracking_event_failed", type=event.type, message_id=event.message_id, error=repr(exc))
            finally:
                self._queue.task_done()


def _event(kind: str, claims: Claims, request: web.Request, **data: Any) -> Event:
    agent = request.headers.get("User-Agent", "")[:_USER_AGENT_MAX]
    return Event(id=str(uuid.uuid4()), type=kind, created_at=time.time(), message_id=claims.message_id,
                 recipient=claims.recipient or None, data={**data, "user_agent": agent})


# -- the plugin -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Message:
    """What one rewrite needs to know about the message, taken on the event loop."""

    queue_id: str
    recipient: str
    sender_domain: str


class TrackingPlugin(Plugin[TrackingConfig]):
    name = "tracking"
    Config = TrackingConfig
    modifies = frozenset({"body", "headers"})
    # Tracking is best effort: a failure leaves the message untracked (the opt-out header already gone)
    # rather than refusing mail.
    on_error = "continue"

    def __init__(self, config: TrackingConfig, host: PluginHost) -> None:
        super().__init__(config, host)
        self.base_url = ""
        self.codec: TokenCodec | None = None
        self.events = EventQueue(host.events, config.event_queue_size, config.event_workers)
        self._users = frozenset(config.enabled_for_users)
        self._domains = frozenset(d.lower().rstrip(".") for d in config.enabled_for_domains)

    async def start(self) -> None:
        self.codec = self._codec()
        self.base_url = self.config.base_url or (self.host.public_url or "").rstrip("/")
        if not self.base_url:
            raise PluginError("tracking links need a base URL: set [http] public_url or plugins.tracking.base_url")
        if self.host.http is None:
            log.info("tracking_links_served_elsewhere", base_url=self.base_url)
        else:
            if self.config.one_click_unsubscribe and self.host.suppressions is None:
                raise PluginError("one_click_unsubscribe needs the suppression list, which this queue store "
                                  "does not provide")
            self._add_routes()
        self.events.start()

    async def stop(self) -> None:
        await self.events.stop()

    def _codec(self) -> TokenCodec:
        if not self.host.secret_key:
            raise PluginError("tracking tokens are signed with server.secret_key, which is not set")
        old = {}
        for key in self.config.old_keys:
            secret = key.secret.get_secret_value()
            if not secret or PLACEHOLDER_SECRET in secret:
                raise PluginError(f"old_keys: key {key.key_id!r} has no real secret")
            old[key.key_id] = secret.encode()
        try:
            return TokenCodec.from_secrets(self.host.secret_key, self.config.key_id, old)
        except ValueError as exc:
            raise PluginError(f"old_keys: {exc}") from None

    def _add_routes(self) -> None:
        assert self.host.http is not None
        self.host.http.add_route("GET", CLICK_PATH, self.click)
        self.host.http.add_route("GET", OPEN_PATH, self.open)
        if self.config.one_click_unsubscribe:
            self.host.http.add_route("GET", UNSUBSCRIBE_PATH, self.unsubscribe_page)
            self.host.http.add_route("POST", UNSUBSCRIBE_PATH, self.unsubscribe)

    # -- DATA -------------------------------------------------------------------------------------------
    async def data(self, ctx: DataContext) -> Verdict:
        _, body_start = header_block(ctx.data)
        headers = parse_headers(ctx.data, 0, body_start)
        opt_out = headers.get(self.config.opt_out_header)
        if opt_out is not None:
            ctx.data = remove_header(ctx.data, self.config.opt_out_header)
            if str(opt_out).strip().lower() in OPT_OUT_VALUES:
                log.info("tracking_opted_out", queue_id=ctx.queue_id)
                return CONTINUE
        if not self._tracks(ctx, headers):
            return CONTINUE
        message = _Message(ctx.queue_id, ctx.recipients[0] if len(ctx.recipients) == 1 else "",
                           ctx.sender.rpartition("@")[2].lower())
        # Parsing and re-encoding HTML is CPU work: off the loop, so other sessions keep being served.
        result, data = await asyncio.to_thread(self._rewrite, ctx.data, message)
        ctx.data = data
        log.info("tracking_rewritten", queue_id=ctx.queue_id, links=len(result.links), pixel=result.pixel,
                 parts=result.parts_rewritten, parts_left=result.parts_left,
                 links_left_for_length=result.links_left_for_length)
        return CONTINUE

    def _tracks(self, ctx: DataContext, headers: Message) -> bool:
        if not ctx.sender or not self._enabled_for(ctx.session.auth_user, ctx.sender):
            return False
        if len(ctx.recipients) > 1 and self.config.multiple_recipients == "skip":
            return False
        if not self.config.rewrite_signed and any(name in headers for name in SIGNATURE_HEADERS):
            log.info("tracking_skipped_signed", queue_id=ctx.queue_id)
            return False
        return True

    def _enabled_for(self, user: str | None, sender: str) -> bool:
        if user is not None and ("*" in self._users or user in self._users):
            return True
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        return "*" in self._domains or domain in self._domains

    def _rewrite(self, data: bytes, message: _Message) -> tuple[MessageRewrite, bytes]:
        """The whole rewrite of one message (runs in a worker thread; pure over its inputs)."""
        _, body_start = header_block(data)
        headers = parse_headers(data, 0, body_start)
        leave = list_unsubscribe_urls(headers)
        result = rewrite_message(
            data,
            track=self._click_tracker(message, leave) if self.config.track_clicks else None,
            pixel_html=self._pixel_html(message) if self.config.track_opens else None,
            no_track_class=self.config.no_track_class,
            max_html_bytes=self.config.max_html_size,
        )
        out = result.data
        if (self.config.one_click_unsubscribe and message.recipient and message.sender_domain
                and "List-Unsubscribe" not in headers and "List-Unsubscribe-Post" not in headers):
            url = self._url(UNSUBSCRIBE_PATH, Claims(TokenKind.UNSUBSCRIBE, message.queue_id, message.recipient,
                                                     message.sender_domain))
            out = add_headers(out, [f"List-Unsubscribe: <{url}>",
                                    "List-Unsubscribe-Post: List-Unsubscribe=One-Click"])
        return result, out

    def _click_tracker(self, message: _Message, leave: frozenset[str]) -> Callable[[str], str | None]:
        own = self.base_url + "/t/"

        def track(url: str) -> str | None:
            if url in leave or url.startswith(own) or len(url) > self.config.max_url_length:
                return None
            try:
                return self._url(CLICK_PATH, Claims(TokenKind.CLICK, message.queue_id, message.recipient, url))
            except ValueError:           # a URL a token cannot carry: the link stays as it was
                return None
        return track

    def _pixel_html(self, message: _Message) -> str:
        src = self._url(OPEN_PATH, Claims(TokenKind.OPEN, message.queue_id, message.recipient))
        return (f'<img src="{src}" width="1" height="1" alt="" '
                'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" />')

    def _url(self, path: str, claims: Claims) -> str:
        assert self.codec is not None
        return self.base_url + path.replace("{token}", self.codec.issue(claims))

    # -- HTTP -------------------------------------------------------------------------------------------
    def _claims(self, request: web.Request, kind: TokenKind) -> Claims:
        assert self.codec is not None
        try:
            return self.codec.verify(request.match_info.get("token", ""), kind)
        except TokenError as exc:
            # debug: anyone can send junk to these URLs; at info it would flood the log
            log.debug("tracking_token_refused", kind=kind.value, status=exc.status, reason=exc.reason)
            if exc.status == 400:
                raise web.HTTPBadRequest(text="bad request") from None
            raise web.HTTPNotFound(text="not found") from None

    async def click(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, TokenKind.CLICK)
        try:
            location = location_for(claims.value)
        except ValueError:
            log.warning("tracking_click_target_refused", message_id=claims.message_id)
            raise web.HTTPNotFound(text="not found") from None
        if request.method == "GET":
            self.events.post(_event("clicked", claims, request, url=claims.value))
        # no-referrer: the token in our URL is not handed to the target site.
        return web.Response(status=302, headers={"Location": location, "Referrer-Policy": "no-referrer",
                                                 **NO_STORE})

    async def open(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, TokenKind.OPEN)
        if request.method == "GET":
            self.events.post(_event("opened", claims, request))
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)

    async def unsubscribe_page(self, request: web.Request) -> web.StreamResponse:
        """GET: a confirmation page only — link scanners prefetch GETs, so GET never unsubscribes."""
        claims = self._claims(request, TokenKind.UNSUBSCRIBE)
        if not claims.recipient:
            raise web.HTTPNotFound(text="not found")
        return _page("Unsubscribe", "<p>Stop receiving these messages?</p>"
                     '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                     '<button type="submit">Unsubscribe</button></form>')

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        """POST (RFC 8058 one-click, or the confirmation form): suppress the recipient for the sender."""
        claims = self._claims(request, TokenKind.UNSUBSCRIBE)
        if not claims.recipient or self.host.suppressions is None:
            raise web.HTTPNotFound(text="not found")
        entry = Suppression(value=claims.recipient, kind="address", reason="unsubscribe", source="tracking",
                            created_at=time.time(), note=f"one-click unsubscribe, message {claims.message_id}",
                            scope=claims.value)
        try:
            await self.host.suppressions.add_suppression(entry)
        except Exception as exc:  # the sender's mailbox provider retries a failed one-click POST
            log.error("tracking_unsubscribe_failed", message_id=claims.message_id, error=repr(exc))
            raise web.HTTPServiceUnavailable(text="try again later") from None
        log.info("tracking_unsubscribed", message_id=claims.message_id, scope=claims.value)
        self.events.post(_event("unsubscribed", claims, request, scope=claims.value))
        return _page("Unsubscribed", "<p>You have been unsubscribed.</p>")


def _page(title: str, body: str) -> web.Response:
    text = (f'<!doctype html><html><head><meta charset="utf-8"><meta name="robots" content="noindex">'
            f'<meta name="viewport" content="width=device-width"><title>{title}</title></head>'
            f"<body>{body}</body></html>")
    return web.Response(text=text, content_type="text/html", headers={
        **NO_STORE, "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex",
        "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'"})


PLUGIN = TrackingPlugin

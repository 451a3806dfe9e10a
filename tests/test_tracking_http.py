"""The relay's HTTP server and the tracking endpoints, over real sockets on loopback.

Most tests start a whole relay (``[http]`` on 127.0.0.1 port 0, the tracking plugin in the chain, the
real queue store) and submit mail over SMTP; the clicks, opens and unsubscribes then go through aiohttp's
client to the relay's own HTTP server, and events and suppressions are read back from the store. Tests
of the recording path itself (never waiting for the store, a failing store, a full queue) use a bare
HttpServer and a recorder fake they control.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from relay.plugins.tracking import PIXEL_GIF, TrackingConfig, TrackingPlugin
from relay.plugins.tracking_tokens import Claims, TokenCodec, TokenKind

from relay.app import Relay, StartupError
from relay.http import HttpServer
from relay.limits import make_limiter
from relay.plugin import Event, PluginHost
from relay.settings import HttpSettings, RedisSettings
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

SECRET = "tracking-test-secret-0123456789abcdef"
PUBLIC = "https://t.example.com"
ORIGINAL = "https://shop.example.com/item?id=42&ref=mail&utm_source=news#reviews"
HTML = ("<html><body><p>Hello</p>\r\n"
        '<a href="https://shop.example.com/item?id=42&amp;ref=mail&amp;utm_source=news#reviews">Buy</a>\r\n'
        '<a href="mailto:help@example.com">Help</a>\r\n</body></html>\r\n')
TRACKING_URL = re.compile(re.escape(PUBLIC) + r"(/t/[cou]/[A-Za-z0-9_.-]+)")


def message(html: str = HTML, *extra: str) -> bytes:
    head = ["From: News <news@example.com>", "To: <reader@example.org>", "Subject: offers", *extra,
            "MIME-Version: 1.0", "Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return ("\r\n".join(head) + "\r\n\r\n" + html).encode()


async def start(relays: RelayFactory, *, store_url: str | None = None, secret: str = SECRET,
                **tracking: Any) -> RunningRelay:
    config = {"enabled_for_domains": ["example.com"], "one_click_unsubscribe": True, **tracking}
    return await relays.start(store_url=store_url, server={"secret_key": secret},
                              http={"address": "127.0.0.1:0", "public_url": PUBLIC},
                              chain={"plugins": ["tracking"]}, plugins={"tracking": config})


def base(running: RunningRelay) -> str:
    assert running.relay.http is not None and running.relay.http.port
    return f"http://127.0.0.1:{running.relay.http.port}"


def plugin_of(running: RunningRelay) -> TrackingPlugin:
    assert running.relay.chain is not None
    [plugin] = running.relay.chain.plugins
    assert isinstance(plugin, TrackingPlugin)
    return plugin


async def submit(running: RunningRelay, data: bytes, recipients: tuple[str, ...] = ("reader@example.org",)
                 ) -> str:
    client = await RawClient.connect(running.ports["relay"])
    assert (await client.greeting()).code == 220
    await client.ehlo()
    reply = await client.mail("news@example.com", list(recipients), data)
    await client.close()
    assert reply.code == 250, reply
    return reply.text.rsplit(" ", 1)[1]


async def stored_paths(running: RunningRelay, queue_id: str) -> list[str]:
    """The tracking paths (/t/…) in the stored message, in order."""
    return TRACKING_URL.findall((await running.store.message_data(queue_id)).decode())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, method: str = "GET", **kw: Any
              ) -> tuple[int, dict[str, str], bytes]:
    async with http.request(method, url, allow_redirects=False, **kw) as response:
        return response.status, dict(response.headers), await response.read()


async def events(running: RunningRelay, kind: str) -> list[Event]:
    await plugin_of(running).events.drain()
    return await running.store.list_events(kind)


# -- the server itself -------------------------------------------------------------------------------
async def test_healthz_and_no_server_without_an_address(relays: RelayFactory, http: aiohttp.ClientSession) -> None:
    running = await start(relays)
    status, headers, body = await get(http, base(running) + "/healthz")
    assert (status, body, headers["Server"]) == (200, b"ok", "relay")
    assert (await get(http, base(running) + "/nothing-here"))[0] == 404
    plain = await relays.start()
    assert plain.relay.http is None


async def test_http_port_in_use_is_a_startup_error(relays: RelayFactory) -> None:
    running = await start(relays)
    assert running.relay.http is not None
    taken = f"127.0.0.1:{running.relay.http.port}"
    settings = relays.settings(store_url=f"sqlite:///{relays.tmp_path}/other.db", http={"address": taken}, listeners=[
        {"name": "relay", "address": "127.0.0.1:0", "kind": "relay", "trusted_networks": ["127.0.0.0/8"]}])
    relay = Relay(settings)
    with pytest.raises(StartupError, match="cannot listen for HTTP"):
        await relay.start()
    await relay.stop(grace=1)


async def test_routes_are_added_before_start_only() -> None:
    server = HttpServer(HttpSettings(address="127.0.0.1:0"))
    await server.start()
    try:
        with pytest.raises(RuntimeError, match="after the HTTP server started"):
            server.add_route("GET", "/late", _never)
    finally:
        await server.stop()


async def _never(request: object) -> None:
    raise AssertionError("not reachable")


# -- end to end: SMTP in, links stored, clicks and opens out ---------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_click_and_open_end_to_end(relays: RelayFactory, http: aiohttp.ClientSession, backend: str,
                                         request: pytest.FixtureRequest) -> None:
    store_url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    running = await start(relays, store_url=store_url)
    queue_id = await submit(running, message())
    stored = await running.store.message_data(queue_id)
    assert b"mailto:help@example.com" in stored and b"shop.example.com" not in stored
    unsubscribe, click, pixel = await stored_paths(running, queue_id)
    assert unsubscribe.startswith("/t/u/") and click.startswith("/t/c/") and pixel.startswith("/t/o/")

    status, headers, _ = await get(http, base(running) + click, headers={"User-Agent": "TestBrowser/1.0"})
    assert status == 302 and headers["Location"] == ORIGINAL
    assert headers["Referrer-Policy"] == "no-referrer" and "no-store" in headers["Cache-Control"]
    status, headers, body = await get(http, base(running) + pixel)
    assert (status, headers["Content-Type"], body) == (200, "image/gif", PIXEL_GIF)
    assert body.startswith(b"GIF89a") and len(body) == 43

    [clicked] = await events(running, "clicked")
    assert (clicked.message_id, clicked.recipient) == (queue_id, "reader@example.org")
    assert clicked.data["url"] == ORIGINAL and clicked.data["user_agent"] == "TestBrowser/1.0"
    [opened] = await events(running, "opened")
    assert (opened.message_id, opened.recipient) == (queue_id, "reader@example.org")
    assert opened.id != clicked.id and opened.created_at >= clicked.created_at


async def test_head_requests_are_answered_but_not_recorded(relays: RelayFactory, http: aiohttp.ClientSession
                                                           ) -> None:
    running = await start(relays)
    _, click, pixel = await stored_paths(running, await submit(running, message()))
    status, headers, _ = await get(http, base(running) + click, "HEAD")
    assert status == 302 and headers["Location"] == ORIGINAL
    assert (await get(http, base(running) + pixel, "HEAD"))[0] == 200
    assert await events(running, "clicked") == [] and await events(running, "opened") == []


async def test_several_recipients_click_without_a_recipient(relays: RelayFactory, http: aiohttp.ClientSession
                                                            ) -> None:
    running = await start(relays)
    queue_id = await submit(running, message(), ("a@example.org", "b@example.org"))
    click, _ = await stored_paths(running, queue_id)              # no unsubscribe header: no recipient
    assert (await get(http, base(running) + click))[1]["Location"] == ORIGINAL
    [clicked] = await events(running, "clicked")
    assert clicked.message_id == queue_id and clicked.recipient is None


# -- tokens that must not redirect ------------------------------------------------------------------------
async def test_bad_tokens_never_redirect(relays: RelayFactory, http: aiohttp.ClientSession) -> None:
    running = await start(relays)
    unsubscribe, click, pixel = await stored_paths(running, await submit(running, message()))
    token = click.rsplit("/", 1)[1]
    version, key_id, payload, signature = token.split(".")
    foreign = TokenCodec.from_secrets(b"someone else's secret", "k1").issue(
        Claims(TokenKind.CLICK, "Q", "r@example.org", "https://evil.example/"))
    own = TokenCodec.from_secrets(SECRET.encode(), "k1")
    scripted = own.issue(Claims(TokenKind.CLICK, "Q", "r@example.org", "javascript:alert(1)"))
    relative = own.issue(Claims(TokenKind.CLICK, "Q", "r@example.org", "//evil.example/"))
    tampered_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    bad = {
        "tampered payload": f"/t/c/{version}.{key_id}.{tampered_payload}.{signature}",
        "tampered signature": f"/t/c/{version}.{key_id}.{payload}.{signature[::-1]}",
        "truncated": click[:-10],
        "truncated to the payload": f"/t/c/{version}.{key_id}.{payload}",
        "foreign key": "/t/c/" + foreign,
        "unknown key id": f"/t/c/{version}.k9.{payload}.{signature}",
        "unknown version": f"/t/c/v2.{key_id}.{payload}.{signature}",
        "an open token": "/t/c/" + pixel.rsplit("/", 1)[1].removesuffix(".gif"),
        "an unsubscribe token": "/t/c/" + unsubscribe.rsplit("/", 1)[1],
        "signed but not http(s)": "/t/c/" + scripted,
        "signed but scheme-relative": "/t/c/" + relative,
        "junk": "/t/c/%00%0d%0aLocation:%20https://evil.example/",
        "huge": "/t/c/v1.k1." + "A" * 5000 + ".x",
        "a click token as a pixel": "/t/o/" + token + ".gif",
        "empty": "/t/c/",
    }
    for what, path in bad.items():
        status, headers, _ = await get(http, base(running) + path)
        assert status in (400, 404), what
        assert "Location" not in headers, what
    assert await events(running, "clicked") == [] and await events(running, "opened") == []


async def test_key_rotation_keeps_old_links_working(relays: RelayFactory, http: aiohttp.ClientSession) -> None:
    running = await start(relays)
    _, old_click, _ = await stored_paths(running, await submit(running, message()))
    assert ".k1." in old_click
    await relays.stop_all()

    rotated = await start(relays, secret="a-brand-new-secret-after-rotation-0123",
                          key_id="k2", old_keys=[{"key_id": "k1", "secret": SECRET}])
    assert (await get(http, base(rotated) + old_click))[1]["Location"] == ORIGINAL
    _, new_click, _ = await stored_paths(rotated, await submit(rotated, message()))
    assert ".k2." in new_click and (await get(http, base(rotated) + new_click))[1]["Location"] == ORIGINAL
    await relays.stop_all()

    # Once the old key is dropped from the configuration, its links are foreign.
    dropped = await start(relays, secret="a-brand-new-secret-after-rotation-0123", key_id="k2")
    status, headers, _ = await get(http, base(dropped) + old_click)
    assert status == 404 and "Location" not in headers
    assert (await get(http, base(dropped) + new_click))[0] == 302


# -- one-click unsubscribe --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_unsubscribe_post_suppresses_get_does_not(relays: RelayFactory, http: aiohttp.ClientSession,
                                                        backend: str, request: pytest.FixtureRequest) -> None:
    store_url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    running = await start(relays, store_url=store_url)
    queue_id = await submit(running, message())
    stored = (await running.store.message_data(queue_id)).decode()
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in stored
    unsubscribe, click, _ = await stored_paths(running, queue_id)

    status, headers, page = await get(http, base(running) + unsubscribe)
    assert status == 200 and b'<form method="post">' in page and "noindex" in headers["X-Robots-Tag"]
    assert await running.store.find_suppression("reader@example.org", scope="example.com") is None

    status, _, page = await get(http, base(running) + unsubscribe, "POST", data={"List-Unsubscribe": "One-Click"})
    assert status == 200 and b"unsubscribed" in page
    entry = await running.store.find_suppression("reader@example.org", scope="example.com")
    assert entry is not None and (entry.reason, entry.kind, entry.scope, entry.source) == (
        "unsubscribe", "address", "example.com", "tracking")
    # Scoped to the sender's domain: other senders may still write.
    assert await running.store.find_suppression("reader@example.org", scope="other.example") is None
    assert await running.store.find_suppression("reader@example.org") is None
    [event] = await events(running, "unsubscribed")
    assert (event.message_id, event.recipient, event.data["scope"]) == (queue_id, "reader@example.org", "example.com")

    # A truncated token, or a click token, unsubscribes nobody.
    for path in (unsubscribe[:-3], click.replace("/t/c/", "/t/u/")):
        assert (await get(http, base(running) + path, "POST"))[0] in (400, 404)
    assert len(await running.store.list_suppressions()) == 1


async def test_unsubscribe_is_off_unless_configured(relays: RelayFactory, http: aiohttp.ClientSession) -> None:
    running = await start(relays, one_click_unsubscribe=False)
    queue_id = await submit(running, message())
    assert b"List-Unsubscribe" not in await running.store.message_data(queue_id)
    own = TokenCodec.from_secrets(SECRET.encode(), "k1")
    token = own.issue(Claims(TokenKind.UNSUBSCRIBE, queue_id, "reader@example.org", "example.com"))
    assert (await get(http, base(running) + "/t/u/" + token, "POST"))[0] == 404


# -- recording never holds up the answer ------------------------------------------------------------------
@dataclass
class GatedRecorder:
    """Records only once the test opens the gate; fails when told to."""

    gate: asyncio.Event
    fail: bool = False

    def __post_init__(self) -> None:
        self.recorded: list[Event] = []
        self.attempts = 0

    async def record_event(self, event: Event) -> None:
        self.attempts += 1
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("store down")
        self.recorded.append(event)


async def bare_plugin(recorder: GatedRecorder, **config: Any) -> tuple[TrackingPlugin, HttpServer, str]:
    server = HttpServer(HttpSettings(address="127.0.0.1:0", public_url=PUBLIC))
    host = PluginHost(hostname="relay.test", secret_key=SECRET.encode(), limiter=make_limiter(RedisSettings()),
                      events=recorder, http=server, public_url=PUBLIC)
    plugin = TrackingPlugin(TrackingConfig.model_validate(config), host)
    await plugin.start()
    await server.start()
    return plugin, server, f"http://127.0.0.1:{server.port}"


def click_path(plugin: TrackingPlugin, url: str = ORIGINAL) -> str:
    assert plugin.codec is not None
    return "/t/c/" + plugin.codec.issue(Claims(TokenKind.CLICK, "Q1", "r@example.org", url))


async def test_response_does_not_wait_for_the_recorder(http: aiohttp.ClientSession) -> None:
    recorder = GatedRecorder(asyncio.Event())
    plugin, server, url = await bare_plugin(recorder)
    try:
        for _ in range(3):
            status, headers, _ = await get(http, url + click_path(plugin))
            assert status == 302 and headers["Location"] == ORIGINAL
        assert recorder.recorded == []                            # the store has not answered yet
        recorder.gate.set()
        await plugin.events.drain()
        assert [e.type for e in recorder.recorded] == ["clicked"] * 3
    finally:
        await server.stop()
        await plugin.stop()


async def test_a_failing_recorder_is_logged_and_the_next_events_still_go(http: aiohttp.ClientSession) -> None:
    gate = asyncio.Event()
    gate.set()
    recorder = GatedRecorder(gate, fail=True)
    plugin, server, url = await bare_plugin(recorder, event_workers=1)
    try:
        assert (await get(http, url + click_path(plugin)))[0] == 302
        await plugin.events.drain()
        recorder.fail = False
        assert (await get(http, url + click_path(plugin)))[0] == 302
        await plugin.events.drain()
        assert recorder.attempts == 2 and len(recorder.recorded) == 1
    finally:
        await server.stop()
        await plugin.stop()


async def test_a_full_event_queue_drops_instead_of_waiting(http: aiohttp.ClientSession) -> None:
    recorder = GatedRecorder(asyncio.Event())
    plugin, server, url = await bare_plugin(recorder, event_queue_size=2, event_workers=1)
    try:
        for _ in range(6):
            assert (await get(http, url + click_path(plugin)))[0] == 302
        recorder.gate.set()
        await plugin.events.drain()
        # One event was being recorded, two waited in the queue, the rest were dropped.
        assert len(recorder.recorded) == 3 and plugin.events.dropped == 3
    finally:
        await server.stop()
        await plugin.stop()

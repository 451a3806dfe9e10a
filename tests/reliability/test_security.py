"""Security properties, each probed over real sockets against a real relay (issue 7, item 4).

- No open relay: from an untrusted address, on every listener, every way of naming a foreign recipient
  (plain, percent hack, source route, quoted local part, ``!`` path, address literal, unqualified) is
  refused, before and after STARTTLS, and nothing is queued.
- AUTH is never accepted in clear text (unless the listener allows it for loopback clients) and a brute
  force is locked out, the right password included, per IP and per user name.
- SMTP smuggling: no bare-CR/LF variant of the end-of-data sequence ends DATA; the smuggled commands never
  become a second message.
- No header or protocol-line injection through configuration values; tracking links cannot inject
  headers into the message or the redirect; a click redirects only for a genuine signed token.
- Secrets never reach a log line: the suite-wide scan in tests/conftest.py does that over the whole run;
  here its finder is tested, and sessions full of secrets are run for it to check.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.settings import ConfigError, parse_settings
from relay.sink import SinkConfig, SinkServer
from tests.support.logtap import Leak, find_leaks, register_secret
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

UNTRUSTED = ("127.0.0.2", 0)       # a loopback address outside the listeners' trusted networks
PASSWORD = "brute-force-target-9fQ2"


# -- configuration values -------------------------------------------------------------------------------

@pytest.mark.parametrize(("toml", "key"), [
    ('[server]\nhostname = "relay.example\\r\\nX-Injected: yes"', "server.hostname"),
    ('[server]\nhostname = "relay.example\\n250 fake"', "server.hostname"),
    ('[server]\nhostname = "relay example"', "server.hostname"),
    ('[server]\nhostname = ""', "server.hostname"),
    ('[server]\nhostname = "[not an address]"', "server.hostname"),
    ('[server]\nhostname = "relay.exämple"', "server.hostname"),
    ('[delivery]\nhostname = "out.example\\r\\nRCPT TO:<x@y>"', "delivery.hostname"),
    ('[smtp]\ngreeting = "ESMTP\\r\\n250 AUTH PLAIN"', "smtp.greeting"),
    ('[smtp]\ngreeting = "ESMTP\\u0000"', "smtp.greeting"),
    ('[delivery.routes]\ndefault = { kind = "reject", reject_text = "no\\r\\nX: y" }', "delivery.routes.default"),
    ('[http]\npublic_url = "https://t.example/\\r\\nX: y"', "http.public_url"),
])
def test_config_values_that_would_inject_lines_are_refused(toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(toml)
    assert key in str(refused.value)


@pytest.mark.parametrize("hostname", ["relay.example.com", "mx-1.example.com.", "[192.0.2.1]", "[IPv6:2001:db8::1]",
                                      "localhost"])
def test_ordinary_host_names_are_accepted(hostname: str) -> None:
    assert parse_settings(f'[server]\nhostname = "{hostname}"').server.hostname == hostname


# -- no open relay ------------------------------------------------------------------------------------------

FOREIGN_RECIPIENTS = [
    "victim@elsewhere.example",                       # plain
    "victim%elsewhere.example@relay.test",            # percent hack
    "victim%elsewhere.example@[127.0.0.1]",
    "@relay.test:victim@elsewhere.example",           # source route
    "@relay.test,@hop.example:victim@elsewhere.example",
    '"victim@elsewhere.example"@relay.test',          # quoted local part hiding an address
    '"victim%elsewhere.example"@relay.test',
    '"victim"@elsewhere.example',
    "elsewhere.example!victim@relay.test",            # bang paths
    "elsewhere.example!victim",
    "victim@elsewhere.example@relay.test",
    "victim@[192.0.2.1]",                             # address literals
    "victim@[IPv6:2001:db8::1]",
    "victim",                                          # unqualified
    "postmaster",
    "victim@relay.test",                              # the relay's own name: still not ours to deliver
    "VICTIM@ELSEWHERE.EXAMPLE",
]
SENDERS = ["", "someone@elsewhere.example", "postmaster@relay.test"]


LISTENER_HOSTS = {"relay": "127.0.0.1", "submission": "127.0.0.5", "smtps": "127.0.0.6", "auth-off": "127.0.0.7"}


async def _listeners(relays: RelayFactory) -> RunningRelay:
    host = LISTENER_HOSTS
    return await relays.start(listeners=[
        {"name": "relay", "address": f"{host['relay']}:0", "kind": "relay", "auth": "optional",
         "trusted_networks": ["127.0.0.1/32"]},
        {"name": "submission", "address": f"{host['submission']}:0", "kind": "submission", "auth": "required"},
        {"name": "smtps", "address": f"{host['smtps']}:0", "kind": "smtps", "auth": "required"},
        {"name": "auth-off", "address": f"{host['auth-off']}:0", "kind": "relay", "auth": "off"},
    ])


async def _probe(client: RawClient, sender: str, recipient: str) -> list[str]:
    """Envelope with a foreign recipient; the replies that accepted what must be refused."""
    accepted = []
    mail = await client.cmd(f"MAIL FROM:<{sender}>")
    if mail.code == 250:
        rcpt = await client.cmd(f"RCPT TO:<{recipient}>")
        if rcpt.code < 400:
            accepted.append(f"RCPT {recipient!r} from <{sender}>: {rcpt}")
        data = await client.cmd("DATA")
        if data.code == 354:
            accepted.append(f"DATA after RCPT {recipient!r}: {data}")
            await client.cmd(b"Subject: relay probe\r\n\r\nprobe\r\n.")
        await client.cmd("RSET")
    else:
        assert mail.code in (530, 550, 553, 501), mail
    return accepted


@pytest.mark.parametrize("tls", ["plain", "starttls"])
async def test_no_listener_relays_for_an_untrusted_client(relays: RelayFactory, tls: str) -> None:
    running = await _listeners(relays)
    accepted: list[str] = []
    for name, port in running.ports.items():
        implicit = name == "smtps"
        if tls == "starttls" and implicit:
            continue
        for recipient in FOREIGN_RECIPIENTS:
            # A connection per recipient: syntax refusals count towards the bad-command limit.
            client = await RawClient.connect(port, LISTENER_HOSTS[name], local_addr=UNTRUSTED,
                                             tls=relays.client_tls() if implicit else None)
            assert (await client.greeting()).code == 220
            await client.ehlo("probe.example")
            if tls == "starttls":
                assert (await client.starttls(relays.client_tls())).code == 220
                await client.ehlo("probe.example")
            for sender in SENDERS:
                accepted += [f"{name}: {line}" for line in await _probe(client, sender, recipient)]
            await client.close()
    assert accepted == []
    counts = await running.store.count_by_state()
    assert sum(counts.values()) == 0, counts


async def test_xclient_and_xforward_cannot_borrow_a_trusted_address(relays: RelayFactory) -> None:
    running = await _listeners(relays)
    client = await RawClient.connect(running.ports["relay"], local_addr=UNTRUSTED)
    await client.greeting()
    await client.ehlo()
    for command in ("XCLIENT ADDR=127.0.0.1", "XFORWARD ADDR=127.0.0.1", "TURN", "ETRN elsewhere.example"):
        assert (await client.cmd(command)).code == 500
    await client.cmd("MAIL FROM:<a@elsewhere.example>")
    assert (await client.cmd("RCPT TO:<victim@elsewhere.example>")).code == 550


# -- AUTH ---------------------------------------------------------------------------------------------------

async def test_auth_in_clear_text_is_refused(relays: RelayFactory) -> None:
    running = await relays.start()
    await running.add_user("alice", PASSWORD)
    client = await RawClient.connect(running.ports["submission"], "127.0.0.2")
    await client.greeting()
    ehlo = await client.ehlo()
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    token = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    register_secret(token, with_base64=False)
    for command in (f"AUTH PLAIN {token}", "AUTH LOGIN", "AUTH PLAIN"):
        reply = await client.cmd(command)
        assert (reply.code, reply.enhanced) == (538, "5.7.11"), reply
    assert (await client.cmd("MAIL FROM:<alice@example.com>")).code == 530
    # The same credentials work once TLS is up, so the refusal above was about clear text only.
    assert (await client.starttls(relays.client_tls())).code == 220
    await client.ehlo()
    assert (await client.auth_plain("alice", PASSWORD)).code == 235


async def test_brute_force_is_locked_out_per_user_and_per_ip(relays: RelayFactory) -> None:
    running = await relays.start(limits={"auth_failures_per_user": {"count": 3, "period": 600},
                                         "auth_failures_per_ip": {"count": 6, "period": 600}})
    await running.add_user("alice", PASSWORD)
    await running.add_user("bob", PASSWORD + "-bob")

    async def attempt(username: str, password: str, source: str = "127.0.0.3") -> int:
        client = await RawClient.connect(running.ports["submission"], host="127.0.0.2", local_addr=(source, 0))
        await client.greeting()
        await client.ehlo()
        await client.starttls(relays.client_tls())
        await client.ehlo()
        code = (await client.auth_plain(username, password)).code
        await client.close()
        return code

    assert [await attempt("alice", f"guess-{n}-xyzzy") for n in range(3)] == [535, 535, 535]
    assert await attempt("alice", PASSWORD) == 454          # locked out: the right password too
    assert await attempt("alice", PASSWORD, source="127.0.0.4") == 454   # from another address as well
    assert await attempt("bob", PASSWORD + "-bob") == 235   # another user is not affected
    assert [await attempt(f"nobody{n}", f"guess-{n}-xyzzy") for n in range(3)] == [535, 535, 535]
    assert await attempt("bob", PASSWORD + "-bob") == 454   # this address made 6 failures: locked out
    assert await attempt("bob", PASSWORD + "-bob", source="127.0.0.4") == 235


# -- SMTP smuggling -----------------------------------------------------------------------------------------

SMUGGLED_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r", b"\r\n.\r\r\n",
                 b"\r\n.\n\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n .\r\n", b"\r\n.\t\r\n"]


@pytest.mark.parametrize("end", SMUGGLED_ENDS, ids=[repr(e) for e in SMUGGLED_ENDS])
async def test_smuggled_end_of_data_never_ends_data(relays: RelayFactory, end: bytes) -> None:
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        running = await relays.start(server={"role": "all"}, delivery={"routes": {"default": {
            "kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}}})
        client = await RawClient.connect(running.ports["relay"])
        await client.greeting()
        await client.ehlo()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.com>")
        assert (await client.cmd("DATA")).code == 354
        smuggled = (b"MAIL FROM:<spoof@bank.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                    b"From: <ceo@bank.example>\r\n\r\nsmuggled\r\n")
        await client.send(b"Subject: first\r\n\r\nfirst" + end + smuggled + b".\r\nQUIT\r\n")
        replies = []
        with pytest.raises(ConnectionError):
            while True:
                replies.append(await client.reply())
        codes = [reply.code for reply in replies]
        # Refused outright (bare CR/LF) and closed, or one whole message: never a reply to the smuggled MAIL.
        assert codes in ([550], [250, 221]), replies
        queued = await running.store.count_by_state()
        assert sum(queued.values()) == (1 if codes[0] == 250 else 0)
        if codes[0] == 250:
            [message] = await sink.wait_for_messages(1, timeout=20)
            assert message.rcpt_tos == ["b@example.com"] and b"smuggled" in message.data
        await asyncio.sleep(0.2)
        assert sink.stats.messages <= 1


# -- tracking: no injection through URLs, redirects only for genuine tokens ---------------------------------

TRACKING_SECRET = "security-tracking-secret-5d1c7e0a9b"
PUBLIC = "https://t.example.com"
TRACKED = re.compile(re.escape(PUBLIC) + r"(/t/c/[A-Za-z0-9_.-]+)")
HOSTILE_HREFS = [
    "https://shop.example/a&#13;&#10;Set-Cookie:%20stolen=1",
    "https://shop.example/b&#x0D;&#x0A;Location:%20https://evil.example/",
    "https://shop.example/c%0d%0aX-Injected:%20yes",
    "https://shop.example/d\u2028X-Injected: yes",
    "https://shop.example/e&#0;f",
    "https://exa mple.example/g",
    "https://user:pa ss@shop.example/h",
    "https://b\u00fccher.example/\u00fc?q=\u00e4#\u00f6",
    "https://shop.example/i<script>alert(1)</script>",
    "https://shop.example/j\"onmouseover=\"alert(1)",
    "https://shop.example/k\x7f\x01",
    "https://[::1]:8080/l",
    "https://shop.example/" + "m" * 1500,
]


def _tracked_message() -> bytes:
    links = "".join(f'<a href="{href}">link {n}</a>\r\n' for n, href in enumerate(HOSTILE_HREFS))
    head = ["From: News <news@example.com>", "To: <reader@example.org>", "Subject: links",
            "MIME-Version: 1.0", "Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return ("\r\n".join(head) + "\r\n\r\n<html><body>\r\n" + links + "</body></html>\r\n").encode()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _tracking_relay(relays: RelayFactory) -> RunningRelay:
    register_secret(TRACKING_SECRET)
    return await relays.start(server={"secret_key": TRACKING_SECRET},
                              http={"address": "127.0.0.1:0", "public_url": PUBLIC},
                              chain={"plugins": ["tracking"]},
                              plugins={"tracking": {"enabled_for_domains": ["example.com"],
                                                    "one_click_unsubscribe": True}})


async def test_tracking_urls_inject_no_header_into_the_message_or_the_redirect(
        relays: RelayFactory, http: aiohttp.ClientSession) -> None:
    running = await _tracking_relay(relays)
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    reply = await client.mail("news@example.com", ["reader@example.org"], _tracked_message())
    assert reply.code == 250, reply
    stored = await running.store.message_data(reply.text.rsplit(" ", 1)[1])
    head = stored[:stored.index(b"\r\n\r\n") + 2]
    assert not re.search(rb"^(Set-Cookie|Location|X-Injected):", head, re.MULTILINE | re.IGNORECASE)
    assert all(re.match(rb"^([!-9;-~]+:|[ \t])", line) for line in head.split(b"\r\n")[:-1]), head
    paths = TRACKED.findall(stored.decode("utf-8", "replace"))
    assert len(paths) >= 8, paths                 # most links are tracked; the rest stay as they were
    assert running.relay.http is not None
    base_url = f"http://127.0.0.1:{running.relay.http.port}"
    for path in paths:
        async with http.get(base_url + path, allow_redirects=False) as response:
            assert response.status in (302, 404), path
            names = {name.lower() for name in response.headers}
            assert not names & {"set-cookie", "x-injected"}, response.headers
            if response.status == 302:
                location = response.headers["Location"]
                assert location.isascii() and location.isprintable() and " " not in location, location
                assert location.startswith(("https://", "http://")), location


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(url=st.text(max_size=120).map(lambda tail: "https://" + tail))
def test_a_redirect_location_is_always_one_clean_ascii_line(url: str) -> None:
    from relay.plugins.tracking import location_for
    try:
        location = location_for(url)
    except ValueError:
        return
    assert location.isascii() and location.isprintable() and " " not in location, location


def _mutations() -> st.SearchStrategy[list[tuple[int, int, str]]]:
    return st.lists(st.tuples(st.integers(0, 3), st.integers(0, 400), st.sampled_from(list("AZaz09-_.=+/%"))),
                    min_size=1, max_size=4)


def _mutate(token: str, edits: list[tuple[int, int, str]]) -> str:
    chars = list(token)
    for kind, at, char in edits:
        pos = at % (len(chars) + 1)
        if kind == 0 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif kind == 1:
            chars.insert(pos, char)
        elif kind == 2 and chars:
            chars[min(pos, len(chars) - 1)] = char
        else:
            chars[pos:pos] = chars[pos:pos + 3]
    return "".join(chars)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=_mutations())
def test_only_a_genuine_signature_yields_a_click_target(edits: list[tuple[int, int, str]]) -> None:
    from relay.plugins.tracking_tokens import Claims, TokenCodec, TokenError, TokenKind
    codec = TokenCodec.from_secrets(TRACKING_SECRET.encode(), "k1")
    genuine = Claims(TokenKind.CLICK, "Q1", "reader@example.org", "https://shop.example/item?id=42")
    token = codec.issue(genuine)
    forged = _mutate(token, edits)
    try:
        claims = codec.verify(forged, TokenKind.CLICK)
    except TokenError as exc:
        assert exc.status in (400, 404)
        return
    assert claims == genuine, (token, forged)     # whatever verifies says exactly what was signed


async def test_forged_click_tokens_never_redirect_over_http(relays: RelayFactory,
                                                            http: aiohttp.ClientSession) -> None:
    from relay.plugins.tracking_tokens import Claims, TokenCodec, TokenKind
    running = await _tracking_relay(relays)
    assert running.relay.http is not None
    base_url = f"http://127.0.0.1:{running.relay.http.port}/t/c/"
    codec = TokenCodec.from_secrets(TRACKING_SECRET.encode(), "k1")
    token = codec.issue(Claims(TokenKind.CLICK, "Q1", "reader@example.org", "https://shop.example/ok"))
    forged = [token[:-1] + ("A" if token[-1] != "A" else "B"), token.replace(".", "..", 1), token + "A",
              TokenCodec.from_secrets(b"another secret entirely", "k1").issue(
                  Claims(TokenKind.CLICK, "Q1", "r@example.org", "https://evil.example/")),
              "v1.k1.." , "v1.k1.%0d%0a.x", token.upper(), token.lower()]
    for path in forged:
        async with http.get(base_url + path, allow_redirects=False) as response:
            assert response.status in (400, 404), path
            assert "Location" not in response.headers
    async with http.get(base_url + token, allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "https://shop.example/ok"


# -- secrets in logs ----------------------------------------------------------------------------------------

def test_the_leak_finder_finds_secrets_and_their_base64() -> None:
    lines = [("a.log", '{"event": "auth_failed", "username": "alice"}'),
             ("a.log", '{"event": "oops", "data": "AGFsaWNlAHMzY3JldC1wYXNz"}'),
             ("b.log", "Traceback: password=s3cret-pass")]
    secret = "s3cret-pass"
    found = find_leaks(lines, [secret, base64.b64encode(b"\0alice\0" + secret.encode()).decode()])
    assert [(leak.origin, leak.line[:20]) for leak in found] == [("a.log", lines[1][1][:20]),
                                                                 ("b.log", lines[2][1][:20])]
    assert "s3c" in str(found[1]) and secret not in str(found[1])
    assert find_leaks(lines[:1], [secret]) == []
    assert isinstance(found[0], Leak)


async def test_sessions_full_of_secrets_leave_none_in_the_log(relays: RelayFactory) -> None:
    """Passwords right and wrong, AUTH PLAIN and LOGIN, cancelled exchanges, a smarthost password: the
    end-of-run scan (tests/conftest.py) checks every line this relay logged; here they must at least
    have been logged about (the lines exist to be scanned)."""
    from tests.support.logtap import current_tap
    wrong = "wrong-password-7Yq1"
    register_secret(wrong)
    smarthost_password = "smarthost-secret-Zx81"
    running = await relays.start(
        limits={"auth_failures_per_user": {"count": 100, "period": 600},
                "auth_failures_per_ip": {"count": 100, "period": 600}},
        delivery={"routes": {"default": {"kind": "smarthost", "host": "127.0.0.1", "port": 9, "tls": "required",
                                         "username": "relay", "password": smarthost_password}}})
    await running.add_user("carol", PASSWORD)
    with current_tap().watch() as lines:
        client = await RawClient.connect(running.ports["submission"], "127.0.0.2")
        await client.greeting()
        await client.ehlo()
        await client.starttls(relays.client_tls())
        await client.ehlo()
        assert (await client.auth_plain("carol", wrong)).code == 535
        for user, password in (("carol", wrong), ("nobody", PASSWORD)):
            assert (await client.cmd("AUTH LOGIN")).code == 334
            assert (await client.cmd(base64.b64encode(user.encode()).decode())).code == 334
            assert (await client.cmd(base64.b64encode(password.encode()).decode())).code == 535
        assert (await client.cmd("AUTH LOGIN")).code == 334
        assert (await client.cmd("*")).code == 501
        assert (await client.auth_plain("carol", PASSWORD)).code == 235
        await client.close()
    assert any('"auth_failed"' in line for line in lines) and any('"auth_ok"' in line for line in lines)
    secrets_here = [PASSWORD, wrong, smarthost_password, base64.b64encode(wrong.encode()).decode()]
    assert find_leaks((("tap", line) for line in lines), secrets_here) == []




# -- webhook signatures ---------------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300), secret=st.text(min_size=1, max_size=40), flip=st.integers(0, 10_000),
       skew=st.integers(-299, 299))
def test_webhook_signatures_verify_and_any_change_breaks_them(body: bytes, secret: str, flip: int,
                                                              skew: int) -> None:
    from relay.webhooks import REPLAY_WINDOW, signature_header, verify_signature
    now = 1_800_000_000
    header = signature_header([secret], now, body)
    assert verify_signature(header, body, secret, now=now + skew)
    assert not verify_signature(header, body, secret + "x", now=now)
    assert not verify_signature(header, body, secret, now=now + REPLAY_WINDOW + 1)   # a replay, too late
    if body:
        tampered = bytearray(body)
        tampered[flip % len(body)] ^= 1 << (flip % 8)
        assert not verify_signature(header, bytes(tampered), secret, now=now)
    stamp, signature = header.split(",")
    position = flip % len(signature)
    other = "0" if signature[position] != "0" else "1"
    assert not verify_signature(f"{stamp},{signature[:position]}{other}{signature[position + 1:]}", body, secret,
                                now=now)
    assert not verify_signature(f"t={now + 1},{signature}", body, secret, now=now)       # the time is signed


async def test_a_password_typed_as_the_user_name_is_not_logged(relays: RelayFactory) -> None:
    from tests.support.logtap import current_tap
    running = await relays.start(limits={"auth_failures_per_user": {"count": 2, "period": 600}})
    await running.add_user("dave", PASSWORD)
    with current_tap().watch() as lines:
        client = await RawClient.connect(running.ports["submission"], "127.0.0.2")
        await client.greeting()
        await client.ehlo()
        await client.starttls(relays.client_tls())
        await client.ehlo()
        for user, password in ((PASSWORD, PASSWORD), ("dave", "not-it-at-all"), ("dave", "not-it-either"),
                               ("dave", PASSWORD)):
            assert (await client.cmd("AUTH LOGIN")).code == 334
            assert (await client.cmd(base64.b64encode(user.encode()).decode())).code == 334
            await client.cmd(base64.b64encode(password.encode()).decode())
        await client.close()
    failed = [json.loads(line) for line in lines if '"auth_failed"' in line or '"auth_locked_out"' in line]
    assert [(f["event"], f["username"][:8]) for f in failed] == [
        ("auth_failed", "unknown:"), ("auth_failed", "dave"), ("auth_failed", "dave"), ("auth_locked_out", "dave")]
    assert find_leaks((("tap", line) for line in lines), [PASSWORD]) == []

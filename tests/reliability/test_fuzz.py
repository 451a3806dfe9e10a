"""Hostile SMTP input, CI-sized: a few thousand hypothesis sessions against a relay process.

The driver (:mod:`tests.reliability.fuzz`) says what a session is and what is checked. On demand the same
code runs ``scripts/reliability --fuzz 100000``; the figures of the last such run are in RELIABILITY.md.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tests.reliability.fuzz import SLOWLORIS_CLIENTS, reply_problems, run_fuzz
from tests.reliability.harness import log_problems
from tests.support.logtap import current_tap
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

SESSIONS = 3000


def test_fuzzed_sessions_never_crash_the_relay_nor_get_malformed_replies(tmp_path: Path) -> None:
    report = run_fuzz(SESSIONS, tmp_path, seed=1)
    print(report.summary())
    assert not report.failures(), report.summary() + "\n" + "\n".join(report.failures())
    assert report.sessions == SESSIONS and report.slowloris_cut == SLOWLORIS_CLIENTS


def test_the_reply_checker_finds_what_it_must() -> None:
    assert reply_problems(b"220 relay.reliability.test ESMTP\r\n250-relay.reliability.test\r\n250 DSN\r\n") == []
    assert reply_problems(b"250-other.host\r\n250 DSN\r\n") == ["no enhanced status code in 250 'other.host'"]
    assert reply_problems(b"250 2.0.0 Ok\r\n501 5.5.4 Syntax\r\n221 2.0.0 Bye\r\n") == []
    assert reply_problems(b"250 2.0.0 Ok\n")
    assert reply_problems(b"25 Ok\r\n")
    assert reply_problems(b"250 2.0.0 Ok\r\n250")
    assert reply_problems(b"451 2.0.0 class differs\r\n")
    assert reply_problems(b"250-2.0.0 a\r\n251 2.0.0 b\r\n")
    assert reply_problems(b"250 2.0.0 " + b"x" * 600 + b"\r\n")


async def test_the_classics_get_clean_answers(relays: RelayFactory) -> None:
    """The named hostile inputs, one by one, with the exact answers (the fuzzer checks only their form)."""
    running = await relays.start(listeners=[
        {"name": "relay", "address": "127.0.0.1:0", "kind": "relay", "trusted_networks": ["127.0.0.0/8"]},
        {"name": "submission", "address": "127.0.0.2:0", "kind": "submission", "auth": "required",
         "allow_plain_auth_on_loopback": True}])
    with current_tap().watch() as lines:
        await _classics(running, relays)
    assert log_problems(lines) == []
    assert not [line for line in lines if '"logger_name": "asyncio"' in line], lines   # no library warnings


async def _classics(running: RunningRelay, relays: RelayFactory) -> None:
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    assert (await client.cmd("DATA")).code == 503                        # DATA without MAIL
    assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await client.cmd("DATA")).code == 503                        # DATA without RCPT
    assert (await client.cmd(b"NOOP \x00 x")).code == 500                # NUL
    assert (await client.cmd(b"NOOP \xff\xfe")).code == 500              # invalid UTF-8
    assert (await client.cmd(b"NOOP " + b"A" * 100_000)).code == 500     # a huge line
    await client.send(b"NOOP\r\n" * 300)                                  # a pipelined burst
    burst = [await client.reply() for _ in range(300)]
    assert {reply.code for reply in burst} == {250}
    assert (await client.cmd("RSET")).code == 250
    assert (await client.starttls(relays.client_tls())).code == 220
    await client.ehlo()
    twice = await client.cmd("STARTTLS")                                  # STARTTLS twice
    assert (twice.code, twice.enhanced) == (503, "5.5.1")
    await client.close()

    auth = await RawClient.connect(running.ports["submission"], "127.0.0.2")
    await auth.greeting()
    await auth.ehlo()
    for garbage, code in ((b"AUTH PLAIN !!notbase64!!", 501), (b"AUTH PLAIN " + base64.b64encode(b"\0\0"), 535),
                          (b"AUTH XOAUTH2 x", 504), (b"AUTH", 504)):
        assert (await auth.cmd(garbage)).code == code, garbage
    assert (await auth.cmd("AUTH LOGIN")).code == 334
    assert (await auth.cmd(b"\xff\xfe")).code == 501                      # not base64
    assert (await auth.cmd("AUTH LOGIN")).code == 334
    assert (await auth.cmd("*")).code == 501                              # cancelled
    await auth.close()

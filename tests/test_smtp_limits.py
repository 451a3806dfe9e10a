"""Rate limits through real SMTP sessions with a real Redis shared by two relays, and Redis outages."""

from __future__ import annotations

import pytest

from tests.support.pgcluster import free_port
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient

BODY = b"Subject: t\r\n\r\nhi\r\n"


async def send_one(running: RunningRelay) -> int:
    client = await RawClient.connect(running.ports["relay"])
    greeting = await client.greeting()
    if greeting.code != 220:
        await client.close()
        return greeting.code
    await client.ehlo()
    reply = await client.mail("a@example.com", ["b@example.org"], BODY)
    await client.close()
    return reply.code


async def test_message_limit_is_shared_by_two_relays_through_redis(relays: RelayFactory, redis_url: str,
                                                                   key_prefix: str) -> None:
    config = {"redis": {"url": redis_url, "key_prefix": key_prefix},
              "limits": {"messages_per_ip": {"count": 3, "period": 3600}}}
    first = await relays.start(**config)
    second = await relays.start(**config)
    codes = [await send_one(first), await send_one(second), await send_one(first),
             await send_one(second), await send_one(first)]
    assert codes == [250, 250, 250, 450, 450]


async def test_recipient_limit_per_ip(relays: RelayFactory, redis_url: str, key_prefix: str) -> None:
    running = await relays.start(redis={"url": redis_url, "key_prefix": key_prefix},
                                 limits={"recipients_per_ip": {"count": 2, "period": 3600}})
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<1@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<2@example.org>")).code == 250
    reply = await client.cmd("RCPT TO:<3@example.org>")
    assert reply.code == 450 and reply.enhanced == "4.7.1"
    await client.close()


async def test_redis_down_fail_open_keeps_accepting(relays: RelayFactory) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    running = await relays.start(redis={"url": dead, "fail_open": True, "timeout": 0.2},
                                 limits={"messages_per_ip": {"count": 1, "period": 3600}})
    # Limits cannot be decided: accepted anyway (fail-open), twice despite the limit of one.
    assert [await send_one(running), await send_one(running)] == [250, 250]


async def test_redis_down_fail_closed_answers_temporary_failure(relays: RelayFactory) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    running = await relays.start(redis={"url": dead, "fail_open": False, "timeout": 0.2})
    client = await RawClient.connect(running.ports["relay"])
    reply = await client.reply()
    assert reply.code == 421 and reply.enhanced == "4.3.0"
    assert await client.closed()
    # With no per-connection rule the limiter is first asked at MAIL: 451 4.3.0 there.
    running = await relays.start(redis={"url": dead, "fail_open": False, "timeout": 0.2},
                                 limits={"connection_rate_per_ip": {"count": 0},
                                         "messages_per_ip": {"count": 5, "period": 60}})
    client = await RawClient.connect(running.ports["relay"])
    assert (await client.greeting()).code == 220
    await client.ehlo()
    reply = await client.cmd("MAIL FROM:<a@example.com>")
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    await client.close()


@pytest.mark.postgres
async def test_spine_on_postgres(relays: RelayFactory, postgres_url: str, redis_url: str,
                                 key_prefix: str) -> None:
    running = await relays.start(store_url=postgres_url, redis={"url": redis_url, "key_prefix": key_prefix})
    await running.add_user("pg-user", "pg-password")
    assert await send_one(running) == 250
    client = await RawClient.connect(running.ports["submission"], "127.0.0.2")
    await client.greeting()
    await client.ehlo()
    await client.starttls(relays.client_tls())
    await client.ehlo()
    assert (await client.auth_plain("pg-user", "pg-password")).code == 235
    reply = await client.mail("pg-user@example.com", ["x@example.org", "y@example.net"], BODY)
    assert reply.code == 250
    queue_id = reply.text.rsplit(" ", 1)[1]
    await client.close()
    rows = await running.store.recipients_of(queue_id)
    assert sorted(r.domain for r in rows) == ["example.net", "example.org"]
    message = await running.store.get_message(queue_id)
    assert message is not None and message.auth_user == "pg-user"

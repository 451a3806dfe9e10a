"""The relay on uvloop, as ``relay serve`` runs it: the rest of the suite runs on asyncio's own loop.

Found by the SIGKILL test (issue 7): uvloop's transports do not subclass ``asyncio.Transport``, so every
``isinstance(transport, asyncio.WriteTransport)`` guard was False under ``relay serve``. Deliveries all
failed with "connection lost after EHLO", idle clients were never timed out, shutdown never said 421 and
a connection over a listener's limit got no answer. These tests run the same paths on uvloop.
"""

from __future__ import annotations

import asyncio

import uvloop

from relay.sink import SinkConfig, SinkServer
from relay.transports import stream_transport
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient


async def test_the_loop_is_uvloop_and_its_transports_are_stream_transports() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        _, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        assert not isinstance(writer.transport, asyncio.WriteTransport)   # why the guards failed
        assert stream_transport(writer.transport) is writer.transport
        writer.close()
    assert stream_transport(object()) is None


async def test_delivery_works_on_uvloop(relays: RelayFactory) -> None:
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        running = await relays.start(
            server={"role": "all"},
            delivery={"routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port,
                                             "tls": "none"}}})
        client = await RawClient.connect(running.ports["relay"])
        await client.greeting()
        await client.ehlo()
        reply = await client.mail("a@example.org", ["b@example.com"], b"Subject: uvloop\r\n\r\nhello\r\n")
        assert reply.code == 250, reply
        received = await sink.wait_for_messages(1, timeout=20)
        assert received[0].rcpt_tos == ["b@example.com"]


async def test_idle_client_is_timed_out_on_uvloop(relays: RelayFactory) -> None:
    running = await relays.start(smtp={"command_timeout": 0.5})
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    reply = await client.reply(timeout=10)
    assert reply.code == 421 and reply.enhanced == "4.4.2"
    assert await client.closed()


async def test_connection_over_the_listener_limit_gets_421_on_uvloop(relays: RelayFactory) -> None:
    running = await relays.start(listeners=[{"name": "relay", "address": "127.0.0.1:0", "kind": "relay",
                                             "trusted_networks": ["127.0.0.0/8"], "max_connections": 1}])
    first = await RawClient.connect(running.ports["relay"])
    await first.greeting()
    second = await RawClient.connect(running.ports["relay"])
    reply = await second.reply()
    assert reply.code == 421 and reply.enhanced == "4.7.0"
    assert await second.closed()


async def test_shutdown_says_421_on_uvloop(relays: RelayFactory) -> None:
    running = await relays.start()
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await running.relay.stop(grace=1)
    reply = await client.reply()
    assert reply.code == 421 and reply.enhanced == "4.3.2"

"""Leases under slow transactions, end to end on Postgres: the heartbeat keeps a live transaction's
claims, a claim whose lease was taken over is never attempted again, and a DSN is never duplicated.

The destination is a real sink behind :class:`SlowPeer`, a loopback TCP relay that holds the end of each
message (the final dot) before passing it on: to the delivery side, a live peer that is slow to answer
mid-DATA — the moment where a lapsed lease would let a second worker deliver the message again. (The
sink's own ``body:*=stall`` never answers at all, so it could not show a delivery being made twice.)

No assertion depends on speed: the holds end on events the test sets, or after a fixed stall that only
has to be longer than the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from relay.delivery.config import ConcurrencySettings, TimeoutSettings
from relay.delivery.scheduler import DeliveryService
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import QueueStore, RecipientState
from tests.support.dnsserver import DnsTestServer
from tests.test_delivery_e2e import SENDER, World, dsn_fields, enqueue, rows, wait_until

#: Far longer than a stage could ever take here: only the lease may run out.
GENEROUS = TimeoutSettings(connect=30, greeting=30, ehlo=30, mail=30, rcpt=30, data_init=30, data_block=30,
                           data_end=30)
END_OF_DATA = b"\r\n.\r\n"


class SlowPeer:
    """A TCP relay on 127.0.0.1 in front of a sink: it passes every byte on, but holds the chunk that ends
    a message until ``release`` is set or, when ``stall`` is given, that many seconds have passed."""

    def __init__(self, upstream_port: int, stall: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.stall = stall
        self.release = asyncio.Event()
        self.holding = asyncio.Event()   # set once the end of a message is being held
        self.ends_held = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> SlowPeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.release.set()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((client_writer, upstream_writer))
        try:
            await asyncio.gather(self._pump(client_reader, upstream_writer, hold=True),
                                 self._pump(upstream_reader, client_writer, hold=False))
        finally:
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, hold: bool) -> None:
        tail = b""
        try:
            while chunk := await source.read(65536):
                if hold and END_OF_DATA in tail + chunk:
                    await self._hold()
                    tail = b""  # that end is passed on: the next command is not another one
                else:
                    tail = (tail + chunk)[-(len(END_OF_DATA) - 1):]  # an end split across two reads
                sink.write(chunk)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()  # one side ended: end the other too

    async def _hold(self) -> None:
        self.ends_held += 1
        self.holding.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stall):
                await self.release.wait()


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[list[QueueStore]]:
    """Two store objects on one fresh database: two relay nodes, as far as the queue can tell."""
    opened = [await open_store(StoreSettings(url=postgres_url, pool_size=3)) for _ in range(2)]
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
async def world(stores: list[QueueStore]) -> AsyncIterator[World]:
    async with DnsTestServer() as dns:
        w = World(stores[0], dns)
        await w.sink("sender.example")
        try:
            yield w
        finally:
            await w.close()


async def slow_destination(world: World, domain: str, stall: float | None = None) -> tuple[SinkServer, SlowPeer]:
    """A sink for ``domain`` whose MX is reached through a :class:`SlowPeer` (entered by the caller)."""
    sink = SinkServer(SinkConfig(starttls="off"))
    await sink.start()
    world.sinks[domain] = sink  # stopped with the world
    peer = SlowPeer(sink.port, stall)
    return sink, peer


async def take_over(postgres_url: str, recipient_id: int, owner: str = "another-node:1:beef") -> None:
    """What another node's claim does once it finds the lease ended: the row is its own from now on."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("UPDATE recipients SET lease_owner = %s, lease_until = %s WHERE id = %s",
                           (owner, time.time() + 3600, recipient_id))


async def lease_owner(postgres_url: str, recipient_id: int) -> Any:
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT lease_owner FROM recipients WHERE id = %s", (recipient_id,))
        row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def dsns_queued(store: QueueStore, recipients: int) -> int:
    """How many DSN recipients the queue holds besides the test's own ``recipients`` (one per DSN here)."""
    return sum((await store.count_by_state()).values()) - recipients


# --- the heartbeat ----------------------------------------------------------------------------------------

async def test_a_transaction_slower_than_its_lease_is_delivered_once_by_two_nodes(
        world: World, stores: list[QueueStore]) -> None:
    stall, lease = 5.0, 2.0
    sink, peer = await slow_destination(world, "slow.example", stall=stall)
    sink.set_rule("bad@slow.example", "550 5.1.1 no such user")
    async with peer:
        world.mx("slow.example", peer.port)
        message = await enqueue(stores[0], "bob@slow.example", "bad@slow.example")
        services: list[DeliveryService] = []
        for store in stores:
            world.store = store
            services.append(world.service(lease_seconds=lease, timeouts=GENEROUS))
        for service in services:
            await service.start()

        async def settled() -> bool:
            found = await rows(stores[0], message)
            return (found["bob@slow.example"].state, found["bad@slow.example"].state) == (
                RecipientState.DELIVERED, RecipientState.BOUNCED)

        await wait_until(settled)
        # The DSN for bad@ went out with the results; wait for it to reach the sender.
        await world.sinks["sender.example"].wait_for_messages(1, timeout=30)
        for service in services:
            await service.stop(grace=5)

    # One transaction, held well past the lease, and no second one from the other node meanwhile.
    assert peer.ends_held == 1
    assert [m.rcpt_tos for m in sink.received] == [["bob@slow.example"]]
    assert sink.stats.recipients_accepted == 1
    bob = (await rows(stores[0], message))["bob@slow.example"]
    assert bob.attempts == 1 and len(await stores[0].attempts_of(bob.id)) == 1
    # Exactly one DSN, about bad@ alone.
    assert await dsns_queued(stores[0], recipients=2) == 1
    [dsn] = world.sinks["sender.example"].received
    assert dsn.rcpt_tos == [SENDER]
    assert dsn_fields(dsn.data)[1]["Final-Recipient"] == "rfc822; bad@slow.example"
    assert sum(s.stats.leases_renewed for s in services) > 0
    assert sum(s.stats.leases_lost for s in services) == 0


# --- leases lost anyway (a node paused past its lease, an operator) --------------------------------------

async def test_a_lease_lost_mid_send_commits_neither_the_result_nor_its_dsn(
        world: World, stores: list[QueueStore], postgres_url: str) -> None:
    sink, peer = await slow_destination(world, "slow.example")
    sink.set_rule("bad@slow.example", "554 5.6.0 message refused", stage="data")
    async with peer:
        world.mx("slow.example", peer.port)
        message = await enqueue(stores[0], "bad@slow.example")
        service = world.service(lease_seconds=3, timeouts=GENEROUS)
        run = asyncio.create_task(service.run_once())
        async with asyncio.timeout(30):
            await peer.holding.wait()  # mid-DATA: the message is sent, its reply not yet
        (bad_id,) = [row.id for row in (await rows(stores[0], message)).values()]
        await take_over(postgres_url, bad_id)
        await wait_until(lambda: service.stats.leases_lost == 1)  # the heartbeat noticed
        peer.release.set()
        async with asyncio.timeout(60):
            await run

    assert sink.stats.messages_rejected == 1  # the peer did refuse it: a DSN was built for it
    assert service.stats.dsns == 1
    row = (await rows(stores[0], message))["bad@slow.example"]
    assert (row.state, row.attempts) == (RecipientState.QUEUED, 0)
    assert await stores[0].attempts_of(bad_id) == []
    assert await lease_owner(postgres_url, bad_id) == "another-node:1:beef"
    assert await dsns_queued(stores[0], recipients=1) == 0  # the new holder will report it, once


async def test_a_queued_claim_whose_lease_was_lost_is_never_attempted(
        world: World, stores: list[QueueStore], postgres_url: str) -> None:
    sink, peer = await slow_destination(world, "slow.example")
    async with peer:
        world.mx("slow.example", peer.port)
        first = await enqueue(stores[0], "one@slow.example")
        second = await enqueue(stores[0], "two@slow.example")
        # One connection at a time: the second message waits in the destination's queue.
        service = world.service(lease_seconds=3, timeouts=GENEROUS,
                                concurrency=ConcurrencySettings(total=1, per_destination=1))
        run = asyncio.create_task(service.run_once())
        async with asyncio.timeout(30):
            await peer.holding.wait()
        (second_id,) = [row.id for row in (await rows(stores[0], second)).values()]
        await take_over(postgres_url, second_id)
        await wait_until(lambda: service.stats.leases_lost == 1)
        peer.release.set()
        async with asyncio.timeout(60):
            await run

    assert [m.rcpt_tos for m in sink.received] == [["one@slow.example"]]
    assert peer.ends_held == 1
    assert (await rows(stores[0], first))["one@slow.example"].state == RecipientState.DELIVERED
    row = (await rows(stores[0], second))["two@slow.example"]
    assert (row.state, row.attempts) == (RecipientState.QUEUED, 0)
    assert await lease_owner(postgres_url, second_id) == "another-node:1:beef"


async def test_a_reload_that_shortens_the_lease_renews_at_the_new_pace_at_once(
        world: World, stores: list[QueueStore]) -> None:
    sink, peer = await slow_destination(world, "slow.example")
    async with peer:
        world.mx("slow.example", peer.port)
        message = await enqueue(stores[0], "bob@slow.example")
        service = world.service(lease_seconds=900, timeouts=GENEROUS)  # the heartbeat sleeps 300 s
        run = asyncio.create_task(service.run_once())
        async with asyncio.timeout(30):
            await peer.holding.wait()
        shorter = service.settings.model_copy(update={"lease_seconds": 3.0})
        service.reconfigure(shorter, hostname="relay.test")
        # Claims made from now on last 3 s: the heartbeat must not finish its 300 s sleep first.
        await wait_until(lambda: service.stats.leases_renewed >= 2)
        peer.release.set()
        async with asyncio.timeout(60):
            await run

    assert [m.rcpt_tos for m in sink.received] == [["bob@slow.example"]]
    assert (await rows(stores[0], message))["bob@slow.example"].state == RecipientState.DELIVERED

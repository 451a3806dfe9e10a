"""Graceful shutdown and roles, against real relays (in process, and ``relay serve`` subprocesses).

Shutdown: listeners stop accepting at once, idle sessions get 421 at once, a session inside a transaction
may finish it within the grace period and is cut off with 421 after it; a delivery attempt may finish
within the grace, else its claim goes back to the queue at once (no waiting for the lease); a second
SIGTERM exits at once with status 1; SIGTERM in the middle of a load loses nothing: every message
answered 250 is in the queue, delivered or still queued, and is delivered after a restart.

Roles: ``--role smtp`` never claims a recipient, ``--role delivery`` never binds an SMTP socket, and an
smtp node plus a delivery node on one Postgres deliver everything.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

from relay.app import Relay
from relay.sink import ReceivedMessage, SinkConfig, SinkServer
from relay.store import open_store
from tests.support import probeplugin
from tests.support.configfile import ConfigFile
from tests.support.relayproc import RelayProcess
from tests.support.smtpclient import RawClient

PROBE = "tests.support.probeplugin:Probe"
QUEUE_ID = re.compile(rb"\bid ([0-9a-z]+)\b")


def body(subject: str = "shutdown") -> bytes:
    return f"From: a@example.com\r\nTo: b@dest.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def queue_id_of(reply: Any) -> str:
    assert reply.code == 250, str(reply)
    return str(reply.text.rsplit(" ", 1)[-1])


def received_ids(messages: list[ReceivedMessage]) -> list[str]:
    ids = []
    for message in messages:
        match = QUEUE_ID.search(message.data)
        assert match is not None, message.data[:300]
        ids.append(match.group(1).decode())
    return ids


def route_to(sink: SinkServer) -> dict[str, Any]:
    return {"routes": {"domains": {"dest.test": {"kind": "host", "host": "127.0.0.1", "port": sink.port,
                                                 "tls": "none"}}}}


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    probeplugin.reset()


@pytest.fixture
def config(tmp_path: Path, tls_ca: trustme.CA) -> ConfigFile:
    return ConfigFile(tmp_path, tls_ca)


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    async with SinkServer(SinkConfig(starttls="off")) as server:
        yield server


async def session(port: int) -> RawClient:
    client = await RawClient.connect(port)
    assert (await client.greeting()).code == 220
    assert (await client.ehlo()).code == 250
    return client


async def open_transaction(port: int) -> RawClient:
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>")).code == 250
    return client


# -- draining SMTP sessions ----------------------------------------------------------------------------
async def test_stop_turns_idle_sessions_away_and_lets_an_open_transaction_finish(config: ConfigFile) -> None:
    config.write()
    relay = await config.start()
    assert relay.smtp is not None and relay.store is not None
    port = relay.smtp.ports()["relay"]
    idle = await session(port)
    busy = await open_transaction(port)

    stopping = asyncio.create_task(relay.stop(grace=60))
    assert str(await idle.reply()).startswith("421 4.3.2")             # idle: told at once
    assert await idle.closed()
    with pytest.raises(OSError):                                        # no new connections
        await RawClient.connect(port)
    assert (await busy.cmd("DATA")).code == 354                         # the transaction goes on
    queued = queue_id_of(await busy.cmd(body() + b"."))
    assert str(await busy.reply()).startswith("421 4.3.2")             # … and then it is told too
    await stopping

    store = await open_store(relay.settings.store)
    try:
        assert await store.get_message(queued) is not None
    finally:
        await store.close()


async def test_a_transaction_outlasting_the_grace_is_cut_off_with_421(config: ConfigFile) -> None:
    config.write()
    relay = await config.start()
    assert relay.smtp is not None
    busy = await open_transaction(relay.smtp.ports()["relay"])
    await relay.stop(grace=0.2)                                         # the client never sends DATA
    assert str(await busy.reply()).startswith("421 4.3.2")
    assert await busy.closed()
    store = await open_store(relay.settings.store)
    try:
        assert not any((await store.count_by_state()).values())      # nothing half-stored
    finally:
        await store.close()


# -- in-flight deliveries ------------------------------------------------------------------------------
def delivering(config: ConfigFile, sink: SinkServer, tag: str, hold: bool) -> dict[str, Any]:
    return {"server": {"role": "all"}, "chain": {"plugins": [PROBE]},
            "plugins": {"probe": {"tag": tag, "hold_attempts": hold}}, "delivery": route_to(sink)}


async def test_an_attempt_under_way_may_finish_within_the_grace(config: ConfigFile, sink: SinkServer) -> None:
    config.write(**delivering(config, sink, "finishes", hold=True))
    relay = await config.start()
    assert relay.smtp is not None
    client = await session(relay.smtp.ports()["relay"])
    queued = queue_id_of(await client.mail("a@example.com", ["b@dest.test"], body()))
    await client.close()
    probe = probeplugin.instance("finishes")
    await asyncio.wait_for(probe.attempt_started.wait(), 10)
    stopping = asyncio.create_task(relay.stop(grace=60))
    await asyncio.sleep(0)
    probeplugin.GATES.setdefault("finishes", asyncio.Event()).set()
    await stopping
    assert received_ids(await sink.wait_for_messages(1)) == [queued]
    store = await open_store(relay.settings.store)
    try:
        [recipient] = await store.recipients_of(queued)
        assert recipient.state.value == "delivered"
    finally:
        await store.close()


async def test_an_attempt_outlasting_the_grace_gives_its_claim_back(config: ConfigFile, sink: SinkServer) -> None:
    config.write(**delivering(config, sink, "stuck", hold=True))
    relay = await config.start()
    assert relay.smtp is not None
    client = await session(relay.smtp.ports()["relay"])
    queued = queue_id_of(await client.mail("a@example.com", ["b@dest.test"], body()))
    await client.close()
    await asyncio.wait_for(probeplugin.instance("stuck").attempt_started.wait(), 10)
    await relay.stop(grace=0.2)

    store = await open_store(relay.settings.store)
    try:
        [recipient] = await store.recipients_of(queued)
        assert recipient.state.value == "queued"
        # Given back, not left to lapse: another worker claims it now, without waiting lease_seconds.
        claims = await store.claim_due(recipient.next_attempt_at + 1, 10, "another-node", 60)
        assert [claim.recipient.id for claim in claims] == [recipient.id]
        await store.release([recipient.id], "another-node")
    finally:
        await store.close()

    config.write(**delivering(config, sink, "after-restart", hold=False))
    again = await config.start()
    try:
        assert received_ids(await sink.wait_for_messages(1)) == [queued]
    finally:
        await again.stop(grace=5)


# -- roles -------------------------------------------------------------------------------------------
async def test_role_smtp_never_delivers_and_role_delivery_never_listens(
        config: ConfigFile, sink: SinkServer, postgres_url: str) -> None:
    port = free_port()
    listeners = [{"name": "relay", "address": f"127.0.0.1:{port}", "trusted_networks": ["127.0.0.0/8"]}]
    config.write(server={"role": "smtp"}, store={"url": postgres_url}, listeners=listeners,
                 delivery=route_to(sink))
    smtp_node = await config.start()
    delivery_node: Relay | None = None
    try:
        assert smtp_node.delivery is None
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("delivery")]
        client = await session(port)
        ids = [queue_id_of(await client.mail("a@example.com", [f"r{i}@dest.test"], body())) for i in range(3)]
        assert smtp_node.store is not None
        assert (await smtp_node.store.count_by_state()).get("queued") == 3

        # Same configuration, role delivery: the listener address is taken by the smtp node, so a node
        # that tried to bind it could not start at all.
        config.write(server={"role": "delivery"}, store={"url": postgres_url}, listeners=listeners,
                     delivery=route_to(sink))
        delivery_node = await config.start()
        assert delivery_node.smtp is None and delivery_node.delivery is not None
        assert sorted(received_ids(await sink.wait_for_messages(3))) == sorted(ids)
        queue_id_of(await client.mail("a@example.com", ["late@dest.test"], body()))   # woken across nodes
        assert len(await sink.wait_for_messages(4)) == 4
    finally:
        if delivery_node is not None:
            await delivery_node.stop(grace=5)
        await smtp_node.stop(grace=5)


async def test_an_smtp_node_and_a_delivery_node_on_one_postgres_deliver_everything(
        config: ConfigFile, sink: SinkServer, postgres_url: str) -> None:
    port = free_port()
    config.write(server={"role": "all"}, store={"url": postgres_url}, delivery=route_to(sink),
                 listeners=[{"name": "relay", "address": f"127.0.0.1:{port}", "trusted_networks": ["127.0.0.0/8"]}])
    smtp_node = RelayProcess(config.path, "--role", "smtp", pid_file=config.dir / "smtp.pid")
    delivery_node = RelayProcess(config.path, "--role", "delivery", pid_file=config.dir / "delivery.pid")
    try:
        await asyncio.to_thread(smtp_node.wait_ready)
        await asyncio.to_thread(delivery_node.wait_ready)
        accepted = await send_many(port, senders=5, each=10)
        assert len(accepted) == 50
        assert sorted(received_ids(await sink.wait_for_messages(50, timeout=60))) == sorted(accepted)
        for node in (smtp_node, delivery_node):
            node.signal(signal.SIGTERM)
            assert await asyncio.to_thread(node.wait) == 0
        assert "listening" in smtp_node.event_names() and "delivery_started" not in smtp_node.event_names()
        assert "delivery_started" in delivery_node.event_names() and "listening" not in delivery_node.event_names()
        assert {"relay_started"} <= set(delivery_node.event_names())
        assert delivery_node.wait_event("relay_started")["role"] == "delivery"
    finally:
        smtp_node.kill()
        delivery_node.kill()


async def send_many(port: int, *, senders: int, each: int) -> list[str]:
    accepted: list[str] = []

    async def one_sender(number: int) -> None:
        client = await session(port)
        for i in range(each):
            accepted.append(queue_id_of(await client.mail("a@example.com", [f"s{number}-{i}@dest.test"],
                                                          body(f"{number}-{i}"))))
        await client.cmd("QUIT")
    await asyncio.gather(*(one_sender(n) for n in range(senders)))
    return accepted


# -- SIGTERM on a relay serve process ----------------------------------------------------------------------
async def test_sigterm_during_load_loses_nothing(config: ConfigFile, sink: SinkServer, postgres_url: str) -> None:
    """Submitted (answered 250) = stored (queued) + delivered, right after the stop and after a restart."""
    port = free_port()
    config.write(server={"role": "all", "shutdown_grace": 30.0}, store={"url": postgres_url},
                 delivery=route_to(sink),
                 listeners=[{"name": "relay", "address": f"127.0.0.1:{port}", "trusted_networks": ["127.0.0.0/8"]}])
    relay = RelayProcess(config.path, pid_file=config.dir / "relay.pid")
    accepted: list[str] = []
    refused: list[str] = []
    enough = asyncio.Event()

    async def sender(number: int) -> None:
        """Sends on one connection after another until the relay turns it away."""
        for _ in range(1000):
            try:
                client = await RawClient.connect(port)
                if (await client.greeting()).code != 220:
                    return
                await client.ehlo()
                for i in range(1000):
                    reply = await client.mail("a@example.com", [f"l{number}-{i}@dest.test"], body())
                    if reply.code != 250:
                        refused.append(str(reply))
                        return
                    accepted.append(queue_id_of(reply))
                    if len(accepted) >= 150:
                        enough.set()
            except (OSError, ConnectionError, TimeoutError):
                return          # the listener is closed, or the session was told 421 and closed

    try:
        await asyncio.to_thread(relay.wait_ready)
        senders = [asyncio.create_task(sender(n)) for n in range(8)]
        await asyncio.wait_for(enough.wait(), 120)
        relay.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*senders), 120)
        assert await asyncio.to_thread(relay.wait) == 0
    finally:
        relay.kill()
    assert len(set(accepted)) == len(accepted) >= 150
    assert all(reply.startswith("421") for reply in refused)

    with psycopg.connect(postgres_url) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM messages")}
        states = dict(db.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall())
        leased = db.execute("SELECT count(*) FROM recipients WHERE lease_owner IS NOT NULL").fetchone()
        delivered = {row[0] for row in db.execute(
            "SELECT message_id FROM recipients WHERE state = 'delivered'")}
    assert stored == set(accepted)                                   # nothing lost, nothing invented
    assert set(states) <= {"queued", "delivered"} and sum(states.values()) == len(accepted)
    assert leased == (0,)                                            # every claim recorded or given back
    assert set(received_ids(sink.received)) == delivered             # what the store calls delivered arrived

    restarted = RelayProcess(config.path, "--role", "delivery", pid_file=config.dir / "relay.pid")
    try:
        await asyncio.to_thread(restarted.wait_ready)
        arrived = await sink.wait_for_messages(len(accepted), timeout=120)
        restarted.signal(signal.SIGTERM)
        assert await asyncio.to_thread(restarted.wait) == 0
    finally:
        restarted.kill()
    assert set(received_ids(arrived)) == set(accepted)


async def test_a_second_signal_exits_at_once_with_status_1(config: ConfigFile, postgres_url: str) -> None:
    port = free_port()
    config.write(server={"role": "smtp", "shutdown_grace": 600.0}, store={"url": postgres_url},
                 listeners=[{"name": "relay", "address": f"127.0.0.1:{port}", "trusted_networks": ["127.0.0.0/8"]}])
    relay = RelayProcess(config.path, pid_file=config.dir / "relay.pid")
    try:
        await asyncio.to_thread(relay.wait_ready)
        busy = await open_transaction(port)        # keeps the graceful stop waiting (up to 600 s)
        relay.signal(signal.SIGTERM)
        await asyncio.to_thread(relay.wait_event, "shutdown_requested")
        assert relay.process.poll() is None
        relay.signal(signal.SIGTERM)
        assert await asyncio.to_thread(relay.wait, 60) == 1            # far sooner than the 600 s grace
        assert "shutdown_forced" in relay.event_names()
        assert await busy.closed()
    finally:
        relay.kill()

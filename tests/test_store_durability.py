"""Durability: what enqueue acknowledged survives the process being killed, and Postgres may restart.

A child process enqueues messages from several tasks at once (so group commits are in flight) and
prints each id only after ``enqueue`` returned. The test SIGKILLs it by PID mid-stream, reopens the
store and checks that every printed id is there, whole: all recipients, identical bytes. It also checks
that no message in the store is half-written (every stored message has all its recipients).

The restart test runs its own throwaway Postgres cluster, stops it under a live store and starts it again:
calls fail with StoreError (never hang) while it is down, and the same store works again, LISTEN included,
once it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest

from relay.settings import StoreSettings
from relay.store import NewMessage, NewRecipient, QueueStore, StoreError, open_store
from relay.store.postgres import PostgresStore
from tests.support.pgcluster import PgCluster

RECIPIENTS = 3
ACKED_BEFORE_KILL = 300

# The child: 16 tasks enqueue forever; an id is printed only once its enqueue has returned.
ENQUEUER = """
import asyncio, hashlib, itertools, sys, time
from relay.log import configure_logging
from relay.settings import StoreSettings
from relay.store import NewMessage, NewRecipient, open_store

configure_logging(stream=sys.stderr)  # stdout carries only acknowledged ids

def body(msg_id):
    return b"Subject: " + msg_id.encode() + b"\\r\\n\\r\\n" + hashlib.sha256(msg_id.encode()).digest() * 300

async def main(url):
    store = await open_store(StoreSettings(url=url, pool_size=4))
    counter = itertools.count()

    async def worker():
        while True:
            msg_id = f"m{next(counter):07d}"
            rcpts = [NewRecipient(f"r{j}-{msg_id}@example.com") for j in range({rcpts})]
            await store.enqueue(NewMessage(id=msg_id, sender="s@example.org", recipients=rcpts,
                                           data=body(msg_id), received_at=time.time()))
            sys.stdout.write(msg_id + "\\n")
            sys.stdout.flush()

    await asyncio.gather(*(worker() for _ in range(16)))

asyncio.run(main(sys.argv[1]))
""".replace("{rcpts}", str(RECIPIENTS))


def body(msg_id: str) -> bytes:
    return b"Subject: " + msg_id.encode() + b"\r\n\r\n" + hashlib.sha256(msg_id.encode()).digest() * 300


def _pump_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_and_kill(url: str, log_path: Path) -> list[str]:
    """Start the enqueuer, SIGKILL it after enough acknowledgements; return every acknowledged id."""
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-c", ENQUEUER, url], stdout=subprocess.PIPE,
                                 stderr=log, text=True)
    assert child.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump_lines, args=(child.stdout, lines), daemon=True)
    reader.start()
    acked: list[str] = []
    try:
        while len(acked) < ACKED_BEFORE_KILL:
            line = lines.get(timeout=120)  # a guard against a stuck child, not a speed requirement
            if line is None:
                pytest.fail(f"the enqueuer exited early: {log_path.read_text()}")
            acked.append(line)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    reader.join(timeout=60)
    child.stdout.close()
    # Whatever was still in the pipe had been acknowledged too; a torn last line had not finished.
    while (line := lines.get_nowait()) is not None:
        acked.append(line)
    assert child.returncode == -signal.SIGKILL
    return [line.strip() for line in acked if line.endswith("\n")]


async def check_acknowledged(url: str, acked: list[str]) -> None:
    store = await open_store(StoreSettings(url=url, pool_size=2))
    try:
        for msg_id in acked:
            assert await store.message_data(msg_id) == body(msg_id), msg_id
            rows = await store.recipients_of(msg_id)
            assert sorted(r.address for r in rows) == [f"r{j}-{msg_id}@example.com" for j in range(RECIPIENTS)]
    finally:
        await store.close()


def recipients_per_message(url: str) -> set[int]:
    query = ("SELECT COUNT(r.id) FROM messages m LEFT JOIN recipients r ON r.message_id = m.id "
             "GROUP BY m.id")
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return {row[0] for row in conn.execute(query)}
    with psycopg.connect(url) as pg:
        return {row[0] for row in pg.execute(query)}


def test_sqlite_acknowledged_mail_survives_sigkill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/queue.db"
    acked = run_and_kill(url, tmp_path / "child.log")
    assert len(acked) >= ACKED_BEFORE_KILL
    asyncio.run(check_acknowledged(url, acked))
    assert recipients_per_message(url) == {RECIPIENTS}  # nothing half-written


@pytest.mark.postgres
def test_postgres_acknowledged_mail_survives_sigkill(postgres_url: str, tmp_path: Path) -> None:
    acked = run_and_kill(postgres_url, tmp_path / "child.log")
    assert len(acked) >= ACKED_BEFORE_KILL
    asyncio.run(check_acknowledged(postgres_url, acked))
    assert recipients_per_message(postgres_url) == {RECIPIENTS}


def _message(msg_id: str) -> NewMessage:
    return NewMessage(id=msg_id, sender="s@example.org", recipients=[NewRecipient("r@example.com")],
                      data=body(msg_id), received_at=time.time())


async def _until_listening(store: PostgresStore) -> None:
    for _ in range(600):  # bounded: the listener retries at least every 10 s
        if store.listening:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the LISTEN connection was not re-established")


async def _fails_fast(call: Coroutine[Any, Any, object]) -> None:
    with pytest.raises(StoreError):
        # The guard turns a hang into a failure (TimeoutError is not StoreError).
        await asyncio.wait_for(call, 60)


@pytest.mark.postgres
@pytest.mark.slow
async def test_postgres_restart_fails_fast_then_recovers() -> None:
    cluster = PgCluster()
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start)
    stores: list[QueueStore] = []
    try:
        settings = StoreSettings(url=cluster.url, pool_size=3)
        node, other = await open_store(settings), await open_store(settings)
        stores += [node, other]
        assert isinstance(node, PostgresStore)
        await node.enqueue(_message("before"))

        await asyncio.to_thread(cluster.stop, "fast")
        await _fails_fast(node.enqueue(_message("during")))
        await _fails_fast(node.claim_due(time.time(), 10, "w", 60))
        await _fails_fast(node.ping())

        await asyncio.to_thread(cluster.start)
        await node.ping()
        await node.enqueue(_message("after"))
        assert await node.message_data("before") == body("before")
        assert await node.message_data("after") == body("after")
        assert await node.get_message("during") is None

        # LISTEN is back too: new mail from another node wakes this one.
        await _until_listening(node)
        await node.wait_for_new_mail(0)  # consume the wake-up the reconnection itself signals
        waiting = asyncio.create_task(node.wait_for_new_mail(60))
        await other.enqueue(_message("from-other"))
        assert await waiting is True
    finally:
        for store in stores:
            await store.close()
        await asyncio.to_thread(cluster.destroy)

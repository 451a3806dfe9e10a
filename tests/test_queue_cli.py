"""`relay queue …` and `relay trace`, run as real subprocesses (``python -m relay.cli``) against a real store
on SQLite and Postgres; then the actions steering a running relay's delivery loop (hold keeps a recipient
from delivery until release; retry/flush make it due; bounce sends a DSN to the sender's sink; delete drops
it). Subprocesses run in a thread so the relay under test keeps serving on the test's loop.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.ids import new_queue_id
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import (
    AttemptRecord,
    Event,
    NewMessage,
    NewRecipient,
    QueueStore,
    RecipientResult,
    RecipientState,
)
from tests.support.relayfx import RelayFactory

RELAY = [sys.executable, "-m", "relay.cli"]
SENDER = "app@sender.example"


def body(subject: str) -> bytes:
    return f"From: {SENDER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@sender.example>\r\n\r\nhello\r\n".encode()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def config(store_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\nhostname = "cli.test"\nstate_dir = "{tmp_path}/state"\n'
                    f'secret_key = "k-{os.urandom(8).hex()}"\n[store]\nurl = "{store_url}"\n')
    return path


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[QueueStore]:
    opened = await open_store(StoreSettings(url=store_url, pool_size=3))
    try:
        yield opened
    finally:
        await opened.close()


async def relay(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("RELAY_CONFIG", None)
    return await asyncio.to_thread(subprocess.run, [*RELAY, "--config", str(config), *args], cwd=config.parent,
                                   input=stdin, capture_output=True, text=True, timeout=120, env=env)


async def ok(config: Path, *args: str, stdin: str = "") -> str:
    result = await relay(config, *args, stdin=stdin)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


async def json_lines(config: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (await ok(config, *args, "--json")).splitlines()]


async def enqueue(store: QueueStore, *rcpts: str, age: float = 0.0, due_in: float = 0.0, subject: str = "",
                  sender: str = SENDER) -> NewMessage:
    now = time.time()
    msg_id = new_queue_id()
    message = NewMessage(id=msg_id, sender=sender, recipients=[NewRecipient(r) for r in rcpts],
                         data=body(subject or msg_id), received_at=now - age, client_ip="192.0.2.7",
                         client_helo="app.example", auth_user="alice", listener="submission",
                         first_attempt_at=now + due_in if due_in else 0.0)
    await store.enqueue(message)
    return message


async def states(store: QueueStore, message: NewMessage) -> list[RecipientState]:
    return [r.state for r in await store.recipients_of(message.id)]


async def settled(store: QueueStore, message: NewMessage, limit: float = 30.0) -> list[RecipientState]:
    """The states once none is queued any more (the relay records a delivery just after the sink has it)."""
    deadline = time.monotonic() + limit
    while RecipientState.QUEUED in (found := await states(store, message)):
        assert time.monotonic() < deadline, f"{message.id} still queued"
        await asyncio.sleep(0.05)
    return found


# -- looking -----------------------------------------------------------------------------------------------

async def test_summary_list_show_trace(config: Path, store: QueueStore) -> None:
    young = await enqueue(store, "a@one.example", "b@two.example", due_in=3600)
    middle = await enqueue(store, "c@one.example", age=30 * 60, due_in=3600, sender="other@shop.example")
    old = await enqueue(store, "d@one.example", age=3 * 3600, due_in=3600)
    # One failed attempt on d@one.example, recorded as a delivery worker does; and an event.
    now = time.time()
    (rcpt_d,) = await store.recipients_of(old.id)
    assert len(await store.claim_recipients([rcpt_d.id], "worker", 60, now=now)) == 1
    attempt = AttemptRecord(rcpt_d.id, now - 5, 0.5, "mx.one.example", "TLSv1.3", "451 4.7.1 try later",
                            "greylisted", "temporary")
    await store.record_results([RecipientResult(rcpt_d.id, RecipientState.QUEUED, now + 3600,
                                                "451 4.7.1 try later", attempt)], "worker")
    await store.record_event(Event("ev-1", "opened", now - 1, old.id, "d@one.example", {"ip": "192.0.2.9"}))

    rows = {row["domain"]: row for row in await json_lines(config, "queue", "summary")}
    assert rows["one.example"]["total"] == 3 and rows["two.example"]["total"] == 1
    assert rows["one.example"]["buckets"] == {"5": 1, "10": 0, "20": 0, "40": 1, "80": 0, "160": 0, "320": 1,
                                              "640": 0, "1280": 0, "1280+": 0}
    assert rows["TOTAL"]["total"] == 4
    text = (await ok(config, "queue", "summary")).splitlines()
    assert text[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert text[1].split()[:3] == ["TOTAL", "4", "2"] and text[2].split()[:2] == ["one.example", "3"]
    assert (await ok(config, "queue", "summary", "--top", "1")).count("\n") == 3

    listed = await json_lines(config, "queue", "list")
    assert [r["recipient"] for r in listed] == ["a@one.example", "b@two.example", "c@one.example", "d@one.example"]
    assert listed[3]["attempts"] == 1 and listed[3]["last_reply"] == "451 4.7.1 try later"
    assert listed[0]["queue_id"] == young.id and listed[0]["state"] == "queued" and listed[0]["in_flight"] is False
    assert [r["recipient"] for r in await json_lines(config, "queue", "list", "--domain", "two.example")] == [
        "b@two.example"]
    assert [r["queue_id"] for r in await json_lines(config, "queue", "list", "--sender", "shop.example")] == [
        middle.id]
    assert [r["recipient"] for r in await json_lines(config, "queue", "list", "--older-than", "1h")] == [
        "d@one.example"]
    assert await json_lines(config, "queue", "list", "--state", "held") == []
    cut = await relay(config, "queue", "list", "--limit", "1", "--json")
    assert cut.returncode == 0 and len(cut.stdout.splitlines()) == 1 and "1 shown" in cut.stderr
    assert "d@one.example" in await ok(config, "queue", "list") and "451 4.7.1 try later" in await ok(
        config, "queue", "list")

    shown = await ok(config, "queue", "show", old.id)
    assert f"queue id      {old.id}" in shown and "<app@sender.example>" in shown and "192.0.2.7" in shown
    assert f"Subject: {old.id}" in shown and "mx.one.example" in shown and "greylisted" in shown
    (detail,) = await json_lines(config, "queue", "show", old.id)
    assert detail["auth_user"] == "alice" and ["Subject", old.id] in detail["headers"]
    assert detail["recipients"][0]["history"][0]["reply"] == "451 4.7.1 try later"

    trace = await ok(config, "trace", old.id)
    lines = trace.splitlines()
    assert "received from [192.0.2.7] helo app.example as alice on submission" in lines[1]
    steps = "\n".join(lines[2:])
    assert "attempt d@one.example: temporary (greylisted) mx mx.one.example tls TLSv1.3" in steps
    assert "event opened d@one.example ip=192.0.2.9" in steps
    assert "chain verdicts: not recorded" in trace
    (traced,) = await json_lines(config, "trace", old.id)
    kinds = [step["what"] for step in traced["steps"]]
    assert kinds[0] == "received" and "attempt" in kinds and kinds.count("event") >= 1
    # Time order: the attempt (5 s ago) before the opened event (1 s ago).
    assert steps.index("attempt d@one.example") < steps.index("event opened")

    missing = await relay(config, "queue", "show", "nosuchid")
    assert missing.returncode == 1 and "no message nosuchid" in missing.stderr
    assert (await relay(config, "queue", "list", "--older-than", "soon")).returncode == 2


# -- changing ----------------------------------------------------------------------------------------------

async def test_actions_change_the_store(config: Path, store: QueueStore) -> None:
    first = await enqueue(store, "a@one.example", "b@two.example", due_in=3600)
    second = await enqueue(store, "c@one.example", due_in=3600)

    out = await ok(config, "queue", "hold", "--domain", "one.example")
    assert out.strip() == "held 2 recipients of 2 messages"
    assert await states(store, first) == [RecipientState.HELD, RecipientState.QUEUED]
    assert await states(store, second) == [RecipientState.HELD]
    assert "nothing to hold" in await ok(config, "queue", "hold", "--domain", "one.example")
    usage = await relay(config, "queue", "hold")
    assert usage.returncode == 2 and "--domain" in usage.stderr
    assert (await relay(config, "queue", "hold", "nosuchid")).returncode == 1

    before = time.time()
    assert "released 1 recipient of 1 message" in await ok(config, "queue", "release", second.id)
    (row,) = await store.recipients_of(second.id)
    assert row.state is RecipientState.QUEUED and before - 1 <= row.next_attempt_at <= time.time() + 1

    await ok(config, "queue", "retry", "--all")
    assert all(r.next_attempt_at <= time.time() for r in await store.recipients_of(first.id)
               if r.state is RecipientState.QUEUED)

    # delete asks; "n" (and no answer at all) changes nothing.
    refused = await relay(config, "queue", "delete", first.id, stdin="n\n")
    assert refused.returncode == 1 and "delete 2 recipients? [y/N]" in refused.stderr
    assert await states(store, first) == [RecipientState.HELD, RecipientState.QUEUED]
    assert (await relay(config, "queue", "delete", first.id)).returncode == 1
    deleted = await ok(config, "queue", "delete", first.id, "--recipient", "b@two.example", stdin="y\n")
    assert "deleted 1 recipient" in deleted
    assert await states(store, first) == [RecipientState.HELD, RecipientState.DELETED]
    assert (await store.recipients_of(first.id))[1].last_reply == "deleted by the mail system administrator"

    bounced = await relay(config, "queue", "bounce", first.id, "--reason", "Campaign cancelled")
    assert bounced.returncode == 0, bounced.stderr
    assert "bounced 1 recipient of 1 message; 1 DSN queued" in bounced.stdout
    assert "... 1 of 1 recipients bounced" in bounced.stderr  # progress, on stderr off a terminal
    assert await states(store, first) == [RecipientState.BOUNCED, RecipientState.DELETED]
    dsns = [e for e in (await _entries(store)) if e["sender"] == ""]
    assert [d["recipient"] for d in dsns] == [SENDER]
    dsn = email.message_from_bytes(await store.message_data(dsns[0]["queue_id"]), policy=email.policy.default)
    report = dsn.get_payload()[1].as_string()  # type: ignore[index,union-attr]  # multipart/report
    assert "5.0.0" in report and "Campaign cancelled" in report and "a@one.example" in report

    # The final decisions are outbox events (webhooks, trace), committed with the states.
    events = {e.type: e for e in await store.message_events(first.id) if e.type in ("bounced", "dropped")}
    assert events["bounced"].recipient == "a@one.example" and events["bounced"].data["category"] == "operator"
    assert events["dropped"].recipient == "b@two.example"
    assert "event bounced a@one.example" in await ok(config, "trace", first.id)

    flushed = await ok(config, "queue", "flush", "one.example")
    assert "made due 1 recipient" in flushed  # c@one.example; held and final ones are not touched


async def _entries(store: QueueStore) -> list[dict[str, Any]]:
    from relay.store.base import RecipientQuery
    found = await store.find_recipients(RecipientQuery(states=tuple(RecipientState)), now=time.time(), limit=100)
    return [{"queue_id": e.recipient.message_id, "sender": e.sender, "recipient": e.recipient.address}
            for e in found]


async def test_many_recipients_show_progress_and_skip_what_a_worker_holds(config: Path, store: QueueStore) -> None:
    messages = [await enqueue(store, *(f"r{i}-{j}@bulk.example" for j in range(50)), due_in=3600)
                for i in range(14)]  # 700 recipients: two pages
    rows = [r for m in messages for r in await store.recipients_of(m.id)]
    await store.claim_recipients([rows[0].id], "worker", 300, now=time.time())  # in flight
    result = await relay(config, "queue", "hold", "--all")
    assert result.returncode == 0, result.stderr
    assert "held 699 recipients of 14 messages; 1 skipped" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("... ")]
    assert progress == ["... 499 of 700 recipients held, 1 skipped", "... 699 of 700 recipients held, 1 skipped"]
    assert (await store.recipients_of(messages[0].id))[0].state is RecipientState.QUEUED


# -- steering a running relay ------------------------------------------------------------------------------

async def test_actions_steer_the_delivery_loop(relays: RelayFactory, config: Path, store_url: str,
                                              store: QueueStore) -> None:
    dest = SinkServer(SinkConfig(starttls="off"))
    sender_sink = SinkServer(SinkConfig(starttls="off"))
    await dest.start()
    await sender_sink.start()
    try:
        held = await enqueue(store, "held@dest.example", subject="held")
        await ok(config, "queue", "hold", held.id)
        free = await enqueue(store, "free@dest.example", subject="free")
        routes = {d: {"kind": "host", "host": "127.0.0.1", "port": s.port, "tls": "none"}
                  for d, s in (("dest.example", dest), ("sender.example", sender_sink))}
        await relays.start(store_url=store_url, server={"role": "all"},
                           delivery={"routes": {"domains": routes}, "retry": {"schedule": "1h*"}})

        # Both were due at start; the loop's claims took the free one only.
        await dest.wait_for_messages(1, timeout=30)
        assert await settled(store, free) == [RecipientState.DELIVERED]
        assert await states(store, held) == [RecipientState.HELD]
        assert [m.rcpt_tos for m in dest.received] == [["free@dest.example"]]

        # release: due now, and the relay is told (NOTIFY; SQLite: it notices the commit by itself).
        await ok(config, "queue", "release", held.id)
        await dest.wait_for_messages(2, timeout=30)
        assert dest.received[1].rcpt_tos == ["held@dest.example"]

        later = await enqueue(store, "later@dest.example", due_in=3600, subject="later")
        await ok(config, "queue", "retry", later.id)
        await dest.wait_for_messages(3, timeout=30)

        flushed = await enqueue(store, "flushed@dest.example", due_in=3600, subject="flushed")
        await ok(config, "queue", "flush", "dest.example")
        await dest.wait_for_messages(4, timeout=30)
        assert dest.received[3].rcpt_tos == ["flushed@dest.example"]
        assert await settled(store, flushed) == [RecipientState.DELIVERED]

        doomed = await enqueue(store, "doomed@dest.example", due_in=3600, subject="doomed")
        gone = await enqueue(store, "gone@dest.example", due_in=3600, subject="gone")
        await ok(config, "queue", "bounce", doomed.id, "--reason", "recalled by the sender")
        await ok(config, "queue", "delete", gone.id, "--yes")
        (dsn,) = await sender_sink.wait_for_messages(1, timeout=30)
        assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
        assert b"recalled by the sender" in dsn.data and b"doomed@dest.example" in dsn.data
        assert await states(store, doomed) == [RecipientState.BOUNCED]
        assert await states(store, gone) == [RecipientState.DELETED]
        # Neither reached the destination: a later message does, and nothing else came with it.
        last = await enqueue(store, "last@dest.example", subject="last")
        await dest.wait_for_messages(5, timeout=30)
        assert [m.rcpt_tos[0] for m in dest.received] == [
            "free@dest.example", "held@dest.example", "later@dest.example", "flushed@dest.example",
            "last@dest.example"]
        assert await settled(store, last) == [RecipientState.DELIVERED]
    finally:
        await dest.stop()
        await sender_sink.stop()

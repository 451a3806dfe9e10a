"""deploy/pg-backup.sh against a real Postgres: back up a queue database, restore it into another one and
compare them table by table (row counts and a digest of every row, message bodies included); the restored
database is a working queue; a restore never lands on an existing queue by accident; rotation keeps the
newest backups by count and age and never deletes the newest one.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from relay.settings import StoreSettings
from relay.store import open_store
from relay.store.base import AttemptRecord, NewMessage, NewRecipient, RecipientResult, RecipientState, Suppression, User

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "pg-backup.sh"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**clean, **(env or {})})


@pytest.fixture
def restore_target(postgres_server_url: str) -> Iterator[str]:
    """The URL of a database that does not exist yet (the script creates it); dropped afterwards."""
    name = "relay_restore_" + secrets.token_hex(6)
    try:
        yield with_database(postgres_server_url, name)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def fill_queue(url: str) -> list[str]:
    """A queue with messages (8-bit bodies), delivered and deferred recipients with attempt history,
    users and suppressions."""
    store = await open_store(StoreSettings(url=url))
    ids = []
    try:
        now = time.time()
        for number in range(25):
            message_id = f"msg{number:04d}{secrets.token_hex(4)}"
            body = (f"From: a@example.com\r\nSubject: {number}\r\n\r\n".encode()
                    + bytes(range(256)) * (number + 1) + b"\r\n")
            recipients = [NewRecipient(f"r{i}@dest{number % 3}.example") for i in range(1 + number % 3)]
            await store.enqueue(NewMessage(id=message_id, sender="a@example.com", recipients=recipients,
                                           data=body, received_at=now - number))
            ids.append(message_id)
        claims = await store.claim_due(now + 1, 30, "backup-test", 60)
        results = [RecipientResult(claim.recipient.id,
                                   RecipientState.DELIVERED if i % 2 else RecipientState.QUEUED,
                                   None if i % 2 else now + 600, "250 ok" if i % 2 else "451 later",
                                   AttemptRecord(claim.recipient.id, now, 0.2, "mx.example", "TLSv1.3",
                                                 "250 ok" if i % 2 else "451 later", None,
                                                 "delivered" if i % 2 else "temporary"))
                   for i, claim in enumerate(claims)]
        await store.record_results(results, "backup-test")
        await store.add_user(User(username="alice", password_hash="$2b$12$" + "x" * 53, created_at=now))
        await store.add_suppression(Suppression(value="gone@dest0.example", kind="address", reason="hard_bounce",
                                                source="test", created_at=now))
    finally:
        await store.close()
    return ids


def table_digests(url: str) -> dict[str, tuple[int, str]]:
    """Per table of the public schema: row count and an md5 over every row's text form, in a fixed order."""
    with psycopg.connect(url) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY 1")]
        digests = {}
        for table in tables:
            count, digest = conn.execute(
                f'SELECT count(*), md5(coalesce(string_agg(t::text, chr(10) ORDER BY t::text), \'\')) '
                f'FROM public."{table}" t').fetchone()  # type: ignore[misc]
            digests[table] = (count, digest)
        return digests


def body_bytes(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT sum(octet_length(data)) FROM messages").fetchone()
        assert row is not None
        return int(row[0])


async def test_backup_then_restore_into_another_database_gives_the_same_queue(
        postgres_url: str, restore_target: str, tmp_path: Path) -> None:
    ids = await fill_queue(postgres_url)
    backups = tmp_path / "backups"
    done = run("backup", "--dir", str(backups), env={"RELAY_STORE__URL": postgres_url})
    assert done.returncode == 0, done.stderr
    [dump] = list(backups.iterdir())
    assert dump.name.startswith("relay-relay_test_") and dump.suffix == ".dump"
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600                      # message bodies inside

    restored = run("restore", str(dump), restore_target, "--create")
    assert restored.returncode == 0, restored.stderr
    assert "messages 25" in restored.stdout

    source, copy = table_digests(postgres_url), table_digests(restore_target)
    assert copy == source
    assert source["messages"][0] == 25 and source["recipients"][0] == 49 and source["attempts"][0] > 0
    assert body_bytes(restore_target) == body_bytes(postgres_url) > 25 * 256

    # The copy is a working queue: schema recognised as current, bodies readable, new ids fresh.
    store = await open_store(StoreSettings(url=restore_target))
    try:
        original = await store.message_data(ids[7])
        assert bytes(range(256)) * 8 in original
        await store.enqueue(NewMessage(id="after-restore", sender="", recipients=[NewRecipient("x@y.example")],
                                       data=b"Subject: x\r\n\r\nx\r\n", received_at=time.time()))
        [new] = await store.recipients_of("after-restore")
        existing = [r.id for message_id in ids for r in await store.recipients_of(message_id)]
        assert new.id > max(existing)
    finally:
        await store.close()


async def test_a_restore_never_lands_on_an_existing_queue_by_accident(
        postgres_url: str, restore_target: str, tmp_path: Path) -> None:
    await fill_queue(postgres_url)
    assert run("backup", "--dir", str(tmp_path), postgres_url).returncode == 0
    [dump] = list(tmp_path.glob("*.dump"))
    refused = run("restore", str(dump), postgres_url)                       # the source itself
    assert refused.returncode == 1 and "already holds a relay queue" in refused.stderr
    assert run("restore", str(dump), restore_target).returncode == 1       # does not exist, no --create
    assert run("restore", str(tmp_path / "missing.dump"), restore_target, "--create").returncode == 1
    (tmp_path / "junk.dump").write_bytes(b"not a dump")
    assert run("restore", str(tmp_path / "junk.dump"), restore_target, "--create").returncode == 1
    # --clean replaces the objects of an existing queue with the backup's.
    assert run("restore", str(dump), restore_target, "--create").returncode == 0
    with psycopg.connect(restore_target, autocommit=True) as conn:
        conn.execute("DELETE FROM messages")
    again = run("restore", str(dump), restore_target, "--clean")
    assert again.returncode == 0, again.stderr
    assert table_digests(restore_target) == table_digests(postgres_url)


async def test_rotation_keeps_the_newest_by_count_and_age(postgres_url: str, tmp_path: Path) -> None:
    await fill_queue(postgres_url)
    name = urlsplit(postgres_url).path.lstrip("/")
    day = 86400
    old = {f"relay-{name}-202001{d:02d}T000000Z.dump": time.time() - (40 - d) * day for d in range(1, 8)}
    for file, mtime in old.items():
        (tmp_path / file).write_bytes(b"old")
        os.utime(tmp_path / file, (mtime, mtime))
    other = tmp_path / "relay-another_db-20200101T000000Z.dump"            # another database's: untouched
    other.write_bytes(b"other")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")

    # By count: the new backup and the two newest old ones stay.
    assert run("backup", "--dir", str(tmp_path), "--keep", "3", "--max-age", "0", postgres_url).returncode == 0
    mine = sorted(p.name for p in tmp_path.glob(f"relay-{name}-*.dump"))
    assert len(mine) == 3 and mine[:2] == sorted(old)[-2:]
    assert other.exists() and unrelated.exists()

    # By age (older than 30 days go; all old ones are 33+ days old), count off: only the fresh one stays.
    assert run("backup", "--dir", str(tmp_path), "--keep", "0", "--max-age", "30", postgres_url).returncode == 0
    remaining = sorted(p.name for p in tmp_path.glob(f"relay-{name}-*.dump"))
    assert len(remaining) in (1, 2) and not set(remaining) & set(old)

    # The newest backup is never rotated away, however old it looks.
    for path in tmp_path.glob(f"relay-{name}-*.dump"):
        os.utime(path, (time.time() - 400 * day,) * 2)
    newest = max(remaining)
    assert run("backup", "--dir", str(tmp_path), "--keep", "1", "--max-age", "1", postgres_url).returncode == 0
    latest = sorted(p.name for p in tmp_path.glob(f"relay-{name}-*.dump"))
    assert len(latest) == 1 and latest[0] > newest
    listing = run("list", "--dir", str(tmp_path))
    assert listing.returncode == 0 and latest[0] in listing.stdout


def test_usage_errors() -> None:
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    assert run("backup", "sqlite:///var/queue.db").returncode == 1
    assert run("backup", env={}).returncode == 1                            # no URL anywhere

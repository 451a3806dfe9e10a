"""The embedded queue store: one SQLite file, zero setup, for a single relay node.

URLs: ``sqlite:///relative/path.db`` (relative to the working directory) or ``sqlite:////abs/path.db``;
missing parent directories are created.

How it keeps the event loop free and acceptance durable:
- One **writer thread** owns the only write connection. Every write (enqueue, claims, results, users)
  is a job on its queue, so writes are serialised without locks in Python and never run on the loop.
- **Group commit**: the writer takes an enqueue, then gathers more enqueues (at most
  ``commit_batch_max`` messages or 64 MiB, waiting at most ``commit_batch_wait_ms`` once it has one),
  writes them all in one transaction and commits once — one fsync for the batch. Each caller's future is
  resolved only after that commit, through ``loop.call_soon_threadsafe``.
- If a batch fails, it is rolled back and its messages are retried one transaction each, so a bad
  message fails alone (:class:`StoreError`) and the others are still accepted.
- Reads run on a small pool of reader threads, each with its own ``query_only`` connection; WAL lets
  them read the last commit while the writer writes.

Invariants:
- ``journal_mode=WAL``, ``synchronous=FULL`` (a commit is on disk when it returns), ``foreign_keys=ON``.
- Every write transaction starts with ``BEGIN IMMEDIATE``: it holds the database write lock from its
  first read, so a claim's select-then-lease cannot interleave with another process's claim, and two
  processes never deadlock upgrading a read transaction to a write.
- Leases work as on Postgres (``lease_owner``/``lease_until``): a claim never hands out a row whose
  lease has not ended.
- ``wait_for_new_mail`` is woken by any store object of this process on the same file (a process-wide
  signal per database path); other processes are not signalled (the embedded store is single-node).
"""

# S608: SQL here is assembled only from this package's constant column lists; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from relay.log import get_logger
from relay.settings import StoreSettings
from relay.store import eventsql, queries, rows
from relay.store import suppressions as lists
from relay.store.base import (
    PENDING_STATES,
    AttemptRecord,
    Bounce,
    Claim,
    Event,
    NewMessage,
    QueueEntry,
    QueueStore,
    RecipientQuery,
    RecipientResult,
    RecipientRow,
    RecipientState,
    ShapeCount,
    StoredMessage,
    StoreError,
    Suppression,
    UnknownUser,
    User,
    UserExists,
    WebhookBacklog,
    bounces_to_commit,
    check_bounces,
)
from relay.store.migrations import apply_sqlite_migrations
from relay.store.rows import CommitStats
from relay.store.sqlite_events import SqliteEventsMixin

log = get_logger(__name__)

T = TypeVar("T")

# How long a connection waits for another process's write lock before the operation fails.
BUSY_TIMEOUT_SECONDS = 10.0
READER_THREADS = 4
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
#: A relay waiting for new mail checks this often whether another process committed to the file (an admin
#: command made recipients due, a second relay on the file queued mail): SQLite has no cross-process signal.
CROSS_PROCESS_POLL = 2.0


def sqlite_path(url: str) -> Path:
    """The database file named by a ``sqlite:///…`` URL (three slashes: relative, four: absolute)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"not a sqlite:/// URL with a file path: {url!r}")
    path = url[len(prefix):]
    if path.startswith(":memory:") or "?" in path:
        raise StoreError("the SQLite store needs a plain file path (no :memory:, no query string)")
    return Path(path)


def connect_sqlite(path: Path, *, writer: bool) -> sqlite3.Connection:
    """Open a connection in autocommit mode (transactions are explicit) with the store's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_SECONDS)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        if writer:
            mode = _switch_to_wal(conn)
            if mode != "wal":
                raise StoreError(f"{path}: cannot switch the database to WAL mode (got {mode})")
            # FULL: the WAL is fsync'd at every commit, so an acknowledged enqueue survives power loss.
            conn.execute("PRAGMA synchronous = FULL")
        else:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """Set WAL mode (persistent in the file) and return the mode now in force.

    Two processes opening a new file at once both need an exclusive lock for the switch; SQLite answers
    one of them "locked" at once, without waiting in the busy handler, so the wait is done here.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if not _is_lock_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# -- process-wide new-mail signal ----------------------------------------------------------------------


@dataclass(eq=False)
class _MailWaiter:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event


class _NewMailSignals:
    """Per database file, the events of every open store of this process waiting for new mail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[_MailWaiter]] = {}

    def register(self, key: str, waiter: _MailWaiter) -> None:
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)

    def unregister(self, key: str, waiter: _MailWaiter) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def notify(self, key: str) -> None:
        """Wake every waiter on this file; callable from any thread."""
        with self._lock:
            waiters = list(self._waiters.get(key, ()))
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # that store's loop is already closed
                waiter.loop.call_soon_threadsafe(waiter.event.set)


_SIGNALS = _NewMailSignals()


# -- the writer thread -----------------------------------------------------------------------------------


class _Completion(Generic[T]):
    """Resolves one caller's future, from the writer thread, on the caller's loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.future: asyncio.Future[T] = self._loop.create_future()

    def resolve(self, value: T) -> None:
        self._call(self._set_result, value)

    def fail(self, exc: BaseException) -> None:
        self._call(self._set_exception, exc)

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, arg)

    def _set_result(self, value: T) -> None:
        if not self.future.done():  # the caller may have been cancelled meanwhile
            self.future.set_result(value)

    def _set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(slots=True)
class _EnqueueJob:
    message: NewMessage
    done: _Completion[None]


@dataclass(slots=True)
class _CallJob(Generic[T]):
    """Any other write: ``fn`` runs on the write connection, inside a transaction when asked."""

    fn: Callable[[sqlite3.Connection], T]
    done: _Completion[T]
    transactional: bool = True


class _Stop:
    """Sentinel: finish what is queued before it, then close the connection and end the thread."""


_Job = _EnqueueJob | _CallJob[Any] | _Stop


@dataclass
class _Writer:
    """The thread that owns the write connection; see the module docstring."""

    conn: sqlite3.Connection
    batch_max: int
    batch_wait: float
    on_new_mail: Callable[[], None]
    jobs: queue.SimpleQueue[_Job] = field(default_factory=queue.SimpleQueue)
    batches: int = 0
    messages: int = 0
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="relay-sqlite-writer", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            # Never leave a caller waiting on a thread that is gone.
            log.critical("store_writer_died", error=repr(exc))
            self._fail_queued(StoreError("the queue store writer stopped"))
            raise
        finally:
            self.conn.close()

    def _fail_queued(self, error: StoreError) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if not isinstance(job, _Stop):
                job.done.fail(error)

    def _serve(self) -> None:
        carried: _Job | None = None
        while True:
            job = carried if carried is not None else self.jobs.get()
            carried = None
            if isinstance(job, _Stop):
                return
            if isinstance(job, _EnqueueJob):
                batch, carried = self._collect_batch(job)
                self._commit_enqueues(batch)
            else:
                self._run_call(job)

    def _collect_batch(self, first: _EnqueueJob) -> tuple[list[_EnqueueJob], _Job | None]:
        """Gather enqueues behind ``first``; a job of another kind closes the batch and is returned."""
        batch = [first]
        size = first.message.size
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_max and size < rows.BATCH_MAX_BYTES:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _EnqueueJob):
                return batch, job
            batch.append(job)
            size += job.message.size
        return batch, None

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self.conn)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return result

    def _commit_enqueues(self, batch: list[_EnqueueJob]) -> None:
        now = time.time()
        try:
            self._transaction(lambda conn: insert_messages(conn, [job.message for job in batch], now))
        except Exception as exc:
            if len(batch) == 1 or _is_lock_error(exc):
                # Nothing item-specific to isolate: every message in the batch fails the same way.
                log.error("enqueue_failed", queue_ids=[job.message.id for job in batch], error=str(exc))
                for job in batch:
                    job.done.fail(_store_error("enqueue", exc))
                return
            log.warning("enqueue_batch_failed", messages=len(batch), error=str(exc))
            self._commit_one_by_one(batch)
            return
        self.batches += 1
        self.messages += len(batch)
        for job in batch:
            job.done.resolve(None)
        self.on_new_mail()

    def _commit_one_by_one(self, batch: list[_EnqueueJob]) -> None:
        committed = 0
        for job in batch:
            try:
                self._transaction(_inserter(job.message))
            except Exception as exc:
                log.error("enqueue_failed", queue_id=job.message.id, error=str(exc))
                job.done.fail(_store_error("enqueue", exc))
                continue
            committed += 1
            self.batches += 1
            self.messages += 1
            job.done.resolve(None)
        if committed:
            self.on_new_mail()

    def _run_call(self, job: _CallJob[Any]) -> None:
        try:
            result = self._transaction(job.fn) if job.transactional else job.fn(self.conn)
        except sqlite3.Error as exc:
            log.error("store_write_failed", error=str(exc))
            job.done.fail(_store_error("write", exc))
        except Exception as exc:  # StoreError subclasses (UserExists, …) and bugs reach the caller as is
            job.done.fail(exc)
        else:
            job.done.resolve(result)


def _is_lock_error(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)


def _store_error(what: str, exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    error = StoreError(f"{what} failed: {exc}")
    error.__cause__ = exc
    return error


# -- SQL, run on a connection inside a transaction ---------------------------------------------------------

_INSERT_ATTEMPT = (f"INSERT INTO attempts ({', '.join(rows.ATTEMPT_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(rows.ATTEMPT_COLUMNS))})")


def insert_messages(conn: sqlite3.Connection, messages: Sequence[NewMessage], now: float) -> None:
    """The messages, their recipients and their "queued" events (the outbox's events commit with the
    message: accepted mail always has them), a few statements per batch rather than three per message.

    Why: every sqlite3 statement step releases the GIL and takes it back, and while the event loop is
    busy taking it back can wait a whole switch interval; per-row statements made a batch's inserts take
    ~1 ms of wall time per message under load (and held the write lock, shared with other processes, that
    long). Multi-row INSERTs take it back a few times per batch."""
    _insert_rows(conn, "messages", rows.MESSAGE_COLUMNS, [rows.message_values(m) for m in messages])
    _insert_rows(conn, "recipients", rows.RECIPIENT_COLUMNS,
                 [values for m in messages for values in rows.recipient_values(m, now)])
    _insert_rows(conn, "events", lists.EVENT_COLUMNS, eventsql.queued_event_values(messages),
                 suffix=" ON CONFLICT (id) DO NOTHING")


#: Rows per multi-row INSERT: far under SQLite's bound-variable limit (32,766 since 3.32) for our widths.
_ROWS_PER_INSERT = 200


def _insert_rows(conn: sqlite3.Connection, table: str, columns: Sequence[str], values: list[tuple[Any, ...]],
                 suffix: str = "") -> None:
    for start in range(0, len(values), _ROWS_PER_INSERT):
        chunk = values[start:start + _ROWS_PER_INSERT]
        conn.execute(_multi_row_insert(table, tuple(columns), len(chunk), suffix),
                     [value for row in chunk for value in row])


@functools.lru_cache(maxsize=512)
def _multi_row_insert(table: str, columns: tuple[str, ...], count: int, suffix: str) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * count)}{suffix}"


def _inserter(message: NewMessage) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: insert_messages(conn, [message], time.time())


def _claims_by_id(conn: sqlite3.Connection, ids: list[int], lease_until: float) -> list[Claim]:
    if not ids:
        return []
    # json_each instead of one "?" per id: no limit on the number of bound variables.
    found = conn.execute(
        f"SELECT {rows.RECIPIENT_SELECT}, {rows.CLAIM_MESSAGE_SELECT} "
        "FROM recipients r JOIN messages m ON m.id = r.message_id "
        "WHERE r.id IN (SELECT value FROM json_each(?)) ORDER BY r.next_attempt_at, r.id",
        (json.dumps(ids),)).fetchall()
    return [rows.claim(row, lease_until) for row in found]


def _claim_due(conn: sqlite3.Connection, now: float, limit: int, owner: str,
               lease_until: float) -> list[Claim]:
    ids = [row[0] for row in conn.execute(
        "UPDATE recipients SET lease_owner = ?, lease_until = ? WHERE id IN ("
        " SELECT id FROM recipients"
        " WHERE state = 'queued' AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
        " ORDER BY next_attempt_at, id LIMIT ?) RETURNING id",
        (owner, lease_until, now, now, limit)).fetchall()]
    return _claims_by_id(conn, ids, lease_until)


def _claim_expired(conn: sqlite3.Connection, received_before: float, limit: int, owner: str,
                   now: float, lease_until: float) -> list[Claim]:
    ids = [row[0] for row in conn.execute(
        "UPDATE recipients SET lease_owner = ?, lease_until = ? WHERE id IN ("
        " SELECT r.id FROM recipients r JOIN messages m ON m.id = r.message_id"
        f" WHERE m.received_at < ? AND r.state IN {rows.PENDING_STATES_SQL}"
        "  AND (r.lease_until IS NULL OR r.lease_until < ?)"
        " ORDER BY m.received_at, r.id LIMIT ?) RETURNING id",
        (owner, lease_until, received_before, now, limit)).fetchall()]
    return _claims_by_id(conn, ids, lease_until)


def _release(conn: sqlite3.Connection, recipient_ids: Sequence[int], owner: str) -> None:
    conn.execute(
        "UPDATE recipients SET lease_owner = NULL, lease_until = NULL "
        "WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner = ?",
        (json.dumps(list(recipient_ids)), owner))


def _renew(conn: sqlite3.Connection, recipient_ids: Sequence[int], owner: str, lease_until: float) -> set[int]:
    # MAX with the present value: a renewal never shortens a lease (IFNULL: MAX(NULL, x) is NULL in SQLite).
    return {int(row[0]) for row in conn.execute(
        "UPDATE recipients SET lease_until = MAX(IFNULL(lease_until, 0), ?) "
        "WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner = ? RETURNING id",
        (lease_until, json.dumps(list(recipient_ids)), owner)).fetchall()}


def _held(conn: sqlite3.Connection, recipient_ids: set[int], owner: str) -> set[int]:
    return {int(row[0]) for row in conn.execute(
        "SELECT id FROM recipients WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner = ?",
        (json.dumps(sorted(recipient_ids)), owner)).fetchall()}


def _record_results(conn: sqlite3.Connection, results: Sequence[RecipientResult], owner: str,
                    bounces: Sequence[Bounce], now: float) -> None:
    withheld: set[int] = set()
    if bounces:
        # The write lock is held from this read on (BEGIN IMMEDIATE): nobody can take a lease meanwhile.
        members = {rid for bounce in bounces for rid in bounce.recipient_ids}
        bounces, withheld = bounces_to_commit(bounces, _held(conn, members, owner))
    for result in results:
        if result.recipient_id in withheld:
            log.warning("result_withheld_with_its_bounce", recipient_id=result.recipient_id, owner=owner)
            continue
        # Only the lease holder's word counts; COALESCE keeps the previous due time (final states) and
        # the last real reply (deferrals that carry none).
        held = conn.execute(
            "UPDATE recipients SET state = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
            " last_reply = COALESCE(?, last_reply), attempts = attempts + ?, updated_at = ?,"
            " lease_owner = NULL, lease_until = NULL "
            "WHERE id = ? AND lease_owner = ? RETURNING message_id",
            (result.state.value, result.next_attempt_at, result.last_reply, int(result.count_attempt), now,
             result.recipient_id, owner)).fetchone()
        if held is None:
            log.warning("result_ignored_not_lease_holder", recipient_id=result.recipient_id, owner=owner)
            continue
        if result.attempt is not None:
            conn.execute(_INSERT_ATTEMPT, rows.attempt_values(result.attempt, result.recipient_id, held[0]))
        if result.events:  # the state change's events, in its transaction (an outbox)
            conn.executemany(_INSERT_EVENT, [lists.event_values(event) for event in result.events])
    for bounce in bounces:
        insert_messages(conn, [bounce.message], now)


def _purge(conn: sqlite3.Connection, finished_before: float, history_before: float) -> int:
    # received_at < cutoff narrows the scan through the index: a message is received before any of its
    # recipients is last updated. Recipients go with their message (ON DELETE CASCADE).
    removed = conn.execute(
        "DELETE FROM messages WHERE received_at < ?1 AND NOT EXISTS ("
        " SELECT 1 FROM recipients r WHERE r.message_id = messages.id"
        f" AND (r.state IN {rows.PENDING_STATES_SQL} OR r.updated_at >= ?1))",
        (finished_before,)).rowcount
    conn.execute("DELETE FROM attempts WHERE started_at < ?", (history_before,))
    conn.execute(_PURGE_EXPIRED, (time.time(),))
    return int(removed)


def _next_due_at(conn: sqlite3.Connection) -> float | None:
    # A leased row comes due again when its lease ends, not before; counting it at its old due time
    # would make the delivery loop spin while the row is in flight.
    unleased = conn.execute(
        "SELECT next_attempt_at FROM recipients WHERE state = 'queued' AND lease_until IS NULL "
        "ORDER BY next_attempt_at LIMIT 1").fetchone()
    leased = conn.execute(
        "SELECT MIN(MAX(next_attempt_at, lease_until)) FROM recipients "
        "WHERE lease_until IS NOT NULL AND state = 'queued'").fetchone()
    candidates = [float(row[0]) for row in (unleased, leased) if row is not None and row[0] is not None]
    return min(candidates, default=None)


def _user_values(user: User, created_at: float) -> tuple[Any, ...]:
    return (user.username, user.password_hash, json.dumps(list(user.allowed_sender_domains)),
            user.expires_at, int(user.disabled), user.quota_per_minute, user.quota_per_day, created_at)


def _user(row: sqlite3.Row) -> User:
    return rows.user(row, json.loads(row["allowed_sender_domains"]))


def _add_user(conn: sqlite3.Connection, user: User) -> None:
    try:
        conn.execute(
            "INSERT INTO users (username, password_hash, allowed_sender_domains, expires_at, disabled,"
            " quota_per_minute, quota_per_day, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            _user_values(user, user.created_at or time.time()))
    except sqlite3.IntegrityError:
        raise UserExists(f"user {user.username!r} already exists") from None


def _update_user(conn: sqlite3.Connection, user: User) -> None:
    # created_at 0 means "not given": the original creation time is kept.
    values = _user_values(user, user.created_at)
    changed = conn.execute(
        "UPDATE users SET password_hash = ?, allowed_sender_domains = ?, expires_at = ?, disabled = ?,"
        " quota_per_minute = ?, quota_per_day = ?, created_at = COALESCE(NULLIF(?, 0), created_at) "
        "WHERE username = ?", (*values[1:], values[0])).rowcount
    if changed == 0:
        raise UnknownUser(f"no user {user.username!r}")


def _delete_user(conn: sqlite3.Connection, username: str) -> None:
    if conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount == 0:
        raise UnknownUser(f"no user {username!r}")


_UPSERT_SUPPRESSION = lists.sql(lists.UPSERT_SUPPRESSION, "?")
_FIND_SUPPRESSION = lists.sql(lists.FIND_SUPPRESSION, "?")
_DELETE_SUPPRESSION = lists.sql(lists.DELETE_SUPPRESSION, "?")
_PURGE_EXPIRED = lists.sql(lists.PURGE_EXPIRED, "?")
_INSERT_EVENT = (f"INSERT INTO events ({', '.join(lists.EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(lists.EVENT_COLUMNS))}) ON CONFLICT (id) DO NOTHING")


def _upsert_suppressions(conn: sqlite3.Connection, entries: Sequence[Suppression]) -> None:
    conn.executemany(_UPSERT_SUPPRESSION, [lists.suppression_values(entry) for entry in entries])


def _insert_event(conn: sqlite3.Connection, values: tuple[Any, ...]) -> None:
    conn.execute(_INSERT_EVENT, values)


def _list_suppressions(conn: sqlite3.Connection, limit: int, offset: int, reason: str | None) -> list[Any]:
    return conn.execute(
        f"SELECT {', '.join(lists.SUPPRESSION_COLUMNS)} FROM suppressions WHERE (?1 IS NULL OR reason = ?1) "
        "ORDER BY value, kind, scope LIMIT ?2 OFFSET ?3", (reason, limit, offset)).fetchall()


def _list_events(conn: sqlite3.Connection, type_: str | None, since: float, limit: int) -> list[Any]:
    return conn.execute(
        f"SELECT {lists.EVENT_SELECT} FROM events WHERE (?1 IS NULL OR type = ?1) AND created_at >= ?2 "
        "ORDER BY created_at, id LIMIT ?3", (type_, since, limit)).fetchall()


# -- the store ----------------------------------------------------------------------------------------------


class SqliteStore(SqliteEventsMixin, QueueStore):
    """The embedded store; see the module docstring for its threads and guarantees."""

    kind = "sqlite"

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._path = sqlite_path(settings.url)
        self._writer: _Writer | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._new_mail = asyncio.Event()
        self._waiter: _MailWaiter | None = None
        self._signal_key = ""
        self._watch_conn: sqlite3.Connection | None = None
        self._seen_data_version: int | None = None
        self.migrations_applied: list[str] = []

    @property
    def path(self) -> Path:
        return self._path

    @property
    def stats(self) -> CommitStats:
        writer = self._writer
        return CommitStats(0, 0) if writer is None else CommitStats(writer.batches, writer.messages)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._writer is not None:
            return
        try:
            conn = await asyncio.to_thread(self._connect_writer)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the queue database {self._path}: {exc}") from exc
        writer = _Writer(conn, self._settings.commit_batch_max, self._settings.commit_batch_wait_ms / 1000,
                         on_new_mail=lambda: _SIGNALS.notify(self._signal_key))
        writer.start()
        self._writer = writer
        self._readers = ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="relay-sqlite-read")
        try:
            self.migrations_applied = await self._write(apply_sqlite_migrations, transactional=False)
        except BaseException:
            await self.close()
            raise
        self._waiter = _MailWaiter(asyncio.get_running_loop(), self._new_mail)
        _SIGNALS.register(self._signal_key, self._waiter)
        log.info("store_opened", store="sqlite", path=str(self._path), migrations=self.migrations_applied)

    def _connect_writer(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Every spelling of the same file must share one new-mail signal.
        self._signal_key = os.path.realpath(self._path)
        return connect_sqlite(self._path, writer=True)

    async def close(self) -> None:
        writer, readers, waiter = self._writer, self._readers, self._waiter
        self._writer = self._readers = self._waiter = None
        if waiter is not None:
            _SIGNALS.unregister(self._signal_key, waiter)
        if writer is not None and writer.thread is not None:
            writer.jobs.put(_Stop())  # after every job already queued: pending commits finish first
            await asyncio.to_thread(writer.thread.join)
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, wait=True)
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
            self._watch_conn = None
        for conn in conns:
            conn.close()

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive():
            raise StoreError("the queue store is not open")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- plumbing ----------------------------------------------------------------------------------------
    def _live_writer(self) -> _Writer:
        writer = self._writer
        if writer is None or not writer.alive():
            raise StoreError("the queue store is not open")
        return writer

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, transactional: bool = True) -> T:
        writer = self._live_writer()
        done: _Completion[T] = _Completion()
        writer.jobs.put(_CallJob(fn, done, transactional))
        return await done.future

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        readers = self._readers
        if readers is None:
            raise StoreError("the queue store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(readers, self._run_read, fn)
        except sqlite3.Error as exc:
            log.error("store_read_failed", error=str(exc))
            raise StoreError(f"read failed: {exc}") from exc

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = connect_sqlite(self._path, writer=False)
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return fn(conn)

    # -- reception ---------------------------------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        rows.check_new_message(message)
        writer = self._live_writer()
        done: _Completion[None] = _Completion()
        writer.jobs.put(_EnqueueJob(message, done))
        await done.future

    # -- delivery ----------------------------------------------------------------------------------------
    async def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float) -> list[Claim]:
        if limit <= 0:
            return []
        lease_until = now + lease_seconds
        return await self._write(lambda conn: _claim_due(conn, now, limit, owner, lease_until))

    async def release(self, recipient_ids: Sequence[int], owner: str) -> None:
        if recipient_ids:
            await self._write(lambda conn: _release(conn, recipient_ids, owner))

    async def renew(self, recipient_ids: Sequence[int], owner: str, lease_seconds: float) -> set[int]:
        if not recipient_ids:
            return set()
        lease_until = time.time() + lease_seconds
        return await self._write(lambda conn: _renew(conn, recipient_ids, owner, lease_until))

    async def record_results(self, results: Sequence[RecipientResult], owner: str,
                             bounces: Sequence[Bounce] = ()) -> None:
        check_bounces(results, bounces)
        for bounce in bounces:
            rows.check_new_message(bounce.message)
        await self._write(lambda conn: _record_results(conn, results, owner, bounces, time.time()))
        if bounces:
            _SIGNALS.notify(self._signal_key)

    async def claim_expired(self, received_before: float, limit: int, owner: str,
                            lease_seconds: float) -> list[Claim]:
        if limit <= 0:
            return []
        now = time.time()
        return await self._write(
            lambda conn: _claim_expired(conn, received_before, limit, owner, now, now + lease_seconds))

    # The interface (base.QueueStore) fixes this signature, timeout parameter included.
    async def wait_for_new_mail(self, timeout: float) -> bool:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0)
        while not self._new_mail.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._new_mail.wait(), min(remaining, CROSS_PROCESS_POLL))
            except TimeoutError:
                if await self._changed_by_another_connection():
                    break
        self._new_mail.clear()
        return True

    async def _changed_by_another_connection(self) -> bool:
        """True when a commit by any other connection (another process included) happened since the last
        call: ``PRAGMA data_version`` of one dedicated connection changes exactly then. Commits of this
        process's own writer count too, so a busy relay wakes its loop every poll — one cheap claim."""
        if self._writer is None:
            return False
        try:
            version = await asyncio.to_thread(self._data_version)
        except (OSError, sqlite3.Error) as exc:
            log.warning("store_change_poll_failed", error=str(exc))
            return False
        changed = self._seen_data_version is not None and version != self._seen_data_version
        self._seen_data_version = version
        return changed

    def _data_version(self) -> int:
        with self._reader_lock:
            conn = self._watch_conn
            if conn is None:
                conn = self._watch_conn = connect_sqlite(self._path, writer=False)
                self._reader_conns.append(conn)
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    async def purge(self, finished_before: float, history_before: float) -> int:
        removed = await self._write(lambda conn: _purge(conn, finished_before, history_before))
        if removed:
            log.info("queue_purged", messages=removed)
        return removed

    async def message_data(self, message_id: str) -> bytes:
        row = await self._read(lambda conn: conn.execute(
            "SELECT data FROM messages WHERE id = ?", (message_id,)).fetchone())
        if row is None:
            raise StoreError(f"message {message_id} is not in the queue")
        return bytes(row[0])

    async def next_due_at(self) -> float | None:
        return await self._read(_next_due_at)

    # -- inspection ----------------------------------------------------------------------------------------
    async def get_message(self, message_id: str) -> StoredMessage | None:
        row = await self._read(lambda conn: conn.execute(
            f"SELECT {rows.MESSAGE_SELECT} FROM messages m WHERE m.id = ?", (message_id,)).fetchone())
        return None if row is None else rows.stored_message(row)

    async def recipients_of(self, message_id: str) -> list[RecipientRow]:
        found = await self._read(lambda conn: conn.execute(
            f"SELECT {rows.RECIPIENT_SELECT} FROM recipients r WHERE r.message_id = ? ORDER BY r.id",
            (message_id,)).fetchall())
        return [rows.recipient_row(row) for row in found]

    async def attempts_of(self, recipient_id: int) -> list[AttemptRecord]:
        found = await self._read(lambda conn: conn.execute(
            "SELECT * FROM attempts WHERE recipient_id = ? ORDER BY started_at, id",
            (recipient_id,)).fetchall())
        return [rows.attempt_record(row) for row in found]

    async def count_by_state(self) -> dict[str, int]:
        found = await self._read(lambda conn: conn.execute(
            "SELECT state, COUNT(*) FROM recipients GROUP BY state").fetchall())
        return rows.all_states_counted({row[0]: int(row[1]) for row in found})

    # -- operations (metrics, admin CLI) -------------------------------------------------------------------
    async def queue_shape(self, now: float, edges: Sequence[float], *, by_domain: bool = False,
                          states: Sequence[RecipientState] = PENDING_STATES) -> list[ShapeCount]:
        if not states:
            return []
        sql, values = queries.queue_shape("?", now, edges, by_domain, states)
        found = await self._read(lambda conn: conn.execute(sql, values).fetchall())
        return [queries.shape_count(row) for row in found]

    async def find_recipients(self, query: RecipientQuery, *, now: float, limit: int = 1000,
                              after_id: int = 0) -> list[QueueEntry]:
        if limit <= 0:
            return []
        sql, values = queries.find_recipients("?", query, now, limit, after_id)
        found = await self._read(lambda conn: conn.execute(sql, values).fetchall())
        return [queries.queue_entry(row) for row in found]

    async def claim_recipients(self, recipient_ids: Sequence[int], owner: str, lease_seconds: float, *,
                               now: float, states: Sequence[RecipientState] = PENDING_STATES) -> list[Claim]:
        if not recipient_ids or not states:
            return []
        lease_until = now + lease_seconds
        sql, values = queries.claim_recipients_sqlite(recipient_ids, owner, lease_until, now, states)

        def claim(conn: sqlite3.Connection) -> list[Claim]:
            ids = [row[0] for row in conn.execute(sql, values).fetchall()]
            return _claims_by_id(conn, ids, lease_until)

        return await self._write(claim)

    async def notify_new_mail(self) -> None:
        # This process's waiters at once; relays in other processes see the commit in their poll.
        _SIGNALS.notify(self._signal_key)

    async def message_events(self, message_id: str) -> list[Event]:
        found = await self._read(lambda conn: conn.execute(
            f"SELECT {lists.EVENT_SELECT} FROM events WHERE message_id = ? ORDER BY created_at, id",
            (message_id,)).fetchall())
        return [lists.event(row) for row in found]

    async def webhook_backlog(self) -> WebhookBacklog:
        def counts(conn: sqlite3.Connection) -> WebhookBacklog:
            undispatched = int(conn.execute(queries.WEBHOOK_UNDISPATCHED).fetchone()[0])
            return queries.webhook_backlog(undispatched, conn.execute(queries.WEBHOOK_PENDING).fetchall(),
                                           conn.execute(queries.WEBHOOK_DEAD).fetchall())

        return await self._read(counts)

    # -- users ---------------------------------------------------------------------------------------------
    async def add_user(self, user: User) -> None:
        await self._write(lambda conn: _add_user(conn, user))

    async def get_user(self, username: str) -> User | None:
        row = await self._read(lambda conn: conn.execute(
            "SELECT * FROM users WHERE username = ?", (username,)).fetchone())
        return None if row is None else _user(row)

    async def list_users(self) -> list[User]:
        found = await self._read(lambda conn: conn.execute(
            "SELECT * FROM users ORDER BY username").fetchall())
        return [_user(row) for row in found]

    async def update_user(self, user: User) -> None:
        await self._write(lambda conn: _update_user(conn, user))

    async def delete_user(self, username: str) -> None:
        await self._write(lambda conn: _delete_user(conn, username))

    # -- suppression list ----------------------------------------------------------------------------------
    async def add_suppression(self, entry: Suppression) -> None:
        await self.add_suppressions([entry])

    async def add_suppressions(self, entries: Sequence[Suppression]) -> None:
        rows_ = [lists.normalized(entry) for entry in entries]
        if rows_:
            await self._write(lambda conn: _upsert_suppressions(conn, rows_))

    async def remove_suppression(self, value: str, kind: str, scope: str = "") -> bool:
        key = lists.key_values(value, kind, scope)
        removed = await self._write(lambda conn: conn.execute(_DELETE_SUPPRESSION, key).rowcount)
        return bool(removed)

    async def find_suppression(self, address: str, ip: str | None = None, scope: str = "",
                               now: float | None = None) -> Suppression | None:
        params = lists.lookup_keys(address, ip, scope, now).params()
        row = await self._read(lambda conn: conn.execute(_FIND_SUPPRESSION, params).fetchone())
        return None if row is None else lists.suppression(row)

    async def list_suppressions(self, limit: int = 1000, offset: int = 0, reason: str | None = None
                                ) -> list[Suppression]:
        found = await self._read(lambda conn: _list_suppressions(conn, limit, offset, reason))
        return [lists.suppression(row) for row in found]

    async def count_suppressions(self, reason: str | None = None) -> int:
        row = await self._read(lambda conn: conn.execute(
            "SELECT COUNT(*) FROM suppressions WHERE (?1 IS NULL OR reason = ?1)", (reason,)).fetchone())
        return int(row[0])

    async def purge_expired_suppressions(self, now: float | None = None) -> int:
        cutoff = time.time() if now is None else now
        removed = await self._write(lambda conn: conn.execute(_PURGE_EXPIRED, (cutoff,)).rowcount)
        return int(removed)

    # -- event outbox ----------------------------------------------------------------------------------------
    async def record_event(self, event: Event) -> None:
        values = lists.event_values(event)
        await self._write(lambda conn: _insert_event(conn, values))

    async def list_events(self, type: str | None = None, since: float | None = None,
                          limit: int = 1000) -> list[Event]:
        found = await self._read(lambda conn: _list_events(conn, type, since or 0.0, limit))
        return [lists.event(row) for row in found]

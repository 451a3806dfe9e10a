"""The queue store: :func:`open_store` picks the implementation for ``[store].url`` and opens it.

``sqlite://…`` gives :class:`~relay.store.sqlite.SqliteStore` (embedded, single node);
``postgresql://…`` (or ``postgres://…``) gives :class:`~relay.store.postgres.PostgresStore` (shared by
every node). Either is returned opened, with every migration applied. :func:`migrate_store` applies
pending migrations alone (``relay db migrate``).

The interface and its value types are re-exported here, so callers import from ``relay.store``.
"""

from __future__ import annotations

import asyncio
import sqlite3

from relay.settings import StoreSettings
from relay.store.base import (
    FINAL_STATES,
    AttemptRecord,
    Claim,
    NewMessage,
    NewRecipient,
    QueueCounts,
    QueueStore,
    RecipientResult,
    RecipientRow,
    RecipientState,
    StoredMessage,
    StoreError,
    UnknownUser,
    User,
    UserExists,
)

__all__ = [
    "FINAL_STATES",
    "AttemptRecord",
    "Claim",
    "NewMessage",
    "NewRecipient",
    "QueueCounts",
    "QueueStore",
    "RecipientResult",
    "RecipientRow",
    "RecipientState",
    "StoreError",
    "StoredMessage",
    "UnknownUser",
    "User",
    "UserExists",
    "make_store",
    "migrate_store",
    "open_store",
]


def make_store(settings: StoreSettings) -> QueueStore:
    """The implementation for the URL's scheme, not yet opened."""
    if settings.kind == "sqlite":
        from relay.store.sqlite import SqliteStore

        return SqliteStore(settings)
    from relay.store.postgres import PostgresStore

    return PostgresStore(settings)


async def open_store(settings: StoreSettings) -> QueueStore:
    """Open the configured store and bring its schema up to date."""
    store = make_store(settings)
    await store.open()
    return store


async def migrate_store(settings: StoreSettings) -> list[str]:
    """Apply pending migrations without starting the store; return the versions applied now."""
    if settings.kind == "sqlite":
        return await asyncio.to_thread(_migrate_sqlite, settings)
    return await _migrate_postgres(settings)


def _migrate_sqlite(settings: StoreSettings) -> list[str]:
    from relay.store.migrations import apply_sqlite_migrations
    from relay.store.sqlite import connect_sqlite, sqlite_path

    path = sqlite_path(settings.url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect_sqlite(path, writer=True)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
    try:
        return apply_sqlite_migrations(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"migration failed: {exc}") from exc
    finally:
        conn.close()


async def _migrate_postgres(settings: StoreSettings) -> list[str]:
    import asyncpg

    from relay.store.migrations import apply_postgres_migrations
    from relay.store.postgres import COMMAND_TIMEOUT, CONNECT_TIMEOUT

    try:
        conn = await asyncpg.connect(settings.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreError(f"cannot connect to the queue database: {exc}") from exc
    try:
        result: list[str] = await apply_postgres_migrations(conn)
        return result
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreError(f"migration failed: {type(exc).__name__}: {exc}") from exc
    finally:
        await conn.close()

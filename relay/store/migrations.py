"""Forward-only schema migrations: numbered SQL files applied once each, in order, and recorded.

The files are ``NNNN_name.sql`` in the package ``relay.migrations`` (repository folders
``migrations/postgres/`` and ``migrations/sqlite/``), read with :mod:`importlib.resources` so they work
from a checkout, an editable install or a wheel.

Invariants:
- Each migration runs inside one transaction together with its row in
  ``schema_migrations(version, name, applied_at)``: it is applied completely and recorded, or not at all.
- A recorded version is never applied again; files are applied in ascending version order.
- Two relays starting together never both migrate: on Postgres a session advisory lock serialises the
  runners; on SQLite every migration takes the database write lock (``BEGIN IMMEDIATE``) and re-checks
  the record under it.
- A database recording versions this relay does not know (a newer relay migrated it) is used as is, with
  a warning: migrations are written to stay compatible with the previous release.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from relay.log import get_logger
from relay.store.base import StoreError

log = get_logger(__name__)

MIGRATIONS_PACKAGE = "relay.migrations"
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

# pg_advisory_lock key for "a relay is migrating this database" (the bytes of "relaymig").
POSTGRES_MIGRATION_LOCK = 0x72656C61796D6967

_SCHEMA_MIGRATIONS_POSTGRES = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    applied_at double precision NOT NULL
)"""
_SCHEMA_MIGRATIONS_SQLITE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


class MigrationError(StoreError):
    """The migration files are malformed or one of them failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str


def load_migrations(kind: Literal["postgres", "sqlite"]) -> list[Migration]:
    """Every migration shipped for one store kind, in version order."""
    folder = resources.files(MIGRATIONS_PACKAGE).joinpath(kind)
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migrations/{kind}/{entry.name}: the name must be NNNN_name.sql")
        found.append(Migration(match["version"], match["name"], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"migrations/{kind}: two files share one version number")
    return found


def _warn_unknown_versions(kind: str, recorded: set[str], known: list[Migration]) -> None:
    unknown = recorded - {migration.version for migration in known}
    if unknown:
        log.warning("schema_newer_than_relay", store=kind, versions=sorted(unknown))


# -- SQLite ------------------------------------------------------------------------------------------


def split_sqlite_statements(script: str) -> list[str]:
    """Split a script into single statements (``sqlite3`` executes one at a time).

    ``executescript`` would commit the surrounding transaction first, so the runner executes statement
    by statement instead. A ``;`` only ends a statement where SQLite agrees the text is complete, so
    semicolons inside strings or trigger bodies do not split.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if _has_sql(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _has_sql(buffer.removesuffix(";")):
        raise MigrationError("the script ends in an incomplete statement")
    return statements


def _has_sql(text: str) -> bool:
    lines = (line.split("--", 1)[0].strip() for line in text.splitlines())
    return any(line and line != ";" for line in lines)


def apply_sqlite_migrations(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations on a connection in autocommit mode; return the versions applied now."""
    if conn.isolation_level is not None:
        raise MigrationError("the migration runner needs a connection with isolation_level=None")
    conn.execute(_SCHEMA_MIGRATIONS_SQLITE)
    migrations = load_migrations("sqlite")
    applied_now: list[str] = []
    for migration in migrations:
        if _apply_one_sqlite(conn, migration):
            applied_now.append(migration.version)
    recorded = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    _warn_unknown_versions("sqlite", recorded, migrations)
    return applied_now


def _apply_one_sqlite(conn: sqlite3.Connection, migration: Migration) -> bool:
    # The write lock is taken before the check so that a second process waits here and then sees the row.
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?",
                            (migration.version,)).fetchone()
        if done is None:
            for statement in split_sqlite_statements(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                         (migration.version, migration.name, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if done is None:
        log.info("migration_applied", store="sqlite", version=migration.version, name=migration.name)
    return done is None


# -- Postgres ----------------------------------------------------------------------------------------


async def apply_postgres_migrations(conn: Any) -> list[str]:
    """Apply pending migrations over one asyncpg connection; return the versions applied now.

    ``conn`` is an ``asyncpg.Connection`` (asyncpg ships no type information).
    """
    migrations = load_migrations("postgres")
    await conn.execute("SELECT pg_advisory_lock($1)", POSTGRES_MIGRATION_LOCK)
    try:
        await conn.execute(_SCHEMA_MIGRATIONS_POSTGRES)
        recorded = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied_now: list[str] = []
        for migration in migrations:
            if migration.version in recorded:
                continue
            async with conn.transaction():
                # No arguments: asyncpg uses the simple protocol, which runs a multi-statement script.
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version, migration.name, time.time())
            log.info("migration_applied", store="postgres", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
        _warn_unknown_versions("postgres", recorded, migrations)
        return applied_now
    finally:
        # If the connection died the server has already dropped the session lock with it.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", POSTGRES_MIGRATION_LOCK)

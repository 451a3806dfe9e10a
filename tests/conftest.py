"""Shared fixtures: real Postgres and real Redis for the whole suite, never skipped.

Postgres: ``$RELAY_TEST_POSTGRES_URL`` names a server (the suite makes a throwaway database in it and
drops it afterwards); without it the suite starts a throwaway cluster of its own.
Redis: ``$RELAY_TEST_REDIS_URL`` names a server (tests use unique key prefixes); without it pytest-redis
starts a throwaway ``redis-server``.
If neither way works the fixture fails the tests that need it, loudly.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import structlog
import trustme
from pytest_redis import factories

from relay.log import configure_logging
from tests.support.logtap import LogTap, find_leaks, install_tap, registered_secrets
from tests.support.pgcluster import PgCluster
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

redis_server = factories.redis_proc(port=None)


# -- every log line of the run, and the secrets that must not be in any (issue 7) -------------------------

def _log_as_production(tap: LogTap) -> object:
    """structlog as `relay serve` sets it up (JSON, redaction), at debug so nothing is filtered away."""
    configure_logging("debug", "json", stream=tap)
    return structlog.get_config()["logger_factory"]


@pytest.fixture(scope="session", autouse=True)
def relay_log_tap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogTap]:
    """Collects every line the in-process relays log during the whole run (and the log files of the
    relays tests run as subprocesses); at the end fails the run if any registered secret is in one."""
    tap = LogTap(tmp_path_factory.mktemp("relay-logs"))
    install_tap(tap)
    _log_as_production(tap)
    yield tap
    leaks = find_leaks(tap.all_lines(), registered_secrets())
    tap.close()
    assert not leaks, "secrets in the relay's logs:\n" + "\n".join(str(leak) for leak in leaks[:20])


@pytest.fixture(autouse=True)
def _keep_logging_tapped(relay_log_tap: LogTap) -> Iterator[None]:
    """A test that reconfigures logging (an in-process CLI command) gets the tap back afterwards."""
    factory = structlog.get_config()["logger_factory"]
    yield
    if structlog.get_config()["logger_factory"] is not factory:
        _log_as_production(relay_log_tap)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = os.environ.get("RELAY_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    cluster = PgCluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.destroy()


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    dbname = "relay_test_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        yield _with_database(postgres_server_url, dbname)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("RELAY_TEST_REDIS_URL")
    if url:
        return url
    proc = request.getfixturevalue("redis_server")
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix unique to one test, so tests sharing a server never see each other's keys."""
    return f"relaytest:{secrets.token_hex(4)}:"


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    for client in list(RawClient.open_clients):
        await client.close()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def relays(tmp_path: Path, tls_ca: trustme.CA) -> AsyncIterator[RelayFactory]:
    """Start real relays in the test (``await relays.start(...)``); all are stopped afterwards."""
    factory = RelayFactory(tmp_path, tls_ca)
    try:
        yield factory
    finally:
        await factory.stop_all()

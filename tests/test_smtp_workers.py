"""SMTP worker processes (relay/workers.py), against real ``relay serve`` processes, real sockets, real Redis.

What is shown: N processes accept on one listener (both actually serve) and every message answered 250 is
in the queue; SIGHUP reaches the workers; a worker killed with SIGKILL is restarted and the listener keeps
accepting meanwhile; SIGTERM stops every process; a worker whose supervisor is SIGKILLed stops by itself;
more than one worker without Redis is refused; per-process connection limits are divided, never loosened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay.settings import ConfigError, parse_settings
from relay.smtp.server import SharedState
from relay.workers import launch_command
from tests.support.configfile import ConfigFile
from tests.support.relayproc import RelayProcess
from tests.support.smtpclient import RawClient


@pytest.fixture
def config(tmp_path: Path, tls_ca: trustme.CA) -> ConfigFile:
    return ConfigFile(tmp_path, tls_ca)


def write_config(config: ConfigFile, redis_url: str, key_prefix: str, workers: int = 2) -> None:
    config.write(server={"role": "smtp", "smtp_workers": workers, "shutdown_grace": 5.0},
                 redis={"url": redis_url, "key_prefix": key_prefix})


def body(n: int) -> bytes:
    return f"From: a@example.com\r\nTo: b@dest.test\r\nSubject: w{n}\r\n\r\nhello {n}\r\n".encode()


async def submit(port: int, count: int, tag: str, parallel: int = 8) -> list[str]:
    """``count`` messages, a new connection each, ``parallel`` at a time; the queue ids answered."""
    ids: list[str] = []
    gate = asyncio.Semaphore(parallel)

    async def one(n: int) -> None:
        async with gate:
            client = await RawClient.connect(port)
            assert (await client.greeting()).code == 220
            assert (await client.ehlo()).code == 250
            reply = await client.mail("a@example.com", [f"{tag}{n}@dest.test"], body(n))
            assert reply.code == 250, str(reply)
            ids.append(reply.text.rsplit(" ", 1)[-1])
            await client.cmd("QUIT")
            await client.close()

    await asyncio.gather(*(one(n) for n in range(count)))
    return ids


def stored_ids(config: ConfigFile) -> set[str]:
    with sqlite3.connect(config.dir / "queue.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM messages")}


def listener_port(relay: RelayProcess) -> int:
    address = str(relay.wait_event("listening")["address"])
    return int(address.rsplit(":", 1)[1])


def worker_pids(relay: RelayProcess) -> list[int]:
    return [int(pid) for pid in relay.wait_event("smtp_workers_started")["pids"]]


def served_by(relay: RelayProcess) -> set[object]:
    """Which processes logged a queued message: None is the supervisor, 2… the workers."""
    return {entry.get("worker") for entry in relay.events if entry.get("event") == "queued"}


def wait_events(relay: RelayProcess, name: str, count: int, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [entry for entry in relay.events if entry.get("event") == name]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {name!r} lines: {relay.event_names()[-30:]}")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (exited, not reaped yet) counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


@contextlib.asynccontextmanager
async def supervisor(config: ConfigFile, redis_url: str, key_prefix: str,
                     workers: int = 2) -> AsyncIterator[RelayProcess]:
    """``relay serve`` with ``workers`` SMTP processes, every one of them started; killed at the end."""
    write_config(config, redis_url, key_prefix, workers)
    relay = RelayProcess(config.path, pid_file=config.dir / "relay.pid")
    try:
        await asyncio.to_thread(relay.wait_ready)
        await asyncio.to_thread(wait_events, relay, "relay_started", workers)
        yield relay
    finally:
        relay.kill()


async def stop_gracefully(relay: RelayProcess) -> None:
    relay.signal(signal.SIGTERM)
    assert await asyncio.to_thread(relay.wait) == 0


async def test_workers_share_the_listener_and_every_accepted_message_is_stored(
        config: ConfigFile, redis_url: str, key_prefix: str) -> None:
    async with supervisor(config, redis_url, key_prefix, workers=3) as relay:
        pids = worker_pids(relay)
        assert len(pids) == 2 and relay.pid not in pids
        accepted = await submit(listener_port(relay), 90, "share")
        assert len(set(accepted)) == 90
        assert stored_ids(config) == set(accepted)        # 250 means committed, whichever process said it
        # 90 connections spread by the kernel over three sockets: all three served (the chance that one
        # got none is about 3 * (2/3)^90).
        assert served_by(relay) == {None, 2, 3}
        await stop_gracefully(relay)
    assert all(gone(pid, 10) for pid in pids)
    assert "smtp_workers_stopped" in relay.event_names()


async def test_sighup_reloads_every_worker(config: ConfigFile, redis_url: str, key_prefix: str) -> None:
    async with supervisor(config, redis_url, key_prefix) as relay:
        relay.signal(signal.SIGHUP)
        applied = await asyncio.to_thread(wait_events, relay, "reload_applied", 2)
        assert {entry.get("worker") for entry in applied} == {None, 2}
        assert not [e for e in relay.events if e.get("event") == "reload_needs_restart"]   # same file
        await stop_gracefully(relay)


async def test_a_killed_worker_is_restarted_and_the_listener_keeps_accepting(
        config: ConfigFile, redis_url: str, key_prefix: str) -> None:
    async with supervisor(config, redis_url, key_prefix) as relay:
        [worker] = worker_pids(relay)
        port = listener_port(relay)
        os.kill(worker, signal.SIGKILL)
        exited = await asyncio.to_thread(relay.wait_event, "smtp_worker_exited")
        assert exited["worker"] == 2 and exited["exit_code"] == -signal.SIGKILL
        # Meanwhile the supervisor's socket alone takes every connection.
        during = await submit(port, 10, "during")
        restarted = await asyncio.to_thread(relay.wait_event, "smtp_worker_restarted")
        assert restarted["pid"] != worker
        await asyncio.to_thread(wait_events, relay, "relay_started", 3)   # the new worker serves
        mark = len(relay.events)
        after = await submit(port, 60, "after")
        assert stored_ids(config) == set(during) | set(after)
        assert 2 in {e.get("worker") for e in relay.events[mark:] if e.get("event") == "queued"}
        await stop_gracefully(relay)
    assert gone(int(restarted["pid"]), 10)


async def test_a_worker_stops_when_its_supervisor_is_killed(
        config: ConfigFile, redis_url: str, key_prefix: str) -> None:
    worker = 0
    try:
        async with supervisor(config, redis_url, key_prefix) as relay:
            [worker] = worker_pids(relay)
            relay.process.send_signal(signal.SIGKILL)
            relay.process.wait(30)
            # PR_SET_PDEATHSIG turns the supervisor's death into SIGUSR2 (possibly more than once) and the
            # worker's own parent check asks for the same stop: together one graceful stop, never the
            # forced exit of a second SIGTERM, well within 10 s.
            assert gone(worker, 10)
            stopped = await asyncio.to_thread(relay.wait_event, "relay_stopped", 10)
            assert stopped.get("worker") == 2
            assert "shutdown_forced" not in relay.event_names()
    finally:
        if worker and not gone(worker, 0):
            os.kill(worker, signal.SIGKILL)


def test_more_than_one_worker_needs_redis() -> None:
    with pytest.raises(ConfigError, match="smtp_workers = 2 needs \\[redis\\] url"):
        parse_settings("[server]\nsmtp_workers = 2\n")
    # A delivery-only process runs no SMTP: the key does not concern it.
    assert parse_settings('[server]\nsmtp_workers = 2\nrole = "delivery"\n').server.smtp_workers == 2
    with_redis = parse_settings('[server]\nsmtp_workers = 4\n[redis]\nurl = "redis://127.0.0.1:6379/0"\n')
    assert with_redis.server.smtp_workers == 4
    with pytest.raises(ConfigError, match="smtp_workers"):
        parse_settings("[server]\nsmtp_workers = 0\n")


@pytest.mark.parametrize(("limit", "processes", "share"), [
    (0, 4, 0),          # unlimited stays unlimited
    (1000, 1, 1000),
    (1000, 2, 500),
    (5, 2, 2),          # the shares never add up to more than the limit
    (1, 3, 1),          # … except that every process may take one connection
])
def test_connection_limits_are_divided_among_the_processes(limit: int, processes: int, share: int) -> None:
    state = SharedState(store=None, limiter=None, generations=None, processes=processes)  # type: ignore[arg-type]
    assert state.share(limit) == share


@pytest.mark.parametrize(("orig_argv", "argv", "command"), [
    (["/venv/python", "/venv/bin/relay", "--config", "r.toml", "serve"], ["relay", "--config", "r.toml", "serve"],
     ["/venv/python", "/venv/bin/relay"]),
    (["/venv/python", "-m", "relay.cli", "serve"], ["/src/relay/cli.py", "serve"], ["/venv/python", "-m", "relay.cli"]),
    (["/venv/python", "/snap/bin/relay", "serve"], ["/snap/bin/relay", "serve"], ["/venv/python", "/snap/bin/relay"]),
    # Not started as `relay …` (a test runner, an embedding): the installed package's entry point.
    (["/venv/python", "-m", "pytest", "-x"], ["pytest", "-q"], [sys.executable, "-m", "relay.cli"]),
])
def test_workers_are_started_the_way_the_supervisor_was(monkeypatch: pytest.MonkeyPatch, orig_argv: list[str],
                                                         argv: list[str], command: list[str]) -> None:
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)
    assert launch_command() == command

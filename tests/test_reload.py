"""Reload (SIGHUP / ``relay reload``): a real relay re-reads its relay.toml with sessions and attempts open.

What is checked: a transaction open during a reload finishes on the configuration it began with (limits,
chain) while a new connection sees the new ones (limits, rate rules, certificate); the replaced chain
stops only once its last transaction or delivery attempt is over; routes and plugin HTTP routes switch;
DKIM keys are read again; an invalid file (bad value, bad TOML, unusable key or certificate, placeholder
secret) is refused with one log line and the running configuration kept; keys that need a restart are
reported and left alone; and ``relay reload`` through the pid file against a ``relay serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.app import Relay
from relay.reload import reconcile
from relay.settings import Settings
from relay.sink import SinkConfig, SinkServer
from tests.support import probeplugin
from tests.support.configfile import ConfigFile
from tests.support.smtpclient import RawClient

PROBE = "tests.support.probeplugin:Probe"
RELAY_BIN = Path(sys.executable).parent / "relay"


def message(size: int = 200, subject: str = "reload") -> bytes:
    head = f"From: a@example.com\r\nTo: b@dest.test\r\nSubject: {subject}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    probeplugin.reset()


@pytest.fixture
def config(tmp_path: Path, tls_ca: trustme.CA) -> ConfigFile:
    return ConfigFile(tmp_path, tls_ca)


@pytest.fixture
async def running() -> AsyncIterator[list[Relay]]:
    relays: list[Relay] = []
    yield relays
    for relay in relays:
        await relay.stop(grace=1)


async def start(config: ConfigFile, running: list[Relay]) -> Relay:
    relay = await config.start()
    running.append(relay)
    return relay


def queue_id(reply: Any) -> str:
    assert reply.code == 250, str(reply)
    return str(reply.text.rsplit(" ", 1)[-1])


async def session(port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> RawClient:
    client = await RawClient.connect(port, host, tls=tls)
    assert (await client.greeting()).code == 220
    assert (await client.ehlo()).code == 250
    return client


# -- what a reload may change ------------------------------------------------------------------------
def test_reconcile_keeps_what_needs_a_restart() -> None:
    running = Settings(listeners=[{"name": "relay", "address": "127.0.0.1:2525", "trusted_networks": []}])
    new = Settings(
        server={"role": "delivery", "hostname": "new.example", "state_dir": "elsewhere"},
        store={"url": "postgresql://relay@db/relay"}, redis={"url": "redis://cache:6379/0"},
        http={"address": "127.0.0.1:8025", "public_url": "https://t.example"},
        listeners=[{"name": "relay", "address": "127.0.0.1:2526", "trusted_networks": ["10.0.0.0/8"]},
                   {"name": "extra", "address": "127.0.0.1:2600"}],
        smtp={"max_recipients": 7})
    merged, pending = reconcile(running, new)
    assert sorted(pending) == sorted([
        "server.role", "server.state_dir", "store.url", "redis.url", "http.address",
        "listeners.relay.address", "listeners.extra (new)"])
    assert merged.server.role == "all" and merged.server.hostname == "new.example"
    assert merged.store == running.store and merged.redis == running.redis
    assert merged.http.address == "" and merged.http.public_url == "https://t.example"
    [listener] = merged.listeners
    assert listener.address == "127.0.0.1:2525" and listener.trusted_networks == ["10.0.0.0/8"]
    assert merged.smtp.max_recipients == 7


def test_reconcile_reports_a_removed_listener_and_keeps_it() -> None:
    running = Settings()
    new = Settings(listeners=[running.listeners[0]])
    merged, pending = reconcile(running, new)
    assert pending == ["listeners.submission (removed)"]
    assert [listener.name for listener in merged.listeners] == ["relay", "submission"]


# -- SMTP sessions across a reload -------------------------------------------------------------------
async def test_open_transaction_finishes_on_its_configuration_new_connections_get_the_new_one(
        config: ConfigFile, running: list[Relay]) -> None:
    config.write(smtp={"max_message_size": 100_000}, chain={"plugins": [PROBE]}, plugins={"probe": {"tag": "v1"}})
    relay = await start(config, running)
    assert relay.smtp is not None and relay.store is not None
    port = relay.smtp.ports()["relay"]
    old = await session(port)
    assert (await old.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await old.cmd("RCPT TO:<b@dest.test>")).code == 250

    config.write(smtp={"max_message_size": 2048}, chain={"plugins": [PROBE]}, plugins={"probe": {"tag": "v2"}},
                 limits={"recipients_per_ip": {"count": 2, "period": 3600}})
    outcome = await relay.reload()
    assert outcome.ok and outcome.generation == 2, outcome
    v1, v2 = probeplugin.instance("v1"), probeplugin.instance("v2")
    assert v2.started and not v1.stopped.is_set()       # the open transaction still holds v1

    # The open transaction: the old size limit and the old chain.
    assert (await old.cmd("DATA")).code == 354
    first = queue_id(await old.cmd(message(5000) + b"."))
    assert (await relay.store.message_data(first)).startswith(b"X-Probe: v1\r\n")

    # A new connection: the new SIZE, the new size limit, the new rate rule, the new chain.
    new = await RawClient.connect(port)
    await new.greeting()
    assert "SIZE 2048" in (await new.ehlo()).lines
    assert (await new.mail("a@example.com", ["b@dest.test"], message(5000))).code == 552
    assert (await new.cmd("RSET")).code == 250
    assert (await new.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await new.cmd("RCPT TO:<b@dest.test>")).code == 250
    assert (await new.cmd("RCPT TO:<c@dest.test>")).code == 450     # recipients_per_ip: 2 used
    assert (await new.cmd("DATA")).code == 354
    second = queue_id(await new.cmd(message(500) + b"."))
    assert (await relay.store.message_data(second)).startswith(b"X-Probe: v2\r\n")

    # Between transactions the old session takes the new configuration; v1 is then let go and stopped.
    assert "SIZE 2048" in (await old.ehlo()).lines
    await asyncio.wait_for(v1.stopped.wait(), 10)
    assert not v2.stopped.is_set()
    assert relay.generations is not None and relay.generations.retiring == []


async def test_new_certificate_for_new_connections_and_handshakes(config: ConfigFile, running: list[Relay]) -> None:
    listeners = [
        {"name": "relay", "address": "127.0.0.1:0", "kind": "relay", "trusted_networks": ["127.0.0.0/8"]},
        {"name": "smtps", "address": "127.0.0.2:0", "kind": "smtps", "auth": "off"},
    ]
    one = config.certificate("localhost", "one.test", stem="one")
    config.write(tls={"cert_file": one[0], "key_file": one[1]}, listeners=listeners)
    relay = await start(config, running)
    assert relay.smtp is not None
    ports = relay.smtp.ports()
    tls = config.client_tls()
    before = await session(ports["relay"])                          # greeted before the reload
    smtps_before = await session(ports["smtps"], "127.0.0.2", tls)

    two = config.certificate("localhost", "two.test", stem="two")
    config.write(tls={"cert_file": two[0], "key_file": two[1]}, listeners=listeners)
    assert (await relay.reload()).ok

    assert (await before.starttls(tls)).code == 220                # the session's own configuration
    assert names(before) == {"localhost", "one.test"}
    assert names(smtps_before) == {"localhost", "one.test"}
    after = await session(ports["relay"])
    assert (await after.starttls(tls)).code == 220
    assert names(after) == {"localhost", "two.test"}
    smtps_after = await session(ports["smtps"], "127.0.0.2", tls)
    assert names(smtps_after) == {"localhost", "two.test"}
    assert (await smtps_after.mail("a@example.com", ["b@dest.test"], message())).code == 550  # no relay: fine


def names(client: RawClient) -> set[str]:
    cert = client.writer.get_extra_info("peercert")
    return {value for kind, value in cert["subjectAltName"] if kind == "DNS"}


# -- refused reloads ---------------------------------------------------------------------------------
BASE: dict[str, Any] = {"smtp": {"max_recipients": 3}, "chain": {"plugins": [PROBE]},
                        "plugins": {"probe": {"tag": "kept"}}}


@pytest.mark.parametrize(("broken", "named"), [
    ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients"),
    ("[smtp\nmax_recipients = 5\n", "not valid TOML"),
    ({"smtp": {"max_recipents": 5}}, "smtp.max_recipents: unknown key"),
    ({"server": {"secret_key": "CHANGE-ME"}}, "placeholder secret"),
    ({"chain": {"plugins": ["no_such_plugin"]}}, "no_such_plugin"),
    ({"plugins": {"probe": {"tag": 5}}}, "plugins.probe.tag"),
    ({"tls": {"cert_file": "/nonexistent/cert.pem", "key_file": "/nonexistent/key.pem"}}, "/nonexistent/"),
], ids=["bad-value", "bad-toml", "unknown-key", "placeholder", "unknown-plugin", "plugin-config", "tls-file"])
async def test_an_invalid_file_is_refused_and_the_running_configuration_kept(
        config: ConfigFile, running: list[Relay], broken: dict[str, Any] | str, named: str) -> None:
    config.write(**BASE)
    relay = await start(config, running)
    assert relay.smtp is not None and relay.chain is not None
    kept = probeplugin.instance("kept")
    settings_before, chain_before = relay.settings, relay.chain
    good = config.path.read_text()
    if isinstance(broken, str):
        config.path.write_text(good + "\n" + broken)
    else:
        config.write(**{name: {**BASE.get(name, {}), **value} for name, value in {**BASE, **broken}.items()})

    with structlog.testing.capture_logs() as logs:
        outcome = await relay.reload()
    assert not outcome.ok and outcome.generation == 1
    assert outcome.error is not None and named in outcome.error, outcome.error
    refused = [entry for entry in logs if entry["event"] == "reload_refused"]
    assert len(refused) == 1 and named in refused[0]["error"]
    assert relay.settings is settings_before and relay.chain is chain_before
    assert kept in chain_before.plugins and not kept.stopped.is_set()
    client = await session(relay.smtp.ports()["relay"])
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    for rcpt in ("r1", "r2", "r3"):
        assert (await client.cmd(f"RCPT TO:<{rcpt}@dest.test>")).code == 250
    assert (await client.cmd("RCPT TO:<r4@dest.test>")).code == 452     # max_recipients 3 still applies

    config.path.write_text(good)                                        # fixed: the next reload applies
    assert (await relay.reload()).ok


async def test_keys_that_need_a_restart_are_reported_and_left_alone(config: ConfigFile, running: list[Relay]) -> None:
    config.write()
    relay = await start(config, running)
    store_before = relay.store
    config.write(server={"role": "all", "hostname": "renamed.test"},
                 store={"url": f"sqlite:///{config.dir}/other.db"},
                 listeners=[*config.defaults()["listeners"],
                            {"name": "extra", "address": "127.0.0.2:0", "kind": "submission"}])
    with structlog.testing.capture_logs() as logs:
        outcome = await relay.reload()
    assert outcome.ok
    assert set(outcome.needs_restart) == {"server.role", "store.url", "listeners.extra (new)"}
    assert {entry["key"] for entry in logs if entry["event"] == "reload_needs_restart"} == set(outcome.needs_restart)
    assert relay.settings.server.role == "smtp" and relay.settings.server.hostname == "renamed.test"
    assert relay.store is store_before and relay.delivery is None
    assert relay.smtp is not None and list(relay.smtp.ports()) == ["relay"]
    client = await RawClient.connect(relay.smtp.ports()["relay"])
    assert "renamed.test" in (await client.greeting()).text


# -- DKIM keys -------------------------------------------------------------------------------------
def dkim_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def dkim_section(selector: str, key_file: Path) -> dict[str, Any]:
    return {"dkim": {"domains": {"example.com": [{"selector": selector, "key_file": str(key_file)}]}}}


async def test_a_reload_reads_dkim_keys_again_and_refuses_a_key_that_cannot_sign(
        config: ConfigFile, running: list[Relay]) -> None:
    config.write(chain={"plugins": ["dkim"]}, plugins=dkim_section("s1", dkim_key(config.dir / "s1.pem")))
    relay = await start(config, running)
    signed = message()

    config.write(chain={"plugins": ["dkim"]}, plugins=dkim_section("s2", dkim_key(config.dir / "s2.pem")))
    assert (await relay.reload()).ok
    assert relay.chain is not None
    [dkim] = relay.chain.plugins
    out, made = dkim.sign(signed)   # type: ignore[attr-defined]  # the DkimPlugin of the new chain
    assert [(s.selector, s.domain) for s in made] == [("s2", "example.com")]
    assert b"s=s2;" in out.replace(b" ", b"")

    (config.dir / "bad.pem").write_text("not a key")
    (config.dir / "bad.pem").chmod(0o600)
    config.write(chain={"plugins": ["dkim"]}, plugins=dkim_section("s3", config.dir / "bad.pem"))
    outcome = await relay.reload()
    assert not outcome.ok and outcome.error is not None and "bad.pem" in outcome.error
    assert relay.chain.plugins == [dkim]
    assert [s.selector for s in dkim.sign(signed)[1]] == ["s2"]   # type: ignore[attr-defined]  # still signing


# -- delivery attempts across a reload -----------------------------------------------------------------
async def test_an_attempt_under_way_keeps_its_chain_and_routes_switch_for_the_next(
        config: ConfigFile, running: list[Relay]) -> None:
    async with SinkServer(SinkConfig(starttls="off")) as first, SinkServer(SinkConfig(starttls="off")) as second:
        def sections(tag: str, sink: SinkServer) -> dict[str, Any]:
            return {"server": {"role": "all"}, "chain": {"plugins": [PROBE]},
                    "plugins": {"probe": {"tag": tag, "hold_attempts": tag == "held"}},
                    "delivery": {"routes": {"domains": {"dest.test": {"kind": "host", "host": "127.0.0.1",
                                                                      "port": sink.port, "tls": "none"}}}}}
        config.write(**sections("held", first))
        relay = await start(config, running)
        assert relay.smtp is not None and relay.generations is not None
        port = relay.smtp.ports()["relay"]
        client = await session(port)
        queue_id(await client.mail("a@example.com", ["b@dest.test"], message(subject="before")))
        held = probeplugin.instance("held")
        await asyncio.wait_for(held.attempt_started.wait(), 10)     # the attempt waits at before_attempt

        config.write(**sections("free", second))
        assert (await relay.reload()).ok
        free = probeplugin.instance("free")
        assert not held.stopped.is_set() and [g.number for g in relay.generations.retiring] == [1]
        queue_id(await client.mail("a@example.com", ["c@dest.test"], message(subject="after")))
        [after] = await second.wait_for_messages(1)
        assert after.data.startswith(b"X-Probe-Attempt: free\r\nX-Probe: free\r\n")
        assert first.received == []

        probeplugin.GATES.setdefault("held", asyncio.Event()).set()
        [before] = await first.wait_for_messages(1)
        assert before.data.startswith(b"X-Probe-Attempt: held\r\nX-Probe: held\r\n")
        await asyncio.wait_for(held.stopped.wait(), 10)
        assert (held.attempts_begun, held.attempts_ended) == (1, 1)   # after_attempt on the same instance
        assert (free.attempts_begun, free.attempts_ended) == (1, 1)
        assert not free.stopped.is_set()


# -- plugin HTTP routes --------------------------------------------------------------------------------
async def test_plugin_http_routes_follow_the_generation(config: ConfigFile, running: list[Relay]) -> None:
    def sections(tag: str, route: str = "/probe") -> dict[str, Any]:
        return {"http": {"address": "127.0.0.1:0"}, "chain": {"plugins": [PROBE]},
                "plugins": {"probe": {"tag": tag, "route": route}}}
    config.write(**sections("one"))
    relay = await start(config, running)
    assert relay.http is not None
    url = f"http://127.0.0.1:{relay.http.port}/probe"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert await response.text() == "one"
        config.write(**sections("two"))
        assert (await relay.reload()).ok
        async with http.get(url) as response:
            assert await response.text() == "two"
        config.write(**sections("three", route="/elsewhere"))
        outcome = await relay.reload()
        assert not outcome.ok and outcome.error is not None and "/elsewhere" in outcome.error
        assert "restart" in outcome.error
        async with http.get(url) as response:
            assert await response.text() == "two"
        config.write(**{**sections("four"), "chain": {"plugins": []}, "plugins": {}})
        assert (await relay.reload()).ok
        async with http.get(url) as response:
            assert response.status == 404
        async with http.get(f"http://127.0.0.1:{relay.http.port}/healthz") as response:
            assert response.status == 200


# -- relay reload against relay serve ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_command(config: ConfigFile, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RELAY_BIN), "--config", str(config.path), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=config.dir)


def _env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}


async def wait_for_file(path: Path, process: subprocess.Popen[str]) -> None:
    for _ in range(600):
        if path.exists():
            return
        assert process.poll() is None, f"relay serve exited: {process.communicate()}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


async def greeting_text(port: int) -> str:
    client = await RawClient.connect(port)
    try:
        return (await client.greeting()).text
    finally:
        await client.close()


async def test_relay_reload_signals_the_relay_named_by_its_pid_file(config: ConfigFile) -> None:
    port = free_port()
    listeners = [{"name": "relay", "address": f"127.0.0.1:{port}", "kind": "relay",
                  "trusted_networks": ["127.0.0.0/8"]}]
    config.write(smtp={"greeting": "ESMTP first"}, listeners=listeners)
    pid_file = config.dir / "state" / "relay.pid"
    assert relay_command(config, "reload").returncode == 1                  # nothing runs yet
    process = subprocess.Popen([str(RELAY_BIN), "--config", str(config.path), "serve"], env=_env(),
                               cwd=config.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_for_file(pid_file, process)
        assert pid_file.read_text().strip() == str(process.pid)
        assert "ESMTP first" in await greeting_text(port)
        open_session = await session(port)      # open across both reloads: never dropped

        config.write(smtp={"greeting": "ESMTP second"}, listeners=listeners)
        done = await asyncio.to_thread(relay_command, config, "reload")
        assert done.returncode == 0, done.stderr
        assert "configuration reloaded (generation 2)" in done.stdout
        assert "ESMTP second" in await greeting_text(port)

        # A file `relay reload` cannot check itself (a key file only the relay reads): the relay refuses.
        config.write(smtp={"greeting": "ESMTP third"}, listeners=listeners,
                     tls={"cert_file": config.dir / "missing.pem", "key_file": config.dir / "missing.key"})
        refused = await asyncio.to_thread(relay_command, config, "reload", "--pid", str(process.pid))
        assert refused.returncode == 1
        assert "reload refused" in refused.stderr and "missing.pem" in refused.stderr
        assert "ESMTP second" in await greeting_text(port)
        # A file that does not validate: `relay reload` says so and leaves the relay alone.
        config.path.write_text(config.path.read_text().replace("[smtp]", "[smtp]\nmax_recipients = -1"))
        invalid = await asyncio.to_thread(relay_command, config, "reload")
        assert invalid.returncode == 1
        assert "reload refused" in invalid.stderr and "smtp.max_recipients" in invalid.stderr
        assert "ESMTP second" in await greeting_text(port)
        assert (await open_session.cmd("NOOP")).code == 250

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
        assert process.returncode == 0, stderr
        assert '"event": "reload_refused"' in stderr
        assert not pid_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

"""The plugin chain through real SMTP sessions: order, verdicts, failures → 451, seals, config errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from relay.chain import Chain, load_plugin_class
from relay.limits.memory import MemoryLimiter
from relay.plugin import (
    ACCEPT,
    CONTINUE,
    DataContext,
    MailContext,
    Plugin,
    PluginConfig,
    PluginHost,
    RcptContext,
    Verdict,
)
from relay.settings import ConfigError
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

CALLS: list[str] = []
BODY = b"Subject: chain\r\n\r\nbody\r\n"


class RecorderConfig(PluginConfig):
    label: str = "rec"
    refuse: str = ""              # an address this plugin rejects at RCPT


class Recorder(Plugin[RecorderConfig]):
    name = "recorder"
    Config = RecorderConfig

    async def mail_from(self, ctx: MailContext) -> Verdict:
        CALLS.append(f"{self.config.label}:mail:{ctx.sender}")
        return CONTINUE

    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        CALLS.append(f"{self.config.label}:rcpt:{ctx.recipient}")
        if ctx.recipient == self.config.refuse:
            return Verdict.reject("Recipient refused", code=550, enhanced="5.7.1", reason="test policy")
        return CONTINUE


class Acceptor(Plugin[PluginConfig]):
    name = "acceptor"

    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        CALLS.append(f"acceptor:rcpt:{ctx.recipient}")
        return ACCEPT if ctx.recipient.startswith("vip") else CONTINUE


class Stamper(Plugin[PluginConfig]):
    name = "stamper"
    modifies: ClassVar[frozenset] = frozenset({"headers"})  # type: ignore[type-arg]

    async def data(self, ctx: DataContext) -> Verdict:
        ctx.data = b"X-Stamped: yes\r\n" + ctx.data
        return CONTINUE


class Sealer(Plugin[PluginConfig]):
    name = "sealer"
    seals = True

    async def data(self, ctx: DataContext) -> Verdict:
        return CONTINUE


class Crasher(Plugin[PluginConfig]):
    name = "crasher"

    async def mail_from(self, ctx: MailContext) -> Verdict:
        raise RuntimeError("boom: secret detail")


class Sleeper(Plugin[PluginConfig]):
    name = "sleeper"
    timeout = 0.2

    async def mail_from(self, ctx: MailContext) -> Verdict:
        await asyncio.sleep(5)
        return CONTINUE


class LenientCrasher(Crasher):
    name = "lenient"
    on_error = "continue"


class TempRefuser(Plugin[PluginConfig]):
    name = "temprefuser"

    async def mail_from(self, ctx: MailContext) -> Verdict:
        return Verdict.tempfail("Try later", code=451, enhanced="4.7.1", disconnect=True)


HERE = "tests.test_chain"


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


async def session(relays: RelayFactory, plugins: list[str], tables: dict[str, object] | None = None
                  ) -> tuple[RawClient, object]:
    running = await relays.start(chain={"plugins": plugins}, plugins=tables or {})
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    return client, running


async def test_order_and_first_rejection_wins(relays: RelayFactory) -> None:
    client, _ = await session(relays, [f"{HERE}:Recorder", f"{HERE}:Acceptor"],
                              {"recorder": {"label": "r1", "refuse": "no@example.org"}})
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<ok@example.org>")).code == 250
    reply = await client.cmd("RCPT TO:<no@example.org>")
    assert (reply.code, reply.text) == (550, "5.7.1 Recipient refused")
    assert CALLS == ["r1:mail:a@example.com", "r1:rcpt:ok@example.org", "acceptor:rcpt:ok@example.org",
                     "r1:rcpt:no@example.org"]


async def test_accept_stops_the_chain_for_the_stage(relays: RelayFactory) -> None:
    client, _ = await session(relays, [f"{HERE}:Acceptor", f"{HERE}:Recorder"])
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<vip@example.org>")).code == 250
    assert "rec:rcpt:vip@example.org" not in CALLS and "acceptor:rcpt:vip@example.org" in CALLS


async def test_exception_becomes_451_and_is_logged_with_the_plugin(relays: RelayFactory,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    client, _ = await session(relays, [f"{HERE}:Crasher"])
    reply = await client.cmd("MAIL FROM:<a@example.com>")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert "boom" not in reply.text
    assert (await client.cmd("NOOP")).code == 250


async def test_timeout_becomes_451(relays: RelayFactory) -> None:
    client, _ = await session(relays, [f"{HERE}:Sleeper"])
    reply = await client.cmd("MAIL FROM:<a@example.com>")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")


async def test_on_error_continue_skips_the_plugin(relays: RelayFactory) -> None:
    client, _ = await session(relays, [f"{HERE}:LenientCrasher"])
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250


async def test_temporary_rejection_with_disconnect(relays: RelayFactory) -> None:
    client, _ = await session(relays, [f"{HERE}:TempRefuser"])
    reply = await client.cmd("MAIL FROM:<a@example.com>")
    assert (reply.code, reply.text) == (451, "4.7.1 Try later")
    assert await client.closed()


async def test_data_changes_are_kept(relays: RelayFactory) -> None:
    client, running = await session(relays, [f"{HERE}:Stamper"])
    reply = await client.mail("a@example.com", ["b@example.org"], BODY)
    queue_id = reply.text.rsplit(" ", 1)[1]
    data = await running.store.message_data(queue_id)  # type: ignore[attr-defined]
    assert data.startswith(b"X-Stamped: yes\r\nReceived: ")


def test_changing_after_sealing_is_refused() -> None:
    host = PluginHost(hostname="h", secret_key=None, limiter=MemoryLimiter())
    with pytest.raises(ConfigError, match=r"'stamper' changes the message .* after 'sealer' sealed it"):
        Chain.from_settings([f"{HERE}:Sealer", f"{HERE}:Stamper"], {}, host)
    chain = Chain.from_settings([f"{HERE}:Stamper", f"{HERE}:Sealer"], {}, host)
    assert chain.effective()["data"] == ["stamper", "sealer"]


def test_config_errors_name_the_plugin_key() -> None:
    host = PluginHost(hostname="h", secret_key=None, limiter=MemoryLimiter())
    with pytest.raises(ConfigError, match=r"plugins\.recorder\.lable: unknown key"):
        Chain.from_settings([f"{HERE}:Recorder"], {"recorder": {"lable": "x"}}, host)
    with pytest.raises(ConfigError, match=r"not in chain\.plugins: ghost"):
        Chain.from_settings([], {"ghost": {}}, host)


def test_unknown_plugins_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="no built-in plugin"):
        load_plugin_class("no_such_plugin")
    with pytest.raises(ConfigError, match="cannot import"):
        load_plugin_class("no.such.module:Thing")
    with pytest.raises(ConfigError, match=r"is not a relay plugin class$"):
        load_plugin_class("tests.test_chain:CALLS")


def test_relay_plugins_command_prints_the_chain(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[chain]\nplugins = ["{HERE}:Stamper", "{HERE}:Recorder", "{HERE}:Sealer"]\n'
                      '[plugins.recorder]\nlabel = "x"\n')
    result = subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(config), "plugins"],
                            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "chain: stamper -> recorder -> sealer" in result.stdout
    assert "rcpt_to         recorder" in result.stdout
    assert "data            stamper -> sealer" in result.stdout
    assert "stamper: tests.test_chain.Stamper (changes headers;" in result.stdout

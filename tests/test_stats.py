"""Hourly statistics and alerts: numbers from a scripted run of a real relay delivering to a sink, the rates
and thresholds, alerts raised once per period (escalation excepted), and ``relay stats`` output.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import structlog

from relay.alerts import Alerts
from relay.eventsconfig import AlertSettings, StatsSettings, Threshold
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.stats import (
    HOUR,
    StatsService,
    Totals,
    check_alerts,
    hour_start,
    judge,
    refresh_hours,
    totals_by_domain,
)
from relay.statscli import hbar, render, sparkline, stacked_bar
from relay.store import QueueStore, open_store
from relay.store.base import Event, HourlyStats, RecipientState
from tests.support.relayfx import RelayFactory, RunningRelay
from tests.support.smtpclient import RawClient


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> Any:
    opened = await open_store(StoreSettings(url=store_url, pool_size=3))
    try:
        yield opened
    finally:
        await opened.close()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- numbers from a scripted run ---------------------------------------------------------------------------

SCRIPT = [  # (sender, recipient): the sink answers per recipient below
    ("app@sender-a.example", "ok1@dest.example"), ("app@sender-a.example", "ok2@dest.example"),
    ("app@sender-a.example", "ok3@dest.example"), ("app@sender-a.example", "gone@dest.example"),
    ("app@sender-a.example", "full@other.example"), ("app@sender-a.example", "later@other.example"),
    ("app@sender-b.example", "ok@other.example"), ("app@sender-b.example", "gone2@dest.example"),
]
SINK_RULES = {"gone@dest.example": "550 5.1.1 no such user", "gone2@dest.example": "550 5.1.1 no such user",
              "full@other.example": "552 5.2.2 mailbox full", "later@other.example": "451 4.7.1 try again later"}


async def send(running: RunningRelay, sender: str, recipient: str) -> str:
    client = await RawClient.connect(running.ports["relay"])
    await client.greeting()
    await client.ehlo()
    reply = await client.mail(sender, [recipient], f"From: {sender}\r\nSubject: hi\r\n\r\nHello.\r\n".encode())
    await client.close()
    assert reply.code == 250, reply
    return reply.text.rsplit(" ", 1)[1]


async def settled(store: QueueStore, queue_ids: list[str]) -> bool:
    for queue_id in queue_ids:
        for row in await store.recipients_of(queue_id):
            if row.state == RecipientState.QUEUED and row.attempts == 0:
                return False
    counts = await store.count_by_state()
    return counts["queued"] == 1  # only the deferred one is left (its DSNs went out)


async def test_stats_count_a_scripted_run_per_sender_and_destination(relays: RelayFactory, store_url: str) -> None:
    sink = SinkServer(SinkConfig(starttls="off"))
    await sink.start()
    for address, reply in SINK_RULES.items():
        sink.set_rule(address, reply)
    try:
        running = await relays.start(
            store_url=store_url, server={"role": "all"},
            delivery={"routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}},
                      "retry": {"schedule": "1h*", "delay_warning_after": 0}})
        store = running.store
        ids = [await send(running, sender, rcpt) for sender, rcpt in SCRIPT]
        async with asyncio.timeout(60):
            while not await settled(store, ids):
                await asyncio.sleep(0.05)
            # Three DSNs (two hard bounces, one full mailbox) delivered to the senders' domains.
            while len([m for m in sink.received if not m.mail_from]) < 3:
                await asyncio.sleep(0.05)
            while len(await store.list_events(type="delivered")) < 7:
                await asyncio.sleep(0.05)
    finally:
        await sink.stop()
    now = (await store.list_events(type="queued"))[-1].created_at
    ok1 = ids[0]
    await store.record_events([   # what tracking and a feedback loop would add
        Event(uuid.uuid4().hex, "opened", now, message_id=ok1, recipient="ok1@dest.example"),
        Event(uuid.uuid4().hex, "clicked", now, message_id=ok1, recipient="ok1@dest.example"),
        Event(uuid.uuid4().hex, "complained", now, message_id=ok1, recipient="ok1@dest.example",
              data={"sender_domain": "sender-a.example", "domain": "dest.example"}),
    ])

    await refresh_hours(store, now, 2, now)   # the run may straddle an hour: count both
    window = (hour_start(now) - HOUR, hour_start(now) + HOUR)
    by_destination = {d: t.as_dict() for d, t in totals_by_domain(
        await store.read_hourly_stats("destination", *window)).items()}
    by_sender = {d: t.as_dict() for d, t in totals_by_domain(await store.read_hourly_stats("sender", *window)).items()}

    def counts(**values: int) -> dict[str, int]:
        return Totals(**values).as_dict()

    assert by_destination == {
        "dest.example": counts(sent=5, delivered=3, bounced_hard=2, complained=1, opened=1, clicked=1),
        "other.example": counts(sent=3, delivered=1, bounced_soft=1, deferred=1),
        "sender-a.example": counts(sent=2, delivered=2),   # the DSNs of the full mailbox and the hard bounce
        "sender-b.example": counts(sent=1, delivered=1),
    }
    assert by_sender == {
        "sender-a.example": counts(sent=6, delivered=3, bounced_hard=1, bounced_soft=1, deferred=1, complained=1,
                                   opened=1, clicked=1),
        "sender-b.example": counts(sent=2, delivered=1, bounced_hard=1),
        "": counts(sent=3, delivered=3),                   # bounce messages have the null sender
    }


# -- rates, thresholds and alerts --------------------------------------------------------------------------


def test_rates_and_their_thresholds() -> None:
    totals = Totals(sent=200, delivered=94, bounced_hard=4, bounced_soft=2, deferred=0, complained=1)
    assert totals.rate("bounce_rate") == (6.0, 100)
    assert totals.rate("complaint_rate")[0] == pytest.approx(100 / 94)
    assert totals.rate("delivery_rate") == (94.0, 100)
    bounce = Threshold(warning=5.0, critical=10.0, min_volume=100)
    assert judge("bounce_rate", bounce, totals) == ("warning", 6.0, 5.0, 100)
    assert judge("bounce_rate", bounce.model_copy(update={"min_volume": 101}), totals) is None
    assert judge("bounce_rate", bounce, Totals(delivered=95, bounced_hard=5)) is None     # 5 % is not above 5 %
    assert judge("bounce_rate", bounce, Totals(delivered=89, bounced_hard=11))[:2] == ("critical", 11.0)  # type: ignore[index]
    delivery = Threshold(warning=95.0, critical=90.0, min_volume=10)
    assert judge("delivery_rate", delivery, totals)[:2] == ("warning", 94.0)  # type: ignore[index]
    assert judge("delivery_rate", delivery, Totals(delivered=8, deferred=2))[:2] == ("critical", 80.0)  # type: ignore[index]
    assert judge("delivery_rate", delivery, Totals()) is None
    with pytest.raises(ValueError, match="critical"):
        AlertSettings(delivery_rate=Threshold(warning=90.0, critical=95.0))


def outcome(type_: str, at: float, domain: str, sender_domain: str = "brand.example", **data: Any) -> Event:
    return Event(uuid.uuid4().hex, type_, at, message_id=None, recipient=f"someone@{domain}",
                 data={"sender_domain": sender_domain, "domain": domain, **data})


def outcomes(at: float, domain: str, delivered: int, bounced: int = 0, deferred: int = 0) -> list[Event]:
    return ([outcome("delivered", at, domain) for _ in range(delivered)]
            + [outcome("bounced", at, domain, bounce_type="hard") for _ in range(bounced)]
            + [outcome("deferred", at, domain) for _ in range(deferred)])


async def test_alerts_are_raised_once_per_period_and_again_when_they_escalate(store: QueueStore) -> None:
    start = hour_start(1_800_000_000.0) + 600
    clock = Clock(start)
    settings = AlertSettings(period=3600.0, complaint_rate=Threshold(warning=0.05, critical=0.1, min_volume=1000))
    alerts = Alerts(store, settings, clock=clock)
    service = StatsService(store, StatsSettings(), settings, alerts, clock=clock)
    await store.record_events(outcomes(start - 60, "dest.example", 94, 6)          # 6 %: warning
                              + outcomes(start - 60, "other.example", 80, 0, 20)   # delivery 80 %: critical
                              + outcomes(start - 60, "tiny.example", 1, 1))        # too little to judge

    with structlog.testing.capture_logs() as logs:
        raised = await service.run_once()
    found = {(b.kind, b.scope, b.level) for b in raised}
    assert found == {
        ("bounce_rate", "destination:dest.example", "warning"),
        ("delivery_rate", "destination:dest.example", "warning"),
        ("delivery_rate", "destination:other.example", "critical"),
        # The sender brand.example sent all of it: 7 of 182 bounced (3.8 %), 175 of 202 delivered (86.6 %).
        ("delivery_rate", "sender:brand.example", "critical"),
    }
    events = await store.list_events(type="alert")
    assert {(e.data["kind"], e.data["scope"], e.data["level"]) for e in events} == found
    bounce = next(e for e in events if e.data["kind"] == "bounce_rate")
    assert (bounce.data["rate"], bounce.data["threshold"], bounce.data["volume"], bounce.data["domain"]) == (
        6.0, 5.0, 100, "dest.example")
    assert "bounce rate of destination domain dest.example is 6.00 %" in bounce.data["summary"]
    lines = [line for line in logs if line["event"] == "alert"]
    assert len(lines) == 4 and {line["log_level"] for line in lines} == {"warning", "error"}

    clock.now += 300                       # the next run, same conditions: nothing new
    assert await service.run_once() == []
    assert len(await store.list_events(type="alert")) == 4

    await store.record_events(outcomes(clock.now - 10, "dest.example", 0, 10))   # 16 of 110: critical
    escalated = await service.run_once()
    assert {(b.kind, b.scope, b.level) for b in escalated} == {
        ("bounce_rate", "destination:dest.example", "critical"),     # escalated from warning
        ("delivery_rate", "destination:dest.example", "critical"),   # escalated from warning
        ("bounce_rate", "sender:brand.example", "warning")}          # new: 17 of 192 (8.9 %)

    clock.now += 3600                      # a period later the conditions (still in the window) alert again
    again = await check_alerts(store, settings, alerts, clock.now)
    assert ("delivery_rate", "destination:other.example", "critical") in {(b.kind, b.scope, b.level) for b in again}


async def test_alerts_can_be_switched_off(store: QueueStore) -> None:
    now = hour_start(1_800_000_000.0) + 60
    settings = AlertSettings(enabled=False)
    clock = Clock(now)
    service = StatsService(store, StatsSettings(), settings, Alerts(store, settings, clock=clock), clock=clock)
    await store.record_events(outcomes(now - 30, "dest.example", 50, 50))
    assert await service.run_once() == []
    assert await store.list_events(type="alert") == []
    [row] = await store.read_hourly_stats("destination", hour_start(now), now + HOUR)
    assert (row.delivered, row.bounced_hard) == (50, 50)   # the numbers are kept all the same


# -- relay stats -------------------------------------------------------------------------------------------


def test_pictures() -> None:
    assert sparkline([0, 1, 4, 8]) == "·▁▄█"
    assert sparkline([0, 0]) == "··"
    assert hbar(5.0, 10.0, 4) == "██" and hbar(1.0, 8.0, 1) == "▏" and hbar(0.0, 1.0, 5) == ""
    assert stacked_bar([(8, "█"), (1, "▓"), (0, "░")], 9, 9) == "████████▓"


async def fill(store: QueueStore, now: float) -> None:
    for hours_ago, (delivered, bounced) in enumerate([(40, 1), (10, 0), (0, 0), (25, 5)]):
        at = hour_start(now) - hours_ago * HOUR + 1
        await store.record_events(outcomes(at, "dest.example", delivered, bounced)
                                  + [outcome("queued", at, "dest.example", domains={"dest.example": 1})
                                     for _ in range(delivered + bounced)]
                                  + outcomes(at, "quiet.example", 1))


async def test_relay_stats_table_sparkline_and_bars(store: QueueStore) -> None:
    now = hour_start(1_800_000_000.0) + 1800
    await fill(store, now)

    text = await render(store, "destination", 6, now=now, recompute=True, width=100)

    lines = text.splitlines()
    assert lines[0].startswith("Destination domains, last 6 h")
    [row] = [line for line in lines if line.startswith("dest.example ") and "·" not in line]
    assert row.split()[:5] == ["dest.example", "81", "75", "6", "0"]     # sent, delivered, hard, soft
    [total] = [line for line in lines if line.startswith("total")]
    assert total.split()[1:3] == ["81", "79"]
    [spark] = [line for line in lines if line.startswith("dest.example ") and "·" in line]
    assert "··▆·▂█" in spark and "7.4 %" in spark                        # 6 hours, oldest first

    one = await render(store, "destination", 6, domain="dest.example", now=now, width=100)
    assert "delivered █  bounced ▓  deferred ░" in one
    assert any("█" in line and "▓" in line for line in one.splitlines())
    assert "bounce rate 7.4 %" in one

    assert "no mail in this period" in await render(store, "sender", 2, domain="nobody.example", now=now)


async def test_relay_stats_command_prints_json(store_url: str, store: QueueStore, tmp_path: Path) -> None:
    import time
    now = time.time()
    await fill(store, now)
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n[store]\nurl = "{store_url}"\n')
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "relay.cli", "stats", "--by", "destination", "--hours", "6",
                         "--recompute", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {row["domain"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows["dest.example"]["totals"]["delivered"] == 75
    assert rows["dest.example"]["hourly"]["delivered"][-4:] == [25, 0, 10, 40]
    assert rows["quiet.example"]["rates"]["bounce_rate"] == 0.0
    human = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "relay.cli", "stats", "--hours", "6"], capture_output=True,
        text=True, env=env, timeout=120)
    assert human.returncode == 0 and "dest.example" in human.stdout and "█" in human.stdout


def test_hourly_rows_are_stable_values() -> None:
    assert HourlyStats("sender", 0.0, "a.example", sent=1) == HourlyStats("sender", 0.0, "a.example", sent=1)

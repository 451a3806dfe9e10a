"""Hourly statistics from the event outbox, and the anomaly checks that raise alerts from them.

**What is counted** (per hour, per sender domain and per destination domain, from the events' times):
``sent`` — recipients accepted (``queued`` events, bounce messages included under the null sender ``""``);
``delivered``; ``bounced_hard`` / ``bounced_soft`` — permanent failures whose category says the address
cannot receive mail (hard) or not (soft; expired recipients count here too), see
:mod:`relay.delivery.events`; ``deferred`` — failed attempts that will be retried; ``complained``,
``opened``, ``clicked``.

**How** (measured, see ``docs/stats.md``): the events of one hour are counted by one grouped query over the
events' time index (:meth:`~relay.store.base.QueueStore.tally_events`) and written, replacing the hour, to
``stats_hourly`` — materialised. :class:`StatsService` recomputes the current and the previous hour every
``[stats] interval`` (the previous one because events of its last seconds may commit late) and, when it
starts, the last ``backfill_hours``. Readers (``relay stats``, the checks) read the small table; recomputing
an hour is always safe, so several nodes may run the job.

**Rates** (percent): bounce rate = bounced (hard + soft) / (delivered + bounced); complaint rate =
complained / delivered; delivery rate = delivered / (delivered + bounced + deferred) — the share of
delivery outcomes that were deliveries, which drops when a destination defers mail even before anything
bounces. A rate is judged only when its denominator reaches the rule's ``min_volume``.

**Alerts** (``[alerts]``): after each run, for every domain of both dimensions, each rate over its window
(the whole hours overlapping the last ``window`` seconds) is compared with its thresholds; a breach raises
``<rate>`` for ``<dimension>:<domain>`` through :class:`relay.alerts.Alerts` (at most once per period).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from relay.alerts import Alerts, Level
from relay.eventsconfig import AlertSettings, StatsSettings, Threshold
from relay.log import get_logger
from relay.store.base import STATS_COUNTERS, EventTally, HourlyStats, QueueStore

log = get_logger(__name__)

HOUR = 3600.0
#: Old materialised hours are deleted at most this often (seconds).
PURGE_INTERVAL = 3600.0
DIMENSIONS = ("sender", "destination")
#: Which counter an event type adds to ("bounced" goes to bounced_hard or bounced_soft by its bounce type).
_COUNTER_OF_TYPE = {"queued": "sent", "delivered": "delivered", "deferred": "deferred", "expired": "bounced_soft",
                    "complained": "complained", "opened": "opened", "clicked": "clicked"}


def hour_start(t: float) -> float:
    return math.floor(t / HOUR) * HOUR


def counter_of(tally: EventTally) -> str | None:
    if tally.type == "bounced":
        return "bounced_hard" if tally.bounce_type == "hard" else "bounced_soft"
    return _COUNTER_OF_TYPE.get(tally.type)


def hourly_rows(hour: float, tallies: Iterable[EventTally]) -> list[HourlyStats]:
    """One hour's tallies folded into rows per (dimension, domain)."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for tally in tallies:
        counter = counter_of(tally)
        if counter is None:
            continue
        for key in (("sender", tally.sender_domain), ("destination", tally.domain)):
            row = counts.setdefault(key, dict.fromkeys(STATS_COUNTERS, 0))
            row[counter] += tally.count
    return [HourlyStats(dimension, hour, domain, **values)  # type: ignore[arg-type]  # dimension is one of two
            for (dimension, domain), values in sorted(counts.items())]


async def materialise_hour(store: QueueStore, hour: float, now: float) -> list[HourlyStats]:
    """Recompute one hour from the events and replace its rows."""
    rows = hourly_rows(hour, await store.tally_events(hour, hour + HOUR))
    await store.replace_hourly_stats(hour, rows, now)
    return rows


@dataclass(slots=True)
class Totals:
    """Counters summed over hours (and possibly domains)."""

    sent: int = 0
    delivered: int = 0
    bounced_hard: int = 0
    bounced_soft: int = 0
    deferred: int = 0
    complained: int = 0
    opened: int = 0
    clicked: int = 0

    def add(self, row: HourlyStats | Totals) -> None:
        for name in STATS_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(row, name))

    @property
    def bounced(self) -> int:
        return self.bounced_hard + self.bounced_soft

    def rate(self, kind: str) -> tuple[float | None, int]:
        """(rate in percent or None without volume, its denominator)."""
        numerator, volume = {
            "bounce_rate": (self.bounced, self.delivered + self.bounced),
            "complaint_rate": (self.complained, self.delivered),
            "delivery_rate": (self.delivered, self.delivered + self.bounced + self.deferred),
        }[kind]
        return (100.0 * numerator / volume if volume else None), volume

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def totals_by_domain(rows: Iterable[HourlyStats]) -> dict[str, Totals]:
    found: dict[str, Totals] = {}
    for row in rows:
        found.setdefault(row.domain, Totals()).add(row)
    return found


# -- anomaly checks --------------------------------------------------------------------------------------

RATE_KINDS = ("bounce_rate", "complaint_rate", "delivery_rate")


@dataclass(frozen=True, slots=True)
class Breach:
    kind: str
    dimension: str
    domain: str
    level: Level
    rate: float
    threshold: float
    volume: int
    window_start: float
    window_end: float

    @property
    def scope(self) -> str:
        return f"{self.dimension}:{self.domain}"

    def summary(self) -> str:
        side = "below" if self.kind == "delivery_rate" else "above"
        return (f"{self.kind.replace('_', ' ')} of {self.dimension} domain {self.domain} is {self.rate:.2f} % "
                f"({side} the {self.level} threshold {self.threshold:g} %) over {self.volume} messages")


def judge(kind: str, rule: Threshold, totals: Totals) -> tuple[Level, float, float, int] | None:
    """(level, rate, threshold crossed, volume) when the rate breaches a threshold with enough volume."""
    rate, volume = totals.rate(kind)
    if rate is None or volume < rule.min_volume:
        return None
    below = kind == "delivery_rate"
    for level, threshold in (("critical", rule.critical), ("warning", rule.warning)):
        if (rate < threshold) if below else (rate > threshold):
            return level, rate, threshold, volume  # type: ignore[return-value]  # level is a Level literal
    return None


async def find_breaches(store: QueueStore, settings: AlertSettings, now: float) -> list[Breach]:
    """Every (rate, dimension, domain) over its thresholds now; the null-sender and unknown domains are
    not judged (they are nobody's reputation)."""
    breaches: list[Breach] = []
    for kind in RATE_KINDS:
        rule: Threshold = getattr(settings, kind)
        start = hour_start(now - rule.window)
        for dimension in DIMENSIONS:
            rows = await store.read_hourly_stats(dimension, start, now + HOUR)
            for domain, totals in sorted(totals_by_domain(rows).items()):
                found = judge(kind, rule, totals) if domain else None
                if found is not None:
                    level, rate, threshold, volume = found
                    breaches.append(Breach(kind, dimension, domain, level, round(rate, 4), threshold, volume,
                                           start, now))
    return breaches


async def check_alerts(store: QueueStore, settings: AlertSettings, alerts: Alerts, now: float) -> list[Breach]:
    """Raise an alert for every breach (the store keeps each one to once per period); the raised ones."""
    raised = []
    for breach in await find_breaches(store, settings, now):
        if await alerts.raise_alert(breach.kind, breach.scope, breach.level, breach.summary(),
                                    dimension=breach.dimension, domain=breach.domain, rate=breach.rate,
                                    threshold=breach.threshold, volume=breach.volume,
                                    window_start=breach.window_start, window_end=breach.window_end):
            raised.append(breach)
    return raised


# -- the periodic job ------------------------------------------------------------------------------------

class StatsService:
    """Materialises hours and runs the checks every ``[stats] interval``."""

    def __init__(self, store: QueueStore, settings: StatsSettings, alert_settings: AlertSettings, alerts: Alerts, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.alert_settings = alert_settings
        self.alerts = alerts
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._next_purge = 0.0
        self.runs = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stats")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run_once(self, *, backfill: int = 1) -> list[Breach]:
        """Recompute the current hour and the ``backfill`` before it, then check the rates."""
        now = self._clock()
        await refresh_hours(self.store, now, backfill + 1, now)
        self.runs += 1
        if self.settings.retention > 0 and now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            removed = await self.store.purge_hourly_stats(hour_start(now - self.settings.retention))
            if removed:
                log.info("stats_purged", rows=removed)
        if not self.alert_settings.enabled:
            return []
        return await check_alerts(self.store, self.alert_settings, self.alerts, now)

    async def _loop(self) -> None:
        backfill = self.settings.backfill_hours
        while not self._stopping.is_set():
            try:
                await self.run_once(backfill=backfill)
                backfill = 1
            except Exception as exc:  # the job is retried at the next interval; it must never die
                log.error("stats_run_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval)


async def refresh_hours(store: QueueStore, until: float, hours: int, now: float) -> list[float]:
    """Recompute the ``hours`` hours ending with the one holding ``until``; the hours done."""
    last = hour_start(until)
    done = [last - HOUR * n for n in range(max(hours, 1) - 1, -1, -1)]
    for hour in done:
        await materialise_hour(store, hour, now)
    return done


async def read_window(store: QueueStore, dimension: str, since: float, until: float,
                      domain: str | None = None) -> list[HourlyStats]:
    return await store.read_hourly_stats(dimension, hour_start(since), until, domain)


def series(rows: Sequence[HourlyStats], hours: Sequence[float], counter: str) -> list[int]:
    """One counter per hour (0 for hours without a row)."""
    by_hour: dict[float, int] = {}
    for row in rows:
        by_hour[row.hour] = by_hour.get(row.hour, 0) + int(getattr(row, counter))
    return [by_hour.get(hour, 0) for hour in hours]


__all__ = ["DIMENSIONS", "HOUR", "RATE_KINDS", "Breach", "StatsService", "Totals", "check_alerts", "find_breaches",
           "hour_start", "hourly_rows", "judge", "materialise_hour", "read_window", "refresh_hours", "series",
           "totals_by_domain"]

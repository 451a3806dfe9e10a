"""How much counting the events costs: one hour recomputed, 24 hours counted on demand, 24 hours read back.

    .venv/bin/python bench/stats_tally.py                       # 20,000 events an hour × 24 h, SQLite
    .venv/bin/python bench/stats_tally.py --postgres URL        # also on Postgres (a throwaway database)
    .venv/bin/python bench/stats_tally.py --per-hour 100000 --hours 24

Fills a fresh store with ``--hours`` hours of delivery events (queued, delivered, deferred, bounced, a few
opens and complaints; 200 sender domains × 2,000 destination domains), then times, median of 3 runs:

- ``tally 1 h``: :meth:`tally_events` over one hour (what the stats job does per hour, every interval);
- ``materialise 1 h``: the same plus replacing the hour in ``stats_hourly``;
- ``tally 24 h``: one grouped query over 24 hours of events (what "computed on demand" would cost each time
  ``relay stats`` or an alert check looks at a day);
- ``read 24 h``: reading 24 materialised hours back (what ``relay stats`` and the checks do instead).

Nothing leaves the machine; the Postgres database is created and dropped with FORCE.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay.settings import StoreSettings
from relay.stats import HOUR, hour_start, materialise_hour
from relay.store import QueueStore, open_store
from relay.store.base import Event

TYPES = [("queued", 40), ("delivered", 36), ("deferred", 8), ("bounced", 3), ("opened", 10), ("clicked", 2),
         ("complained", 1)]


def events_for_hour(hour: float, count: int, rng: random.Random) -> list[Event]:
    kinds = [name for name, weight in TYPES for _ in range(weight)]
    out = []
    for _ in range(count):
        kind = rng.choice(kinds)
        domain = f"d{rng.randrange(2000)}.example"
        data: dict[str, Any] = {"sender_domain": f"s{rng.randrange(200)}.example", "domain": domain}
        if kind == "bounced":
            data["bounce_type"] = rng.choice(["hard", "soft"])
        if kind == "queued":   # one per message, its recipients counted per domain
            data["domains"] = {domain: 1}
        out.append(Event(uuid.uuid4().hex, kind, hour + rng.random() * HOUR, message_id=None,
                         recipient=f"u{rng.randrange(10**6)}@{domain}", data=data))
    return out


async def timed(fn: Callable[[], Awaitable[Any]], reps: int = 3) -> float:
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def measure(store: QueueStore, label: str, per_hour: int, hours: int) -> None:
    rng = random.Random(5)
    last = hour_start(time.time()) - HOUR
    first = last - HOUR * (hours - 1)
    started = time.perf_counter()
    for n in range(hours):
        batch = events_for_hour(first + n * HOUR, per_hour, rng)
        for i in range(0, len(batch), 5000):
            await store.record_events(batch[i:i + 5000])
    print(f"{label}: {per_hour * hours:,} events written in {time.perf_counter() - started:.1f} s")
    for n in range(hours):
        await materialise_hour(store, first + n * HOUR, time.time())
    results = {
        "tally 1 h": await timed(lambda: store.tally_events(last, last + HOUR)),
        "materialise 1 h": await timed(lambda: materialise_hour(store, last, time.time())),
        "tally 24 h": await timed(lambda: store.tally_events(last - 23 * HOUR, last + HOUR)),
        "read 24 h (destination)": await timed(lambda: store.read_hourly_stats("destination", last - 23 * HOUR,
                                                                               last + HOUR)),
    }
    for name, seconds in results.items():
        print(f"  {name:<26} {seconds * 1000:9.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-hour", type=int, default=20_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--postgres", help="a Postgres server URL (a throwaway database is made in it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = await open_store(StoreSettings(url=f"sqlite:///{tmp}/bench.db"))
        try:
            await measure(store, "sqlite", args.per_hour, args.hours)
        finally:
            await store.close()
    if args.postgres:
        import psycopg
        name = "relay_bench_" + secrets.token_hex(4)
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(args.postgres)
        url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
        try:
            store = await open_store(StoreSettings(url=url))
            try:
                await measure(store, "postgres", args.per_hour, args.hours)
            finally:
                await store.close()
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())

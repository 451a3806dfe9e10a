"""Queue claims on Postgres with a small and a huge backlog: does claiming slow down as the queue grows?

    python bench/claims.py                                   # 10,000 then 1,000,000 queued recipients
    python bench/claims.py --sizes 10000,100000 --claims 100

For each size: a throwaway database on the machine's Postgres (created, then dropped with FORCE), the
relay's schema, ``size`` queued recipients written through the store's own enqueue (COPY group commit:
messages of 100 recipients, 1 KB each, due now), ``ANALYZE``; then ``--claims`` rounds of
``claim_due(limit=--limit)`` immediately followed by ``release`` of what was claimed (so every round
sees the same queue), timed one by one. Reported: the median and p90 claim time per size and the ratio
of the largest size to the smallest (the issue's target: within 1.3×).

Invariants: only the throwaway databases are touched; the work is bounded by ``--sizes`` and
``--claims``; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_section, markdown_table
from references import ThrowawayDatabase

from relay.ids import new_queue_id
from relay.log import configure_logging
from relay.settings import StoreSettings
from relay.store import open_store
from relay.store.base import NewMessage, NewRecipient, QueueStore

RECIPIENTS_PER_MESSAGE = 100
BODY = b"From: bench@sender.example\r\nSubject: claims\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def fill(store: QueueStore, size: int) -> float:
    """Queue ``size`` recipients, due now; returns the seconds it took."""
    started = time.monotonic()
    now = time.time()
    messages = size // RECIPIENTS_PER_MESSAGE
    for first in range(0, messages, 200):   # 200 messages (20,000 rows) in flight at a time
        batch = [NewMessage(id=new_queue_id(), sender="bench@sender.example", data=BODY, received_at=now,
                            recipients=[NewRecipient(f"r{n}-{i}@d{i % 50}.example")
                                        for i in range(RECIPIENTS_PER_MESSAGE)])
                 for n in range(first, min(first + 200, messages))]
        await asyncio.gather(*(store.enqueue(m) for m in batch))
    return time.monotonic() - started


def analyze(url: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="queued recipients per run (comma-separated)")
    parser.add_argument("--claims", type=int, default=200, help="timed claim rounds per size")
    parser.add_argument("--limit", type=int, default=100, help="recipients per claim (the delivery loop's batch)")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    configure_logging("warning", "json")
    rows = []
    medians = {}
    for size in sizes:
        with ThrowawayDatabase(args.admin_url) as db:
            times, filled = asyncio.run(measure(db.url, size, args.claims, args.limit))
        medians[size] = statistics.median(times)
        p90 = sorted(times)[int(len(times) * 0.9)]
        rows.append([f"{size:,}", f"{filled:.1f}", f"{medians[size] * 1000:.2f}", f"{p90 * 1000:.2f}"])
        print(f"{size:,} queued: claim_due({args.limit}) median {medians[size] * 1000:.2f} ms, "
              f"p90 {p90 * 1000:.2f} ms (fill {filled:.1f} s)", flush=True)
    ratio = medians[sizes[-1]] / medians[sizes[0]]
    text = "\n".join([
        "# Queue claims on Postgres", "",
        f"{args.claims} rounds of claim_due({args.limit}) + release per size, on a throwaway database filled "
        f"through the store's enqueue; median and p90 of the claim alone.", "",
        markdown_table(["queued recipients", "fill s", "claim median ms", "claim p90 ms"], rows), "",
        f"**{sizes[-1]:,} / {sizes[0]:,}: {ratio:.2f}×** (target: within 1.3×)", "",
        machine_section(), "", "## Command", "", "    python " + " ".join(sys.argv), "",
    ])
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


async def measure(url: str, size: int, rounds: int, limit: int) -> tuple[list[float], float]:
    """Fill, ANALYZE (what autovacuum would do for a queue of that size), then time the claims."""
    store = await open_store(StoreSettings(url=url))
    try:
        filled = await fill(store, size)
    finally:
        await store.close()
    await asyncio.to_thread(analyze, url)
    store = await open_store(StoreSettings(url=url))
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            claims = await store.claim_due(time.time(), limit, "bench-claims", 60.0)
            times.append(time.perf_counter() - started)
            if len(claims) != limit:
                raise RuntimeError(f"claimed {len(claims)} of {limit}")
            await store.release([c.recipient.id for c in claims], "bench-claims")
        return times, filled
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(main())

"""Delivery throughput, end to end in one process: a queue store with a backlog, the delivery service,
and SMTP sinks on loopback; how long until every recipient is delivered.

    python bench/e2e_delivery.py --messages 2000 --recipients 2 --domains 4
    python bench/e2e_delivery.py --store-url postgresql://postgres@127.0.0.1:5432/bench   (an empty database)
    python bench/e2e_delivery.py --client-only      (one connection, PIPELINING on versus off)

Domains use ``host`` routes to their sink (no DNS in the measurement). The log goes through the relay's
JSON renderer to /dev/null at the chosen level, so its cost is counted as in production.

Invariants: binds and connects to 127.0.0.1 only; the work is bounded by ``--messages`` and every wait
by ``--timeout``; the SQLite file lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.delivery.client import ClientOptions, DeliveryConnection, Target, TlsFallbackMemory
from relay.delivery.config import DeliverySettings, RouteSettings
from relay.delivery.scheduler import DeliveryService
from relay.log import configure_logging
from relay.settings import StoreSettings
from relay.sink import SinkConfig, SinkServer
from relay.store import open_store
from relay.store.base import NewMessage, NewRecipient

BODY = b"From: bench@sender.example\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 40


async def end_to_end(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        url = args.store_url or f"sqlite:///{Path(tmp) / 'queue.db'}"
        store = await open_store(StoreSettings(url=url))
        sinks = [SinkServer(SinkConfig(starttls="off", keep_messages=False)) for _ in range(args.domains)]
        for sink in sinks:
            await sink.start()
        try:
            routes = {f"d{n}.bench": {"kind": "host", "host": "127.0.0.1", "port": sink.port, "tls": "none"}
                      for n, sink in enumerate(sinks)}
            settings = DeliverySettings(routes=RouteSettings(domains=routes), claim_batch=args.batch)
            now = time.time()
            for number in range(args.messages):
                rcpts = [NewRecipient(f"u{number}.{r}@d{(number + r) % args.domains}.bench")
                         for r in range(args.recipients)]
                await store.enqueue(NewMessage(id=f"bench{number:08d}", sender="bench@sender.example",
                                               recipients=rcpts, data=BODY, received_at=now))
            expected = args.messages * args.recipients
            service = DeliveryService.from_settings(store, settings, hostname="bench.localhost")
            started = time.perf_counter()
            await service.start()
            async with asyncio.timeout(args.timeout):
                while (await store.count_by_state()).get("delivered", 0) < expected:
                    await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            await service.stop(grace=5)
            connections = sum(s.stats.connections_opened for s in sinks)
            transactions = sum(s.stats.messages for s in sinks)
            print(f"store={store.kind} messages={args.messages} recipients={expected} domains={args.domains}")
            print(f"  {elapsed:.2f} s: {expected / elapsed:.0f} recipients/s, {transactions / elapsed:.0f} "
                  f"transactions/s over {connections} connections")
        finally:
            for sink in sinks:
                await sink.stop()
            await store.close()


async def client_only(args: argparse.Namespace) -> None:
    """One connection, ``--messages`` transactions of ``--recipients`` each, PIPELINING on and off."""
    for pipelining in (True, False):
        async with SinkServer(SinkConfig(starttls="off", keep_messages=False)) as sink:
            options = ClientOptions("bench.localhost", DeliverySettings().timeouts, tls="none",
                                    max_messages=args.messages + 1, pipelining=pipelining)
            conn = DeliveryConnection(Target("sink", "127.0.0.1", sink.port), options, TlsFallbackMemory(1))
            message = NewMessage(id="bench", sender="bench@sender.example",
                                 recipients=[NewRecipient(f"u{r}@d.bench") for r in range(args.recipients)],
                                 data=BODY, received_at=0.0)
            started = time.perf_counter()
            for _ in range(args.messages):
                await conn.send(message, message.data, message.recipients)
            elapsed = time.perf_counter() - started
            await conn.close()
            print(f"pipelining={'on ' if pipelining else 'off'} {args.messages / elapsed:.0f} transactions/s "
                  f"({args.recipients} recipients each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--recipients", type=int, default=2)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--batch", type=int, default=200, help="claim batch")
    parser.add_argument("--store-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--client-only", action="store_true")
    args = parser.parse_args()
    if min(args.messages, args.recipients, args.domains, args.batch) < 1:
        parser.error("counts must be at least 1")
    with open(os.devnull, "w") as devnull:
        configure_logging(args.log_level, "json", stream=devnull)
        asyncio.run(client_only(args) if args.client_only else end_to_end(args))


if __name__ == "__main__":
    main()

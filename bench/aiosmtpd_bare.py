"""The "bare aiosmtpd" reference: aiosmtpd's SMTP protocol with a handler that answers 250 and keeps nothing.

It is the floor under the relay's SMTP side — the same library and event loop, with none of the relay's
work (no store, no fsync, no limits, no logging) — so relay / bare-aiosmtpd shows what the relay's own
work costs. Like the relay it runs on the main event loop of its own process (``loop.create_server``,
not aiosmtpd's threaded Controller) and uses uvloop when it is installed, as ``relay serve`` does.

Run: ``python bench/aiosmtpd_bare.py --listen 127.0.0.1:PORT``. Stops on SIGTERM/SIGINT.
Invariant: it listens where it is told and nowhere else; the harness only ever tells it loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    """Accept every message and throw it away."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: discarded"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = DiscardHandler()
    factory: Callable[[], SMTP] = lambda: SMTP(handler, hostname="aiosmtpd-bench.localhost")  # noqa: E731
    server = await loop.create_server(factory, host=host, port=port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def _runner() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop  # the relay uses it when installed; the reference should too
    except ImportError:
        return lambda coro: asyncio.run(coro)  # type: ignore[arg-type]  # a coroutine, as run() wants
    return lambda coro: uvloop.run(coro)  # type: ignore[arg-type]  # a coroutine, as run() wants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:2530", help="host:port (default 127.0.0.1:2530)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    _runner()(serve(host, int(port)))


if __name__ == "__main__":
    main()

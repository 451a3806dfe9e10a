"""An asyncio SMTP load client that measures acceptance latency: end of DATA (the final ".") to the reply.

The message has smtp-source's shape — From/To/Date/Message-Id headers, then ``size`` bytes of 80-column
lines, one recipient, a new connection per message, no pipelining — so latency and throughput figures
describe the same work. ``concurrency`` sessions run at once until ``count`` messages were attempted.

Per message: connect, greeting, EHLO, MAIL, RCPT, DATA, the body (written and drained), then the clock
starts, ``.`` is sent, and it stops at the reply. A reply other than the expected one is recorded as an
error for that message (code and text) and the run goes on, so a server that answers 4xx under load
shows up as a count of errors, not as a crashed harness.

Invariant: bounded — every read has a timeout, the whole run has a deadline, and only the loopback
address given is ever contacted. Run alone: ``python bench/loadclient.py --port N [--count …]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from common import LOOPBACK, RECIPIENT, SENDER, percentile

STEP_TIMEOUT = 60.0


@dataclass
class LoadResult:
    """Latencies (seconds, accepted messages only), errors by text, and the run's wall-clock time."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    attempted: int = 0

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, object]:
        return {"attempted": self.attempted, "accepted": self.accepted, "seconds": round(self.seconds, 3),
                "p50_ms": round(percentile(self.latencies, 50) * 1000, 3),
                "p99_ms": round(percentile(self.latencies, 99) * 1000, 3),
                "errors": dict(self.errors)}


class ReplyError(Exception):
    """The server answered something other than what the step expects."""


def message_body(size: int, index: int) -> bytes:
    """Headers like smtp-source's, then ``size`` payload bytes in CRLF lines of 80 bytes (no dot-stuffing
    needed: no line starts with ".")."""
    headers = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {email.utils.formatdate()}\r\n"
               f"Message-Id: <{index}.{time.time_ns()}@loadclient.localhost>\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    full, rest = divmod(size, len(line))
    tail = b"X" * max(0, rest - 2) + b"\r\n" if rest else b""
    return headers + line * full + tail


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One (possibly multi-line) reply: its code and its last line's text."""
    while True:
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        if not line:
            raise ReplyError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            text = line.decode(errors="replace").strip()
            try:
                return int(line[:3]), text
            except ValueError:
                raise ReplyError(f"not an SMTP reply: {text[:60]}") from None


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes,
                  expect: int) -> None:
    writer.write(line)
    code, text = await read_reply(reader)
    if code != expect:
        raise ReplyError(_generic(text))


def _generic(text: str) -> str:
    # Queue ids and the like make every reply unique; keep code + enhanced code + words for counting.
    words = text.split()
    return " ".join(words[:2] + [w for w in words[2:] if not any(ch.isdigit() for ch in w)])[:80]


async def send_one(port: int, body: bytes) -> float:
    """One message on a fresh connection; the seconds from sending "." to the 250."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), STEP_TIMEOUT)
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise ReplyError(_generic(text))
        await command(reader, writer, b"EHLO loadclient.localhost\r\n", 250)
        await command(reader, writer, f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        await command(reader, writer, f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await command(reader, writer, b"DATA\r\n", 354)
        writer.write(body)
        await asyncio.wait_for(writer.drain(), STEP_TIMEOUT)
        started = time.perf_counter()
        writer.write(b".\r\n")
        code, text = await read_reply(reader)
        latency = time.perf_counter() - started
        if code != 250:
            raise ReplyError(_generic(text))
        with contextlib.suppress(ReplyError, OSError, TimeoutError):
            await command(reader, writer, b"QUIT\r\n", 221)
        return latency
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def run_load(port: int, count: int, concurrency: int, size: int, deadline: float) -> LoadResult:
    """Send ``count`` messages over ``concurrency`` sessions at once; stop at ``deadline`` seconds."""
    result = LoadResult()
    remaining = iter(range(count))
    bodies = [message_body(size, i) for i in range(min(count, 64))]

    async def session() -> None:
        for index in remaining:
            result.attempted += 1
            try:
                result.latencies.append(await send_one(port, bodies[index % len(bodies)]))
            except ReplyError as exc:
                result.errors[str(exc)] += 1
            except TimeoutError:
                result.errors["timeout"] += 1
            except OSError as exc:
                result.errors[f"{type(exc).__name__}: {exc.strerror or exc}"] += 1

    started = time.perf_counter()
    tasks = [asyncio.create_task(session()) for _ in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), deadline)
    except TimeoutError:
        result.errors[f"run stopped at the {deadline:.0f} s deadline"] += 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.perf_counter() - started
    return result


def run_load_sync(port: int, count: int, concurrency: int, size: int, deadline: float) -> LoadResult:
    """:func:`run_load` on a fresh event loop (uvloop when installed, like the servers)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_load(port, count, concurrency, size, deadline))
    return uvloop.run(run_load(port, count, concurrency, size, deadline))


def main() -> None:
    parser = argparse.ArgumentParser(description="SMTP acceptance latency on loopback (end of DATA → 250)")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240, help="payload bytes after the headers")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds before the run is cut short")
    args = parser.parse_args()
    result = run_load_sync(args.port, args.count, args.concurrency, args.size, args.deadline)
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()

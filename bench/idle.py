"""Idle connections: hold 1k, 5k, then 10k open SMTP sessions on the relay and report its memory.

Each connection reads the greeting and (unless ``--no-ehlo``) says EHLO, then stays silent — a client
pool's idle sessions. After each step, once things settle, the server's VmRSS/VmHWM, threads and open
descriptors are read from /proc/PID/status and /proc/PID/fd, and one message is sent on a fresh
connection to show the server still serves (its end-of-DATA latency is reported). The bare aiosmtpd
(same library and loop, nothing else) is measured the same way as the reference point.

Bounded: the steps are capped by ``--steps`` (default 1000,5000,10000), the whole server run by
``--timeout``; RLIMIT_NOFILE is raised for the harness and the server it starts (which inherits it);
every connection is closed and the server stopped by PID at the end. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    LOOPBACK,
    HarnessError,
    Processes,
    command_line,
    machine_section,
    markdown_table,
    proc_status,
    raise_nofile,
    terminate_on_sigterm,
)
from loadclient import ReplyError, message_body, read_reply, send_one
from references import BareAiosmtpd, Reference, RelayServer, add_relay_options, prepare_relay

OPEN_AT_ONCE = 200  # connection attempts in flight while opening a step's connections


@dataclass(frozen=True)
class Step:
    """What the server looked like with ``held`` idle connections open."""

    target: int
    held: int
    failed: int
    dropped: int
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int
    probe_ms: float
    first_error: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Memory of the relay holding many idle SMTP connections")
    parser.add_argument("--steps", default="1000,5000,10000",
                        help="connection counts (default 1000,5000,10000)")
    parser.add_argument("--servers", default="relay,aiosmtpd", help="relay and/or aiosmtpd (default both)")
    parser.add_argument("--no-ehlo", action="store_true", help="stay silent after the greeting (no EHLO)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading memory")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one server's whole run")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop of the servers: auto = as shipped (uvloop when installed)")
    add_relay_options(parser)
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.step_list = sorted(int(s) for s in args.steps.split(",") if s.strip())
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.step_list or min(args.step_list) < 1 or set(args.server_list) - {"relay", "aiosmtpd"}:
        parser.error("steps must be positive; servers are relay and/or aiosmtpd")
    return args


class IdlePool:
    """The open, idle connections; closes them all on :meth:`close`."""

    def __init__(self, port: int, ehlo: bool) -> None:
        self.port = port
        self.ehlo = ehlo
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.errors: Counter[str] = Counter()

    async def grow_to(self, target: int) -> None:
        gate = asyncio.Semaphore(OPEN_AT_ONCE)

        async def one() -> None:
            async with gate:
                try:
                    self.streams.append(await self._open())
                except (OSError, TimeoutError, ReplyError) as exc:
                    self.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

        await asyncio.gather(*(one() for _ in range(target - len(self.streams))))

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.port), 30)
        try:
            code, text = await read_reply(reader)
            if code != 220:
                raise ReplyError(text[:80])
            if self.ehlo:
                writer.write(b"EHLO idle.localhost\r\n")
                code, text = await read_reply(reader)
                if code != 250:
                    raise ReplyError(text[:80])
        except BaseException:
            writer.close()
            raise
        return reader, writer

    def dropped(self) -> int:
        """Connections the server has closed while they sat idle."""
        return sum(1 for reader, _ in self.streams if reader.at_eof())

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()
        for _, writer in self.streams:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)
        self.streams.clear()


class ServerGone(Exception):
    """The server process is no longer there (a finding about the server, not a harness failure)."""


def server_status(ref: Reference) -> dict[str, int]:
    try:
        return proc_status(ref.pid)
    except (FileNotFoundError, ProcessLookupError):
        raise ServerGone(f"{ref.name} is gone; its log ends:\n{ref.log_tail(10)}") from None


async def measure_server(ref: Reference, args: argparse.Namespace,
                         say: Callable[[str], None]) -> tuple[dict[str, int], list[Step]]:
    await asyncio.sleep(args.settle)
    baseline = server_status(ref)
    pool = IdlePool(ref.port, ehlo=not args.no_ehlo)
    steps = []
    try:
        for target in args.step_list:
            await pool.grow_to(target)
            await asyncio.sleep(args.settle)
            status = server_status(ref)
            try:
                probe = await asyncio.wait_for(send_one(ref.port, message_body(10240, 0)), 60) * 1000
            except (OSError, TimeoutError, ReplyError):
                probe = float("nan")
            step = Step(target, len(pool.streams), sum(pool.errors.values()), pool.dropped(), status["VmRSS"],
                        status["VmHWM"], status["Threads"], status["fds"], probe,
                        pool.errors.most_common(1)[0][0] if pool.errors else "")
            steps.append(step)
            say(f"{ref.name}: {step.held}/{target} idle connections held, RSS {step.rss_kib / 1024:.1f} MiB, "
                f"{step.failed} failed, {step.dropped} dropped, probe {step.probe_ms:.1f} ms")
    finally:
        await pool.close()
    return baseline, steps


def run_server(name: str, args: argparse.Namespace, procs: Processes,
               say: Callable[[str], None]) -> tuple[dict[str, int], list[Step]]:
    ref: Reference
    if name == "relay":
        ref = RelayServer(procs, role="smtp", relay_bin=args.relay_bin, loop=args.loop,
                          max_connections=max(args.step_list) + 1000)
    else:
        ref = BareAiosmtpd(procs, loop=args.loop)
    with ref:
        return asyncio.run(asyncio.wait_for(measure_server(ref, args, say), args.timeout))


def report(args: argparse.Namespace, results: dict[str, tuple[dict[str, int], list[Step]]],
           notes: list[str], elapsed: float) -> str:
    headers = ["server", "connections held", "RSS MiB", "Δ RSS vs idle, MiB", "KiB per connection",
               "peak RSS MiB", "fds", "threads", "probe message ms", "failed / dropped"]
    rows = []
    for name, (baseline, steps) in results.items():
        rows.append([name, "0 (started, idle)", f"{baseline['VmRSS'] / 1024:.1f}", "0", "—",
                     f"{baseline['VmHWM'] / 1024:.1f}", str(baseline["fds"]), str(baseline["Threads"]), "—", "—"])
        for s in steps:
            delta = s.rss_kib - baseline["VmRSS"]
            rows.append([name, f"{s.held} / {s.target}", f"{s.rss_kib / 1024:.1f}", f"{delta / 1024:.1f}",
                         f"{delta / s.held:.1f}" if s.held else "—", f"{s.hwm_kib / 1024:.1f}", str(s.fds),
                         str(s.threads), f"{s.probe_ms:.1f}", f"{s.failed} / {s.dropped}"])
    out = ["# Idle connections", "",
           f"Idle SMTP sessions ({'greeting only' if args.no_ehlo else 'greeting + EHLO'}) held open on one "
           f"server process; memory read from /proc/PID/status after {args.settle:.0f} s of settling at each "
           "step; a probe message on a fresh connection shows the server still serves.", "",
           markdown_table(headers, rows)]
    errors = [f"- {name} at {s.target}: first error: {s.first_error}" for name, (_, steps) in results.items()
              for s in steps if s.first_error]
    if errors or notes:
        out += ["", "## Problems seen", "", *errors, *(f"- {n}" for n in notes)]
    out += ["", "## Machine", "", machine_section(args.relay_source),
            f"- event loop of the servers in this run: {args.loop}",
            "", "## Command", "", f"    {command_line()}", "", f"Total time: {elapsed:.0f} s."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our sockets plus the server's (it inherits the limit), with room for its files and the probes.
    limit = raise_nofile(max(args.step_list) + 2000)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    say(f"RLIMIT_NOFILE {limit}")
    procs = Processes()
    results: dict[str, tuple[dict[str, int], list[Step]]] = {}
    notes: list[str] = []
    failed = False
    try:
        with terminate_on_sigterm(), contextlib.ExitStack() as stack:
            args.relay_source = prepare_relay(args, stack)
            say(f"relay: {args.relay_source}")
            for name in args.server_list:
                try:
                    results[name] = run_server(name, args, procs, say)
                except HarnessError as exc:
                    failed = True
                    notes.append(f"{name}: {exc}")
                    say(notes[-1])
                except TimeoutError:
                    notes.append(f"{name}: the run did not finish within {args.timeout:.0f} s")
                    say(notes[-1])
                except ServerGone as exc:
                    notes.append(str(exc))
                    say(notes[-1])
    finally:
        procs.stop_all()
    text = report(args, results, notes, time.monotonic() - started)
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
